"""Input pipelines of the paper's recipes (tf.data).

- `cifar`: reflect-pad 4 + random crop + flip, per-channel normalisation
  (the DKS authors' CIFAR pipeline), for any fixed-size TFDS dataset.
- `imagenet`: random-resized crop + flip / resize 256 + central crop 224.
- `fashion_mnist`: real Fashion-MNIST from IDX files, offline.
- `pipelines`: TFDS loading, normalisation and `measure_throughput`, the
  speed of a pipeline without a model.

Example:
```python
from keras_dks.data import cifar, pipelines
raw, info = pipelines.load_tfds("cifar100", "train", shuffle_files=True)
train = cifar.make_dataset(raw, training=True, batch_size=128)
print(pipelines.measure_throughput(train, steps=50))
```
"""

from keras_dks.data import cifar
from keras_dks.data import fashion_mnist
from keras_dks.data import imagenet
from keras_dks.data import pipelines
from keras_dks.data.pipelines import load_tfds
from keras_dks.data.pipelines import measure_throughput

__all__ = [
    "cifar",
    "fashion_mnist",
    "imagenet",
    "load_tfds",
    "measure_throughput",
    "pipelines",
]
