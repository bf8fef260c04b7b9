"""keras_dks.blocks: parameter counts from formulas, padding, shapes."""

import keras
import numpy as np
import pytest

from keras_dks import blocks


def _params(fn, in_shape, *args):
    inp = keras.Input(in_shape)
    out = fn(inp, *args)
    return keras.Model(inp, out)


def test_preact_basic_block_param_count_and_shape():
    cfg = blocks.BlockConfig()
    m = _params(blocks.preact_basic_block, (8, 8, 4), 6, 2, "b", cfg)
    assert tuple(m.output.shape) == (None, 4, 4, 6)
    # BN(4) (4 params x 4) + conv3x3 4->6 + BN(6) + conv3x3 6->6 + conv1x1 4->6
    expected = 4 * 4 + 9 * 4 * 6 + 4 * 6 + 9 * 6 * 6 + 4 * 6
    assert m.count_params() == expected


def test_bottleneck_block_param_count_identity_shortcut():
    cfg = blocks.BlockConfig()
    m = _params(blocks.bottleneck_block, (4, 4, 8), 8, 1, "b", cfg)
    inner = 2
    expected = (8 * inner + 4 * inner) + (9 * inner * inner + 4 * inner) + (inner * 8 + 4 * 8)
    assert m.count_params() == expected  # no projection: same width, stride 1
    assert tuple(m.output.shape) == (None, 4, 4, 8)


def test_stride_two_conv_pads_symmetrically_like_pytorch():
    cfg = blocks.BlockConfig(kernel_initializer="ones")
    inp = keras.Input((4, 4, 1))
    m = keras.Model(inp, blocks.conv(inp, 1, 3, 2, "c", cfg))
    x = np.arange(16, dtype="float32").reshape(1, 4, 4, 1)
    # PyTorch conv3x3 stride 2 padding 1: windows centred on 0 and 2.
    padded = np.pad(x[0, :, :, 0], 1)
    ref = np.array([[padded[i:i + 3, j:j + 3].sum() for j in (0, 2)] for i in (0, 2)])
    np.testing.assert_allclose(m(x).numpy()[0, :, :, 0], ref)


def test_fresh_initializer_gives_each_layer_its_own_values():
    cfg = blocks.BlockConfig()
    inp = keras.Input((4, 4, 3))
    a = blocks.conv(inp, 3, 3, 1, "a", cfg)
    b = blocks.conv(a, 3, 3, 1, "b", cfg)
    m = keras.Model(inp, b)
    ka, kb = m.get_layer("a").kernel.numpy(), m.get_layer("b").kernel.numpy()
    assert not np.allclose(ka, kb)


def test_default_conv_init_is_untruncated_he_normal_fan_in():
    # A 3x3 conv 8 -> 32: fan_in 72, fan_out 288, n = 2304 weights.
    # He fan-in std sqrt(2/72) = 0.167; He fan-out sqrt(2/288) = 0.083;
    # Glorot-normal sqrt(2/360) = 0.075: ratios 2 and 2.2 to the He std.
    # The sample std of n normal draws has relative sd 1/sqrt(2n) = 0.015;
    # 5 of those (7.4 %) separates them by far.
    inp = keras.Input((6, 6, 8))
    model = keras.Model(inp, blocks.conv(inp, 32, 3, 1, "c", blocks.BlockConfig()))
    kernel = model.get_layer("c").kernel.numpy()
    n, he_std = kernel.size, np.sqrt(2.0 / 72)
    assert abs(kernel.std() / he_std - 1) < 5 / np.sqrt(2 * n)
    assert abs(kernel.mean()) < 5 * he_std / np.sqrt(n)
    # Untruncated: Keras' truncated normal stops at 2 stds of its untruncated
    # parent, 2 / 0.88 = 2.27 target stds; P(no |w| > 2.5 std in n draws)
    # = (1 - 0.0124)^2304 < 1e-12.
    assert np.abs(kernel).max() > 2.5 * he_std


def test_block_config_replace_and_unknown_kind():
    cfg = blocks.BlockConfig(bn_epsilon=1e-3)
    new = cfg.replace(sync_batchnorm=True)
    assert new.sync_batchnorm and not cfg.sync_batchnorm and new.bn_epsilon == 1e-3
    with pytest.raises(ValueError, match="Unknown block kind"):
        blocks.residual_stage(keras.Input((4, 4, 2)), 2, 1, 1, "fancy", "s", cfg)
