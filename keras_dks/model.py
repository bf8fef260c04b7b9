"""`DKSModel`: a backbone trained with auxiliary heads and the synergy loss."""

import functools
import re
import warnings

import keras
import tensorflow as tf
from keras import ops

from keras_dks import blocks
from keras_dks import distribute as distribute_lib
from keras_dks import heads as heads_lib
from keras_dks import losses as losses_lib
from keras_dks import taps as taps_lib

_LABEL_ERROR = "keras_dks: label outside [0, num_classes)"


def _label_errors_as_value_error(method):
    """Turn the in-graph label range check into the ValueError users expect.

    Labels only exist at run time inside the compiled step, where the check
    can only raise `InvalidArgumentError`; the public entry points re-raise
    it as a `ValueError` that names the fix.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except tf.errors.InvalidArgumentError as e:
            if _LABEL_ERROR not in str(e):
                raise
            raise ValueError(
                f"Labels must be integer class indices in [0, {self.num_classes}) "
                f"or one-hot/probability vectors of length {self.num_classes}; "
                "the data contains a label outside that range. Fix the labels "
                "or build the DKSModel with the right num_classes."
            ) from None

    return wrapper


class _MetricSet:
    """Plain holder so Keras' attribute tracking leaves the metrics alone;
    `DKSModel.metrics` exposes them."""

    def __init__(self, trackers, head_metrics):
        self.trackers = trackers
        self.head_metrics = head_metrics


def _as_list(logits):
    # A single-head model (taps=[]) returns a tensor, not a list.
    return list(logits) if isinstance(logits, (list, tuple)) else [logits]


def _scale_for_distribution(value):
    # Gradients are SUM all-reduced across replicas, so every loss term is
    # divided by the replica count exactly once (keras.losses.Loss does the
    # same for its own reduction).
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        value = value * (1.0 / replicas)
    return value


@keras.saving.register_keras_serializable(package="keras_dks")
class DKSModel(keras.Model):
    """Deeply-supervised Knowledge Synergy (Sun et al., CVPR 2019).

    Wraps a backbone into a multi-output model: the main classifier plus
    auxiliary classifiers on intermediate feature maps ("taps"). Training
    minimises

        sum_k alpha_k CE(y, z_k) + sum_(i,j) beta_ij H(sg(p_j), p_i)
        + regularisation (+ weight_decay / 2 * sum ||w||^2)

    where z_k are the heads' logits, p_k their softmax, sg stop-gradient and
    H the soft-target cross-entropy (head i mimics head j). Every term is
    summed over classes and averaged over the batch. At inference only the
    main head is needed: `inference_model()` is the plain network, with no
    extra cost.

    Outputs are the logits of every head, as a list ordered by depth: index
    0 is the main head, then the auxiliary heads from the deepest tap to the
    shallowest. `head_names` gives their names.

    Args:
        backbone: a functional `keras.Model` with one image input: a
            `keras.applications` model built with `include_top=False` (the
            main global-pool + Dense classifier is added here) or with
            `classifier_activation=None`; a keras-hub
            `FeaturePyramidBackbone`; a `keras_dks.backbones` model; or any
            functional CNN.
        num_classes: number of classes. May be omitted when the backbone
            already ends in a logits Dense layer.
        taps: `"auto"` (the ends of the two down-sampling stages before the
            last one, see `keras_dks.taps`), a list of layer names, a list
            of keras-hub pyramid keys (`"P3"`, `"P4"`), or `[]` for the plain
            network (the baseline).
        head: `"residual"` (the paper's heads: the backbone's own blocks with
            as many stride-2 steps as the backbone), `"simple"` (pool +
            Dense), `"conv"` (conv + pool + Dense) or a callable
            `head(features, num_downsamples, num_classes, name) -> logits`.
        pairs: `"bidirectional"` (paper default), `"top_down"`,
            `"bottom_up"`, `"none"` (deep supervision, no synergy) or a list
            of `(student, teacher)` head indices.
        aux_weight: alpha of the auxiliary heads' cross-entropy, a float or
            one per auxiliary head (the main head's weight is 1).
        synergy_weight: beta, a float or one per pair.
        label_smoothing: label smoothing of the cross-entropy terms.
        weight_decay: coupled L2 on *all* trainable variables, as in the
            authors' code (PyTorch `SGD(weight_decay=...)`): adds
            `weight_decay / 2 * sum ||w||^2` to the loss. 0 disables it; for
            decoupled decay use the optimizer's `weight_decay` instead.
        head_width: multiplier on the residual heads' widths.
        head_depth: if set, blocks per stage of the residual heads.
        sync_batchnorm: use synchronized BatchNormalization in the heads.
        pair_keep_prob: per-pair dropping, a library option (neither the
            DHM paper nor its code drops single pairs): each synergy pair is
            kept with this probability per training step (dropped pairs add
            nothing, no rescaling; the same pairs on every replica). 1.0
            keeps all.
        seed: seed of the pair sampling.
        name: model name.

    Example:
    ```python
    import keras, keras_dks
    backbone = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(64, 64, 3))
    model = keras_dks.DKSModel(backbone, num_classes=10)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  metrics=["accuracy"])
    x = keras.random.uniform((8, 64, 64, 3))
    y = keras.random.randint((8,), 0, 10)
    model.fit(x, y, epochs=1, verbose=0)
    serving = model.inference_model()   # backbone + main classifier only
    ```
    """

    def __init__(
        self,
        backbone,
        num_classes=None,
        taps="auto",
        head="residual",
        pairs="bidirectional",
        aux_weight=1.0,
        synergy_weight=1.0,
        label_smoothing=0.0,
        weight_decay=0.0,
        head_width=1.0,
        head_depth=None,
        sync_batchnorm=False,
        pair_keep_prob=1.0,
        seed=None,
        name="dks_model",
        **kwargs,
    ):
        # === Validation that needs no graph ===
        if not isinstance(backbone, keras.Model):
            raise ValueError(
                "backbone must be a keras.Model (e.g. keras.applications."
                f"ResNet50(weights=None, include_top=False)); got {type(backbone)}."
            )
        if not (isinstance(head, str) and head in heads_lib.HEAD_KINDS) and not (
            callable(head)
        ):
            raise ValueError(
                f"Unknown head={head!r}. Use one of {list(heads_lib.HEAD_KINDS)} or "
                "a callable head(features, num_downsamples, num_classes, name)."
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"label_smoothing must be in [0, 1), got {label_smoothing}."
            )
        if not weight_decay >= 0.0:
            raise ValueError(
                f"weight_decay must be non-negative, got {weight_decay}."
            )
        if not 0.0 < pair_keep_prob <= 1.0:
            raise ValueError(
                f"pair_keep_prob must be in (0, 1], got {pair_keep_prob}; "
                "use pairs='none' to switch the synergy loss off."
            )
        if not head_width > 0:
            raise ValueError(f"head_width must be positive, got {head_width}.")
        if head_depth is not None and int(head_depth) < 1:
            raise ValueError(f"head_depth must be >= 1, got {head_depth}.")
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

        # === The graph ===
        graph = taps_lib.BackboneGraph(backbone)
        final = graph.final_feature_map()
        main_logits, num_classes = self._main_head(backbone, final, num_classes)
        tap_names, tap_tensors = self._resolve_taps(backbone, graph, final, taps)
        head_names = ["main"] + [
            "aux_" + re.sub(r"[^0-9A-Za-z_]", "_", n) for n in tap_names
        ]
        kind, config = self._head_building_style(backbone, sync_batchnorm)
        stages = graph.stages()
        aux_logits = []
        for tap, tensor, head_name in zip(tap_names, tap_tensors, head_names[1:]):
            aux_logits.append(
                self._build_head(
                    backbone, graph, stages, final, tap, tensor, head_name,
                    head, num_classes, kind, config, head_width, head_depth,
                )
            )

        pair_list = losses_lib.resolve_pairs(pairs, len(head_names))
        aux_weights = losses_lib.resolve_weights(
            aux_weight, len(tap_names), "aux_weight", "auxiliary heads"
        )
        pair_weights = losses_lib.resolve_weights(
            synergy_weight, len(pair_list), "synergy_weight", "pairs"
        )

        super().__init__(
            inputs=image, outputs=[main_logits] + aux_logits, name=name, **kwargs
        )

        # === Config ===
        self.backbone = backbone
        self.num_classes = num_classes
        self.taps = tap_names
        self.head = head
        self.pairs = pairs if isinstance(pairs, str) else [list(p) for p in pair_list]
        self.aux_weight = aux_weight
        self.synergy_weight = synergy_weight
        self.label_smoothing = float(label_smoothing)
        self.weight_decay = float(weight_decay)
        self.head_width = head_width
        self.head_depth = head_depth
        self.sync_batchnorm = sync_batchnorm
        self.pair_keep_prob = float(pair_keep_prob)
        if seed is None:
            seed = int(tf.random.uniform((), 0, 2**31 - 1, dtype=tf.int64))
        self.seed = int(seed)
        self.head_names = head_names
        self.pair_list = pair_list
        self._alphas = [1.0] + aux_weights
        self._betas = pair_weights
        self._dks_metrics = None

    # ------------------------------------------------------------------
    # Graph construction helpers
    # ------------------------------------------------------------------
    @staticmethod
    def _main_head(backbone, final, num_classes):
        if len(backbone.outputs) != 1:
            raise ValueError(
                f"The backbone must have one output; it has {len(backbone.outputs)}."
            )
        out = backbone.outputs[0]
        layer = out._keras_history.operation
        activation = getattr(layer, "activation", None)
        act_name = getattr(activation, "__name__", str(activation))
        if isinstance(layer, keras.layers.Softmax) or act_name == "softmax":
            raise ValueError(
                f"The backbone's output layer {layer.name!r} applies softmax; "
                "DKSModel needs logits. Build it with include_top=False (DKSModel "
                "adds the classifier) or classifier_activation=None."
            )
        if num_classes is not None and int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if len(out.shape) == 2 and isinstance(layer, keras.layers.Dense) and (
            act_name == "linear"
        ):
            units = out.shape[-1]
            if num_classes is not None and int(num_classes) != units:
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
        num_classes = int(num_classes)
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

    @staticmethod
    def _resolve_taps(backbone, graph, final, taps):
        if isinstance(taps, str):
            if taps != "auto":
                raise ValueError(
                    f'taps must be "auto" or a list of layer names; got {taps!r}. '
                    f'Did you mean taps=["{taps}"]?'
                )
            taps = taps_lib.auto_taps(backbone, graph)
        taps = list(taps)
        if len(set(taps)) != len(taps):
            raise ValueError(f"taps={taps} names a layer twice; remove it.")
        final_pos = graph.position(final)
        pyramid = taps_lib.is_pyramid_backbone(backbone)
        found = []
        for tap in taps:
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
                    f"({final._keras_history.operation.name!r}), where the main "
                    "classifier already sits. Tap an earlier layer, e.g. one of "
                    f"{taps_lib.auto_taps(backbone, graph)}."
                )
            found.append((pos, tap, tensor))
        found.sort(key=lambda f: -f[0])  # deepest first
        return [f[1] for f in found], [f[2] for f in found]

    @staticmethod
    def _head_building_style(backbone, sync_batchnorm):
        """Block kind and BN settings that make heads match the backbone."""
        if sync_batchnorm:
            # sync_batchnorm only reaches the heads DKSModel builds; BN in
            # the backbone keeps per-replica statistics unless it was built
            # with synchronized=True.
            unsynced = [
                l.name
                for l in backbone._flatten_layers(include_self=False)
                if isinstance(l, keras.layers.BatchNormalization)
                and not l.synchronized
            ]
            if unsynced:
                warnings.warn(
                    f"sync_batchnorm=True, but {len(unsynced)} BatchNormalization "
                    f"layers of the backbone are not synchronized (e.g. "
                    f"{unsynced[0]!r}): under tf.distribute they keep "
                    "per-replica statistics. Build the backbone with "
                    "BatchNormalization(synchronized=True) (keras_dks.backbones "
                    "models take sync_batchnorm=True).",
                    stacklevel=4,
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

    @staticmethod
    def _build_head(
        backbone, graph, stages, final, tap, tensor, head_name, head,
        num_classes, kind, config, head_width, head_depth,
    ):
        if head == "simple":
            return heads_lib.simple_head(tensor, num_classes, head_name)
        downsamples = taps_lib.num_downsamples(tensor, final, tap)
        if callable(head):
            logits = head(tensor, downsamples, num_classes, head_name)
            if len(logits.shape) != 2 or logits.shape[-1] != num_classes:
                raise ValueError(
                    f"The head callable returned shape {logits.shape} for "
                    f"{head_name!r}; it must return logits of shape "
                    f"(batch, {num_classes})."
                )
            return logits
        if head == "conv":
            return heads_lib.conv_head(tensor, num_classes, head_name, config)
        if hasattr(backbone, "dks_head_stages") and tap in getattr(backbone, "dks_taps", ()):
            head_stages = list(backbone.dks_head_stages(tap))
            head_stages = [
                heads_lib.HeadStage(
                    max(int(round(s.filters * head_width)), 1),
                    int(head_depth) if head_depth is not None else s.blocks,
                    s.stride,
                )
                for s in head_stages
            ]
        else:
            pos = graph.position(tensor)
            tap_res = tuple(tensor.shape[1:3])
            later, seen = [], {tap_res}
            for s in stages:
                if graph.position(s.tensor) > pos and s.resolution not in seen:
                    seen.add(s.resolution)
                    later.append((s.channels, s.num_blocks))
            head_stages = heads_lib.default_residual_stages(
                tensor.shape[-1], later, downsamples, head_width, head_depth
            )
        return heads_lib.residual_head(
            tensor, head_stages, num_classes, head_name, kind, config
        )

    # ------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------
    def inference_model(self, softmax=False, name=None):
        """The plain network: input -> main head, sharing the trained weights.

        It holds the backbone and the main classifier only: no auxiliary
        variable is reachable, so it costs exactly what the baseline does.

        Args:
            softmax: return probabilities instead of logits.
            name: model name (default: `<backbone name>_inference`).

        Example:
        ```python
        serving = model.inference_model()
        serving.export("export/1", format="tf_saved_model")
        ```
        """
        out = self.outputs[0]
        if softmax:
            out = keras.layers.Softmax(dtype="float32", name="probabilities")(out)
        return keras.Model(
            self.inputs[0], out, name=name or f"{self.backbone.name}_inference"
        )

    # ------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------
    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """Configure training. Same as `keras.Model.compile`, except:

        - `loss` must be None: the DKS loss is set by the constructor
          (`aux_weight`, `synergy_weight`, `label_smoothing`, `pairs`).
        - every metric in `metrics` is tracked for every head: the main head
          under the plain name (`accuracy`), auxiliary heads prefixed with
          their head name (`aux_conv4_block6_out_accuracy`). Metrics receive
          integer labels and logits; `"accuracy"` means sparse categorical
          accuracy and works for integer and one-hot labels alike.
        """
        for arg, fix in (
            ("loss_weights", "aux_weight / synergy_weight"),
            ("weighted_metrics", "metrics"),
        ):
            if kwargs.get(arg) is not None:
                raise ValueError(
                    f"DKSModel.compile does not take {arg}; use {fix} instead."
                )
            kwargs.pop(arg, None)
        if loss is not None:
            raise ValueError(
                "DKSModel computes its own loss (per-head cross-entropy + synergy "
                "loss); call compile(loss=None) and set aux_weight, "
                "synergy_weight, label_smoothing and pairs on the DKSModel."
            )
        super().compile(optimizer=optimizer, loss=None, metrics=None, **kwargs)
        self._metric_specs = list(metrics) if metrics else []
        trackers = [keras.metrics.Mean(name="loss"), keras.metrics.Mean(name="ce_loss")]
        trackers += [keras.metrics.Mean(name=f"{h}_ce_loss") for h in self.head_names[1:]]
        trackers.append(keras.metrics.Mean(name="synergy_loss"))
        head_metrics = [
            [self._make_metric(spec, prefix) for spec in self._metric_specs]
            for prefix in [""] + [f"{h}_" for h in self.head_names[1:]]
        ]
        self._dks_metrics = _MetricSet(trackers, head_metrics)

    @staticmethod
    def _make_metric(spec, prefix):
        if isinstance(spec, str):
            if spec in ("accuracy", "acc"):
                return keras.metrics.SparseCategoricalAccuracy(name=prefix + "accuracy")
            obj = keras.metrics.get(spec)
            if isinstance(obj, keras.metrics.Metric):
                spec = obj
            else:
                return keras.metrics.MeanMetricWrapper(obj, name=prefix + spec)
        if isinstance(spec, keras.metrics.Metric):
            config = spec.get_config()
            config["name"] = prefix + spec.name
            return spec.__class__.from_config(config)
        if callable(spec):
            return keras.metrics.MeanMetricWrapper(
                spec, name=prefix + getattr(spec, "__name__", "metric")
            )
        raise ValueError(f"Unsupported metric {spec!r}: pass a name or a Metric.")

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None:
            config["metrics"] = keras.saving.serialize_keras_object(
                getattr(self, "_metric_specs", None) or None
            )
        return config

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            # Lets load_model restore the optimizer state (resumed training).
            self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        if getattr(self, "_dks_metrics", None) is None:
            return []
        m = self._dks_metrics
        return list(m.trackers) + [x for head in m.head_metrics for x in head]

    def _prepare_labels(self, y):
        """(integer labels, smoothed target distribution) from int or one-hot y."""
        y = tf.convert_to_tensor(y)
        c = self.num_classes
        if y.shape.rank == 2 and y.shape[-1] == c:
            targets = tf.cast(y, "float32")
            labels = tf.argmax(targets, axis=-1, output_type=tf.int32)
        else:
            if y.shape.rank == 2 and y.shape[-1] == 1:
                y = tf.squeeze(y, -1)
            if y.shape.rank != 1:
                raise ValueError(
                    f"Labels of shape {y.shape} fit neither integer class indices "
                    f"(batch,) nor one-hot vectors (batch, {c})."
                )
            labels = tf.cast(y, tf.int32)
            with tf.control_dependencies(
                [
                    tf.debugging.assert_non_negative(labels, message=_LABEL_ERROR),
                    tf.debugging.assert_less(labels, c, message=_LABEL_ERROR),
                ]
            ):
                labels = tf.identity(labels)
            targets = tf.one_hot(labels, c, dtype="float32")
            # XLA (jit_compile=True) drops Assert ops, so an out-of-range
            # label would silently become an all-zero target there. Make its
            # target NaN instead: the loss goes NaN and StopOnNonFiniteLoss /
            # TerminateOnNaN stop the run. Without XLA the asserts fire first.
            valid = tf.logical_and(labels >= 0, labels < c)
            targets = tf.where(valid[:, None], targets, float("nan"))
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / c
        return labels, targets

    def _pair_mask(self, training):
        """1/0 per pair, drawn per step, identical on every replica."""
        if not training or self.pair_keep_prob >= 1.0 or not self.pair_list:
            return None
        step = tf.cast(self.optimizer.iterations, tf.int64)
        seed = tf.stack([tf.constant(self.seed, tf.int64), step])
        draw = tf.random.stateless_uniform([len(self.pair_list)], seed=seed)
        return tf.cast(draw < self.pair_keep_prob, "float32")

    def _loss_masks(self, training):
        """(per-head, per-pair) 0/1 multipliers of this step, None = all 1."""
        return None, self._pair_mask(training)

    def compute_dks_loss(self, y, logits, sample_weight=None, training=False):
        """Every loss term, unscaled by distribution (means over the batch).

        Returns:
            dict with `loss` (total), `ce` (list, one per head), `synergy` and
            `regularization`.
        """
        _, targets = self._prepare_labels(y)
        logits = [tf.cast(z, "float32") for z in _as_list(logits)]
        ce = [losses_lib.cross_entropy(targets, z) for z in logits]
        head_mask, mask = self._loss_masks(training)
        alphas = self._alphas
        if head_mask is not None:
            alphas = [a * head_mask[k] for k, a in enumerate(alphas)]
        supervised = tf.add_n([a * c for a, c in zip(alphas, ce)])
        synergy = tf.zeros_like(ce[0])
        for k, ((s, t), beta) in enumerate(zip(self.pair_list, self._betas)):
            if beta == 0.0:
                continue
            term = beta * losses_lib.soft_cross_entropy(logits[t], logits[s])
            synergy += term if mask is None else mask[k] * term
        mean = functools.partial(losses_lib._batch_mean, sample_weight=sample_weight)
        regularization = tf.zeros((), "float32")
        if self.losses:
            regularization += tf.add_n([tf.cast(l, "float32") for l in self.losses])
        if self.weight_decay:
            regularization += losses_lib.coupled_weight_decay(
                self.trainable_variables, self.weight_decay
            )
        return {
            "loss": mean(supervised + synergy) + regularization,
            "ce": [mean(c) for c in ce],
            "synergy": mean(synergy),
            "regularization": regularization,
        }

    def _update_metrics(self, y, logits, terms, batch_size):
        labels, _ = self._prepare_labels(y)
        m = self._dks_metrics
        values = [terms["loss"]] + terms["ce"] + [terms["synergy"]]
        for tracker, value in zip(m.trackers, values):
            # Weighted by batch size: epoch means are means over examples.
            tracker.update_state(value, sample_weight=batch_size)
        for head_metrics, z in zip(m.head_metrics, _as_list(logits)):
            for metric in head_metrics:
                metric.update_state(labels, z)
        return {metric.name: metric.result() for metric in self.metrics}

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise ValueError("DKSModel.fit needs labels: pass (images, labels).")
        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            terms = self.compute_dks_loss(y, logits, sample_weight, training=True)
            loss = _scale_for_distribution(terms["loss"])
            loss = self.optimizer.scale_loss(loss)  # loss scaling for float16
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        return self._update_metrics(y, logits, terms, tf.shape(x)[0])

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise ValueError("DKSModel.evaluate needs labels: pass (images, labels).")
        logits = self(x, training=False)
        terms = self.compute_dks_loss(y, logits, sample_weight, training=False)
        return self._update_metrics(y, logits, terms, tf.shape(x)[0])

    fit = _label_errors_as_value_error(keras.Model.fit)
    evaluate = _label_errors_as_value_error(keras.Model.evaluate)
    train_on_batch = _label_errors_as_value_error(keras.Model.train_on_batch)
    test_on_batch = _label_errors_as_value_error(keras.Model.test_on_batch)

    # --- keras-team/keras#20585 workaround (MultiWorkerMirroredStrategy) ---
    # Keras' fit/evaluate fail under MultiWorkerMirroredStrategy; these three
    # overrides route around it, only for models created under that strategy
    # (details in keras_dks.distribute). Remove them when Keras fixes
    # https://github.com/keras-team/keras/issues/20585.
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if distribute_lib.needs_keras_20585_workaround(self):
            return distribute_lib.maybe_symbolic_build(self, iterator, data_batch)
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def make_train_function(self, force=False):
        if not distribute_lib.needs_keras_20585_workaround(self) or (
            self.train_function is not None and not force
        ):
            return super().make_train_function(force)
        self.train_function = self._make_function(
            distribute_lib.rank1_logs(self.train_step, self.distribute_strategy)
        )
        return self.train_function

    def make_test_function(self, force=False):
        if not distribute_lib.needs_keras_20585_workaround(self) or (
            self.test_function is not None and not force
        ):
            return super().make_test_function(force)
        self.test_function = self._make_function(
            distribute_lib.rank1_logs(self.test_step, self.distribute_strategy)
        )
        return self.test_function

    # ------------------------------------------------------------------
    # Serialization
    # ------------------------------------------------------------------
    def get_config(self):
        head = self.head
        if callable(head):
            head = keras.saving.serialize_keras_object(head)
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": self.num_classes,
            "taps": list(self.taps),
            "head": head,
            "pairs": self.pairs,
            "aux_weight": self.aux_weight,
            "synergy_weight": self.synergy_weight,
            "label_smoothing": self.label_smoothing,
            "weight_decay": self.weight_decay,
            "head_width": self.head_width,
            "head_depth": self.head_depth,
            "sync_batchnorm": self.sync_batchnorm,
            "pair_keep_prob": self.pair_keep_prob,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if isinstance(config.get("head"), dict):
            config["head"] = keras.saving.deserialize_keras_object(config["head"])
        return cls(**config)
