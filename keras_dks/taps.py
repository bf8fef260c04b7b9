"""Finding where to attach auxiliary heads in a backbone.

`taps="auto"` picks the *ends of the down-sampling stages before the last
one*, the places the DKS paper uses (conv3_x and conv4_x on ImageNet
ResNets, group0 and group1 on WRNs). The rule, on the backbone's functional
graph:

1. A *cut point* is a tensor that every path from the input to the output
   goes through (the end of a block, never the inside of a residual branch).
2. Tensors are grouped by spatial resolution. A *stage* is a resolution at
   which some layer with weights computes (this leaves out the input and
   padding-only sizes such as 230x230).
3. The end of a stage is the output of its last merge (`Add` /
   `Concatenate`) when that is a cut point, carried through the weightless
   layers right after it (ReLU, Identity) but not into the next block's
   BatchNormalization or conv; without such a merge, its last cut point.
   For ResNet50 that is `conv3_block4_out`; for MobileNetV2 `block_5_add`
   (not the expansion that follows it); for DenseNet121
   `conv3_block12_concat` (the end of dense block 2); for a pre-activation
   WRN the block's addition, not the next block's BN-ReLU.
4. The last stage holds the final feature map; "auto" returns the ends of
   the (up to) two stages before it, deepest first.

keras-hub `FeaturePyramidBackbone`s are tapped by pyramid key instead
("P3", "P4"); "auto" takes the two levels below the final one. Backbones from
`keras_dks.backbones` name their own taps (`dks_taps`).
"""

import collections
import math

import keras
from keras import tree

from keras_dks import compat

Stage = collections.namedtuple(
    "Stage", ["name", "tensor", "resolution", "channels", "num_blocks"]
)
Stage.__doc__ = """A down-sampling stage of a backbone.

Args:
    name: layer name of the stage end (tap it with this name).
    tensor: the stage-end KerasTensor.
    resolution: `(height, width)`, entries may be None for dynamic shapes.
    channels: channels of the stage end.
    num_blocks: residual merges at this resolution and width (0 if none).

Example:
```python
import keras
from keras_dks import blocks, taps
inputs = keras.Input((32, 32, 3))
x = blocks.conv(inputs, 8, 3, 1, "stem", blocks.BlockConfig())
for g, (filters, stride) in enumerate([(8, 1), (16, 2), (32, 2)]):
    x = blocks.residual_stage(x, filters, 1, stride, "basic",
                              f"group{g}", blocks.BlockConfig())
backbone = keras.Model(inputs, x)
for stage in taps.BackboneGraph(backbone).stages():
    print(stage.name, stage.resolution, stage.channels, stage.num_blocks)
# group0_block0_out (32, 32) 8 1
# group1_block0_out (16, 16) 16 1
# group2_block0_out (8, 8) 32 1
```
"""

_MERGE_LAYERS = (keras.layers.Add, keras.layers.Concatenate)


def is_functional(model):
    """True for a functional `keras.Model` (one with a graph of operations).

    Models built with `keras.Model(inputs, outputs)`, `keras.applications`
    models and keras-hub backbones are; `keras.Sequential` models and
    subclassed models are not (rebuild them with `keras.Input` and
    `keras.Model(inputs, outputs)` to tap their layers).

    Args:
        model: any object.

    Returns:
        A bool.

    Example:
    ```python
    import keras
    from keras_dks import taps
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    print(taps.is_functional(model))                  # True
    print(taps.is_functional(keras.layers.Dense(2)))  # False
    ```
    """
    return isinstance(model, keras.Model) and hasattr(model, "operations")


def _public_nodes(model):
    """`(operation, inputs, outputs)` of each operation's first call, from
    `model.operations` (topologically sorted), or None when first calls do
    not make up the graph (a layer called more than once, or first called
    outside this model)."""
    known = {id(t) for t in model.inputs}
    nodes = []
    for op in model.operations:
        try:
            inputs, outputs = tree.flatten(op.input), tree.flatten(op.output)
        except (AttributeError, ValueError):
            return None
        if any(id(t) not in known for t in inputs):
            return None
        known.update(id(t) for t in outputs)
        nodes.append((op, inputs, outputs))
    if any(id(t) not in known for t in model.outputs):
        return None
    return nodes


def graph_nodes(model):
    """Every call of an operation in a functional model, inputs first.

    Reads each operation's first call (public `operation.input` /
    `operation.output`); a graph with a shared layer is read from Keras'
    node table through `keras_dks.compat.graph_nodes`.

    Args:
        model: a functional `keras.Model`.

    Returns:
        A list of `(operation, input_tensors, output_tensors)` (the tensors
        as lists) where every tensor is produced before it is used.

    Example:
    ```python
    import keras
    from keras_dks import taps
    inputs = keras.Input((8, 8, 3), name="images")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.ReLU(name="relu")(x))
    print([op.name for op, _, _ in taps.graph_nodes(model)])
    # ['images', 'conv', 'relu']
    ```
    """
    nodes = _public_nodes(model)
    if nodes is None:  # shared layers: only Keras' node table has them all
        nodes = compat.graph_nodes(model)
    return nodes


class BackboneGraph:
    """Topologically ordered view of a functional backbone's tensors.

    Finds the cut points, the down-sampling stages and the final feature map
    of a backbone by the rule in the module docstring; `DKSModel` uses it to
    resolve `taps="auto"` and to size the auxiliary heads.

    Args:
        model: a functional `keras.Model`.

    Raises:
        ValueError: `model` is not a functional `keras.Model` (e.g. a
            subclassed model).

    Example:
    ```python
    import keras
    from keras_dks import blocks, taps
    inputs = keras.Input((32, 32, 3))
    x = blocks.conv(inputs, 8, 3, 1, "stem", blocks.BlockConfig())
    for g, (filters, stride) in enumerate([(8, 1), (16, 2), (32, 2)]):
        x = blocks.residual_stage(x, filters, 1, stride, "basic",
                                  f"group{g}", blocks.BlockConfig())
    backbone = keras.Model(inputs, x)
    graph = taps.BackboneGraph(backbone)
    print([s.name for s in graph.stages()])
    # ['group0_block0_out', 'group1_block0_out', 'group2_block0_out']
    print(graph.final_feature_map().shape)           # (None, 8, 8, 32)
    tap = graph.layer_output("group1_block0_out")
    print(graph.producer(tap).name)                  # group1_block0_out
    ```
    """

    def __init__(self, model):
        if not is_functional(model):
            raise ValueError(
                "DKSModel needs a functional backbone (built with "
                "keras.Input / keras.Model(inputs, outputs), a "
                "keras.applications model or a keras-hub backbone); got "
                f"{type(model).__name__}. Subclassed models have no graph "
                "to tap: rebuild it functionally."
            )
        self.model = model
        self.tensors = []  # in topological order
        self.layer_of = []
        self.pos = {}
        edges = []
        for operation, inputs, outputs in graph_nodes(model):
            for t in outputs:
                if id(t) not in self.pos:
                    self.pos[id(t)] = len(self.tensors)
                    self.tensors.append(t)
                    self.layer_of.append(operation)
            for t_in in inputs:
                for t in outputs:
                    edges.append((self.pos[id(t_in)], self.pos[id(t)]))
        far = [i for i in range(len(self.tensors))]
        for u, v in edges:
            far[u] = max(far[u], v)
        # A tensor is a cut point iff no edge jumps over it; see module doc.
        self.is_cut = []
        reach = -1
        for p in range(len(self.tensors)):
            self.is_cut.append(reach <= p)
            reach = max(reach, far[p])

    def position(self, tensor):
        """Topological position of `tensor` in this graph, or None."""
        return self.pos.get(id(tensor))

    def producer(self, tensor):
        """The operation (layer) that computes `tensor`, or None."""
        p = self.position(tensor)
        return None if p is None else self.layer_of[p]

    def layer_output(self, name):
        """The output tensor of layer `name` in this graph, or None."""
        for t, layer in zip(self.tensors, self.layer_of):
            if layer.name == name:
                return t
        return None

    def feature_tensors(self, before=None):
        """`(layer name, tensor)` of every 4-D layer output, inputs excluded.

        Args:
            before: optional topological position (see `position`); only
                tensors before it are listed.

        Returns:
            A list of `(str, KerasTensor)`, in topological order.
        """
        out = []
        for p, (t, layer) in enumerate(zip(self.tensors, self.layer_of)):
            if before is not None and p >= before:
                break
            if len(t.shape) == 4 and not isinstance(
                layer, keras.layers.InputLayer
            ):
                out.append((layer.name, t))
        return out

    def final_feature_map(self):
        """The last 4-D cut point: the map the main classifier pools.

        The model's output itself when it is 4-D (`include_top=False`).

        Returns:
            A KerasTensor of shape `(batch, H, W, C)`.

        Raises:
            ValueError: the backbone has no 4-D feature map.
        """
        output = self.model.outputs[0]
        if len(output.shape) == 4:
            return output
        for p in range(len(self.tensors) - 1, -1, -1):
            t = self.tensors[p]
            if len(t.shape) == 4 and self.is_cut[p]:
                return t
        raise ValueError(
            "The backbone has no 4-D feature map: DKSModel needs a "
            "convolutional backbone whose layers output (batch, height, "
            "width, channels) maps."
        )

    def stages(self):
        """All stages of the backbone, shallowest first (see module doc).

        Returns:
            A list of `Stage`, including the final one.
        """
        groups = collections.OrderedDict()
        for p, (t, layer) in enumerate(zip(self.tensors, self.layer_of)):
            if len(t.shape) != 4 or isinstance(layer, keras.layers.InputLayer):
                continue
            res = tuple(t.shape[1:3])
            g = groups.setdefault(
                res, {"weights": False, "merges": [], "cuts": []}
            )
            if layer.weights:
                g["weights"] = True
            if isinstance(layer, _MERGE_LAYERS):
                g["merges"].append(p)
            if self.is_cut[p]:
                g["cuts"].append(p)
        stages = []
        for res, g in groups.items():
            if not g["weights"] or not g["cuts"]:
                continue
            cuts = g["cuts"]
            end = cuts[-1]
            if g["merges"]:
                merge = g["merges"][-1]
                width = self.tensors[merge].shape[-1]
                same = [p for p in cuts if self.tensors[p].shape[-1] == width]
                if merge in cuts:
                    # Extend through weightless layers (ReLU, Identity), stop
                    # before the next block's BN/conv (pre-activation nets).
                    end = merge
                    while (
                        end + 1 < len(self.tensors)
                        and self.is_cut[end + 1]
                        and not self.layer_of[end + 1].weights
                        and tuple(self.tensors[end + 1].shape[1:]) == tuple(self.tensors[end].shape[1:])
                    ):
                        end += 1
                elif same:
                    end = same[-1]
            t = self.tensors[end]
            channels = t.shape[-1]
            blocks = sum(
                1
                for p in g["merges"]
                if isinstance(self.layer_of[p], keras.layers.Add)
                and self.tensors[p].shape[-1] == channels
            )
            stages.append(
                Stage(self.layer_of[end].name, t, res, channels, blocks)
            )
        return stages


def is_pyramid_backbone(backbone):
    """Whether `backbone` has a non-empty `pyramid_outputs` dict (a keras-hub
    `FeaturePyramidBackbone`), so it is tapped by pyramid key ("P3", ...).

    Args:
        backbone: any object.

    Returns:
        A bool.

    Example:
    ```python
    import keras
    from keras_dks import taps
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    print(taps.is_pyramid_backbone(model))  # False
    ```
    """
    return isinstance(getattr(backbone, "pyramid_outputs", None), dict) and bool(
        backbone.pyramid_outputs
    )


def num_downsamples(tap_tensor, final_tensor, tap_name="tap"):
    """Stride-2 steps between a tap and the final map, from static shapes.

    `round(log2(max(H_tap / H_final, W_tap / W_final)))`, and 0 when the
    final map is not smaller than the tap.

    Args:
        tap_tensor: the tapped 4-D tensor `(batch, H, W, C)`.
        final_tensor: the final 4-D feature map.
        tap_name: name of the tap, used in the error message.

    Returns:
        A non-negative int.

    Raises:
        ValueError: a spatial size of either tensor is dynamic (None).

    Example:
    ```python
    import keras
    from keras_dks import taps
    print(taps.num_downsamples(keras.Input((32, 32, 16)),
                               keras.Input((8, 8, 64))))  # 2
    ```
    """
    h, w = tap_tensor.shape[1:3]
    fh, fw = final_tensor.shape[1:3]
    if None in (h, w, fh, fw):
        raise ValueError(
            f"Cannot tell how far {tap_name!r} is from the final feature map: "
            "the backbone's spatial size is dynamic. Build the backbone with "
            "a fixed input_shape=(height, width, channels)."
        )
    ratio = max(h / fh, w / fw)
    return max(int(round(math.log2(ratio))), 0) if ratio >= 1 else 0


def auto_taps(backbone, graph=None, count=2):
    """The tap names `taps="auto"` resolves to for `backbone`, deepest first.

    A `keras_dks.backbones` model answers with its own `dks_taps`; a
    keras-hub pyramid backbone with the pyramid keys below the final level;
    any other functional model with the ends of the stages before the last
    one (see the module docstring).

    Args:
        backbone: a functional keras.Model, keras-hub pyramid backbone, or
            a `keras_dks.backbones` model.
        graph: optional `BackboneGraph` of `backbone`, to reuse one already
            built.
        count: how many stages before the last one to tap. Defaults to 2
            (the paper's two auxiliary heads).

    Returns:
        A list of at most `count` tap names (layer names, or pyramid keys),
        deepest first.

    Raises:
        ValueError: `backbone` is not functional, or has no down-sampling
            stage before its final feature map (e.g. a dynamic spatial size).

    Example:
    ```python
    import keras
    from keras_dks import taps
    backbone = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(64, 64, 3))
    print(taps.auto_taps(backbone))
    # ['conv4_block6_out', 'conv3_block4_out']
    ```
    """
    if hasattr(backbone, "dks_taps"):
        return list(backbone.dks_taps)[:count]
    if is_pyramid_backbone(backbone):
        graph = graph or BackboneGraph(backbone)
        final = graph.final_feature_map()
        keys = [
            k
            for k in sorted(
                backbone.pyramid_outputs, key=lambda k: int(k.lstrip("P"))
            )
            if backbone.pyramid_outputs[k] is not final
        ]
        if not keys:
            raise _no_stage_error(backbone)
        return list(reversed(keys[-count:]))
    graph = graph or BackboneGraph(backbone)
    final = graph.final_feature_map()
    final_pos = graph.position(final)
    earlier = [
        s
        for s in graph.stages()
        if graph.position(s.tensor) < final_pos
        and s.resolution != tuple(final.shape[1:3])
    ]
    if not earlier:
        raise _no_stage_error(backbone)
    return [s.name for s in reversed(earlier[-count:])]


def _no_stage_error(backbone):
    return ValueError(
        f'taps="auto" found no down-sampling stage before the final feature '
        f"map of backbone {backbone.name!r} (its spatial size never shrinks, "
        "or it is dynamic). Pass taps=[layer names] explicitly, build the "
        "backbone with a fixed input_shape, or use taps=[] for a plain "
        "single-head model."
    )
