"""Residual building blocks shared by the backbones and the auxiliary heads.

The DKS paper's principle is that auxiliary branches are made of the
backbone's own building blocks. Backbones in `keras_dks.backbones` and the
"residual" heads in `keras_dks.heads` are therefore built from the same
functions here, so a head really is a copy of the stages it stands in for.

Four block kinds are offered (`BLOCK_KINDS`):

- `"basic"`: post-activation basic block (ResNet-18/34, CIFAR ResNets).
- `"bottleneck"`: post-activation bottleneck, stride on the 3x3 conv
  ("ResNet v1.5", as in torchvision and the DHM code). `filters` is the
  block's output width; the inner width is `filters // 4`.
- `"preact_basic"`: the pre-activation block of the DKS authors' WRN code.
- `"preact_bottleneck"`: pre-activation bottleneck (ResNetV2 style).

All blocks are functional: they take a Keras tensor and return one.
"""

import keras

BLOCK_KINDS = ("basic", "bottleneck", "preact_basic", "preact_bottleneck")


def he_normal():
    """He-normal initialiser, untruncated, fan-in (PyTorch `kaiming_normal_`).

    Keras' `HeNormal` draws from a *truncated* normal; the DKS authors' code
    uses an untruncated one, so we build it from `VarianceScaling`
    (`scale=2.0, mode="fan_in", distribution="untruncated_normal"`).

    Returns:
        A new `keras.initializers.VarianceScaling` instance.

    Example:
    ```python
    import keras
    from keras_dks import blocks
    layer = keras.layers.Conv2D(8, 3, kernel_initializer=blocks.he_normal())
    ```
    """
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_in", distribution="untruncated_normal"
    )


def fresh_initializer(initializer):
    """A serialized initializer, so every layer deserializes its own copy.

    Keras 3 gives an unseeded initializer *instance* a fixed random seed when
    it is created, so one instance shared by many layers hands identical
    values to every weight of the same shape (e.g. all 640->640 3x3 convs of
    a WRN group). A config dict is deserialized once per layer, and each copy
    draws its own seed (still reproducible under
    `keras.utils.set_random_seed`).

    Args:
        initializer: anything `keras.initializers.get` takes: a name
            (`"ones"`), a config dict or an initializer instance.

    Returns:
        The initializer's serialized config (a dict), to give to a layer's
        `*_initializer` argument.

    Example:
    ```python
    import keras
    from keras_dks import blocks
    init = blocks.fresh_initializer(blocks.he_normal())
    a = keras.layers.Dense(4, kernel_initializer=init)
    b = keras.layers.Dense(4, kernel_initializer=init)  # a different draw
    ```
    """
    return keras.initializers.serialize(keras.initializers.get(initializer))


class BlockConfig:
    """Settings shared by every layer a block creates.

    Args:
        bn_epsilon: BatchNormalization epsilon. Defaults to `1e-5` (the
            authors' code, PyTorch's default).
        bn_momentum: Keras BatchNormalization momentum. Defaults to `0.9`
            (PyTorch momentum 0.1, the authors' code).
        bn_gamma_initializer: initialiser of BN scales. Defaults to
            `"ones"`.
        sync_batchnorm: use `BatchNormalization(synchronized=True)`, which
            all-reduces batch statistics across replicas under tf.distribute.
            Defaults to `False`.
        kernel_initializer: initialiser of conv kernels. Defaults to `None`,
            meaning `he_normal()` (untruncated He-normal, as in the authors'
            code).
        kernel_regularizer: optional regulariser for conv kernels. Defaults
            to `None`.
        dropout: dropout rate between the two 3x3 convs of pre-activation
            basic blocks (WRN; the paper's dropout variant uses 0.3), 0 to
            disable. Defaults to `0.0`.
        dense_kernel_initializer: initialiser of the heads' classifier
            kernels (the backbone's own, for `keras_dks.backbones`). Defaults
            to `"glorot_uniform"`.
        dense_bias_initializer: initialiser of the heads' classifier biases.
            Defaults to `"zeros"`.

    Initialisers are copied per layer (`fresh_initializer`), so layers of the
    same shape never start from identical values. `replace(**changes)`
    returns a copy with the given attributes changed.

    Example:
    ```python
    from keras_dks import blocks
    config = blocks.BlockConfig(dropout=0.3)    # WRN with dropout
    synced = config.replace(sync_batchnorm=True)
    print(config.sync_batchnorm, synced.sync_batchnorm, synced.dropout)
    # False True 0.3
    ```
    """

    def __init__(
        self,
        bn_epsilon=1e-5,
        bn_momentum=0.9,
        bn_gamma_initializer="ones",
        sync_batchnorm=False,
        kernel_initializer=None,
        kernel_regularizer=None,
        dropout=0.0,
        dense_kernel_initializer="glorot_uniform",
        dense_bias_initializer="zeros",
    ):
        self.bn_epsilon = bn_epsilon
        self.bn_momentum = bn_momentum
        self.bn_gamma_initializer = bn_gamma_initializer
        self.sync_batchnorm = sync_batchnorm
        self.kernel_initializer = kernel_initializer or he_normal()
        self.kernel_regularizer = kernel_regularizer
        self.dropout = dropout
        self.dense_kernel_initializer = dense_kernel_initializer
        self.dense_bias_initializer = dense_bias_initializer

    def replace(self, **changes):
        new = BlockConfig.__new__(BlockConfig)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new


def conv(x, filters, kernel_size, stride, name, config):
    """Bias-free conv with PyTorch-style symmetric padding.

    Keras' `padding="same"` pads stride-2 convs asymmetrically (nothing on
    the top/left for even inputs); the reference code pads `k // 2` on every
    side. Explicit `ZeroPadding2D` + `"valid"` reproduces that exactly
    (for `stride > 1` and `kernel_size > 1`; otherwise `"same"`).

    Args:
        x: input feature map, `(batch, H, W, C)` (a Keras tensor).
        filters: output channels.
        kernel_size: square kernel size (an int).
        stride: stride (an int).
        name: name of the `Conv2D` layer (its padding layer, when there is
            one, is `f"{name}_pad"`).
        config: `BlockConfig`: `kernel_initializer` and
            `kernel_regularizer` of the conv.

    Returns:
        The conv's output, `(batch, ceil(H / stride), ceil(W / stride),
        filters)` for an odd `kernel_size`.

    Example:
    ```python
    import keras
    from keras_dks import blocks
    y = blocks.conv(keras.Input((32, 32, 3)), 16, 3, 2, "stem",
                    blocks.BlockConfig())
    print(y.shape)  # (None, 16, 16, 16)
    ```
    """
    pad = kernel_size // 2
    if stride > 1 and pad > 0:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding=padding,
        use_bias=False,
        kernel_initializer=fresh_initializer(config.kernel_initializer),
        kernel_regularizer=config.kernel_regularizer,
        name=name,
    )(x)


def batch_norm(x, name, config):
    """`BatchNormalization` with the epsilon, momentum, gamma initialiser and
    synchronisation of `config`.

    Args:
        x: input tensor (a Keras tensor), normalised over its last axis.
        name: name of the layer.
        config: `BlockConfig`.

    Returns:
        The normalised tensor, same shape as `x`.

    Example:
    ```python
    import keras
    from keras_dks import blocks
    y = blocks.batch_norm(keras.Input((8, 8, 4)), "bn", blocks.BlockConfig())
    ```
    """
    return keras.layers.BatchNormalization(
        epsilon=config.bn_epsilon,
        momentum=config.bn_momentum,
        gamma_initializer=fresh_initializer(config.bn_gamma_initializer),
        synchronized=config.sync_batchnorm,
        name=name,
    )(x)


def bn_relu(x, name, config):
    """`batch_norm` then ReLU (layers `f"{name}_bn"` and `f"{name}_relu"`).

    Args:
        x: input tensor (a Keras tensor).
        name: prefix of the two layers' names.
        config: `BlockConfig`.

    Returns:
        The activated tensor, same shape as `x`.

    Example:
    ```python
    import keras
    from keras_dks import blocks
    y = blocks.bn_relu(keras.Input((8, 8, 4)), "final", blocks.BlockConfig())
    ```
    """
    x = batch_norm(x, f"{name}_bn", config)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _shortcut(x, source, filters, stride, name, config, with_bn=False):
    """`x` itself when the block keeps its shape, else a 1x1 conv (+ BN in
    post-activation blocks) of `source` to the new width and resolution."""
    if x.shape[-1] == filters and stride == 1:
        return x
    shortcut = conv(source, filters, 1, stride, f"{name}_convdim", config)
    if with_bn:
        shortcut = batch_norm(shortcut, f"{name}_convdim_bn", config)
    return shortcut


def _bottleneck_convs(x, filters, stride, name, config):
    """1x1 conv to `filters // 4`, BN-ReLU, 3x3 conv with the stride,
    BN-ReLU, 1x1 conv to `filters`: the body of both bottlenecks."""
    inner = max(filters // 4, 1)
    y = conv(x, inner, 1, 1, f"{name}_conv0", config)
    y = bn_relu(y, f"{name}_mid0", config)
    y = conv(y, inner, 3, stride, f"{name}_conv1", config)
    y = bn_relu(y, f"{name}_mid1", config)
    return conv(y, filters, 1, 1, f"{name}_conv2", config)


def preact_basic_block(x, filters, stride, name, config):
    """The WRN block of the DKS authors' code.

    o1 = ReLU(BN(x)); y = conv3x3(o1, stride); o2 = ReLU(BN(y));
    [dropout, if `config.dropout`]; z = conv3x3(o2); out = z +
    (conv1x1(o1, stride) if the width or the resolution changes, else x).

    Args:
        x: input feature map, `(batch, H, W, C)` (a Keras tensor).
        filters: output width of the block.
        stride: stride of the block (on its first 3x3 conv and the shortcut).
        name: prefix of the names of every layer the block creates.
        config: `BlockConfig`.

    Returns:
        The block's output, `(batch, ceil(H / stride), ceil(W / stride),
        filters)`.

    Example:
    ```python
    import keras
    from keras_dks import blocks
    y = blocks.preact_basic_block(keras.Input((16, 16, 16)), 32, 2, "g1b0",
                                  blocks.BlockConfig())
    print(y.shape)  # (None, 8, 8, 32)
    ```
    """
    o1 = bn_relu(x, f"{name}_preact", config)
    y = conv(o1, filters, 3, stride, f"{name}_conv0", config)
    o2 = bn_relu(y, f"{name}_mid", config)
    if config.dropout:
        o2 = keras.layers.Dropout(config.dropout, name=f"{name}_drop")(o2)
    z = conv(o2, filters, 3, 1, f"{name}_conv1", config)
    shortcut = _shortcut(x, o1, filters, stride, name, config)
    return keras.layers.Add(name=f"{name}_add")([z, shortcut])


def preact_bottleneck_block(x, filters, stride, name, config):
    """Pre-activation bottleneck (ResNetV2 style), output width `filters`.

    o1 = ReLU(BN(x)); z = conv1x1 (to `filters // 4`), BN-ReLU, conv3x3
    (stride), BN-ReLU, conv1x1 (to `filters`) of o1; out = z +
    (conv1x1(o1, stride) if the width or the resolution changes, else x).

    Args:
        x: input feature map, `(batch, H, W, C)` (a Keras tensor).
        filters: output width of the block.
        stride: stride of the block (on its 3x3 conv and the shortcut).
        name: prefix of the names of every layer the block creates.
        config: `BlockConfig`.

    Returns:
        The block's output, `(batch, ceil(H / stride), ceil(W / stride),
        filters)`.

    Example:
    ```python
    import keras
    from keras_dks import blocks
    y = blocks.preact_bottleneck_block(keras.Input((16, 16, 64)), 128, 2,
                                       "s1b0", blocks.BlockConfig())
    print(y.shape)  # (None, 8, 8, 128)
    ```
    """
    o1 = bn_relu(x, f"{name}_preact", config)
    z = _bottleneck_convs(o1, filters, stride, name, config)
    shortcut = _shortcut(x, o1, filters, stride, name, config)
    return keras.layers.Add(name=f"{name}_add")([z, shortcut])


def basic_block(x, filters, stride, name, config):
    """Post-activation basic block (He et al. 2016, ResNet-18/34).

    out = ReLU(BN(conv3x3(ReLU(BN(conv3x3(x, stride))))) + shortcut), the
    shortcut being `x`, or conv1x1(x, stride) + BN when the width or the
    resolution changes.

    Args:
        x: input feature map, `(batch, H, W, C)` (a Keras tensor).
        filters: output width of the block.
        stride: stride of the block (on its first 3x3 conv and the shortcut).
        name: prefix of the names of every layer the block creates.
        config: `BlockConfig`.

    Returns:
        The block's output, `(batch, ceil(H / stride), ceil(W / stride),
        filters)`.

    Example:
    ```python
    import keras
    from keras_dks import blocks
    y = blocks.basic_block(keras.Input((16, 16, 64)), 128, 2, "conv3_block0",
                           blocks.BlockConfig())
    print(y.shape)  # (None, 8, 8, 128)
    ```
    """
    y = conv(x, filters, 3, stride, f"{name}_conv0", config)
    y = bn_relu(y, f"{name}_mid", config)
    y = conv(y, filters, 3, 1, f"{name}_conv1", config)
    y = batch_norm(y, f"{name}_bn1", config)
    shortcut = _shortcut(x, x, filters, stride, name, config, with_bn=True)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def bottleneck_block(x, filters, stride, name, config):
    """Post-activation bottleneck, stride on the 3x3 conv (ResNet v1.5).

    conv1x1 (to `filters // 4`), BN-ReLU, conv3x3 (stride), BN-ReLU,
    conv1x1 (to `filters`), BN; plus the shortcut (`x`, or conv1x1(x,
    stride) + BN when the width or the resolution changes); ReLU. As in
    torchvision and the DHM code.

    Args:
        x: input feature map, `(batch, H, W, C)` (a Keras tensor).
        filters: output width of the block.
        stride: stride of the block (on its 3x3 conv and the shortcut).
        name: prefix of the names of every layer the block creates.
        config: `BlockConfig`.

    Returns:
        The block's output, `(batch, ceil(H / stride), ceil(W / stride),
        filters)`.

    Example:
    ```python
    import keras
    from keras_dks import blocks
    y = blocks.bottleneck_block(keras.Input((16, 16, 64)), 256, 1,
                                "conv2_block0", blocks.BlockConfig())
    print(y.shape)  # (None, 16, 16, 256)
    ```
    """
    y = _bottleneck_convs(x, filters, stride, name, config)
    y = batch_norm(y, f"{name}_bn2", config)
    shortcut = _shortcut(x, x, filters, stride, name, config, with_bn=True)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


_BLOCKS = {
    "basic": basic_block,
    "bottleneck": bottleneck_block,
    "preact_basic": preact_basic_block,
    "preact_bottleneck": preact_bottleneck_block,
}


def is_preact(kind):
    """Whether a block kind is a pre-activation one (its name starts with
    `"preact"`).

    Args:
        kind: a block kind, e.g. one of `BLOCK_KINDS`.

    Returns:
        A bool.

    Example:
    ```python
    from keras_dks import blocks
    print(blocks.is_preact("preact_basic"), blocks.is_preact("basic"))
    # True False
    ```
    """
    return kind.startswith("preact")


def residual_stage(x, filters, blocks, stride, kind, name, config):
    """`blocks` blocks of `kind`; only the first one has the stride.

    Args:
        x: input feature map, `(batch, H, W, C)` (a Keras tensor).
        filters: output width of every block.
        blocks: number of blocks (0 returns `x` unchanged).
        stride: stride of the first block.
        kind: one of `BLOCK_KINDS`.
        name: prefix of the blocks' names; block `b` is
            `f"{name}_block{b}"`.
        config: `BlockConfig`.

    Returns:
        The stage's output, `(batch, ceil(H / stride), ceil(W / stride),
        filters)` (`x` itself when `blocks` is 0).

    Raises:
        ValueError: `kind` is not one of `BLOCK_KINDS`.

    Example:
    ```python
    import keras
    from keras_dks import blocks
    inputs = keras.Input((32, 32, 16))
    x = blocks.residual_stage(inputs, 32, 2, 2, "preact_basic", "group1",
                              blocks.BlockConfig())
    print(x.shape)  # (None, 16, 16, 32)
    ```
    """
    if kind not in _BLOCKS:
        raise ValueError(
            f"Unknown block kind {kind!r}. Use one of {list(BLOCK_KINDS)}."
        )
    for b in range(blocks):
        x = _BLOCKS[kind](
            x, filters, stride if b == 0 else 1, f"{name}_block{b}", config
        )
    return x
