"""keras_dks.taps: cut points, stages, auto taps, down-sampling counts."""

import keras
import pytest

from keras_dks import taps
from helpers import tiny_backbone


def _residual_net():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inp)
    y = keras.layers.Conv2D(4, 3, padding="same", name="branch_a")(x)
    y = keras.layers.Conv2D(4, 3, padding="same", name="branch_b")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="down")(x)
    return keras.Model(inp, x)


def test_inside_a_residual_branch_is_not_a_cut_point():
    graph = taps.BackboneGraph(_residual_net())
    cut = {layer.name: c for layer, c in zip(graph.layer_of, graph.is_cut)}
    assert cut["stem"] and cut["add"] and cut["down"]
    assert not cut["branch_a"] and not cut["branch_b"]


def test_stage_end_is_the_last_merge():
    net = _residual_net()
    stages = taps.BackboneGraph(net).stages()
    assert [s.name for s in stages] == ["add", "down"]
    assert stages[0].resolution == (8, 8) and stages[0].num_blocks == 1
    assert taps.auto_taps(net) == ["add"]


def test_auto_taps_and_downsamples_on_a_plain_chain():
    net = tiny_backbone()
    assert taps.auto_taps(net) == ["s2", "s1"]
    graph = taps.BackboneGraph(net)
    final = graph.final_feature_map()
    assert taps.num_downsamples(graph.layer_output("s1"), final) == 2
    assert taps.num_downsamples(graph.layer_output("s2"), final) == 1


def test_subclassed_model_has_no_graph():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="functional backbone"):
        taps.BackboneGraph(Sub())
