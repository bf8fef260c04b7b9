"""Backbones that know where and how the DKS paper attaches its heads.

Each model is a functional `keras.Model` subclass (keras-hub style: the
constructor builds the graph, `get_config` returns its arguments) that
outputs logits, or the final feature map with `include_top=False`. They
name their stage ends and tell `keras_dks.DKSModel` which stages to tap
(`dks_taps`, deepest first) and which residual stages each auxiliary head
is made of (`dks_head_stages(tap)`, `dks_block_kind`, `dks_block_config()`):
the protocol `DKSBackbone` declares (`keras_dks.backbones.base`).

- `WideResNet` / `wide_resnet`: the pre-activation WRN of the DKS authors'
  CIFAR code, with their auxiliary branches.
- `CifarResNet` / `resnet_cifar`: CIFAR ResNet-(6n+2) (ResNet-32, -110).
- `ResNet(depth)` / `resnet18`, `resnet34`: ImageNet ResNets with basic
  blocks; `resnet50`, `resnet101`, `resnet152`: with bottlenecks
  (torchvision's "v1.5", unlike `keras.applications.ResNet50`). One builder
  driven by the table `resnet.IMAGENET_RESNETS`; heads as in the DHM code.

Example:
```python
import keras_dks
from keras_dks import backbones
backbone = backbones.wide_resnet(16, 2, num_classes=10)
model = keras_dks.DKSModel(backbone)   # heads after group0 and group1
```
"""

from keras_dks.backbones.base import DKSBackbone
from keras_dks.backbones.resnet import CifarResNet
from keras_dks.backbones.resnet import ResNet
from keras_dks.backbones.resnet import resnet18
from keras_dks.backbones.resnet import resnet50
from keras_dks.backbones.resnet import resnet101
from keras_dks.backbones.resnet import resnet152
from keras_dks.backbones.resnet import resnet34
from keras_dks.backbones.resnet import resnet_cifar
from keras_dks.backbones.wrn import WideResNet
from keras_dks.backbones.wrn import wide_resnet

__all__ = [
    "CifarResNet",
    "DKSBackbone",
    "ResNet",
    "WideResNet",
    "resnet18",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet34",
    "resnet_cifar",
    "wide_resnet",
]
