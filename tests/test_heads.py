"""keras_dks.heads: layouts from the paper's rule, classifier sizes."""

import keras
import pytest

from keras_dks import blocks, heads
from keras_dks.heads import HeadStage


def test_simple_head_is_pool_plus_dense():
    inp = keras.Input((4, 4, 6))
    m = keras.Model(inp, heads.simple_head(inp, 5, "h"))
    assert m.count_params() == 6 * 5 + 5
    assert m.get_layer("h").dtype_policy.compute_dtype == "float32"


def test_conv_head_adds_one_conv_bn_relu():
    inp = keras.Input((4, 4, 6))
    m = keras.Model(inp, heads.conv_head(inp, 5, "h", blocks.BlockConfig()))
    assert m.count_params() == 9 * 6 * 6 + 4 * 6 + 6 * 5 + 5


@pytest.mark.parametrize(
    "later, downsamples, expected",
    [
        # Two later stages (WRN group0 tap): group1 copy, then group2 at half
        # its blocks (at least 2).
        ([(32, 4), (64, 4)], 2, [HeadStage(32, 4, 2), HeadStage(64, 2, 2)]),
        # A single stage (the deepest tap) at double width, full depth.
        ([(64, 4)], 1, [HeadStage(128, 4, 2)]),
        # Unknown layout: widths double per step, 2 blocks.
        ([], 2, [HeadStage(16, 2, 2), HeadStage(32, 2, 2)]),
        ([], 0, []),
    ],
)
def test_default_residual_stages_follow_the_paper(later, downsamples, expected):
    assert heads.default_residual_stages(8, later, downsamples) == expected


def test_width_and_depth_overrides():
    stages = heads.default_residual_stages(8, [(32, 4), (64, 4)], 2, width=0.5, depth=1)
    assert stages == [HeadStage(16, 1, 2), HeadStage(32, 1, 2)]


def test_residual_head_reaches_the_final_resolution():
    inp = keras.Input((8, 8, 4))
    stages = [HeadStage(8, 1, 2), HeadStage(16, 1, 2)]
    logits = heads.residual_head(inp, stages, 3, "h", "preact_basic", blocks.BlockConfig())
    m = keras.Model(inp, logits)
    assert tuple(m.get_layer("h_pool").input.shape) == (None, 2, 2, 16)
    assert tuple(logits.shape) == (None, 3)
