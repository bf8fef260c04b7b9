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
    net = keras.Model(inp, keras.layers.Dense(7, name="top")(x))
    logits, n = adapt.main_head(net)
    assert n == 7 and logits is net.get_layer("top").output


@pytest.mark.parametrize("value", [2, 3.0, np.int64(10), np.float32(4.0)])
def test_check_num_classes_accepts_whole_numbers(value):
    result = adapt.check_num_classes(value)
    assert result == int(value) and type(result) is int


@pytest.mark.parametrize(
    "value, match",
    [(2.5, "whole number"), ("3", "whole number"), (True, "whole number"),
     (float("nan"), "whole number"), (1, ">= 2"), (0, ">= 2"), (-3, ">= 2")],
)
def test_check_num_classes_names_the_fix(value, match):
    with pytest.raises(ValueError, match=match) as info:
        adapt.check_num_classes(value)
    assert "num_classes=" in str(info.value)  # the message shows what to pass


def _features():
    inp = keras.Input((8, 8, 3))
    return inp, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inp))


def test_ends_in_softmax_and_output_activation():
    inp, x = _features()
    dense = lambda act=None: keras.layers.Dense(3, activation=act)(x)
    cases = {
        "softmax": [
            keras.Model(inp, dense("softmax")),
            keras.Model(inp, keras.layers.Softmax()(dense())),
            keras.Model(inp, keras.layers.Activation("softmax")(dense())),
            keras.Model(inp, keras.ops.softmax(dense())),
            keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")]),
        ],
        "sigmoid": [keras.Model(inp, dense("sigmoid"))],
        None: [
            keras.Model(inp, dense()),
            keras.Model(inp, dense("relu")),
            keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
        ],
    }
    # A model whose last operation is a nested softmax model.
    inner = keras.Model(inp, dense("softmax"))
    outer_in = keras.Input((8, 8, 3))
    cases["softmax"].append(keras.Model(outer_in, inner(outer_in)))
    for expected, models in cases.items():
        for model in models:
            assert adapt.output_activation(model) == expected, model.layers[-1]
            assert adapt.ends_in_softmax(model) == (expected == "softmax")

    class Subclassed(keras.Model):  # no graph: unknown, so not softmax
        def call(self, x):
            return keras.ops.softmax(x)

    assert adapt.output_activation(Subclassed()) is None
