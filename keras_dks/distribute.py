"""`tf.distribute` strategies for DKS training, and multi-worker `fit`.

- `get_strategy(name)`: `"default"`, `"mirrored"` or `"multi_worker"`.
- `multi_worker_model(model)`: lets `model.fit` / `evaluate` run under
  `MultiWorkerMirroredStrategy`, which Keras 3 breaks
  (https://github.com/keras-team/keras/issues/20585, present in Keras
  3.10.0 to 3.15.1); a no-op under any other strategy.

Build and compile the model inside `strategy.scope()` and `fit` with the
global batch. How to launch several workers: docs/scaling.md.
TensorFlow is imported inside the functions, so `import keras_dks` works on
every backend.
"""

import json
import os

import keras
from keras import tree

from keras_dks import compat

STRATEGIES = ("default", "mirrored", "multi_worker")

KERAS_ISSUE = "https://github.com/keras-team/keras/issues/20585"


def require_tensorflow_backend(
    feature,
    uses="tf.distribute",
    alternative="on JAX use keras.distribution.DataParallel for multi-device "
    "training",
):
    """Raise a RuntimeError naming the fix unless Keras runs on TensorFlow.

    Args:
        feature: what needs TensorFlow (starts the message).
        uses: the TensorFlow machinery it is built on.
        alternative: what to do instead on other backends, or None.

    Example:
    ```python
    keras_dks.distribute.require_tensorflow_backend("SavedModel export")
    ```
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"{feature} is a TensorFlow feature ({uses}); KERAS_BACKEND "
            f"is {backend!r}. Run with KERAS_BACKEND=tensorflow"
            + (f", or {alternative}." if alternative else ".")
        )


def _tf():
    import tensorflow as tf

    return tf


def get_strategy(name="default", devices=None):
    """A `tf.distribute.Strategy` by name.

    Args:
        name: `"default"` (the current default strategy, one device),
            `"mirrored"` (`MirroredStrategy`: all local GPUs, or the CPU
            when there are none) or `"multi_worker"`
            (`MultiWorkerMirroredStrategy`, configured by the `TF_CONFIG`
            environment variable; a single worker without it). Call it
            before any other TensorFlow call for `"multi_worker"`.
        devices: optional device list for `"mirrored"`, e.g.
            `["GPU:0", "GPU:1"]`.

    Returns:
        The strategy. Build and compile the model inside its `scope()`
        (and, for `"multi_worker"`, pass the model to `multi_worker_model`).

    Example:
    ```python
    strategy = keras_dks.distribute.get_strategy("mirrored")
    with strategy.scope():
        model = keras_dks.DKSModel(backbone, num_classes=100)
        model.compile("sgd")
    ```
    """
    require_tensorflow_backend("keras_dks.distribute.get_strategy")
    tf = _tf()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if devices is not None:
            raise ValueError(
                "devices is only for 'mirrored'; a multi-worker strategy uses "
                "every local GPU (or the CPU) of each worker."
            )
        config = os.environ.get("TF_CONFIG")
        if config:
            try:
                parsed = json.loads(config)
                if not isinstance(parsed["cluster"], dict) or not parsed["cluster"]:
                    raise ValueError("empty cluster")
                parsed["task"]["type"], int(parsed["task"]["index"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"TF_CONFIG={config!r} is not valid: it must be JSON like "
                    '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                    '"task": {"type": "worker", "index": 0}}.'
                ) from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(
        f"Unknown strategy {name!r}. Use one of {list(STRATEGIES)}."
    )


def is_multi_worker(strategy):
    """True for a `MultiWorkerMirroredStrategy` with more than one worker.

    Its replicas are `len(worker_devices)` per worker, so there is more than
    one worker exactly when there are more replicas than local devices.

    Example:
    ```python
    keras_dks.distribute.is_multi_worker(
        keras_dks.distribute.get_strategy("mirrored"))   # False
    ```
    """
    tf = _tf()
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.num_replicas_in_sync > len(strategy.extended.worker_devices)


def needs_keras_20585_workaround(model):
    """Whether `model.fit` meets keras-team/keras#20585: True for a model
    created under a `MultiWorkerMirroredStrategy` scope (on TensorFlow).

    Example:
    ```python
    keras_dks.distribute.needs_keras_20585_workaround(model)   # False here
    ```
    """
    if keras.backend.backend() != "tensorflow":
        return False
    tf = _tf()
    return isinstance(
        model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy
    )


def _first_local_value(strategy):
    # Maps a (possibly distributed) batch entry to its first local replica's.
    return lambda value: strategy.experimental_local_results(value)[0]


def _rank1_logs(step_function):
    # Keras reduces every log with strategy.reduce("MEAN", v, axis=0) in
    # multi-worker mode; a length-1 axis makes that the mean over replicas
    # of the scalar logs, which is what one machine computes.
    tf = _tf()

    def step(data):
        logs = step_function(data)
        return tree.map_structure(
            lambda v: tf.reshape(v, [1]) if len(getattr(v, "shape", [0])) == 0 else v,
            logs,
        )

    step.dks_rank1_logs = True
    return step


def multi_worker_model(model):
    """Make `model.fit` and `model.evaluate` work under
    `MultiWorkerMirroredStrategy`, and return `model`.

    Keras 3's TensorFlow trainer (https://github.com/keras-team/keras/issues/20585,
    verified present in Keras 3.10.0 to 3.15.1) fails there twice: it
    all-reduces the first input batch only to learn its shapes, and it
    reduces the scalar step logs along an axis 0 they do not have. On this
    model instance only, the first batch's shapes are taken from the first
    local replica, and the train / test steps return their logs with a
    length-1 axis, so Keras' reduction becomes the mean over replicas.
    Nothing in Keras is patched, and the weights and logs equal a
    single-process run on the same global batches (tested with 2 workers).

    A model not created under a `MultiWorkerMirroredStrategy` scope is
    returned unchanged, so recipes may call it for any strategy. Under that
    strategy on a Keras version outside `keras_dks.compat.VERIFIED_KERAS`
    it raises a RuntimeError naming the supported range.

    Args:
        model: a `keras.Model` created (and compiled, before or after this
            call) under the strategy's scope.

    Returns:
        `model`.

    Example:
    ```python
    strategy = keras_dks.distribute.get_strategy("multi_worker")
    with strategy.scope():
        model = keras_dks.DKSModel(backbone, num_classes=100)
        model.compile("sgd", metrics=["accuracy"])
    keras_dks.distribute.multi_worker_model(model)
    model.fit(train_ds, epochs=200)
    ```
    """
    require_tensorflow_backend("keras_dks.distribute.multi_worker_model")
    if not needs_keras_20585_workaround(model):
        return model
    if getattr(model.train_step, "dks_rank1_logs", False):
        return model  # already applied
    compat.build_from_local_batch(model, _first_local_value(model.distribute_strategy))
    if is_multi_worker(model.distribute_strategy):
        model.train_step = _rank1_logs(model.train_step)
        model.test_step = _rank1_logs(model.test_step)
    # Step functions made before this call used the old steps.
    model.train_function = None
    model.test_function = None
    return model


class MultiWorkerWorkaroundMixin:
    """Deprecated: does nothing. Call
    `keras_dks.distribute.multi_worker_model(model)` instead."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__module__.startswith("keras_dks"):
            import warnings

            warnings.warn(
                "keras_dks.distribute.MultiWorkerWorkaroundMixin is deprecated "
                "and does nothing; call "
                "keras_dks.distribute.multi_worker_model(model) after building "
                "the model under MultiWorkerMirroredStrategy.",
                DeprecationWarning,
                stacklevel=2,
            )
