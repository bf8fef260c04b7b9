"""Post-activation ResNets: CIFAR ResNet-(6n+2) and ImageNet ResNet-18 to -152.

The DKS authors released no ResNet training code (their repository has
only an ImageNet *evaluation* script for torchvision ResNets); the DHM code
(d-li14/DHM, `models/imagenet/resnet.py`: same method and head design) is
the only released training code for these heads, and is what the ImageNet
head layout and the initialisation follow. The models describe their
auxiliary branches (`dks_head_stages`) so `DKSModel` builds them from the
backbone's own block (basic or bottleneck).
"""

import collections
import math

import keras

from keras_dks import blocks
from keras_dks import heads
from keras_dks.backbones.base import DKSBackbone
from keras_dks.backbones.base import blocks_per_stage
from keras_dks.backbones.base import check_input_shape
from keras_dks.backbones.base import check_num_classes
from keras_dks.backbones.base import residual_stages
from keras_dks.blocks import fresh_initializer

ResNetSpec = collections.namedtuple(
    "ResNetSpec", ["block_kind", "stage_blocks", "head_blocks", "params"]
)
ResNetSpec.__doc__ = """One ImageNet ResNet of the table `IMAGENET_RESNETS`.

Args:
    block_kind: `"basic"` or `"bottleneck"` (`keras_dks.blocks`).
    stage_blocks: blocks of conv2_x .. conv5_x (He et al. 2016, Table 1).
    head_blocks: `[[conv4_x-like, conv5_x-like] blocks of the head from
        conv3_x, [double-width conv5_x-like] blocks of the head from
        conv4_x]`, as `branch_layers` in the DHM code
        (d-li14/DHM models/imagenet/resnet.py). Neither the DKS nor the DHM
        paper gives them, so the released code is the reference.
    params: trainable parameters for 1000 classes, as torchvision's model
        zoo lists them (the tests recount them).

Example:
```python
from keras_dks.backbones.resnet import IMAGENET_RESNETS
spec = IMAGENET_RESNETS[50]
print(spec.block_kind, spec.stage_blocks, spec.head_blocks)
# bottleneck (3, 4, 6, 3) [[3, 2], [3]]
```
"""

# The five ImageNet ResNets: `ResNet(depth)` and `resnet18` .. `resnet152`.
IMAGENET_RESNETS = {
    18: ResNetSpec("basic", (2, 2, 2, 2), [[1, 2], [2]], 11_689_512),
    34: ResNetSpec("basic", (3, 4, 6, 3), [[3, 2], [3]], 21_797_672),
    50: ResNetSpec("bottleneck", (3, 4, 6, 3), [[3, 2], [3]], 25_557_032),
    101: ResNetSpec("bottleneck", (3, 4, 23, 3), [[12, 2], [3]], 44_549_160),
    152: ResNetSpec("bottleneck", (3, 8, 36, 3), [[18, 2], [3]], 60_192_808),
}
# Block output widths of conv2_x .. conv5_x (a bottleneck's inner width is
# a quarter of its output width).
STAGE_WIDTHS = {"basic": (64, 128, 256, 512), "bottleneck": (256, 512, 1024, 2048)}
HEAD_BLOCK_PRESETS = ("dhm", "copy")


def _resnet_block_config(sync_batchnorm):
    # torchvision / DHM / fb.resnet.torch: kaiming_normal_(mode="fan_out",
    # nonlinearity="relu") on convs (untruncated), BN gamma 1, beta 0, PyTorch
    # BN defaults eps 1e-5 and momentum 0.1 (Keras 0.9).
    return blocks.BlockConfig(
        bn_epsilon=1e-5,
        bn_momentum=0.9,
        bn_gamma_initializer="ones",
        sync_batchnorm=sync_batchnorm,
        kernel_initializer=fresh_initializer(
            keras.initializers.VarianceScaling(
                2.0, mode="fan_out", distribution="untruncated_normal"
            )
        ),
        # nn.Linear's default kernel for the heads' classifiers; its bias
        # bound depends on fan-in, so head biases start at zero instead.
        dense_kernel_initializer=keras.initializers.VarianceScaling(
            1.0 / 3.0, mode="fan_in", distribution="uniform"
        ),
    )


def _torch_linear(x, num_classes):
    """Dense with PyTorch's `nn.Linear` default initialisation.

    Weights kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), bias
    U(+-1/sqrt(fan_in)): what torchvision and the DHM code leave in place.
    """
    bound = 1.0 / math.sqrt(x.shape[-1])
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=fresh_initializer(
            keras.initializers.VarianceScaling(
                1.0 / 3.0, mode="fan_in", distribution="uniform"
            )
        ),
        bias_initializer=fresh_initializer(
            keras.initializers.RandomUniform(-bound, bound)
        ),
        dtype="float32",  # logits stay float32 under mixed precision
        name="fc",
    )(x)


def _check_head_blocks(head_blocks, model_name, presets=()):
    """`[[a, b], [c]]`: blocks of the heads from the shallow and deep tap."""
    if head_blocks is None:
        return None
    if isinstance(head_blocks, str):
        if head_blocks in presets:
            return head_blocks
        raise ValueError(
            f"{model_name} head_blocks must be None, one of {list(presets)} or "
            f"[[b1, b2], [b3]]; got {head_blocks!r}."
        )
    try:
        shallow, deep = head_blocks
        shallow = [int(b) for b in shallow]
        deep = [int(b) for b in deep]
    except (TypeError, ValueError):
        shallow = deep = None
    if (
        shallow is None
        or len(shallow) != 2
        or len(deep) != 1
        or min(shallow + deep) < 1
    ):
        raise ValueError(
            f"{model_name} head_blocks must be [[b1, b2], [b3]] (positive block "
            "counts of the head from the shallow tap's two stages, then of the "
            f"head from the deep tap), e.g. [[1, 2], [2]]; got {head_blocks!r}."
        )
    return [shallow, deep]


class _PostActivationResNet(DKSBackbone):
    """What `CifarResNet` and `ResNet` share: the graph builder, the
    initialisation and the heads' block settings."""

    def _build(self, stem, stages, kind, num_classes, input_shape, include_top,
               sync_batchnorm, name, **kwargs):
        """Stem, `stages` of `kind` blocks (`base.residual_stages`), then
        global average pooling and the classifier when `include_top`."""
        config = _resnet_block_config(sync_batchnorm)
        inputs = keras.Input(shape=input_shape, name="images")
        x = residual_stages(stem(inputs, config), stages, kind, config)
        if include_top:
            x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
            x = _torch_linear(x, num_classes)
        super().__init__(inputs=inputs, outputs=x, name=name, **kwargs)

    def _declare_resnet_heads(self, taps, widths, head_blocks, kind):
        """Heads from the shallow tap (stages of `widths[0]`, `widths[1]`)
        and from the deep tap (one stage of `2 * widths[1]`), all stride 2."""
        (b1, b2), (b3,) = head_blocks
        shallow, deep = taps
        self.declare_heads(
            {
                deep: [heads.HeadStage(2 * widths[1], b3, 2)],
                shallow: [heads.HeadStage(widths[0], b1, 2),
                          heads.HeadStage(widths[1], b2, 2)],
            },
            kind,
        )

    def dks_block_config(self):
        """A new `blocks.BlockConfig` with the backbone's settings."""
        return _resnet_block_config(self.sync_batchnorm)


def _cifar_stem(inputs, config):
    x = blocks.conv(inputs, 16, 3, 1, "stem_conv", config)
    return blocks.bn_relu(x, "stem", config)


def _imagenet_stem(inputs, config):
    x = blocks.conv(inputs, 64, 7, 2, "stem_conv", config)
    x = blocks.bn_relu(x, "stem", config)
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)


@keras.saving.register_keras_serializable(package="keras_dks")
class CifarResNet(_PostActivationResNet):
    """CIFAR ResNet-`depth` (He et al. 2016, Sec. 4.2), depth = 6n + 2.

        conv3x3(16) - BN - ReLU                     "stem_*"
        stage0: n basic blocks, 16 channels, stride 1   -> "stage0"
        stage1: n basic blocks, 32 channels, stride 2   -> "stage1"
        stage2: n basic blocks, 64 channels, stride 2   -> "stage2"
        global average pool -> Dense(num_classes)   (logits)

    Shortcuts are "option B": a 1x1 conv + BN projection where the shape
    changes (the first blocks of stage1 and stage2), identity elsewhere. He
    et al. use option A (zero-padded identity, parameter-free) on CIFAR, as
    does the DHM code (average pool + zero channels); option B adds 2,752
    trainable parameters (ResNet-32 for 100 classes: 472,756 instead of
    470,004) and
    is what `keras_dks.blocks.basic_block` and the heads use everywhere.

    Auxiliary heads (`dks_head_stages`), by the rule of the authors' WRN
    code: from "stage0" a copy of stage1 (n blocks, 32, stride 2) then of
    stage2 with n // 2 blocks (at least 1; 64, stride 2); from "stage1" a
    copy of stage2 at double width (n blocks, 128, stride 2). The DHM code
    uses other counts, [[5, 3], [5]] for ResNet-32 and [[9, 9], [18]] for
    ResNet-110; pass them as `head_blocks` to reproduce it.

    Initialisation (DHM / fb.resnet.torch): convs He-normal untruncated
    fan-out, BN gamma 1 and beta 0 (epsilon 1e-5, Keras momentum 0.9),
    classifier PyTorch's `nn.Linear` default (kernel and bias
    U(+-1/sqrt(fan_in))) instead of Keras' Glorot-uniform kernel and zero
    bias.

    Args:
        depth: 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...).
        num_classes: classifier width, an integer >= 2 (may be None with
            include_top=False).
        input_shape: (height, width, channels) of the images. Defaults to
            `(32, 32, 3)`.
        include_top: if True, logits of shape (batch, num_classes); if False,
            the 4-D output of stage2 (after its last ReLU), unpooled.
            Defaults to `True`.
        sync_batchnorm: `BatchNormalization(synchronized=True)` everywhere.
            Defaults to `False`.
        head_blocks: `None` (default) for the rule above, or
            `[[b1, b2], [b3]]`: the positive block counts of the head from
            "stage0" (its two stages) and of the head from "stage1".
        name: model name. Defaults to `None`, meaning "resnet<depth>_cifar".
        **kwargs: passed on to `keras.Model` (e.g. `trainable`).

    Raises:
        ValueError: `depth` is not 6n + 2 with n >= 1, `head_blocks` is not
            of the form above, `num_classes` is missing with
            `include_top=True` or is not an integer >= 2, or `input_shape`
            does not have 3 entries.

    Example:
    ```python
    import keras, keras_dks
    from keras_dks import backbones
    backbone = backbones.resnet_cifar(32, num_classes=100)
    print(backbone.count_params())  # 475220: 472,756 trainable + BN statistics
    print(backbone.dks_head_stages("stage0"))
    # [HeadStage(filters=32, blocks=5, stride=2),
    #  HeadStage(filters=64, blocks=2, stride=2)]
    print(backbone(keras.random.uniform((2, 32, 32, 3))).shape)  # (2, 100)
    ```
    """

    def __init__(self, depth, num_classes, input_shape=(32, 32, 3), include_top=True,
                 sync_batchnorm=False, head_blocks=None, name=None, **kwargs):
        n = blocks_per_stage(depth, 2, "CIFAR ResNet", "20, 32, 56, 110")
        num_classes = check_num_classes(num_classes, include_top)
        input_shape = check_input_shape(input_shape)
        head_blocks = _check_head_blocks(head_blocks, "CifarResNet")
        self._build(
            _cifar_stem,
            [(f"stage{s}", w, n, stride) for s, (w, stride) in
             enumerate(zip((16, 32, 64), (1, 2, 2)))],
            "basic", num_classes, input_shape, include_top, sync_batchnorm,
            name or f"resnet{depth}_cifar", **kwargs,
        )
        self._declare_resnet_heads(
            ("stage0", "stage1"), (32, 64),
            head_blocks or [[n, max(n // 2, 1)], [n]], "basic",
        )
        self.declare_config(
            depth=depth, num_classes=num_classes, input_shape=input_shape,
            include_top=include_top, sync_batchnorm=sync_batchnorm,
            head_blocks=head_blocks,
        )


@keras.saving.register_keras_serializable(package="keras_dks")
class ResNet(_PostActivationResNet):
    """ImageNet ResNet-18/34 (basic blocks) and ResNet-50/101/152
    (bottlenecks), torchvision's layout (He et al. 2016; "v1.5").

        conv7x7/2(64) - BN - ReLU - maxpool3x3/2        "stem_*"
        conv2_x: blocks of width w, stride 1            -> "conv2_x"
        conv3_x: width 2w, stride 2                     -> "conv3_x"
        conv4_x: width 4w, stride 2                     -> "conv4_x"
        conv5_x: width 8w, stride 2                     -> "conv5_x"
        global average pool -> Dense(num_classes)        (logits)

    w = 64 with basic blocks (18, 34), w = 256 block outputs (inner width
    64) with bottlenecks (50, 101, 152). Blocks per stage, block kinds and
    head block counts: the table `IMAGENET_RESNETS`.
    Layer for layer torchvision's model: 1x1 conv + BN projection shortcuts
    where the shape changes, bias-free convs, the bottleneck's stride on its
    3x3 conv ("ResNet v1.5"; `keras.applications.ResNet50` is v1: stride on
    the first 1x1 conv and biased convs: 25,583,592 trainable parameters), and
    PyTorch's symmetric padding (the stem conv pads 3, the max pool 1,
    stride-2 3x3 convs 1; Keras' `padding="same"` would pad bottom/right
    only). The max pool pads with zeros instead of -inf, which is the same
    after a ReLU. Trainable parameters for 1000 classes, as torchvision's:
    ResNet-18 11,689,512, ResNet-34 21,797,672, ResNet-50 25,557,032,
    ResNet-101 44,549,160, ResNet-152 60,192,808.

    Auxiliary heads (both papers: after conv3_x and conv4_x), made of the
    backbone's own block: from "conv3_x" a conv4_x-like stage (width 4w,
    stride 2) then a conv5_x-like stage (8w, stride 2); from "conv4_x" a
    conv5_x-like stage at double width (16w, stride 2). The block counts
    (`head_blocks`) default to those of the DHM code, the only released
    training code for these heads (neither paper states them):
    [[1, 2], [2]] (18), [[3, 2], [3]] (34, 50), [[12, 2], [3]] (101),
    [[18, 2], [3]] (152). The whole ResNet-18 training network for 1000
    classes then has 53,483,512 trainable parameters, as the DHM code's.
    `head_blocks="copy"` gives the conv4_x-like stage as many blocks as the
    backbone's conv4_x and the deep head as many as conv5_x (ResNet-18:
    [[2, 2], [2]], ResNet-50: [[6, 2], [3]]).

    Initialisation (torchvision and the DHM code): convs He-normal
    untruncated fan-out, BN gamma 1, beta 0 (epsilon 1e-5, Keras momentum
    0.9), classifier PyTorch's `nn.Linear` default (kernel and bias
    U(+-1/sqrt(fan_in))) instead of Keras' Glorot-uniform kernel and zero
    bias.

    Args:
        depth: 18, 34, 50, 101 or 152.
        num_classes: classifier width, an integer >= 2 (may be None with
            include_top=False). Defaults to `1000`.
        input_shape: (height, width, channels) of the images. Defaults to
            `(224, 224, 3)`.
        include_top: if True, logits of shape (batch, num_classes); if False,
            the 4-D output of conv5_x, unpooled. Defaults to `True`.
        sync_batchnorm: `BatchNormalization(synchronized=True)` everywhere.
            Defaults to `False`.
        head_blocks: `None` (default) or `"dhm"` for the DHM code's block
            counts, `"copy"` for the backbone's own counts, or
            `[[b1, b2], [b3]]`: the positive block counts of the head from
            "conv3_x" (its two stages) and of the head from "conv4_x".
        name: model name. Defaults to `None`, meaning "resnet<depth>".
        **kwargs: passed on to `keras.Model` (e.g. `trainable`).

    Raises:
        ValueError: `depth` is not one of the five, `head_blocks` is not of
            the forms above, `num_classes` is missing with
            `include_top=True` or is not an integer >= 2, or `input_shape`
            does not have 3 entries.

    Example:
    ```python
    import keras, keras_dks
    from keras_dks import backbones
    backbone = backbones.ResNet(18, num_classes=10, input_shape=(64, 64, 3))
    print(backbone.dks_taps)                    # ['conv4_x', 'conv3_x']
    print(backbone.dks_head_stages("conv3_x"))
    # [HeadStage(filters=256, blocks=1, stride=2),
    #  HeadStage(filters=512, blocks=2, stride=2)]
    print(backbone(keras.random.uniform((2, 64, 64, 3))).shape)  # (2, 10)
    ```
    """

    def __init__(self, depth, num_classes=1000, input_shape=(224, 224, 3),
                 include_top=True, sync_batchnorm=False, head_blocks=None, name=None,
                 **kwargs):
        if depth not in IMAGENET_RESNETS or isinstance(depth, bool):
            raise ValueError(
                f"ImageNet ResNet depth must be one of "
                f"{sorted(IMAGENET_RESNETS)}; got depth={depth!r}."
            )
        num_classes = check_num_classes(num_classes, include_top)
        input_shape = check_input_shape(input_shape)
        head_blocks = _check_head_blocks(head_blocks, "ResNet", HEAD_BLOCK_PRESETS)
        spec = IMAGENET_RESNETS[depth]
        widths = STAGE_WIDTHS[spec.block_kind]
        self._build(
            _imagenet_stem,
            [(f"conv{s + 2}_x", w, count, stride) for s, (w, count, stride) in
             enumerate(zip(widths, spec.stage_blocks, (1, 2, 2, 2)))],
            spec.block_kind, num_classes, input_shape, include_top,
            sync_batchnorm, name or f"resnet{depth}", **kwargs,
        )
        if head_blocks == "copy":
            head_counts = [[spec.stage_blocks[2], 2], [spec.stage_blocks[3]]]
        elif head_blocks in (None, "dhm"):
            head_counts = spec.head_blocks
        else:
            head_counts = head_blocks
        self._declare_resnet_heads(
            ("conv3_x", "conv4_x"), widths[2:], head_counts, spec.block_kind
        )
        self.declare_config(
            depth=depth, num_classes=num_classes, input_shape=input_shape,
            include_top=include_top, sync_batchnorm=sync_batchnorm,
            head_blocks=head_blocks,
        )


def resnet_cifar(depth, num_classes, **kwargs):
    """CIFAR ResNet-`depth` (6n + 2, e.g. 32 or 110):
    `CifarResNet(depth, num_classes, **kwargs)`.

    Args:
        depth: 6n + 2 with n >= 1.
        num_classes: classifier width (None with `include_top=False`).
        **kwargs: the other arguments of `CifarResNet` (`input_shape`,
            `include_top`, `sync_batchnorm`, `head_blocks`, `name`).

    Returns:
        A `CifarResNet`.

    Raises:
        ValueError: see `CifarResNet`.

    Example:
    ```python
    from keras_dks import backbones
    r110 = backbones.resnet_cifar(110, num_classes=100)
    print(r110.dks_taps)   # ['stage1', 'stage0']
    ```
    """
    return CifarResNet(depth, num_classes, **kwargs)


def _preset(depth):
    """`resnet<depth>(num_classes=1000, **kwargs)`: `ResNet(depth, ...)`."""
    spec = IMAGENET_RESNETS[depth]

    def build(num_classes=1000, **kwargs):
        return ResNet(depth, num_classes, **kwargs)

    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = f"""ResNet-{depth}: `ResNet({depth}, num_classes, **kwargs)`.

    {spec.block_kind.capitalize()} blocks {list(spec.stage_blocks)},
    {spec.params:,} trainable parameters for 1000 classes (torchvision's
    count); default heads (DHM code) {spec.head_blocks} blocks.

    Args:
        num_classes: classifier width. Defaults to `1000`.
        **kwargs: the other arguments of `ResNet` (`input_shape`,
            `include_top`, `sync_batchnorm`, `head_blocks`, `name`).

    Returns:
        A `ResNet` of depth {depth}.

    Raises:
        ValueError: see `ResNet`.

    Example:
    ```python
    from keras_dks import backbones
    net = backbones.resnet{depth}(num_classes=10, input_shape=(64, 64, 3))
    print(net.dks_taps)   # ['conv4_x', 'conv3_x']
    ```
    """
    return build


resnet18 = _preset(18)
resnet34 = _preset(34)
resnet50 = _preset(50)
resnet101 = _preset(101)
resnet152 = _preset(152)
