"""The Keras-trainer side of `DKSModel`: per-head metrics, label checks
before training, and the per-backend parts of a training step.

`DKSTrainerMixin` goes before `keras.Model` in a model's bases. It expects
the model to define `head_names`, `num_classes`, `compute_loss` and, on
TensorFlow, a `skipped_steps_tracker` metric; `DKSModel` does. The loss
itself lives in `keras_dks.model` / `keras_dks.losses`.
"""

import functools

import keras
import numpy as np

from keras_dks import losses as losses_lib


def _array_labels(y):
    """`y` as a NumPy array when it is array-like (NumPy, eager tensor), else
    None (a dataset, a generator, no labels)."""
    if y is not None and (isinstance(y, np.ndarray) or hasattr(y, "numpy")):
        return np.asarray(y)
    return None


def _label_checked(name, evaluating=False):
    """`keras.Model.<name>` that first rejects bad array labels
    (`losses.check_labels`); `evaluating` hides the train-only logs."""

    @functools.wraps(getattr(keras.Model, name))
    def method(self, x=None, y=None, *args, **kwargs):
        labels = _array_labels(y)
        if labels is not None:
            losses_lib.check_labels(labels, self.num_classes)
        self._build_step_state(x, y, labels, optimizer=not evaluating)
        self._evaluating = evaluating
        try:
            return getattr(super(DKSTrainerMixin, self), name)(x, y, *args, **kwargs)
        finally:
            self._evaluating = False

    return method


class DKSTrainerMixin:
    """Per-head metrics, label checks and backend steps of a multi-head model.

    - `compile(metrics=[...])` tracks every metric for every head in
      `head_names` (the first head under the plain name); `loss` must be
      None (the model computes its own).
    - `fit` / `evaluate` / `train_on_batch` / `test_on_batch` reject bad
      array labels (`losses.check_labels`) before any step runs.
    - On TensorFlow (no strategy), the optimizer's and the metrics'
      variables are created before the first step is traced, so each step
      function is traced once (Keras alone creates them in the first
      trace, and `tf.function` then traces again).
    - On TensorFlow, `train_step` skips (and counts in `skipped_steps`) a
      step whose gradients are not finite; on JAX, `step_counter()` is the
      step's own copy of the optimizer's counter inside a train step.

    Example:
    ```python
    class MyModel(keras_dks.trainer.DKSTrainerMixin, keras.Model):
        ...  # defines head_names, num_classes, compute_loss
    ```
    """

    # ------------------------------------------------------------------
    # Per-head metrics
    # ------------------------------------------------------------------
    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """Configure training. Same as `keras.Model.compile`, except:

        - `loss` must be None: the DKS loss is set by the constructor
          (`aux_weight`, `synergy_weight`, `label_smoothing`, `pairs`).
        - every metric in `metrics` is tracked for every head, exactly as
          Keras tracks it on a plain model (labels in the form passed to
          `fit`, so one-hot labels stay one-hot): the main head under the
          plain name (`accuracy`), auxiliary heads prefixed with their head
          name (`aux_conv4_block6_out_accuracy`).
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
        if isinstance(metrics, dict):
            raise ValueError(
                "DKSModel.compile takes a list of metrics, tracked for every "
                "head; got a dict."
            )
        self._metric_specs = list(metrics) if metrics else []
        per_head = None
        if self._metric_specs:
            # Metric objects hold state: each auxiliary head gets a copy.
            per_head = {
                h: [
                    m.__class__.from_config(m.get_config())
                    if (k and isinstance(m, keras.metrics.Metric))
                    else m
                    for m in self._metric_specs
                ]
                for k, h in enumerate(self.head_names)
            }
        super().compile(optimizer=optimizer, loss=None, metrics=per_head, **kwargs)

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

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Every head is scored against the same labels, as passed.
        heads = list(y_pred) if isinstance(y_pred, (list, tuple)) else [y_pred]
        if len(heads) > 1:
            y = {h: y for h in self.head_names}
            y_pred = dict(zip(self.head_names, heads))
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def get_metrics_result(self):
        results = super().get_metrics_result()
        if getattr(self, "_evaluating", False):
            # Evaluation never skips a step: no val_skipped_steps.
            results.pop("skipped_steps", None)
        if len(self.head_names) > 1:
            # The main head's metrics keep their plain names.
            results = {
                (k[len("main_"):] if k.startswith("main_") else k): v
                for k, v in results.items()
            }
        return results

    def _build_step_state(self, x, y, labels, optimizer=True):
        """Create the optimizer's and the compiled metrics' variables before
        the first step is traced (TensorFlow, no distribution strategy).

        Keras creates them inside the first trace of the step function then,
        and `tf.function` traces a function that created variables a second
        time: building them here halves the time to the first step. (Under a
        strategy Keras builds them itself, in the strategy's scope.)
        """
        if keras.backend.backend() != "tensorflow":
            return
        import tensorflow as tf

        if tf.distribute.has_strategy():
            return
        if self.distribute_strategy is not tf.distribute.get_strategy():
            return  # compiled under a strategy, called outside its scope
        opt = getattr(self, "optimizer", None)
        if optimizer and opt is not None and not opt.built:
            opt.build(self.trainable_variables)
        if all(getattr(m, "built", True) for m in self.metrics):
            return
        label = None  # (shape without the batch axis, dtype) of the labels
        if isinstance(x, tf.data.Dataset) and y is None:
            spec = x.element_spec
            if isinstance(spec, tuple) and len(spec) >= 2 and isinstance(spec[1], tf.TensorSpec):
                label = (tuple(spec[1].shape[1:]), spec[1].dtype.as_numpy_dtype)
        elif labels is not None:
            label = (labels.shape[1:], labels.dtype)
        if label is None or None in label[0]:
            return  # Keras builds them in the first trace
        heads = [np.zeros((1, self.num_classes), "float32") for _ in self.head_names]
        self.compute_metrics(None, np.zeros((1,) + label[0], label[1]),
                             heads if len(heads) > 1 else heads[0])
        self.reset_metrics()

    # ------------------------------------------------------------------
    # Label checks before any step (array labels; in a dataset a bad label
    # gets a NaN target row, see `losses.label_targets`)
    # ------------------------------------------------------------------
    fit = _label_checked("fit")
    evaluate = _label_checked("evaluate", evaluating=True)
    train_on_batch = _label_checked("train_on_batch")
    test_on_batch = _label_checked("test_on_batch", evaluating=True)

    # ------------------------------------------------------------------
    # Step counter of the per-step draws
    # ------------------------------------------------------------------
    def step_counter(self):
        """The optimizer's step counter as the running train step sees it.

        The key of every per-step draw (`pair_mask`, DHM's branches and
        roots): `optimizer.iterations`, except inside a JAX train step,
        where it is the step's own (traced) copy of it.
        """
        traced = getattr(self, "_traced_step", None)
        return self.optimizer.iterations if traced is None else traced

    # ------------------------------------------------------------------
    # The backends' steps (Keras' own, but for these two)
    # ------------------------------------------------------------------
    if keras.backend.backend() == "tensorflow":
        # JAX's and PyTorch's trainers call compute_loss themselves; their
        # train_step has another signature, so none is defined there.

        def train_step(self, data):
            import tensorflow as tf

            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x, y, y_pred, sample_weight, training=True)
                batch = tf.shape(keras.tree.flatten(x)[0])[0]
                self._loss_tracker.update_state(
                    losses_lib.unscale_for_distribution(loss), sample_weight=batch
                )
                scaled = self.optimizer.scale_loss(loss)  # loss scaling for float16
            variables = self.trainable_variables
            grads = tape.gradient(scaled, variables)
            # A non-finite gradient would corrupt the weights for good: drop the
            # whole step's gradient and count it (StopOnNonFiniteLoss stops on
            # it). A LossScaleOptimizer skips such steps itself and lowers its
            # scale (an overflow there is routine, not an error).
            if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                finite = tf.reduce_all(
                    [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
                )
                grads = [
                    g if g is None else tf.where(finite, g, tf.zeros_like(g))
                    for g in grads
                ]
                self.skipped_steps_tracker.update_state(
                    1.0 - tf.cast(finite, "float32")
                )
            self.optimizer.apply_gradients(zip(grads, variables))
            return self.compute_metrics(x, y, y_pred, sample_weight)

    if keras.backend.backend() == "jax":

        def compute_loss_and_updates(self, *args, optimizer_variables=None, **kwargs):
            # Keras' JAX step runs the forward pass and the loss with only the
            # model's variables in scope: `optimizer.iterations` would read as
            # a constant of the first trace and every per-step draw would
            # repeat. `step_counter()` returns the step's own copy instead.
            pairs = (
                zip(self.optimizer.variables, optimizer_variables)
                if optimizer_variables
                else ()
            )
            self._traced_step = next(
                (value for v, value in pairs if v is self.optimizer.iterations), None
            )
            try:
                return super().compute_loss_and_updates(
                    *args, optimizer_variables=optimizer_variables, **kwargs
                )
            finally:
                self._traced_step = None
