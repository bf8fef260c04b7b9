"""Backbone adaptation: from a backbone to the graph of a `DKSModel`.

Everything `DKSModel` needs to turn a backbone into a multi-head network,
as public functions, so other models (e.g. `keras_dks.methods.DHMModel`)
build on them by composition:

- `check_backbone` rejects what cannot be adapted, before any work;
  `check_num_classes` and `ends_in_softmax` are the package's only class
  count check and softmax detection.
- `main_head` adds (or finds) the main classifier.
- `resolve_taps` turns tap names into `Tap`s, deepest first. A `Tap` may
  also be built by hand around any tensor computed from the backbone's
  graph (DHM's `RootSelector` output), naming the backbone layer whose
  place decides the head's layout.
- `block_style` picks the residual block kind and BN settings that make
  heads match the backbone.
- `build_head` builds one auxiliary head on a `Tap`.
- `adapt_backbone` does all of the above and returns an `AdaptedBackbone`.

Dependencies: `taps`, `blocks`, `heads` only.
"""

import dataclasses
import numbers
import re
import warnings

import keras

from keras_dks import blocks
from keras_dks import heads as heads_lib
from keras_dks import taps as taps_lib


@dataclasses.dataclass
class Tap:
    """A place where an auxiliary head is attached.

    Args:
        name: the tap's name (a layer name, a pyramid key, or any label such
            as `"a|b"` for a branch with several candidate roots). The head
            is named `head_name(name)`.
        tensor: the feature map the head is built on, a KerasTensor computed
            from the backbone's input.
        layout_name: backbone layer whose role decides the head's layout
            (`dks_head_stages` of `keras_dks.backbones`); default `name`.
        layout_tensor: backbone tensor whose position and shape decide the
            head's layout (the later stages it copies); default `tensor`.
        depth_tensors: backbone tensors whose deepest position orders the
            heads; default `[layout_tensor]`.

    Example:
    ```python
    graph = keras_dks.taps.BackboneGraph(backbone)
    tap = keras_dks.adapt.resolve_taps(backbone, graph, ["conv3_block4_out"])[0]
    logits = keras_dks.adapt.build_head(backbone, graph, tap, "simple", 10)
    ```
    """

    name: str
    tensor: object
    layout_name: str = None
    layout_tensor: object = None
    depth_tensors: list = None

    def __post_init__(self):
        if self.layout_name is None:
            self.layout_name = self.name
        if self.layout_tensor is None:
            self.layout_tensor = self.tensor
        if self.depth_tensors is None:
            self.depth_tensors = [self.layout_tensor]


@dataclasses.dataclass
class AdaptedBackbone:
    """What `adapt_backbone` returns.

    Args:
        inputs: the backbone's image input.
        outputs: logits of every head, main head first, then auxiliary heads
            from the deepest tap to the shallowest.
        head_names: the names of those outputs.
        taps: the resolved `Tap`s, deepest first.
        num_classes: number of classes.
    """

    inputs: object
    outputs: list
    head_names: list
    taps: list
    num_classes: int


def head_name(tap_name):
    """The auxiliary head's name of a tap: `aux_<tap>` with `[^0-9A-Za-z_]`
    replaced by `_`.

    Example:
    >>> head_name("conv3_block4_out")
    'aux_conv3_block4_out'
    """
    return "aux_" + re.sub(r"[^0-9A-Za-z_]", "_", str(tap_name))


def check_backbone(backbone):
    """Raise a ValueError naming the fix if `backbone` cannot be adapted.

    Checks: a `keras.Model`, functional (has a graph to tap), one rank-4
    image input, one output.

    Example:
    ```python
    keras_dks.adapt.check_backbone(keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(64, 64, 3)))
    ```
    """
    if not isinstance(backbone, keras.Model):
        raise ValueError(
            "backbone must be a keras.Model (e.g. keras.applications."
            f"ResNet50(weights=None, include_top=False)); got {type(backbone)}."
        )
    if isinstance(backbone, keras.Sequential):
        raise ValueError(
            "DKSModel needs a functional backbone; got the keras.Sequential "
            f"model {backbone.name!r}. Pass keras.Model(model.inputs, "
            "model.outputs) instead (the Sequential model must start with "
            "keras.Input(shape) so that it has inputs); it shares the layers "
            "and weights."
        )
    if not taps_lib.is_functional(backbone):
        raise ValueError(
            "DKSModel needs a functional backbone (built with keras.Input / "
            "keras.Model(inputs, outputs), a keras.applications model or a "
            f"keras-hub backbone); got the subclassed model "
            f"{type(backbone).__name__!r}, which has no graph to tap. Rebuild "
            "it functionally (keras.Input + layers + keras.Model(inputs, "
            "outputs)) so its layers can be tapped."
        )
    if len(backbone.inputs) != 1:
        raise ValueError(
            f"The backbone must have exactly one image input; it has "
            f"{len(backbone.inputs)}. Wrap it so it takes one "
            "(batch, height, width, channels) tensor."
        )
    image = backbone.inputs[0]
    if len(image.shape) != 4:
        raise ValueError(
            "DKSModel needs an image backbone whose input has rank 4, "
            f"(batch, height, width, channels); got shape {image.shape}. "
            "Reshape the data to images, e.g. with keras.layers.Reshape "
            "in the backbone."
        )
    if len(backbone.outputs) != 1:
        raise ValueError(
            f"The backbone must have one output; it has {len(backbone.outputs)}."
        )


def check_num_classes(num_classes):
    """`num_classes` as an int >= 2 (None passes through); else a ValueError.

    Args:
        num_classes: the number of classes, a whole number (int, NumPy
            integer or integral float such as `10.0`), or None.

    Example:
    >>> check_num_classes(10.0)
    10
    """
    if num_classes is None:
        return None
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Real)
        or not float(num_classes).is_integer()
    ):
        raise ValueError(
            f"num_classes must be a whole number of classes, got "
            f"{num_classes!r}. Pass the number of label values, e.g. "
            "num_classes=10 for labels 0..9."
        )
    if int(num_classes) < 2:
        raise ValueError(
            f"num_classes must be >= 2, got {num_classes}: a softmax "
            "classifier needs two classes or more. For a yes/no task pass "
            "num_classes=2 with labels 0 and 1."
        )
    return int(num_classes)


def _output_operation(model):
    # The operation computing a functional model's single output, or None.
    outputs = model.outputs
    if not outputs or len(outputs) != 1:
        return None
    for op, _, op_outputs in reversed(taps_lib.graph_nodes(model)):
        if any(t is outputs[0] for t in op_outputs):
            return op
    return None


def output_activation(model):
    """`"softmax"` / `"sigmoid"` when that activation computes the model's
    output (so it is not logits), else None (also when it cannot be known).

    Looks at the layer or operation that makes the single output of a
    functional or `Sequential` model (inside nested models too): a `Softmax`
    layer, `keras.ops.softmax`, an `Activation` layer or any layer whose
    `activation` is softmax (likewise sigmoid). Subclassed models: None.

    Args:
        model: a `keras.Model` or a layer.

    Example:
    ```python
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(inp))
    keras_dks.adapt.output_activation(model)   # "softmax"
    ```
    """
    op = model
    if isinstance(model, keras.Sequential):
        return output_activation(model.layers[-1]) if model.layers else None
    if isinstance(model, keras.Model):
        if not taps_lib.is_functional(model):
            return None
        op = _output_operation(model)
        if op is None or op is model:
            return None
        if isinstance(op, keras.Model):
            return output_activation(op)
    if type(op).__name__ in ("Softmax", "Sigmoid"):  # layers and keras.ops
        return type(op).__name__.lower()
    name = getattr(getattr(op, "activation", None), "__name__", None)
    return name if name in ("softmax", "sigmoid") else None


def ends_in_softmax(model):
    """True when a softmax computes `model`'s output (see `output_activation`).

    Example:
    ```python
    keras_dks.adapt.ends_in_softmax(keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3)))   # True
    ```
    """
    return output_activation(model) == "softmax"


def main_head(backbone, num_classes=None):
    """The main head's logits and the number of classes.

    A backbone ending in a linear `Dense` is used as is (its width is the
    class count); a 4-D feature map gets global pooling + Dense
    (`heads.classifier`), pooled features a Dense.

    Returns:
        `(logits, num_classes)`.

    Example:
    ```python
    logits, n = keras_dks.adapt.main_head(backbone, num_classes=10)
    ```
    """
    num_classes = check_num_classes(num_classes)
    out = backbone.outputs[0]
    layer = _output_operation(backbone)
    activation = getattr(layer, "activation", None)
    act_name = getattr(activation, "__name__", str(activation))
    if ends_in_softmax(backbone):
        raise ValueError(
            f"The backbone's output layer {layer.name!r} applies softmax; "
            "DKSModel needs logits. Build it with include_top=False (DKSModel "
            "adds the classifier) or classifier_activation=None."
        )
    if (
        len(out.shape) == 2
        and isinstance(layer, keras.layers.Dense)
        and act_name != "linear"
    ):
        raise ValueError(
            f"The backbone ends in the Dense layer {layer.name!r} with "
            f"activation={act_name!r}: its outputs are not logits, and "
            "DKSModel would stack a second classifier on top. Build the "
            "backbone with include_top=False (DKSModel adds the classifier) "
            "or make its last Dense linear (activation=None)."
        )
    if len(out.shape) == 2 and isinstance(layer, keras.layers.Dense):
        units = out.shape[-1]
        if num_classes is not None and num_classes != units:
            raise ValueError(
                f"num_classes={num_classes} but the backbone's top layer "
                f"{layer.name!r} has {units} units. Pass num_classes={units} "
                "or build the backbone with include_top=False."
            )
        return out, units
    if num_classes is None:
        raise ValueError(
            "Pass num_classes: the backbone has no logits layer to take it from."
        )
    if len(out.shape) == 4:
        return heads_lib.classifier(out, num_classes, "main"), num_classes
    if len(out.shape) == 2:  # pooled features
        return (
            keras.layers.Dense(num_classes, dtype="float32", name="main")(out),
            num_classes,
        )
    raise ValueError(
        f"Unsupported backbone output shape {out.shape}: expected a 4-D "
        "feature map, pooled features or logits."
    )


def resolve_taps(backbone, graph, taps, final=None):
    """Tap names (or ready `Tap`s) -> validated `Tap`s, deepest first.

    Args:
        backbone: the backbone.
        graph: its `keras_dks.taps.BackboneGraph`.
        taps: `"auto"`, or a list of layer names, keras-hub pyramid keys or
            `Tap` objects (kept as given, e.g. a `RootSelector` output).
        final: the final feature map (default: `graph.final_feature_map()`).

    Example:
    ```python
    graph = keras_dks.taps.BackboneGraph(backbone)
    [t.name for t in keras_dks.adapt.resolve_taps(backbone, graph, "auto")]
    ```
    """
    final = graph.final_feature_map() if final is None else final
    if isinstance(taps, str):
        if taps != "auto":
            raise ValueError(
                f'taps must be "auto" or a list of layer names; got {taps!r}. '
                f'Did you mean taps=["{taps}"]?'
            )
        taps = taps_lib.auto_taps(backbone, graph)
    taps = list(taps)
    names = [t.name if isinstance(t, Tap) else t for t in taps]
    if len(set(names)) != len(names):
        raise ValueError(f"taps={names} names a layer twice; remove it.")
    final_pos = graph.position(final)
    pyramid = taps_lib.is_pyramid_backbone(backbone)
    found = []
    for tap in taps:
        if isinstance(tap, Tap):
            depth = max(graph.position(t) for t in tap.depth_tensors)
            found.append((depth, tap))
            continue
        if pyramid and tap in backbone.pyramid_outputs:
            tensor = backbone.pyramid_outputs[tap]
        else:
            tensor = graph.layer_output(tap)
        if tensor is None:
            stage_ends = [s.name for s in graph.stages()]
            candidates = [n for n, _ in graph.feature_tensors(final_pos)]
            extra = (
                f" Pyramid keys: {sorted(backbone.pyramid_outputs)}."
                if pyramid
                else ""
            )
            raise ValueError(
                f"Unknown tap {tap!r}: backbone {backbone.name!r} has no layer "
                f"of that name.{extra} Stage ends (the usual taps): "
                f"{stage_ends}. All valid taps (4-D layers before the final "
                f"feature map): {candidates}."
            )
        if len(tensor.shape) != 4:
            raise ValueError(
                f"Tap {tap!r} outputs shape {tensor.shape}, not a 4-D feature "
                "map (batch, height, width, channels). Tap a convolutional "
                "layer instead."
            )
        pos = graph.position(tensor)
        if tensor is final or pos is None or pos >= final_pos:
            raise ValueError(
                f"Tap {tap!r} is at or after the backbone's final feature map "
                f"({graph.producer(final).name!r}), where the main "
                "classifier already sits. Tap an earlier layer, e.g. one of "
                f"{taps_lib.auto_taps(backbone, graph)}."
            )
        found.append((pos, Tap(tap, tensor)))
    found.sort(key=lambda f: -f[0])  # deepest first
    return [f[1] for f in found]


def _all_layers(model):
    # The layers of `model` and of the models nested in it.
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def block_style(backbone, sync_batchnorm=False):
    """Block kind and `BlockConfig` that make heads match the backbone.

    Returns:
        `(kind, config)`: a `keras_dks.blocks` block kind and its config.

    Example:
    ```python
    kind, config = keras_dks.adapt.block_style(backbone)   # "bottleneck", ...
    ```
    """
    if sync_batchnorm:
        # sync_batchnorm only reaches the heads DKSModel builds; BN in
        # the backbone keeps per-replica statistics unless it was built
        # with synchronized=True.
        unsynced = [
            l.name
            for l in _all_layers(backbone)
            if isinstance(l, keras.layers.BatchNormalization) and not l.synchronized
        ]
        if unsynced:
            warnings.warn(
                f"sync_batchnorm=True, but {len(unsynced)} BatchNormalization "
                f"layers of the backbone are not synchronized (e.g. "
                f"{unsynced[0]!r}): under tf.distribute they keep "
                "per-replica statistics. Build the backbone with "
                "BatchNormalization(synchronized=True) (keras_dks.backbones "
                "models take sync_batchnorm=True).",
                stacklevel=5,
            )
    if hasattr(backbone, "dks_block_kind"):
        config = backbone.dks_block_config().replace(
            sync_batchnorm=sync_batchnorm or backbone.dks_block_config().sync_batchnorm
        )
        return backbone.dks_block_kind, config
    block_type = getattr(backbone, "block_type", None)  # keras-hub ResNet
    names = [layer.name for layer in backbone.layers]
    if block_type is not None:
        kind = "bottleneck" if "bottleneck" in block_type else "basic"
        if getattr(backbone, "use_pre_activation", False):
            kind = "preact_" + kind
    elif any(re.fullmatch(r"conv\d_block\d+_preact_bn", n) for n in names):
        kind = "preact_bottleneck"  # keras.applications ResNetV2
    elif any(re.fullmatch(r"conv\d_block\d+_3_conv", n) for n in names):
        kind = "bottleneck"  # keras.applications ResNet
    elif any(n.endswith("_preact_bn") for n in names):
        # Built from keras_dks.blocks outside keras_dks.backbones.
        bottleneck = any(re.search(r"_block\d+_conv2$", n) for n in names)
        kind = "preact_bottleneck" if bottleneck else "preact_basic"
    else:
        kind = "basic"
    bn = next(
        (l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)),
        None,
    )
    config = blocks.BlockConfig(
        bn_epsilon=bn.epsilon if bn is not None else 1e-5,
        bn_momentum=bn.momentum if bn is not None else 0.9,
        # Heads of a backbone built with synchronized BN sync too.
        sync_batchnorm=sync_batchnorm or bool(getattr(bn, "synchronized", False)),
    )
    return kind, config


def check_head(head):
    """Raise a ValueError unless `head` is a head kind or a callable."""
    if not (isinstance(head, str) and head in heads_lib.HEAD_KINDS) and not callable(
        head
    ):
        raise ValueError(
            f"Unknown head={head!r}. Use one of {list(heads_lib.HEAD_KINDS)} or "
            "a callable head(features, num_downsamples, num_classes, name)."
        )


def build_head(
    backbone,
    graph,
    tap,
    head,
    num_classes,
    style=None,
    head_width=1.0,
    head_depth=None,
    final=None,
    name=None,
):
    """The logits of one auxiliary head built on `tap.tensor`.

    Args:
        backbone: the backbone.
        graph: its `keras_dks.taps.BackboneGraph`.
        tap: a `Tap`; its `layout_name` / `layout_tensor` decide the layout.
        head: `"residual"`, `"simple"`, `"conv"` or a callable
            `head(features, num_downsamples, num_classes, name) -> logits`.
        num_classes: classifier width.
        style: `(kind, config)` from `block_style` (computed if None).
        head_width: multiplier on residual heads' widths.
        head_depth: blocks per stage of residual heads (default: the
            backbone's).
        final: the final feature map (default: `graph.final_feature_map()`).
        name: head name (default: `head_name(tap.name)`).

    Example:
    ```python
    logits = keras_dks.adapt.build_head(backbone, graph, tap, "residual", 10)
    ```
    """
    check_head(head)
    final = graph.final_feature_map() if final is None else final
    name = name or head_name(tap.name)
    tensor = tap.tensor
    if head == "simple":
        return heads_lib.simple_head(tensor, num_classes, name)
    downsamples = taps_lib.num_downsamples(tensor, final, tap.name)
    if callable(head):
        logits = head(tensor, downsamples, num_classes, name)
        if len(logits.shape) != 2 or logits.shape[-1] != num_classes:
            raise ValueError(
                f"The head callable returned shape {logits.shape} for "
                f"{name!r}; it must return logits of shape "
                f"(batch, {num_classes})."
            )
        return logits
    kind, config = style if style is not None else block_style(backbone)
    if head == "conv":
        return heads_lib.conv_head(tensor, num_classes, name, config)
    if hasattr(backbone, "dks_head_stages") and tap.layout_name in getattr(
        backbone, "dks_taps", ()
    ):
        head_stages = [
            heads_lib.HeadStage(
                max(int(round(s.filters * head_width)), 1),
                int(head_depth) if head_depth is not None else s.blocks,
                s.stride,
            )
            for s in backbone.dks_head_stages(tap.layout_name)
        ]
    else:
        pos = graph.position(tap.layout_tensor)
        tap_res = tuple(tensor.shape[1:3])
        later, seen = [], {tap_res}
        for s in graph.stages():
            if graph.position(s.tensor) > pos and s.resolution not in seen:
                seen.add(s.resolution)
                later.append((s.channels, s.num_blocks))
        head_stages = heads_lib.default_residual_stages(
            tensor.shape[-1], later, downsamples, head_width, head_depth
        )
    return heads_lib.residual_head(tensor, head_stages, num_classes, name, kind, config)


def adapt_backbone(
    backbone,
    num_classes=None,
    taps="auto",
    head="residual",
    head_width=1.0,
    head_depth=None,
    sync_batchnorm=False,
):
    """Main head + one auxiliary head per tap, as an `AdaptedBackbone`.

    Args: see `keras_dks.DKSModel` (`taps` may also hold `Tap` objects).

    Example:
    ```python
    adapted = keras_dks.adapt.adapt_backbone(backbone, num_classes=10)
    model = keras.Model(adapted.inputs, adapted.outputs)
    ```
    """
    check_backbone(backbone)
    check_head(head)
    graph = taps_lib.BackboneGraph(backbone)
    final = graph.final_feature_map()
    main_logits, num_classes = main_head(backbone, num_classes)
    resolved = resolve_taps(backbone, graph, taps, final)
    names = ["main"] + [head_name(t.name) for t in resolved]
    style = block_style(backbone, sync_batchnorm)
    aux = [
        build_head(
            backbone, graph, tap, head, num_classes, style, head_width,
            head_depth, final, name,
        )
        for tap, name in zip(resolved, names[1:])
    ]
    return AdaptedBackbone(
        inputs=backbone.inputs[0],
        outputs=[main_logits] + aux,
        head_names=names,
        taps=resolved,
        num_classes=num_classes,
    )
