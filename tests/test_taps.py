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


def _graph_summary(graph):
    cut = {id(t): c for t, c in zip(graph.tensors, graph.is_cut)}
    return (
        cut,
        [(s.name, s.resolution, s.channels, s.num_blocks) for s in graph.stages()],
        taps.auto_taps(graph.model, graph),
    )


@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2"])
def test_public_graph_equals_keras_node_table(name, monkeypatch):
    """The graph read through public API (each operation's input / output)
    has the cut points, stages and taps of Keras' own node table."""
    net = getattr(keras.applications, name)(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    public = taps.BackboneGraph(net)
    assert taps._public_nodes(net) is not None  # the public route was taken
    monkeypatch.setattr(taps, "_public_nodes", lambda model: None)
    private = taps.BackboneGraph(net)
    assert len(public.tensors) == len(private.tensors)
    assert _graph_summary(public) == _graph_summary(private)


def test_shared_layer_graph_uses_every_call():
    """A layer called twice: its second call is only in Keras' node table."""
    inp = keras.Input((8, 8, 3))
    relu = keras.layers.ReLU(name="shared_relu")
    x = relu(keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="c2")(x)
    x = relu(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="c3")(x)
    net = keras.Model(inp, x)
    assert taps._public_nodes(net) is None
    graph = taps.BackboneGraph(net)
    assert len(graph.tensors) == 6  # input, c1, relu, c2, relu, c3
    assert [s.resolution for s in graph.stages()] == [(8, 8), (4, 4), (2, 2)]
