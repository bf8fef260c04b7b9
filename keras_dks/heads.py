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
HeadStage.__doc__ = """One stage of a residual head.

Args:
    filters: output width of every block of the stage.
    blocks: number of residual blocks.
    stride: stride of the first block (2 halves the resolution).
"""


def classifier(x, num_classes, name, config=None):
    """Global average pooling + Dense, kept in float32 under mixed precision
    (float64 when `keras.config.floatx()` is float64)."""
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
    """Residual stages, BN-ReLU for pre-activation blocks, pool, Dense.

    Args:
        x: the tapped feature map.
        stages: list of `HeadStage`.
        num_classes: classifier width.
        name: head name; every layer of the head is prefixed with it.
        kind: block kind (see `keras_dks.blocks.BLOCK_KINDS`).
        config: `keras_dks.blocks.BlockConfig`.
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
    """Paper ablation: average pooling + Dense."""
    return classifier(x, num_classes, name)


def conv_head(x, num_classes, name, config):
    """Paper ablation: one 3x3 conv-BN-ReLU + average pooling + Dense."""
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
        width: multiplier on every stage width.
        depth: if given, the block count of every stage.
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
