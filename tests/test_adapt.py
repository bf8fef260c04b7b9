"""keras_dks.adapt: the public hooks models are built from."""

import keras
import numpy as np
import pytest

from keras_dks import adapt, taps
from helpers import tiny_backbone


def test_adapt_backbone_gives_a_plain_multi_head_graph():
    adapted = adapt.adapt_backbone(tiny_backbone(), num_classes=4, taps=["s1", "s2"],
                                   head="simple")
    assert adapted.head_names == ["main", "aux_s2", "aux_s1"]
    assert [t.name for t in adapted.taps] == ["s2", "s1"]
    model = keras.Model(adapted.inputs, adapted.outputs)
    outs = model(np.zeros((2, 16, 16, 3), "float32"))
    assert [tuple(o.shape) for o in outs] == [(2, 4)] * 3


def test_a_hand_made_tap_uses_its_layout_tensor():
    # A head on a tensor that is not a backbone layer (as DHM's RootSelector
    # output) is laid out for the backbone tensor the Tap names.
    bb = tiny_backbone()
    graph = taps.BackboneGraph(bb)
    s1 = graph.layer_output("s1")
    scaled = keras.layers.Rescaling(2.0, name="twice")(s1)
    tap = adapt.Tap("s1x2", scaled, layout_name="s1", layout_tensor=s1)
    resolved = adapt.resolve_taps(bb, graph, ["s2", tap])
    assert [t.name for t in resolved] == ["s2", "s1x2"]  # ordered by s1's depth
    logits = adapt.build_head(bb, graph, tap, "residual", 3)
    model = keras.Model(bb.inputs, logits)
    # Two stride-2 stages, like the backbone after s1.
    assert tuple(model.get_layer("aux_s1x2_pool").input.shape[1:3]) == (2, 2)
    assert "twice" in [l.name for l in model.layers]


def test_block_style_follows_the_backbone():
    resnet = keras.applications.ResNet50(weights=None, include_top=False,
                                         input_shape=(32, 32, 3))
    assert adapt.block_style(resnet)[0] == "bottleneck"
    assert adapt.block_style(tiny_backbone())[0] == "basic"


def test_main_head_uses_a_linear_top_and_refuses_others():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inp))
    logits, n = adapt.main_head(keras.Model(inp, keras.layers.Dense(7, name="top")(x)))
    assert n == 7 and logits._keras_history.operation.name == "top"
    with pytest.raises(ValueError, match="whole number"):
        adapt.check_num_classes(2.5)
    assert adapt.check_num_classes(3.0) == 3
