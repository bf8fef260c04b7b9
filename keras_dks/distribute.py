"""Distributed training of `DKSModel`: strategies and a Keras workaround.

`DKSModel` trains under any `tf.distribute` strategy: create the strategy
first, then build *and* compile the model inside `strategy.scope()`, then
call `fit` as usual with the *global* batch size (Keras splits every batch
across the replicas). The DKS loss is scaled for distribution exactly once,
so a run on N replicas takes the same steps as one device on the same
global batch (tested to 1e-5 for every pair strategy; BatchNorm statistics
are per replica unless the layers are synchronized: build the backbone with
`BatchNormalization(synchronized=True)` and pass `sync_batchnorm=True` to
`DKSModel` so the auxiliary heads use synchronized BN too).

One machine, several devices (`MirroredStrategy`):

```python
import keras, keras_dks
strategy = keras_dks.distribute.get_strategy("mirrored")
with strategy.scope():
    model = keras_dks.DKSModel(backbone_fn(), num_classes=100,
                               sync_batchnorm=True)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  metrics=["accuracy"])
model.fit(train_ds, epochs=200)      # train_ds batched with the global batch
```

Several machines or processes (`MultiWorkerMirroredStrategy`): start the
*same* script once per worker, each with a `TF_CONFIG` environment variable
that lists every worker and says which one it is. Example for two workers
on one machine (use real host names for several machines):

```sh
export CLUSTER='{"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]}'
TF_CONFIG="{\"cluster\": $CLUSTER, \"task\": {\"type\": \"worker\", \"index\": 0}}" \
    python train.py --strategy multi_worker &
TF_CONFIG="{\"cluster\": $CLUSTER, \"task\": {\"type\": \"worker\", \"index\": 1}}" \
    python train.py --strategy multi_worker
```

Worker 0 is the chief. In `train.py`, call
`keras_dks.distribute.get_strategy("multi_worker")` *before* any other
TensorFlow call (it starts the worker's server), build and compile the model
under its scope and `fit` a `tf.data.Dataset` batched with the global batch.
Every worker must see the same dataset definition: by default tf.data
shards it by file, falling back to by-element ("DATA") sharding, so each
worker trains on its part of every global batch; set
`options.experimental_distribute.auto_shard_policy` to pick explicitly.
Other points for multi-worker runs:

- Variables are initialised on the chief and broadcast, so the workers
  start identical. Anything random that is not a variable must be seeded
  the same on every worker: call `keras.utils.set_random_seed(seed)` on all
  of them and pass `seed=` to `DKSModel` when `pair_keep_prob < 1` (per-pair
  dropping) and to `DHMModel` when it draws branches or roots, otherwise
  workers draw different pairs, branches or roots.
- Save from every worker (reading some distributed variables is a
  collective operation), but only the chief's files matter: give the other
  workers a scratch directory.
  `BackupAndRestore`/`keras_dks.callbacks.SafeBackupAndRestore` need one
  `backup_dir` per worker.
- All workers must run the same number of steps: use a finite, repeated or
  `steps_per_epoch`-bounded dataset whose size divides evenly.

Keras 3 bug keras-team/keras#20585
(https://github.com/keras-team/keras/issues/20585, open in Keras 3.15):
`model.fit` under `MultiWorkerMirroredStrategy` fails in two places of
`keras/src/backend/tensorflow/trainer.py`:

1. `TensorFlowTrainer._maybe_symbolic_build` calls
   `strategy.reduce("MEAN", batch, axis=None)` on the first (PerReplica)
   input batch, only to learn its shapes; the collective reduce cannot
   convert a PerReplica to a tensor ("Attempt to convert a value
   (PerReplica:{...}) with an unsupported type"). A reduction is not needed
   for shapes: `maybe_symbolic_build` here takes the first local replica's
   value instead (and `DKSModel`, a functional model with its own metrics,
   needs no data at all: only the optimizer is built).
2. `reduce_per_replica(..., reduction="auto")` reduces every step's logs
   with `strategy.reduce("MEAN", v, axis=0)` in multi-worker mode, which
   fails on the scalar logs of `train_step`/`test_step` (axis 0 does not
   exist). `rank1_logs` gives the logs a length-1 axis inside the replica
   function, so that reduction becomes the mean over replicas of scalars,
   exactly what the single-machine strategies compute.

`DKSModel` applies both only when its strategy is a
`MultiWorkerMirroredStrategy` (see `needs_keras_20585_workaround`); nothing
in Keras is patched: `MultiWorkerWorkaroundMixin` (a base class of
`DKSModel`) routes around it. Remove this part and the mixin once Keras
fixes the bug (tests/test_distribute.py has a canary test that fails when a
plain Keras model starts working).
"""

import json
import os

import keras
import tensorflow as tf
from keras import tree

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
    require_tensorflow_backend("SavedModel export")
    ```
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"{feature} is a TensorFlow feature ({uses}); KERAS_BACKEND "
            f"is {backend!r}. Run with KERAS_BACKEND=tensorflow"
            + (f", or {alternative}." if alternative else ".")
        )


def get_strategy(name="default", devices=None):
    """A `tf.distribute.Strategy` by name.

    Args:
        name: `"default"` (no distribution: the current default strategy,
            one device), `"mirrored"` (`MirroredStrategy`: all local GPUs,
            or the CPU when there are none; `devices` to choose) or
            `"multi_worker"` (`MultiWorkerMirroredStrategy`, configured by
            the `TF_CONFIG` environment variable, see the module docstring;
            without `TF_CONFIG` it is a single worker).
        devices: optional device list for `"mirrored"`, e.g.
            `["GPU:0", "GPU:1"]`.

    Returns:
        The strategy. Build and compile the model inside its `scope()`.

    Example:
    ```python
    strategy = keras_dks.distribute.get_strategy("mirrored")
    with strategy.scope():
        model = keras_dks.DKSModel(backbone, num_classes=100)
        model.compile("sgd")
    ```

    `tf.distribute` is TensorFlow-only: with another `KERAS_BACKEND` this
    raises a RuntimeError (on JAX use `keras.distribution.DataParallel`).
    """
    require_tensorflow_backend("keras_dks.distribute.get_strategy")
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
                    '"task": {"type": "worker", "index": 0}}. See '
                    "keras_dks.distribute's docstring."
                ) from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(
        f"Unknown strategy {name!r}. Use one of {list(STRATEGIES)}."
    )


def is_multi_worker(strategy):
    """True for a `MultiWorkerMirroredStrategy` with more than one worker."""
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def needs_keras_20585_workaround(model):
    """Whether `model.fit` hits keras-team/keras#20585 (see module doc).

    Only models created under a `MultiWorkerMirroredStrategy` scope do.
    """
    strategy = getattr(model, "_distribute_strategy", None)
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _first_local_value(value):
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


def maybe_symbolic_build(model, iterator=None, data_batch=None):
    """`TensorFlowTrainer._maybe_symbolic_build` without the bad reduce.

    Part 1 of the keras-team/keras#20585 workaround. Keras only needs the
    shapes and dtypes of one batch to build the model, its compiled loss
    and metrics; it takes them from the first local replica's value instead
    of all-reducing the batch across workers. When everything but the
    optimizer is already built (always the case for `DKSModel`, a
    functional model with its own metrics), no data is read at all.
    """
    strategy = model.distribute_strategy
    built = (
        all(layer.built for layer in model._flatten_layers())
        and (model._compile_metrics is None or model._compile_metrics.built)
        and (model._compile_loss is None or model._compile_loss.built)
    )
    if not built and data_batch is None and iterator is not None:
        for _, _, it in iterator:
            data_batch = tree.map_structure(_first_local_value, next(it))
            break
    with strategy.scope():
        model._symbolic_build(data_batch=data_batch)


def rank1_logs(step_function, strategy):
    """Wrap a train/test step so its logs reduce under multi-worker.

    Part 2 of the keras-team/keras#20585 workaround: Keras reduces every
    log with `strategy.reduce("MEAN", v, axis=0)` in multi-worker mode. A
    scalar log gets a length-1 axis here, inside the replica function, so
    that reduction returns the mean over all replicas as a scalar. Logs are
    returned unchanged when the strategy is not in multi-worker mode.
    """
    if not is_multi_worker(strategy):
        return step_function

    def step(data):
        logs = step_function(data)
        return tree.map_structure(
            lambda v: tf.reshape(v, [1]) if len(getattr(v, "shape", [0])) == 0 else v,
            logs,
        )

    return step


class MultiWorkerWorkaroundMixin:
    """Routes `fit` / `evaluate` around keras-team/keras#20585.

    https://github.com/keras-team/keras/issues/20585: Keras' TensorFlow
    trainer fails under `MultiWorkerMirroredStrategy` (see the module doc).
    Put this class before `keras.Model` in a model's bases: for a model
    created under that strategy (`needs_keras_20585_workaround`) it builds
    with `maybe_symbolic_build` and wraps the train / test steps with
    `rank1_logs`; any other model runs Keras' own code. It adds nothing on
    the other backends. Remove it once Keras fixes the bug.

    Example:
    ```python
    class MyModel(keras_dks.distribute.MultiWorkerWorkaroundMixin, keras.Model):
        ...
    ```
    """

    if keras.backend.backend() == "tensorflow":

        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            if needs_keras_20585_workaround(self):
                return maybe_symbolic_build(self, iterator, data_batch)
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

        def _rank1_logs_function(self, kind, force):
            # The `kind` ("train" / "test") step function with rank-1 logs,
            # or None where Keras' own is right (no workaround, or made).
            attr = f"{kind}_function"
            if not needs_keras_20585_workaround(self) or (
                getattr(self, attr) is not None and not force
            ):
                return None
            step = getattr(self, f"{kind}_step")
            setattr(self, attr, self._make_function(rank1_logs(step, self.distribute_strategy)))
            return getattr(self, attr)

        def make_train_function(self, force=False):
            return self._rank1_logs_function("train", force) or super().make_train_function(
                force
            )

        def make_test_function(self, force=False):
            return self._rank1_logs_function("test", force) or super().make_test_function(
                force
            )
