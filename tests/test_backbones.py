"""Tests of keras_dks.backbones: exact sizes, heads, init, padding, config.

Forward passes only run on tiny models; the big parameter-count tests only
build graphs.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras

import keras_dks
from keras_dks import backbones
from keras_dks import heads

# Its module-scoped fixtures run once: keep its tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("backbones")


def trainable_params(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def head_params(backbone, tap, num_classes):
    """Trainable parameters of the head `backbone` describes for `tap`."""
    shape = backbone.get_layer(tap).output.shape[1:]
    x = keras.Input(shape)
    logits = heads.residual_head(
        x,
        backbone.dks_head_stages(tap),
        num_classes,
        "aux",
        backbone.dks_block_kind,
        backbone.dks_block_config(),
    )
    return trainable_params(keras.Model(x, logits))


def layers_of(model, cls):
    return [l for l in model.layers if isinstance(l, cls)]


def preact_basic_head_params(c_in, stages, num_classes):
    """Hand count of an authors'-code WRN head: pre-activation basic blocks
    (BN(c_in), 3x3 conv, BN, 3x3 conv, 1x1 shortcut when the width or the
    resolution changes; convs without bias), final BN, Dense with bias.
    `stages` is a list of (filters, blocks); every stage strides by 2."""
    total = 0
    for filters, blocks in stages:
        for b in range(blocks):
            total += 2 * c_in + 9 * c_in * filters + 2 * filters + 9 * filters * filters
            if b == 0:  # stride 2: the shortcut is always a 1x1 conv
                total += c_in * filters
            c_in = filters
    return total + 2 * c_in + c_in * num_classes + num_classes


def test_hand_head_count_reproduces_the_authors_numbers():
    # The formula used below, checked against the authors' code's counts
    # for WRN-28-10 (METHOD.md section 2).
    assert preact_basic_head_params(160, [(320, 4), (640, 2)], 100) == 20_145_060
    assert preact_basic_head_params(320, [(1280, 4)], 100) == 107_464_420


# ---------------------------------------------------------------------------
# Exact sizes
# ---------------------------------------------------------------------------
def test_wrn_28_10_and_its_heads_have_the_authors_parameter_counts():
    # METHOD.md section 2: counts of the authors' wrn_DKS/resnet.py.
    wrn = backbones.wide_resnet(28, 10, 100)
    assert trainable_params(wrn) == 36_536_884
    assert head_params(wrn, "group0", 100) == 20_145_060
    assert head_params(wrn, "group1", 100) == 107_464_420


def _cifar_resnet_params(depth, num_classes, option_b=True):
    """He et al.'s CIFAR ResNet, counted by hand (conv no bias, BN 2c)."""
    n = (depth - 2) // 6

    def conv(k, cin, cout):
        return k * k * cin * cout

    def bn(c):
        return 2 * c

    def basic(cin, cout):
        p = conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
        if option_b and cin != cout:  # 1x1 conv + BN projection shortcut
            p += conv(1, cin, cout) + bn(cout)
        return p

    total = conv(3, 3, 16) + bn(16)
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += basic(cin, width)
            cin = width
    return total + 64 * num_classes + num_classes


def test_cifar_resnet_parameter_counts_match_the_formula():
    # Sanity of the formula: He et al. report 0.46M for ResNet-32 (option A,
    # CIFAR-10) and 1.7M for ResNet-110.
    assert round(_cifar_resnet_params(32, 10, option_b=False) / 1e6, 2) == 0.46
    assert round(_cifar_resnet_params(110, 10, option_b=False) / 1e6, 1) == 1.7
    expected = _cifar_resnet_params(32, 100)
    assert expected == 472_756
    assert trainable_params(backbones.resnet_cifar(32, 100)) == expected
    assert trainable_params(backbones.resnet_cifar(20, 10)) == (
        _cifar_resnet_params(20, 10)
    )


def _torch_resnet_params(depth, num_classes=1000, branch_layers=None):
    """torchvision's / the DHM code's ImageNet ResNet, counted by hand.

    `branch_layers` adds the DHM code's two auxiliary branches
    (`models/imagenet/resnet.py`: `layer3_head2`, `layer4_head2`, `fc_head2`
    from conv3_x; `layer4_head1` at 1024 planes, `fc_head1` from conv4_x).
    """
    layers = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3),
              101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}[depth]
    expansion = 1 if depth < 50 else 4

    def block(cin, planes, stride):
        if expansion == 1:
            p = 9 * cin * planes + 2 * planes + 9 * planes * planes + 2 * planes
        else:
            p = (cin * planes + 2 * planes + 9 * planes * planes + 2 * planes
                 + planes * 4 * planes + 2 * 4 * planes)
        if stride != 1 or cin != planes * expansion:  # downsample: conv + BN
            p += cin * planes * expansion + 2 * planes * expansion
        return p

    def make_layer(cin, planes, blocks, stride):
        total = block(cin, planes, stride)
        total += (blocks - 1) * block(planes * expansion, planes, 1)
        return total, planes * expansion

    def fc(cin):
        return cin * num_classes + num_classes

    total, c = 49 * 3 * 64 + 2 * 64, 64
    outs = []
    for planes, blocks, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
        p, c = make_layer(c, planes, blocks, stride)
        total += p
        outs.append(c)
    total += fc(c)
    if branch_layers:
        (b1, b2), (b3,) = branch_layers
        p1, c1 = make_layer(outs[1], 256, b1, 2)
        p2, c2 = make_layer(c1, 512, b2, 2)
        p3, c3 = make_layer(outs[2], 1024, b3, 2)
        total += p1 + p2 + fc(c2) + p3 + fc(c3)
    return total


@pytest.fixture(scope="module")
def imagenet_dks_models():
    # Built once (graphs and weights only, no forward pass): 53M + 100M
    # parameters.
    return {
        18: keras_dks.DKSModel(backbones.resnet18()),
        50: keras_dks.DKSModel(backbones.resnet50()),
    }


def test_imagenet_resnets_match_torchvision_parameter_counts(imagenet_dks_models):
    # torchvision's published sizes (its model zoo documentation).
    published = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032,
                 101: 44_549_160, 152: 60_192_808}
    for depth, count in published.items():
        assert _torch_resnet_params(depth) == count
    from keras_dks.backbones import resnet
    assert {d: s.params for d, s in resnet.IMAGENET_RESNETS.items()} == published
    assert trainable_params(imagenet_dks_models[18].backbone) == 11_689_512
    assert trainable_params(backbones.resnet34()) == 21_797_672
    # The v1.5 bottleneck ResNet-50 of torchvision (stride on the 3x3 conv,
    # bias-free convs), not keras.applications' v1 (25,583,592).
    r50 = imagenet_dks_models[50].backbone
    assert trainable_params(r50) == 25_557_032
    first = "conv3_x_block0"
    assert r50.get_layer(f"{first}_conv0").kernel.shape == (1, 1, 256, 128)
    assert r50.get_layer(f"{first}_conv0").strides == (1, 1)
    assert r50.get_layer(f"{first}_conv1").strides == (2, 2)
    assert r50.get_layer(f"{first}_convdim").strides == (2, 2)
    assert not any(getattr(l, "use_bias", False) for l in layers_of(r50, keras.layers.Conv2D))


def test_imagenet_dks_training_networks_match_the_dhm_code(imagenet_dks_models):
    # The DHM code's ResNet-18 training network for 1000 classes: 53,483,512
    # trainable parameters (branch_layers [[1, 2], [2]]).
    r18 = imagenet_dks_models[18]
    assert r18.taps == ["conv4_x", "conv3_x"]
    assert _torch_resnet_params(18, branch_layers=[[1, 2], [2]]) == 53_483_512
    assert trainable_params(r18) == 53_483_512
    # ResNet-50: branch_layers [[3, 2], [3]] with bottlenecks (a 4096-wide
    # double-width conv5_x-like stage from conv4_x).
    r50 = imagenet_dks_models[50]
    assert trainable_params(r50) == _torch_resnet_params(50, branch_layers=[[3, 2], [3]])
    assert trainable_params(r50) == 100_523_000
    HS = heads.HeadStage
    assert r50.backbone.dks_block_kind == "bottleneck"
    # Widths are block outputs: planes 256, 512, 1024 times 4.
    assert r50.backbone.dks_head_stages("conv3_x") == [HS(1024, 3, 2), HS(2048, 2, 2)]
    assert r50.backbone.dks_head_stages("conv4_x") == [HS(4096, 3, 2)]
    # The table for the depths not built here, as in the DHM code's
    # resnet101 / resnet152 constructors.
    from keras_dks.backbones import resnet
    assert resnet.IMAGENET_RESNETS[101].head_blocks == [[12, 2], [3]]
    assert resnet.IMAGENET_RESNETS[152].head_blocks == [[18, 2], [3]]


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: backbones.wide_resnet(10, 1, 7), (32, 32, 3)),
        (lambda: backbones.wide_resnet(10, 1, 7, input_shape=(28, 28, 1)), (28, 28, 1)),
        (lambda: backbones.resnet_cifar(8, 7), (32, 32, 3)),
        (lambda: backbones.resnet18(7, input_shape=(32, 32, 3)), (32, 32, 3)),
    ],
)
def test_outputs_are_float32_logits(build, shape):
    model = build()
    x = np.random.default_rng(0).uniform(size=(3,) + shape).astype("float32")
    logits = model.predict(x, verbose=0)
    assert logits.shape == (3, 7)
    assert logits.dtype == np.float32
    fc = model.get_layer("fc")
    assert fc.activation is keras.activations.linear  # logits, no softmax
    assert fc.dtype_policy.name == "float32"


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_logits_stay_float32_under_mixed_precision(policy):
    original = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        models = [
            backbones.wide_resnet(10, 1, 7, input_shape=(8, 8, 3)),
            backbones.resnet_cifar(8, 7, input_shape=(8, 8, 3)),
            backbones.resnet18(7, input_shape=(32, 32, 3)),
        ]
    finally:
        keras.mixed_precision.set_global_policy(original)
    low = policy.split("_")[1]
    for model in models:
        convs = layers_of(model, keras.layers.Conv2D)
        assert convs and all(c.compute_dtype == low for c in convs), model.name
        assert model.get_layer("fc").compute_dtype == "float32"
        x = np.random.default_rng(0).uniform(size=(2,) + model.input.shape[1:])
        logits = model(x.astype("float32"), training=False)
        assert logits.dtype == tf.float32, model.name
        assert np.isfinite(logits.numpy()).all()


def test_include_top_false_returns_the_final_feature_map():
    wrn = backbones.wide_resnet(10, 2, None, include_top=False)
    assert wrn.output.shape == (None, 8, 8, 128)
    assert wrn.output._keras_history.operation.name == "final_relu"
    cifar = backbones.resnet_cifar(8, None, include_top=False)
    assert cifar.output.shape == (None, 8, 8, 64)
    r18 = backbones.resnet18(include_top=False)
    assert r18.output.shape == (None, 7, 7, 512)
    assert r18.get_layer("stem_pool").output.shape == (None, 56, 56, 64)
    for model in (wrn, cifar, r18):
        assert not layers_of(model, keras.layers.Dense)
        assert not layers_of(model, keras.layers.GlobalAveragePooling2D)


def test_stage_ends_are_named_and_have_the_expected_shapes():
    wrn = backbones.wide_resnet(16, 2, 10)
    assert [wrn.get_layer(f"group{g}").output.shape for g in range(3)] == [
        (None, 32, 32, 32), (None, 16, 16, 64), (None, 8, 8, 128),
    ]
    r34 = backbones.resnet34(10, input_shape=(64, 64, 3))
    assert [r34.get_layer(f"conv{s}_x").output.shape for s in range(2, 6)] == [
        (None, 16, 16, 64), (None, 8, 8, 128), (None, 4, 4, 256), (None, 2, 2, 512),
    ]
    # The generic stage finder of keras_dks.taps agrees with dks_taps.
    for model in (wrn, r34, backbones.resnet_cifar(8, 10)):
        graph = keras_dks.taps.BackboneGraph(model)
        ends = [s.name for s in graph.stages()]
        assert set(model.dks_taps) <= set(ends)


# ---------------------------------------------------------------------------
# DKS head description
# ---------------------------------------------------------------------------
def test_wrn_head_stages():
    HS = heads.HeadStage
    wrn = backbones.wide_resnet(28, 10, 100)
    assert wrn.dks_taps == ["group1", "group0"]
    assert wrn.dks_block_kind == "preact_basic"
    assert wrn.dks_head_stages("group0") == [HS(320, 4, 2), HS(640, 2, 2)]
    assert wrn.dks_head_stages("group1") == [HS(1280, 4, 2)]
    wrn10 = backbones.wide_resnet(10, 1, 10)  # n = 1: never an empty group
    assert wrn10.dks_head_stages("group0") == [HS(32, 1, 2), HS(64, 1, 2)]
    with pytest.raises(ValueError, match=r"taps \['group1', 'group0'\] only"):
        wrn10.dks_head_stages("group2")


def test_resnet_head_stages():
    HS = heads.HeadStage
    r32 = backbones.resnet_cifar(32, 100)
    assert r32.dks_taps == ["stage1", "stage0"]
    assert r32.dks_block_kind == "basic"
    assert r32.dks_head_stages("stage0") == [HS(32, 5, 2), HS(64, 2, 2)]
    assert r32.dks_head_stages("stage1") == [HS(128, 5, 2)]
    r8 = backbones.resnet_cifar(8, 10)
    assert r8.dks_head_stages("stage0") == [HS(32, 1, 2), HS(64, 1, 2)]

    # ImageNet: the DHM code's `branch_layers` by default (resnet18:
    # [[1, 2], [2]], resnet34 and resnet50: [[3, 2], [3]]).
    r18 = backbones.resnet18(10, input_shape=(64, 64, 3))
    assert r18.dks_taps == ["conv4_x", "conv3_x"]
    assert r18.dks_block_kind == "basic"
    assert r18.dks_head_stages("conv3_x") == [HS(256, 1, 2), HS(512, 2, 2)]
    assert r18.dks_head_stages("conv4_x") == [HS(1024, 2, 2)]
    r34 = backbones.resnet34(10, input_shape=(64, 64, 3))
    assert r34.dks_head_stages("conv3_x") == [HS(256, 3, 2), HS(512, 2, 2)]
    assert r34.dks_head_stages("conv4_x") == [HS(1024, 3, 2)]
    with pytest.raises(ValueError, match="conv2_x"):
        r34.dks_head_stages("conv2_x")
    # The other layouts stay available.
    copy = backbones.resnet18(10, input_shape=(64, 64, 3), head_blocks="copy")
    assert copy.dks_head_stages("conv3_x") == [HS(256, 2, 2), HS(512, 2, 2)]
    assert copy.dks_head_stages("conv4_x") == [HS(1024, 2, 2)]
    own = backbones.resnet18(10, input_shape=(64, 64, 3), head_blocks=[[3, 1], [4]])
    assert own.dks_head_stages("conv3_x") == [HS(256, 3, 2), HS(512, 1, 2)]
    assert own.dks_head_stages("conv4_x") == [HS(1024, 4, 2)]
    dhm32 = backbones.resnet_cifar(32, 100, head_blocks=[[5, 3], [5]])
    assert dhm32.dks_head_stages("stage0") == [HS(32, 5, 2), HS(64, 3, 2)]


def test_dks_block_config_matches_the_backbone():
    wrn = backbones.wide_resnet(10, 1, 10, dropout=0.3, sync_batchnorm=True)
    config = wrn.dks_block_config()
    assert config is not wrn.dks_block_config()  # callers may modify it
    assert (config.bn_epsilon, config.bn_momentum) == (1e-5, 0.9)
    assert config.dropout == 0.3 and config.sync_batchnorm
    assert all(bn.synchronized for bn in layers_of(wrn, keras.layers.BatchNormalization))
    assert len(layers_of(wrn, keras.layers.Dropout)) == 3
    r8 = backbones.resnet_cifar(8, 10)
    assert r8.dks_block_config().dropout == 0
    assert not r8.dks_block_config().sync_batchnorm


def test_dks_model_attaches_the_backbones_heads():
    backbone = backbones.wide_resnet(10, 1, 10)
    model = keras_dks.DKSModel(backbone)
    assert model.taps == ["group1", "group0"]
    # WRN-10-1: group0 ends at 16 channels, group1 at 32. The head from
    # group0 = group1 (32, 1 block) + group2 (64, 1 block); from group1 =
    # group2 at double width (128, 1 block). Counted by hand, not by the
    # head code.
    heads_total = preact_basic_head_params(
        32, [(128, 1)], 10
    ) + preact_basic_head_params(16, [(32, 1), (64, 1)], 10)
    assert trainable_params(model) == trainable_params(backbone) + heads_total


def test_head_width_and_head_depth_resize_the_heads():
    backbone = backbones.wide_resnet(10, 1, 10)
    model = keras_dks.DKSModel(backbone, head_width=0.5, head_depth=3)
    # Every head stage at half width, 3 blocks each (README: `head_width`
    # multiplier, `head_depth` blocks per stage).
    heads_total = preact_basic_head_params(
        32, [(64, 3)], 10
    ) + preact_basic_head_params(16, [(16, 3), (32, 3)], 10)
    assert trainable_params(model) == trainable_params(backbone) + heads_total
    # The same on a foreign backbone (heads from the default layout rule).
    tiny = _tiny_keras_resnet(preact=True)
    base = keras_dks.DKSModel(tiny, num_classes=5)
    wide = keras_dks.DKSModel(tiny, num_classes=5, head_width=2.0, head_depth=1)
    for name in base.head_names[1:]:
        widths = {
            m: [c.filters for c in _head_layers(m, name, keras.layers.Conv2D)]
            for m in (base, wide)
        }
        assert max(widths[wide]) == 2 * max(widths[base]), name
        three_by_three = [
            c for c in _head_layers(wide, name, keras.layers.Conv2D) if c.kernel_size == (3, 3)
        ]
        assert len(three_by_three) == len(
            [c for c in three_by_three if c.strides == (2, 2)]
        ), "head_depth=1: every block is a stage's first (stride-2) block"


def _tiny_keras_resnet(preact):
    """keras.applications ResNet (v1) or ResNetV2 with the same builder,
    4x narrower stages of 2 blocks, 64x64 input."""
    from keras.src.applications import resnet

    def stack_fn(x):
        stack = resnet.stack_residual_blocks_v2 if preact else resnet.stack_residual_blocks_v1
        if preact:
            x = stack(x, 2, 2, name="conv2")
            x = stack(x, 4, 2, name="conv3")
            x = stack(x, 4, 2, name="conv4")
            return stack(x, 8, 2, stride1=1, name="conv5")
        x = stack(x, 2, 2, stride1=1, name="conv2")
        x = stack(x, 4, 2, name="conv3")
        x = stack(x, 4, 2, name="conv4")
        return stack(x, 8, 2, name="conv5")

    return resnet.ResNet(
        stack_fn, preact, not preact, include_top=False, weights=None,
        input_shape=(64, 64, 3), name="resnetv2" if preact else "resnet",
    )


def _head_layers(model, head_name, cls=None):
    """The head's layers with weights, in the model's (topological) order."""
    out = [
        l for l in model.layers
        if (l.name == head_name or l.name.startswith(head_name + "_")) and l.weights
    ]
    return [l for l in out if cls is None or isinstance(l, cls)]


@pytest.mark.parametrize("preact", [True, False])
def test_keras_applications_resnet_heads_use_its_block_kind(preact):
    """README: heads are pre-activation bottlenecks for ResNetV2, post-
    activation bottlenecks for ResNet. Checked on the layer structure."""
    backbone = _tiny_keras_resnet(preact)
    model = keras_dks.DKSModel(backbone, num_classes=5)
    assert len(model.head_names) == 3
    for name in model.head_names[1:]:
        layers = _head_layers(model, name)
        tap_channels = model.get_layer(model.taps[model.head_names.index(name) - 1]).output.shape[-1]
        assert isinstance(layers[-1], keras.layers.Dense)
        convs = [l for l in layers if isinstance(l, keras.layers.Conv2D)]
        bns = [l for l in layers if isinstance(l, keras.layers.BatchNormalization)]
        three = [c for c in convs if c.kernel_size == (3, 3)]
        ones = [c for c in convs if c.kernel_size == (1, 1)]
        assert three and len(ones) >= 2 * len(three), "bottleneck: 1x1-3x3-1x1"
        assert {c.kernel_size for c in convs} == {(1, 1), (3, 3)}
        # The bottleneck's inner width is a quarter of its output width.
        assert max(c.filters for c in three) * 4 == max(c.filters for c in ones)
        if preact:
            # BN-ReLU on the tapped map before any conv, BN-ReLU before pooling.
            assert isinstance(layers[0], keras.layers.BatchNormalization)
            assert layers[0].gamma.shape == (tap_channels,)
            assert isinstance(layers[-2], keras.layers.BatchNormalization)
            assert len(bns) == 3 * len(three) + 1
        else:
            # A conv reads the tapped map; every conv is followed by its BN.
            assert isinstance(layers[0], keras.layers.Conv2D)
            assert layers[0].kernel.shape[2] == tap_channels
            assert len(bns) == len(convs)


# ---------------------------------------------------------------------------
# Initialisation and normalisation
# ---------------------------------------------------------------------------
def test_wrn_batchnorm_and_init_follow_the_authors_code():
    keras.utils.set_random_seed(0)
    wrn = backbones.wide_resnet(10, 4, 10)
    bns = layers_of(wrn, keras.layers.BatchNormalization)
    assert all(bn.epsilon == 1e-5 and bn.momentum == 0.9 for bn in bns)
    gammas = np.concatenate([bn.gamma.numpy() for bn in bns])
    assert gammas.min() >= 0.0 and gammas.max() < 1.0  # torch.rand
    assert 0.45 < gammas.mean() < 0.55 and gammas.std() > 0.25
    assert np.all(np.concatenate([bn.beta.numpy() for bn in bns]) == 0)
    # Every layer draws its own values (one shared Keras initializer
    # instance would give same-shaped weights identical values).
    same_shape = [
        wrn.get_layer(name).gamma.numpy()  # both 128 channels
        for name in ("group1_block0_mid_bn", "group2_block0_preact_bn")
    ]
    assert not np.allclose(same_shape[0], same_shape[1])

    # Convs: He-normal, untruncated, fan-in.
    kernel = wrn.get_layer("group2_block0_conv1").kernel.numpy()  # 3x3x256x256
    std = np.sqrt(2.0 / (9 * 256))
    assert abs(kernel.std() / std - 1) < 0.03
    assert np.abs(kernel).max() > 3.5 * std  # a truncated normal stops at 2
    # Classifier: kaiming_normal weight, zero bias (szagoruyko utils.py).
    fc = wrn.get_layer("fc")
    assert np.all(fc.bias.numpy() == 0)
    assert abs(fc.kernel.numpy().std() / np.sqrt(2.0 / 256) - 1) < 0.15


def test_resnet_init_follows_torchvision():
    keras.utils.set_random_seed(0)
    r20 = backbones.resnet_cifar(20, 100)
    bns = layers_of(r20, keras.layers.BatchNormalization)
    assert all(bn.epsilon == 1e-5 and bn.momentum == 0.9 for bn in bns)
    assert all(np.all(bn.gamma.numpy() == 1) for bn in bns)
    # kaiming_normal_(mode="fan_out"): 3x3x32x64 -> fan_out 9 * 64.
    kernel = r20.get_layer("stage2_block0_conv0").kernel.numpy()
    assert abs(kernel.std() / np.sqrt(2.0 / (9 * 64)) - 1) < 0.03
    a = r20.get_layer("stage2_block1_conv0").kernel.numpy()
    b = r20.get_layer("stage2_block2_conv0").kernel.numpy()
    assert not np.allclose(a, b)
    # nn.Linear default: weight and bias U(+-1/sqrt(fan_in)), fan_in 64.
    fc = r20.get_layer("fc")
    bound = 1 / 8
    for w in (fc.kernel.numpy(), fc.bias.numpy()):
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert abs(fc.kernel.numpy().std() / (bound / np.sqrt(3)) - 1) < 0.05


# ---------------------------------------------------------------------------
# PyTorch-style padding
# ---------------------------------------------------------------------------
def test_stride2_convs_pad_symmetrically_like_pytorch():
    wrn = backbones.wide_resnet(10, 1, 10)
    probe = keras.Model(
        wrn.input,
        [
            wrn.get_layer("group1_block0_preact_relu").output,
            wrn.get_layer("group1_block0_conv0").output,
            wrn.get_layer("group1_block0_convdim").output,
        ],
    )
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    o1, conv, convdim = probe.predict(x, verbose=0)
    kernel = wrn.get_layer("group1_block0_conv0").kernel
    # PyTorch conv2d(padding=1, stride=2) on the even 32x32 map.
    symmetric = tf.nn.conv2d(
        tf.pad(o1, [[0, 0], [1, 1], [1, 1], [0, 0]]), kernel, 2, "VALID"
    )
    np.testing.assert_allclose(conv, symmetric, rtol=1e-4, atol=1e-4)
    keras_same = tf.nn.conv2d(o1, kernel, 2, "SAME")  # pads bottom/right only
    assert not np.allclose(conv, keras_same, atol=1e-3)
    # conv1x1 stride 2, no padding: keeps the even rows and columns.
    dim_kernel = wrn.get_layer("group1_block0_convdim").kernel
    np.testing.assert_allclose(
        convdim, tf.nn.conv2d(o1, dim_kernel, 2, "VALID"), rtol=1e-4, atol=1e-4
    )


def test_resnet_stem_max_pool_matches_pytorch_padding():
    r18 = backbones.resnet18(10, input_shape=(32, 32, 3))
    probe = keras.Model(
        r18.input, [r18.get_layer("stem_relu").output, r18.get_layer("stem_pool").output]
    )
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    relu, pooled = probe.predict(x, verbose=0)
    # MaxPool2d(3, stride=2, padding=1) pads with -inf.
    padded = tf.pad(relu, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-np.inf)
    np.testing.assert_allclose(pooled, tf.nn.max_pool2d(padded, 3, 2, "VALID"))
    assert pooled.shape == (2, 8, 8, 64)


# ---------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build",
    [
        lambda: backbones.wide_resnet(10, 1, 5, dropout=0.3),
        lambda: backbones.resnet_cifar(8, 5, head_blocks=[[1, 1], [2]]),
        lambda: backbones.resnet18(5, input_shape=(32, 32, 3), include_top=False),
    ],
)
def test_config_round_trip(build):
    model = build()
    clone = model.__class__.from_config(model.get_config())
    assert type(clone) is type(model)
    assert clone.get_config() == model.get_config()
    assert trainable_params(clone) == trainable_params(model)
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        clone.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    assert clone.dks_taps == model.dks_taps
    assert clone.dks_head_stages(model.dks_taps[0]) == model.dks_head_stages(
        model.dks_taps[0]
    )


def test_save_and_load_keras_file(tmp_path):
    model = backbones.wide_resnet(10, 1, 5)
    path = str(tmp_path / "wrn.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, backbones.WideResNet)
    assert loaded.dks_head_stages("group0") == model.dks_head_stages("group0")
    x = np.random.default_rng(2).uniform(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: backbones.wide_resnet(27, 10, 100), r"6n \+ 4 .*depth=27"),
        (lambda: backbones.wide_resnet(4, 1, 10), r"6n \+ 4 with n >= 1"),
        (lambda: backbones.wide_resnet(28.0, 10, 100), r"integer 6n \+ 4"),
        (lambda: backbones.wide_resnet(16, 0, 10), "width must be positive"),
        (lambda: backbones.wide_resnet(16, 1, 10, dropout=1.0), r"dropout must be in \[0, 1\)"),
        (lambda: backbones.wide_resnet(16, 1, 1), "num_classes must be >= 2"),
        (lambda: backbones.wide_resnet(16, 1, 2.5), "whole number of classes"),
        (lambda: backbones.wide_resnet(16, 1, None), "num_classes is required when include_top=True"),
        (lambda: backbones.wide_resnet(16, 1, 10, input_shape=(32, 32)), r"\(height, width, channels\)"),
        (lambda: backbones.resnet_cifar(33, 100), r"6n \+ 2 .*depth=33"),
        (lambda: backbones.resnet_cifar(2, 100), r"6n \+ 2 with n >= 1"),
        (lambda: backbones.ResNet(51), r"one of \[18, 34, 50, 101, 152\]"),
        (lambda: backbones.resnet18(head_blocks="dks"), r"None, one of \['dhm', 'copy'\]"),
        (lambda: backbones.resnet18(head_blocks=[[1], [2]]), r"\[\[b1, b2\], \[b3\]\]"),
        (lambda: backbones.resnet_cifar(8, 10, head_blocks=[[1, 0], [2]]), "positive block"),
    ],
)
def test_bad_arguments_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# ---------------------------------------------------------------------------
# keras-hub's own serialization checks
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (backbones.WideResNet, dict(depth=10, width=1, num_classes=3, input_shape=(16, 16, 3))),
        (backbones.CifarResNet, dict(depth=8, num_classes=3, input_shape=(16, 16, 3),
                                     head_blocks=[[1, 2], [1]])),
        (backbones.ResNet, dict(depth=18, num_classes=3, input_shape=(32, 32, 3),
                                head_blocks="copy")),
    ],
)
def test_keras_hub_serialization_and_saving_checks(cls, kwargs):
    """keras-hub's TestCase: a config / serialize round trip gives the same
    config and attributes, and a saved `.keras` file loads as the same class
    with the same outputs."""
    from keras_hub.src.tests.test_case import TestCase

    case = TestCase(methodName="run_serialization_test")
    keras.utils.set_random_seed(0)
    case.run_serialization_test(cls(**kwargs))
    images = np.random.default_rng(0).uniform(size=(2,) + kwargs["input_shape"]).astype("float32")
    case.run_model_saving_test(cls, kwargs, images)
    revived = cls.from_config(cls(**kwargs).get_config())
    assert revived.dks_head_stages(revived.dks_taps[-1]) == cls(**kwargs).dks_head_stages(
        revived.dks_taps[-1])
