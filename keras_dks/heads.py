"""Auxiliary classifier heads.

A head maps a tapped feature map to logits. The DKS paper (Sec. 3.2 and
Table 3) shows that the head design decides whether deep supervision helps:
heads made of the backbone's own residual blocks, with as many stride-2
steps between the tap and the classifier as the backbone has, beat simple
"pool + FC" heads by several points. `"residual"` builds those; `"simple"`
and `"conv"` are the paper's ablation baselines.

Custom heads are callables
`head(features, num_downsamples, num_classes, name) -> logits`.

Backbones can describe their own heads exactly (the `keras_dks.backbones`
models do, reproducing the DKS authors' code) by defining
`dks_head_stages(tap_name) -> list[HeadStage]`, `dks_block_kind` and
`dks_block_config()`; see `keras_dks.backbones.wrn`.
"""

import collections

import keras

from keras_dks import blocks

HEAD_KINDS = ("residual", "simple", "conv")

HeadStage = collections.namedtuple("HeadStage", ["filters", "blocks", "stride"])
HeadStage.__doc__ = """One stage of a residual head (a named tuple).

Args:
    filters: output width of every block of the stage.
    blocks: number of residual blocks.
    stride: stride of the first block (2 halves the resolution).

Example:
```python
from keras_dks.heads import HeadStage
stage = HeadStage(filters=64, blocks=2, stride=2)
print(stage.filters, stage.blocks, stage.stride)  # 64 2 2
```
"""


def classifier(x, num_classes, name, config=None):
    """Global average pooling + Dense: the classifier that ends every head.

    The Dense layer computes in float32 whatever the dtype policy (so the
    logits stay float32 under mixed precision), or in float64 when
    `keras.config.floatx()` is `"float64"`.

    Args:
        x: a 4D feature map `(batch, H, W, C)` (a Keras tensor).
        num_classes: number of logits.
        name: name of the Dense layer; the pooling layer is named
            `f"{name}_pool"`.
        config: optional `keras_dks.blocks.BlockConfig`, whose
            `dense_kernel_initializer` / `dense_bias_initializer` initialise
            the Dense layer. Default: `BlockConfig()` (Glorot-uniform kernel,
            zero bias).

    Returns:
        The logits, shape `(batch, num_classes)`.

    Example:
    ```python
    import keras
    from keras_dks import heads
    features = keras.Input((8, 8, 16))
    logits = heads.classifier(features, 10, name="main")
    print(logits.shape)  # (None, 10)
    ```
    """
    config = config or blocks.BlockConfig()
    x = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=blocks.fresh_initializer(config.dense_kernel_initializer),
        bias_initializer=blocks.fresh_initializer(config.dense_bias_initializer),
        dtype="float64" if keras.config.floatx() == "float64" else "float32",
        name=name,
    )(x)


def residual_head(x, stages, num_classes, name, kind, config):
    """The paper's auxiliary head: residual stages, then pool + Dense.

    Builds each `HeadStage` with `keras_dks.blocks.residual_stage`, adds a
    final BN-ReLU when the blocks are pre-activation ones (they end on an
    addition, as the backbone does before its own pooling), then
    `classifier`.

    Args:
        x: the tapped feature map, `(batch, H, W, C)` (a Keras tensor).
        stages: list of `HeadStage`, shallowest first.
        num_classes: number of logits.
        name: head name; every layer of the head is prefixed with it and the
            Dense layer is named `name`.
        kind: block kind, one of `keras_dks.blocks.BLOCK_KINDS`.
        config: `keras_dks.blocks.BlockConfig`.

    Returns:
        The head's logits, shape `(batch, num_classes)`.

    Raises:
        ValueError: `kind` is not a block kind.

    Example:
    ```python
    import keras
    from keras_dks import blocks, heads
    features = keras.Input((16, 16, 8))
    stages = [heads.HeadStage(16, 1, 2), heads.HeadStage(32, 1, 2)]
    logits = heads.residual_head(features, stages, 10, "aux1",
                                 "preact_basic", blocks.BlockConfig())
    print(logits.shape)  # (None, 10)
    ```
    """
    for s, stage in enumerate(stages):
        x = blocks.residual_stage(
            x,
            stage.filters,
            stage.blocks,
            stage.stride,
            kind,
            f"{name}_stage{s}",
            config,
        )
    if blocks.is_preact(kind):
        # Pre-activation blocks end on an addition; the backbone's own
        # BN-ReLU before pooling is needed in the head too.
        x = blocks.bn_relu(x, f"{name}_final", config)
    return classifier(x, num_classes, name, config)


def simple_head(x, num_classes, name):
    """Paper ablation head (Table 3): global average pooling + Dense.

    Args:
        x: the tapped feature map, `(batch, H, W, C)` (a Keras tensor).
        num_classes: number of logits.
        name: name of the Dense layer (the pooling is `f"{name}_pool"`).

    Returns:
        The head's logits, shape `(batch, num_classes)`.

    Example:
    ```python
    import keras
    from keras_dks import heads
    logits = heads.simple_head(keras.Input((8, 8, 16)), 10, "aux1")
    print(logits.shape)  # (None, 10)
    ```
    """
    return classifier(x, num_classes, name)


def conv_head(x, num_classes, name, config):
    """Paper ablation head (Table 3): one 3x3 conv-BN-ReLU, pool, Dense.

    The convolution keeps the tapped map's width and resolution (stride 1,
    no bias).

    Args:
        x: the tapped feature map, `(batch, H, W, C)` (a Keras tensor).
        num_classes: number of logits.
        name: head name: the conv is `f"{name}_conv"`, the Dense `name`.
        config: `keras_dks.blocks.BlockConfig`.

    Returns:
        The head's logits, shape `(batch, num_classes)`.

    Example:
    ```python
    import keras
    from keras_dks import blocks, heads
    logits = heads.conv_head(keras.Input((8, 8, 16)), 10, "aux1",
                             blocks.BlockConfig())
    print(logits.shape)  # (None, 10)
    ```
    """
    x = blocks.conv(x, x.shape[-1], 3, 1, f"{name}_conv", config)
    x = blocks.bn_relu(x, f"{name}_conv", config)
    return classifier(x, num_classes, name, config)


def default_residual_stages(
    tap_channels, later_stages, num_downsamples, width=1.0, depth=None
):
    """The paper's head layout for a tap, from the backbone's later stages.

    Rule (from the authors' WRN code and the DHM ImageNet code, see
    METHOD.md section 2):

    - the head copies every backbone stage between the tap and the main
      classifier: same width, stride 2 each;
    - all but the last copied stage keep the backbone's block count; the
      last one gets half of it, at least 2 (WRN-28: n//2 = 2; ResNet: 2);
    - a head with a single stage (the deepest tap) has the backbone's block
      count at *double* width.

    Args:
        tap_channels: channels of the tapped feature map.
        later_stages: `(channels, num_blocks)` of the backbone stages after
            the tap, shallowest first; `num_blocks` may be 0 when unknown.
            When it does not match `num_downsamples`, widths double per step.
        num_downsamples: stride-2 steps between the tap and the final map.
        width: multiplier on every stage width (the result is rounded and
            at least 1).
        depth: if given, the block count of every stage.

    Returns:
        A list of `HeadStage` (one per down-sampling step, each with stride
        2), empty when `num_downsamples` is 0.

    Example:
    ```python
    from keras_dks import heads
    # WRN-28 (4 blocks per group), tap after group0 (width 160):
    stages = heads.default_residual_stages(160, [(320, 4), (640, 4)], 2)
    print(stages)
    # [HeadStage(filters=320, blocks=4, stride=2),
    #  HeadStage(filters=640, blocks=2, stride=2)]
    ```
    """
    if num_downsamples == 0:
        return []
    if len(later_stages) != num_downsamples:
        later_stages = [
            (tap_channels * 2 ** (d + 1), 0) for d in range(num_downsamples)
        ]
    stages = []
    for d, (channels, n) in enumerate(later_stages):
        n = n or 2
        last = d == num_downsamples - 1
        if num_downsamples == 1:
            filters, count = 2 * channels, n
        elif last:
            filters, count = channels, max(2, n // 2)
        else:
            filters, count = channels, n
        if depth is not None:
            count = depth
        stages.append(HeadStage(max(int(round(filters * width)), 1), count, 2))
    return stages
