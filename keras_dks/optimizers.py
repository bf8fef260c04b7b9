"""`SkipNonFinite`: an optimizer wrapper that skips steps with non-finite
gradients, for any Keras model on TensorFlow, JAX and PyTorch."""

import keras
from keras import ops

from keras_dks import compat


@keras.saving.register_keras_serializable(package="keras_dks")
class SkipNonFinite(keras.optimizers.Optimizer):
    """Skips every update whose gradients contain NaN or inf, and counts it.

    In the manner of `keras.optimizers.LossScaleOptimizer`: when any
    gradient of a step is not finite, the step is skipped as a whole (an
    `ops.cond`): no weight, no optimizer variable (momentum, Adam moments)
    and not `iterations` change; only `skipped_steps` grows by one.
    Otherwise the inner optimizer applies the gradients as usual.
    (Zeroing the gradients instead would still move the weights by SGD's
    momentum and count the step.)

    One NaN image is enough to make a step's gradients NaN on a network
    without BatchNorm, while its loss may look finite; the wrapper keeps
    the weights usable. BatchNorm moving statistics, updated in the forward
    pass, are not protected.

    With loss scaling (`mixed_float16`), put the `LossScaleOptimizer`
    outside: `LossScaleOptimizer(SkipNonFinite(SGD(...)))`, which is what
    `compile(auto_scale_loss=True)` builds from `SkipNonFinite(SGD(...))`.
    The loss-scale optimizer then skips overflowing steps itself and lowers
    its scale (routine, not counted here); the other order would hide the
    overflows from it and never lower the scale.

    `iterations` and `learning_rate` are the inner optimizer's. Under
    `tf.distribute`, the replicas agree on the skip (a non-finite gradient
    on any replica skips the step on all).

    Args:
        inner_optimizer: the `keras.optimizers.Optimizer` to wrap.
        name: optimizer name.

    Example:
    ```python
    model.compile(optimizer=keras_dks.optimizers.SkipNonFinite(
        keras.optimizers.SGD(0.1, momentum=0.9)))
    model.fit(x, y, callbacks=[keras_dks.optimizers.SkippedStepsLogger()])
    int(model.optimizer.skipped_steps)   # steps skipped so far
    ```
    """

    def __init__(self, inner_optimizer, name=None, **kwargs):
        if kwargs:
            raise ValueError(
                f"SkipNonFinite takes no optimizer arguments ({sorted(kwargs)}); "
                "set them on the inner optimizer."
            )
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "SkipNonFinite wraps a keras.optimizers.Optimizer instance, got "
                f"{inner_optimizer!r}; e.g. SkipNonFinite(keras.optimizers.SGD(0.1))."
            )
        if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "Put the LossScaleOptimizer outside: "
                "LossScaleOptimizer(SkipNonFinite(SGD(...))). Inside, SkipNonFinite "
                "would skip its overflowing steps before it can lower its scale."
            )
        super().__init__(learning_rate=0.0, name=name or "skip_non_finite")
        self.inner_optimizer = inner_optimizer
        self.skipped_steps = None  # created by build

    def build(self, var_list):
        self.skipped_steps = self.add_variable(
            shape=(),
            dtype="int",
            initializer="zeros",
            aggregation="only_first_replica",
            name="skipped_steps",
        )
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return super().variables + self.inner_optimizer.variables

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    @staticmethod
    def check_finite(grads):
        """A boolean scalar: every gradient in `grads` is finite."""
        flags = [ops.all(ops.isfinite(g)) for g in grads if g is not None]
        return ops.all(ops.convert_to_tensor(flags)) if flags else True

    # -- stateless (JAX) ------------------------------------------------------
    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        # Values, also when a LossScaleOptimizer passes its variables.
        optimizer_variables = [ops.convert_to_tensor(v) for v in optimizer_variables]
        own = len(super().variables)
        counter = next(
            k for k, v in enumerate(self.variables) if v is self.skipped_steps
        )

        def apply():
            new_trainable, new_inner = self.inner_optimizer.stateless_apply(
                list(optimizer_variables[own:]), grads, trainable_variables
            )
            return list(new_trainable), list(optimizer_variables[:own]) + list(new_inner)

        def skip():
            new = list(optimizer_variables)
            new[counter] = new[counter] + 1
            return list(trainable_variables), new

        return ops.cond(self.check_finite(grads), apply, skip)

    # -- stateful (TensorFlow, PyTorch) ---------------------------------------
    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if not self.built:
            self.build(trainable_variables)
        if keras.backend.backend() == "tensorflow":
            return self._tf_apply(grads, trainable_variables)
        self._apply_or_skip(self.check_finite(grads), grads, trainable_variables)

    def _apply_or_skip(self, finite, grads, trainable_variables):
        def apply():
            self.inner_optimizer.apply(grads, trainable_variables)

        def skip():
            self.skipped_steps.assign_add(1)

        ops.cond(finite, apply, skip)

    def _tf_apply(self, grads, trainable_variables):
        import tensorflow as tf

        if not tf.distribute.has_strategy():
            return self._apply_or_skip(
                self.check_finite(grads), grads, trainable_variables
            )
        # The replicas hold their own gradients (the inner optimizer
        # all-reduces them); agree on the skip by summing non-finite flags.
        context = tf.distribute.get_replica_context()
        bad = tf.cast(tf.logical_not(self.check_finite(grads)), tf.float32)
        finite = tf.equal(context.all_reduce("sum", bad), 0.0)
        if compat.strategy_supports_no_merge_call():
            return self._apply_or_skip(finite, grads, trainable_variables)

        def cross_replica(strategy, finite, grads, trainable_variables):
            # A cond whose branch calls merge_call must run here, in the
            # cross-replica context (as LossScaleOptimizer does).
            finite = strategy.experimental_local_results(finite)[0]

            def apply():
                strategy.extended.call_for_each_replica(
                    self.inner_optimizer.apply, args=(grads, trainable_variables)
                )

            def skip():
                self.skipped_steps.assign_add(1)

            ops.cond(finite, apply, skip)

        context.merge_call(cross_replica, args=(finite, grads, trainable_variables))

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


def skipped_steps(optimizer):
    """The `SkipNonFinite.skipped_steps` count of `optimizer` (also inside a
    `LossScaleOptimizer`) as an int, or None when it skips nothing itself."""
    while optimizer is not None:
        if isinstance(optimizer, SkipNonFinite):
            if optimizer.skipped_steps is None:
                return 0
            return int(ops.convert_to_numpy(optimizer.skipped_steps))
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


class SkippedStepsLogger(keras.callbacks.Callback):
    """Adds `skipped_steps` to the batch and epoch logs: the steps of the
    current epoch that `SkipNonFinite` skipped.

    Put it before the callbacks that read the log (`History` always comes
    after it). Logs nothing when the model's optimizer is not a
    `SkipNonFinite` (or a `LossScaleOptimizer` around one).

    Example:
    ```python
    model.fit(x, y, callbacks=[keras_dks.optimizers.SkippedStepsLogger(),
                               keras_dks.callbacks.StopOnNonFiniteLoss()])
    ```
    """

    def __init__(self):
        super().__init__()
        self._start = None

    def _count(self):
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()  # JAX: the step's variables, not those before the epoch
        return skipped_steps(self.model.optimizer)

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._count()

    def _log(self, logs):
        count = self._count()
        if count is not None and logs is not None:
            logs["skipped_steps"] = float(count - (self._start or 0))

    def on_train_batch_end(self, batch, logs=None):
        self._log(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._log(logs)
