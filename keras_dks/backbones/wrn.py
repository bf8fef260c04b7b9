"""Pre-activation Wide ResNet, as in the DKS authors' code.

The authors' `wrn_DKS/resnet.py` is the functional PyTorch WRN of
Zagoruyko & Komodakis (szagoruyko/wide-residual-networks, `pytorch/`) with
two auxiliary branches added. `WideResNet` rebuilds its backbone layer for
layer and describes the two branches (`dks_head_stages`) so `DKSModel`
attaches exactly the authors' heads.
"""

import keras

from keras_dks import blocks
from keras_dks import heads
from keras_dks.backbones.base import DKSBackbone
from keras_dks.backbones.base import blocks_per_stage
from keras_dks.backbones.base import check_input_shape
from keras_dks.backbones.base import check_num_classes
from keras_dks.backbones.base import residual_stages
from keras_dks.blocks import fresh_initializer


@keras.saving.register_keras_serializable(package="keras_dks")
class WideResNet(DKSBackbone):
    """Pre-activation Wide ResNet-`depth`-`width` (Zagoruyko & Komodakis).

    The backbone of the DKS authors' CIFAR code, layer for layer
    (n = (depth - 4) / 6 blocks per group, k = width):

        conv3x3(3 -> 16, no bias)
        group0: n pre-activation basic blocks, 16k channels, stride 1
        group1: n blocks, 32k channels, stride 2
        group2: n blocks, 64k channels, stride 2
        BN-ReLU ("final_bn", "final_relu") -> global average pool -> Dense

    A block is o1 = ReLU(BN(x)); y = conv3x3(o1, stride);
    o2 = ReLU(BN(y)); [dropout]; z = conv3x3(o2); out = z + shortcut, where
    the shortcut is conv1x1(o1, stride) when the width changes and x
    otherwise (`keras_dks.blocks.preact_basic_block`). Stride-2 convs pad
    one pixel on every side, as PyTorch does (Keras' `padding="same"` would
    pad only bottom/right).

    The layers "group0", "group1", "group2" are the group outputs (the last
    block's addition); "group0" and "group1" are where the authors attach
    their auxiliary heads (`dks_taps`, `dks_head_stages`). Paper vs code:
    the DKS paper's section 4.1 speaks of three auxiliary classifiers, each
    "after the corresponding building block having a down-sampling layer";
    the released code has two, on the outputs of group0 and group1, i.e. on
    the inputs of the two stride-2 groups. These taps follow the code; pass
    `DKSModel(taps=[...])` with other layer names for another placement.

    Initialisation, as in the authors' code (`utils.py` of szagoruyko's
    PyTorch WRN): convs He-normal, untruncated, fan-in (`kaiming_normal`);
    BN gamma ~ U[0, 1) (`torch.rand`), beta 0, epsilon 1e-5, PyTorch
    momentum 0.1 (Keras momentum 0.9); the classifier's kernel He-normal
    untruncated fan-in (`kaiming_normal` on the (out, in) weight, whose
    fan-in is `in`) and its bias zero. These are neither PyTorch's
    `nn.Linear` default (kaiming-uniform with a=sqrt(5) and a uniform bias)
    nor Keras' `Dense` default (Glorot-uniform kernel, zero bias).

    The authors pool with `avg_pool2d(8)` on the 8x8 map of a 32x32 input;
    global average pooling is the same there and also works for other input
    sizes.

    Args:
        depth: total depth, 6n + 4 with n >= 1 (16, 22, 28, 40, ...).
        width: widening factor k (a positive number); group widths are
            int(16k), int(32k), int(64k), as in the authors' code.
        num_classes: classifier width, an integer >= 2 (may be None with
            include_top=False).
        dropout: dropout rate in [0, 1) between the two convs of every block
            (the paper's "WRN-28-10 dropout" uses 0.3), 0 to disable.
            Defaults to `0.0`.
        input_shape: (height, width, channels) of the images. Defaults to
            `(32, 32, 3)` (CIFAR).
        include_top: if True, outputs logits (no softmax) of shape
            (batch, num_classes); if False, the 4-D map after the final
            BN-ReLU (layer "final_relu"), without pooling. Defaults to
            `True`.
        sync_batchnorm: build every BatchNormalization with
            `synchronized=True` (statistics all-reduced across replicas
            under `tf.distribute`). Defaults to `False`.
        name: model name. Defaults to `None`, meaning "wrn_<depth>_<width>".
        **kwargs: passed on to `keras.Model` (e.g. `trainable`).

    Raises:
        ValueError: `depth` is not 6n + 4 with n >= 1, `width` gives a group
            width below 1, `dropout` is outside [0, 1), `num_classes` is
            missing with `include_top=True` or is not an integer >= 2, or
            `input_shape` does not have 3 entries.

    Example:
    ```python
    import keras, keras_dks
    from keras_dks import backbones
    backbone = backbones.WideResNet(depth=16, width=1, num_classes=10)
    print(backbone(keras.random.uniform((2, 32, 32, 3))).shape)  # (2, 10)
    print(backbone.dks_taps)                   # ['group1', 'group0']
    print(backbone.dks_head_stages("group1"))
    # [HeadStage(filters=128, blocks=2, stride=2)]
    model = keras_dks.DKSModel(backbone)  # the authors' WRN-DKS
    ```
    """

    def __init__(self, depth, width, num_classes, dropout=0.0, input_shape=(32, 32, 3),
                 include_top=True, sync_batchnorm=False, name=None, **kwargs):
        n = blocks_per_stage(depth, 4, "WideResNet", "10, 16, 22, 28, 40")
        if not width > 0 or int(16 * width) < 1:
            raise ValueError(
                f"WideResNet width must be positive (int(16 * width) >= 1); got "
                f"width={width!r}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}.")
        num_classes = check_num_classes(num_classes, include_top)
        input_shape = check_input_shape(input_shape)
        widths = [int(v * width) for v in (16, 32, 64)]
        config = _wrn_block_config(sync_batchnorm, dropout)

        inputs = keras.Input(shape=input_shape, name="images")
        x = blocks.conv(inputs, 16, 3, 1, "conv0", config)
        x = residual_stages(
            x,
            [(f"group{g}", w, n, stride)
             for g, (w, stride) in enumerate(zip(widths, (1, 2, 2)))],
            "preact_basic",
            config,
        )
        x = blocks.bn_relu(x, "final", config)
        if include_top:
            x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
            x = keras.layers.Dense(
                num_classes,
                kernel_initializer=fresh_initializer(blocks.he_normal()),
                bias_initializer="zeros",
                dtype="float32",  # logits stay float32 under mixed precision
                name="fc",
            )(x)
        super().__init__(
            inputs=inputs,
            outputs=x,
            name=name or f"wrn_{depth}_{_width_str(width)}",
            **kwargs,
        )
        # The authors' heads: from group0 a copy of group1 (n blocks, 32k,
        # stride 2) then a group2 of n // 2 blocks (64k, stride 2; at least
        # one, where the authors' code would build an empty group for n = 1);
        # from group1 a group2 of n blocks at double width (128k, stride 2).
        self.declare_heads(
            {
                "group1": [heads.HeadStage(2 * widths[2], n, 2)],
                "group0": [heads.HeadStage(widths[1], n, 2),
                           heads.HeadStage(widths[2], max(n // 2, 1), 2)],
            },
            "preact_basic",
        )
        self.declare_config(
            depth=depth, width=width, num_classes=num_classes, dropout=dropout,
            input_shape=input_shape, include_top=include_top,
            sync_batchnorm=sync_batchnorm,
        )

    def dks_block_config(self):
        """A new `blocks.BlockConfig` with the backbone's settings."""
        return _wrn_block_config(self.sync_batchnorm, self.dropout)


def _width_str(width):
    return str(int(width)) if float(width).is_integer() else str(width)


def _wrn_block_config(sync_batchnorm, dropout):
    return blocks.BlockConfig(
        bn_epsilon=1e-5,
        bn_momentum=0.9,  # PyTorch momentum 0.1
        bn_gamma_initializer=fresh_initializer(
            keras.initializers.RandomUniform(0.0, 1.0)  # torch.rand
        ),
        sync_batchnorm=sync_batchnorm,
        kernel_initializer=fresh_initializer(blocks.he_normal()),
        dropout=dropout,
        # The authors' heads end in the same He-normal, zero-bias Linear.
        dense_kernel_initializer=blocks.he_normal(),
        dense_bias_initializer="zeros",
    )


def wide_resnet(depth, width, num_classes, **kwargs):
    """WRN-`depth`-`width` of the DKS authors' code:
    `WideResNet(depth, width, num_classes, **kwargs)`.

    Args:
        depth: total depth, 6n + 4 (e.g. 16, 28).
        width: widening factor k (e.g. 10 for WRN-28-10).
        num_classes: classifier width (None with `include_top=False`).
        **kwargs: the other arguments of `WideResNet` (`dropout`,
            `input_shape`, `include_top`, `sync_batchnorm`, `name`).

    Returns:
        A `WideResNet`.

    Raises:
        ValueError: see `WideResNet`.

    Example:
    ```python
    from keras_dks import backbones
    wrn = backbones.wide_resnet(28, 10, num_classes=100)
    # 36,536,884 trainable parameters, as the DKS authors' backbone,
    # plus 17,952 BatchNormalization statistics:
    print(wrn.count_params())  # 36554836
    ```
    """
    return WideResNet(depth, width, num_classes, **kwargs)
