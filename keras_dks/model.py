"""`DKSModel`: a backbone trained with auxiliary heads and the synergy loss."""

import keras
import numpy as np
from keras import ops

from keras_dks import adapt
from keras_dks import compat
from keras_dks import draws
from keras_dks import losses as losses_lib


def _as_list(logits):
    # A single-head model (taps=[]) returns a tensor, not a list.
    return list(logits) if isinstance(logits, (list, tuple)) else [logits]


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
        num_classes: number of classes. May be omitted (default `None`) when
            the backbone already ends in a logits Dense layer.
        taps: `"auto"` (default: the ends of the two down-sampling stages
            before the last one, see `keras_dks.taps`), a list of layer
            names, a list of keras-hub pyramid keys (`"P3"`, `"P4"`), or
            `[]` for the plain network (the baseline).
        head: `"residual"` (default; the paper's heads: the backbone's own
            blocks with as many stride-2 steps as the backbone), `"simple"`
            (pool + Dense), `"conv"` (conv + pool + Dense) or a callable
            `head(features, num_downsamples, num_classes, name) -> logits`.
        pairs: `"bidirectional"` (default, the paper's best), `"top_down"`,
            `"bottom_up"`, `"none"` (deep supervision, no synergy) or a list
            of `(student, teacher)` head indices.
        aux_weight: alpha of the auxiliary heads' cross-entropy, a float or
            one per auxiliary head (the main head's weight is 1). Defaults
            to `1.0` (the paper and the authors' code).
        synergy_weight: beta, a float or one per pair. Defaults to `1.0`
            (the paper and the authors' code).
        label_smoothing: label smoothing of the cross-entropy terms, in
            [0, 1). Defaults to `0.0`.
        weight_decay: coupled L2 on all trainable variables (the authors'
            PyTorch `SGD(weight_decay=...)`): adds `weight_decay / 2 *
            sum ||w||^2` to the loss. The published numbers use 5e-4 (CIFAR
            WRNs, authors' code) and 1e-4 (other CIFAR nets, ImageNet; paper
            Sec. 4.1-4.2). Default 0: the value depends on the data, and an
            optimizer's decoupled `weight_decay` must not be added on top.
        head_width: positive multiplier on the residual heads' widths.
            Defaults to `1.0`.
        head_depth: if set (>= 1), blocks per stage of the residual heads.
            Defaults to `None` (the backbone's layout). `head_depth=1,
            head_width=0.5` kept the paper heads' gain within its 95 % CI at
            1.32x the plain network's step time instead of 2.24x (WRN-16-1,
            Fashion-MNIST 5k, 5 paired seeds: `benchmarks/head_cost.py`,
            docs/benchmarks.md).
        sync_batchnorm: use synchronized BatchNormalization in the heads.
            Defaults to `False`.
        pair_keep_prob: each synergy pair is kept with this probability per
            training step, in (0, 1], without rescaling (a library option,
            not in the papers). Defaults to `1.0`, which keeps all.
        seed: seed of the per-step draws (random if None, the default).
        name: model name. Defaults to `"dks_model"`.
        **kwargs: passed on to `keras.Model`.

    Raises:
        ValueError: `label_smoothing` outside [0, 1), a negative
            `weight_decay`, `pair_keep_prob` outside (0, 1], a non-positive
            `head_width`, a `head_depth` below 1, an unknown `head` or
            `pairs`, taps that are not layers of the backbone (or not
            before its final feature map), weights of the wrong length, or
            a backbone that is not a functional image model.

    Training runs through Keras' own trainers (`compute_loss` is the DKS
    loss, in `keras.ops`), on TensorFlow, JAX and PyTorch. `compile(metrics=)`
    tracks every metric for every head. Labels are checked in the graph: a
    label `keras_dks.losses.check_labels` would reject gets a NaN target
    (call `check_labels` yourself for a clear error on array labels). To
    skip steps whose gradients are not finite, wrap the optimizer in
    `keras_dks.optimizers.SkipNonFinite`.

    Example:
    ```python
    import keras, keras_dks
    backbone = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(64, 64, 3))
    model = keras_dks.DKSModel(backbone, num_classes=10, weight_decay=1e-4)
    model.compile(
        optimizer=keras_dks.optimizers.SkipNonFinite(
            keras.optimizers.SGD(0.1, momentum=0.9)),
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
        adapt.check_backbone(backbone)
        adapt.check_head(head)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"label_smoothing must be in [0, 1), got {label_smoothing}."
            )
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}.")
        if not 0.0 < pair_keep_prob <= 1.0:
            raise ValueError(
                f"pair_keep_prob must be in (0, 1], got {pair_keep_prob}; "
                "use pairs='none' to switch the synergy loss off."
            )
        if not head_width > 0:
            raise ValueError(f"head_width must be positive, got {head_width}.")
        if head_depth is not None and int(head_depth) < 1:
            raise ValueError(f"head_depth must be >= 1, got {head_depth}.")

        # === The graph (keras_dks.adapt) ===
        adapted = adapt.adapt_backbone(
            backbone, num_classes, taps, head, head_width, head_depth, sync_batchnorm
        )
        head_names = adapted.head_names
        pair_list = losses_lib.resolve_pairs(pairs, len(head_names))
        aux_weights = losses_lib.resolve_weights(
            aux_weight, len(adapted.taps), "aux_weight", "auxiliary heads"
        )
        pair_weights = losses_lib.resolve_weights(
            synergy_weight, len(pair_list), "synergy_weight", "pairs"
        )
        super().__init__(
            inputs=adapted.inputs, outputs=adapted.outputs, name=name, **kwargs
        )
        # Outputs are named by head (compile's per-head metrics are keyed so;
        # Keras < 3.12 checks metric keys against these names).
        self.output_names = list(adapted.head_names)

        # === Config ===
        self.backbone = backbone
        self.num_classes = adapted.num_classes
        self.taps = [t.name for t in adapted.taps]
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
            seed = int(np.random.randint(0, 2**31 - 1))
        self.seed = int(seed)
        self.head_names = head_names
        self.pair_list = pair_list
        self.head_weights = [1.0] + aux_weights
        self.pair_weights = pair_weights

        # === Loss trackers (as keras.distillation.Distiller keeps them) ===
        self.ce_loss_tracker = keras.metrics.Mean(name="ce_loss")
        self.aux_ce_loss_trackers = [
            keras.metrics.Mean(name=f"{h}_ce_loss") for h in head_names[1:]
        ]
        self.synergy_loss_tracker = keras.metrics.Mean(name="synergy_loss")
        self.draw_step = None
        if self.pair_keep_prob < 1.0 and self.pair_list:
            self.add_draw_step()

    # ------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------
    def inference_model(self, softmax=False, name=None):
        """The plain network: input -> main head, sharing the trained weights.

        It holds the backbone and the main classifier only: no auxiliary
        variable is reachable, so it costs exactly what the baseline does.

        Args:
            softmax: return probabilities (a float32 `Softmax` layer named
                `"probabilities"` is added) instead of logits. Defaults to
                `False`.
            name: model name (default: `<backbone name>_inference`).

        Returns:
            A functional `keras.Model` from the image input to the main
            head, `(batch, num_classes)`.

        Example:
        ```python
        import keras, keras_dks
        backbone = keras_dks.backbones.wide_resnet(10, 1, num_classes=10)
        model = keras_dks.DKSModel(backbone)
        serving = model.inference_model()
        print(len(model.outputs), serving.output.shape)   # 3 (None, 10)
        ```
        """
        out = self.outputs[0]
        if softmax:
            out = keras.layers.Softmax(dtype="float32", name="probabilities")(out)
        return keras.Model(
            self.inputs[0], out, name=name or f"{self.backbone.name}_inference"
        )

    # ------------------------------------------------------------------
    # The loss
    # ------------------------------------------------------------------
    def label_targets(self, y):
        """The `(batch, num_classes)` target distribution of labels `y`,
        label smoothing applied (see `keras_dks.losses.label_targets`)."""
        return losses_lib.label_targets(y, self.num_classes, self.label_smoothing)

    def head_mask(self, training=False):
        """Per-head 0/1 weight of the current step, or None (every head counts).

        The hook for methods that switch heads off per step (DHM's location
        indicators, `keras_dks.methods.DHMModel`): return a float32 tensor
        with one entry per head in `head_names` order; `compute_dks_loss`
        multiplies `head_weights` by it. A method that masks heads usually
        masks their pairs too, by overriding `pair_mask`.
        """
        return None

    def pair_mask(self, training=False):
        """Per-pair dropping mask of the current step, or None (all kept)."""
        if not training or self.pair_keep_prob >= 1.0 or not self.pair_list:
            return None
        return draws.pair_mask(
            len(self.pair_list), self.pair_keep_prob, self.seed, self.step_counter()
        )

    def add_draw_step(self):
        """Give the model its `draw_step` counter (once): an int32
        non-trainable weight that each training `compute_loss` advances by
        one, read by every per-step draw (`step_counter`). Being a model
        variable, Keras threads it through compiled JAX steps too, and it is
        saved with the weights. `DKSModel` adds it when `pair_keep_prob < 1`;
        methods with their own per-step draws (DHM) call it too.
        """
        if self.draw_step is None:
            self.draw_step = self.add_weight(
                shape=(),
                dtype="int32",
                initializer="zeros",
                trainable=False,
                aggregation="only_first_replica",  # one value on every replica
                name="draw_step",
            )
        return self.draw_step

    def step_counter(self):
        """The step the per-step draws are keyed on: `draw_step` (training
        steps run so far, equal to `optimizer.iterations` when no step was
        skipped), or `optimizer.iterations` for a model without per-step
        draws (per-epoch draws read it between steps)."""
        if self.draw_step is not None:
            return self.draw_step
        return self.optimizer.iterations

    def regularization_loss(self):
        """Layer losses (`self.losses`) + coupled weight decay, float32
        (float64 in a float64 model)."""
        dtype = "float64" if self.compute_dtype == "float64" else "float32"
        reg = ops.zeros((), dtype)
        for l in self.losses:
            reg = reg + ops.cast(l, dtype)
        if self.weight_decay:
            reg = reg + losses_lib.coupled_weight_decay(
                self.trainable_variables, self.weight_decay
            )
        return reg

    def compute_dks_loss(self, y, logits, sample_weight=None, training=False):
        """Every loss term, unscaled by distribution (means over the batch).

        Head `k`'s weight is `head_weights[k]` times `head_mask(training)[k]`
        and pair `p`'s weight `pair_weights[p]` times `pair_mask(training)[p]`
        (each mask only when not None).

        Returns:
            dict with `loss` (total), `ce` (list, one per head), `synergy` and
            `regularization`.
        """
        head_weights = self.head_weights
        heads = self.head_mask(training)
        if heads is not None:
            head_weights = [w * heads[k] for k, w in enumerate(head_weights)]
        terms = losses_lib.dks_loss_terms(
            self.label_targets(y),
            _as_list(logits),
            head_weights,
            self.pair_list,
            self.pair_weights,
            pair_mask=self.pair_mask(training),
            sample_weight=sample_weight,
        )
        terms["regularization"] = self.regularization_loss()
        terms["loss"] = terms["loss"] + terms["regularization"]
        return terms

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The DKS loss (Keras' extension point), scaled for `tf.distribute`.

        Updates the `ce_loss`, `<head>_ce_loss` and `synergy_loss` trackers;
        in training, advances `draw_step` (after the step's draws).
        """
        if y is None:
            raise ValueError("DKSModel needs labels: pass (images, labels).")
        terms = self.compute_dks_loss(y, y_pred, sample_weight, training=training)
        n = ops.cast(ops.shape(_as_list(y_pred)[0])[0], "float32")
        # Weighted by batch size: epoch means are means over examples.
        self.ce_loss_tracker.update_state(terms["ce"][0], sample_weight=n)
        for tracker, value in zip(self.aux_ce_loss_trackers, terms["ce"][1:]):
            tracker.update_state(value, sample_weight=n)
        self.synergy_loss_tracker.update_state(terms["synergy"], sample_weight=n)
        if training and self.draw_step is not None:
            self.draw_step.assign_add(1)
        return losses_lib.scale_for_distribution(terms["loss"])

    # ------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------
    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """`keras.Model.compile`, with the DKS loss and per-head metrics.

        Args:
            optimizer: as for `keras.Model.compile`; wrap it in
                `keras_dks.optimizers.SkipNonFinite` to skip steps with
                non-finite gradients.
            loss: must be None: the loss is set by the constructor
                (`aux_weight`, `synergy_weight`, `label_smoothing`, `pairs`).
            metrics: a list; every metric is tracked for every head as Keras
                tracks it on a plain model (labels as passed to `fit`): the
                main head under the plain name (`accuracy`), the auxiliary
                heads prefixed with their name (`aux_conv4_block6_out_accuracy`).
            **kwargs: the other `keras.Model.compile` arguments, except
                `loss_weights` and `weighted_metrics`.
        """
        for arg, fix in (
            ("loss_weights", "aux_weight / synergy_weight"),
            ("weighted_metrics", "metrics"),
        ):
            if kwargs.pop(arg, None) is not None:
                raise ValueError(
                    f"DKSModel.compile does not take {arg}; use {fix} instead."
                )
        if loss is not None:
            raise ValueError(
                "DKSModel computes its own loss (per-head cross-entropy + synergy "
                "loss); call compile(loss=None) and set aux_weight, "
                "synergy_weight, label_smoothing and pairs on the DKSModel."
            )
        if isinstance(metrics, dict):
            raise ValueError(
                "DKSModel.compile takes a list of metrics, tracked for every "
                "head; got a dict."
            )
        self.metric_specs = list(metrics) if metrics else []
        per_head = None
        if self.metric_specs:
            # Metric objects hold state: each auxiliary head gets a copy.
            per_head = {
                h: [
                    m.__class__.from_config(m.get_config())
                    if (k and isinstance(m, keras.metrics.Metric))
                    else m
                    for m in self.metric_specs
                ]
                for k, h in enumerate(self.head_names)
            }
        super().compile(optimizer=optimizer, loss=None, metrics=per_head, **kwargs)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:
            # The user's list, not the per-head copies compile made of it.
            config["metrics"] = keras.saving.serialize_keras_object(
                self.metric_specs or None
            )
        return config

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            # Lets load_model restore the optimizer state (resumed training).
            self.optimizer.build(self.trainable_variables)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Every head is scored against the same labels, as passed.
        heads = _as_list(y_pred)
        if len(heads) > 1:
            y = {h: y for h in self.head_names}
            y_pred = dict(zip(self.head_names, heads))
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def get_metrics_result(self):
        results = super().get_metrics_result()
        if len(self.head_names) > 1:
            # Keras prefixes every output's metrics; the main head's keep
            # their plain names.
            results = {
                (k[len("main_"):] if k.startswith("main_") else k): v
                for k, v in results.items()
            }
        return results

    if keras.backend.backend() == "tensorflow":
        # JAX's and PyTorch's trainers take the loss from compute_loss in
        # their own steps (their train_step has another signature).

        def train_step(self, data):
            """One training step on TensorFlow.

            Forward pass and `compute_loss` under a `GradientTape`; the loss
            tracker gets the loss unscaled for distribution, weighted by the
            batch size (Keras' `loss` log); `optimizer.scale_loss` applies
            mixed-precision loss scaling; the optimizer applies the
            gradients (a `SkipNonFinite` optimizer may skip them); then the
            metrics.
            """
            import tensorflow as tf

            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x, y, y_pred, sample_weight, training=True)
                compat.loss_tracker(self).update_state(
                    losses_lib.unscale_for_distribution(loss),
                    sample_weight=tf.shape(keras.tree.flatten(x)[0])[0],
                )
                scaled = self.optimizer.scale_loss(loss)
            variables = self.trainable_variables
            grads = tape.gradient(scaled, variables)
            self.optimizer.apply_gradients(zip(grads, variables))
            return self.compute_metrics(x, y, y_pred, sample_weight)

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

    def load_own_variables(self, store):
        """Keras' loading of the model's own variables; a file saved before
        the model had `draw_step` (its first own variable) loads too, with
        the counter at 0 and a warning."""
        try:
            super().load_own_variables(store)
        except ValueError as error:
            if self.draw_step is None or "draw_step" not in str(error):
                raise
            shifted = {str(int(k) + 1): store[k] for k in store.keys()}
            shifted["0"] = np.zeros((), "int32")
            super().load_own_variables(shifted)
            import warnings

            warnings.warn(
                f"{self.name}: the saved model has no draw_step counter; it "
                "starts at 0, so the per-step draws start over. To continue "
                "the saved run's draws, call "
                "model.draw_step.assign(model.optimizer.iterations).",
                stacklevel=2,
            )

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if isinstance(config.get("head"), dict):
            config["head"] = keras.saving.deserialize_keras_object(config["head"])
        return cls(**config)

    # ------------------------------------------------------------------
    # Export
    # ------------------------------------------------------------------
    def export(
        self,
        filepath,
        format="tf_saved_model",
        verbose=None,
        input_signature=None,
        **kwargs,
    ):
        """Export the inference network (backbone + main classifier).

        `keras.Model.export`'s arguments and formats, applied to
        `inference_model()` (float32 `images` -> `logits`, whatever the
        training policy): see `keras_dks.export.export_inference`; for TF
        Serving with probabilities and top-k classes,
        `keras_dks.export_saved_model`.

        Args:
            filepath: where to write (see `export_inference`).
            format: `"tf_saved_model"` (default), `"litert"`, `"onnx"` or
                `"openvino"`.
            verbose: print what was written (Keras' default when None).
            input_signature: optional input spec, as in `keras.Model.export`.
            **kwargs: passed on to Keras' exporter of the format.

        Returns:
            The path written, as a `str`.

        Example:
        ```python
        import keras_dks
        backbone = keras_dks.backbones.wide_resnet(10, 1, num_classes=10)
        model = keras_dks.DKSModel(backbone)
        print(model.export("/tmp/dks.tflite", format="litert", verbose=False))
        # /tmp/dks.tflite
        ```
        """
        from keras_dks.export import export_inference

        return export_inference(
            self,
            filepath,
            format=format,
            verbose=verbose,
            input_signature=input_signature,
            **kwargs,
        )
