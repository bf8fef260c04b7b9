"""The only place where keras_dks touches private Keras members.

Each function below wraps one private member of Keras, names the Keras
versions it was verified on and checks the running version first: outside
`VERIFIED_KERAS` it raises a RuntimeError naming the supported range (at the
first use of that member, never deep inside `fit`). Everything else in the
package uses public Keras API only; `tests/test_compat.py` checks that.

| function | private member | used by |
|---|---|---|
| `set_initial_epoch` | `Trainer._initial_epoch` | `callbacks.SafeBackupAndRestore` |
| `graph_nodes` | `Function._nodes_by_depth` | `taps.BackboneGraph` (shared layers only) |
| `build_from_local_batch` | `TensorFlowTrainer._maybe_symbolic_build` | `distribute.multi_worker_model` |
| `loss_tracker` | `Trainer._loss_tracker` | `model.DKSModel.train_step` (TensorFlow) |
| `strategy_supports_no_merge_call` | `tf.__internal__.distribute` | `optimizers.SkipNonFinite` (TensorFlow) |
"""

import re

import keras
from keras import tree

# Oldest and newest Keras every function here was verified on (inclusive).
VERIFIED_KERAS = ("3.10.0", "3.15.1")


def _version_tuple(version):
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", str(version))
    if not match:
        return None
    return tuple(int(part) for part in match.groups())


def check_keras_version(member):
    """Raise a RuntimeError unless the running Keras is in `VERIFIED_KERAS`.

    Args:
        member: the private Keras member about to be used (for the message).

    Example:
    ```python
    keras_dks.compat.check_keras_version("Trainer._initial_epoch")
    ```
    """
    low, high = (_version_tuple(v) for v in VERIFIED_KERAS)
    current = _version_tuple(keras.__version__)
    if current is None or not low <= current <= high:
        raise RuntimeError(
            f"keras_dks uses the private Keras member {member}, verified on "
            f"Keras {VERIFIED_KERAS[0]} to {VERIFIED_KERAS[1]}; this is Keras "
            f"{keras.__version__}. Install a supported version, e.g. "
            f"pip install 'keras>={VERIFIED_KERAS[0]},<={VERIFIED_KERAS[1]}'."
        )


def set_initial_epoch(model, epoch):
    """Make the next `model.fit` start at `epoch` (0-based), as
    `keras.callbacks.BackupAndRestore` does.

    `fit` reads `Trainer._initial_epoch` after `on_train_begin`, so a
    callback can set it there (verified on Keras 3.10.0 and 3.15.1, all
    three backends' trainers).

    Args:
        model: the `keras.Model` being fitted.
        epoch: the first epoch to run, or None for `fit`'s own
            `initial_epoch`.
    """
    check_keras_version("Trainer._initial_epoch")
    model._initial_epoch = None if epoch is None else int(epoch)


def graph_nodes(model):
    """Every call of an operation in a functional model, inputs first.

    Reads `Function._nodes_by_depth` (verified on Keras 3.10.0 and 3.15.1),
    which also holds the second and later calls of a shared layer, which
    the public `operation.input` / `operation.output` do not show.

    Args:
        model: a functional `keras.Model`.

    Returns:
        A list of `(operation, input_tensors, output_tensors)`, in an order
        where every tensor is produced before it is used.
    """
    check_keras_version("Function._nodes_by_depth")
    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            nodes.append(
                (node.operation, list(node.input_tensors), list(node.outputs))
            )
    return nodes


def build_from_local_batch(model, local_value):
    """Make `model` build from one local batch instead of a reduced one.

    Replaces, on this model instance only, the TensorFlow trainer's
    `_maybe_symbolic_build` (verified on Keras 3.10.0 and 3.15.1), which
    all-reduces the first distributed batch to learn its shapes; that
    reduce fails under `MultiWorkerMirroredStrategy`
    (https://github.com/keras-team/keras/issues/20585). The replacement
    maps `local_value` over the first batch and hands it to Keras' own
    method as `data_batch`, which skips the reduce.

    Args:
        model: a `keras.Model` on the TensorFlow backend.
        local_value: function from a (possibly distributed) tensor to a
            local tensor of the same shape and dtype.
    """
    check_keras_version("TensorFlowTrainer._maybe_symbolic_build")
    keras_build = type(model)._maybe_symbolic_build.__get__(model)

    def _maybe_symbolic_build(iterator=None, data_batch=None):
        if data_batch is None and iterator is not None:
            # Keras 3.10 yields (step, iterator), 3.15 (begin, end, iterator).
            for item in iterator:
                data_batch = tree.map_structure(local_value, next(item[-1]))
                break
        return keras_build(iterator=None, data_batch=data_batch)

    model._maybe_symbolic_build = _maybe_symbolic_build


def loss_tracker(model):
    """The `keras.metrics.Mean` behind a compiled model's `loss` log.

    Reads `Trainer._loss_tracker` (verified on Keras 3.10.0 and 3.15.1),
    which Keras' own `train_step` updates with the step's loss; a custom
    TensorFlow `train_step` updates it the same way.

    Args:
        model: a compiled `keras.Model`.
    """
    check_keras_version("Trainer._loss_tracker")
    return model._loss_tracker


def strategy_supports_no_merge_call():
    """Whether the current `tf.distribute` strategy lets an optimizer update
    its variables in the replica context (no `merge_call`).

    Reads TensorFlow's `tf.__internal__.distribute.
    strategy_supports_no_merge_call` (verified on TensorFlow 2.19.1 and
    2.21), the test
    Keras' own TensorFlow optimizer and `LossScaleOptimizer` make before
    they apply gradients; a wrapper optimizer must make the same choice.
    """
    import tensorflow as tf

    internal = getattr(getattr(tf, "__internal__", None), "distribute", None)
    check = getattr(internal, "strategy_supports_no_merge_call", None)
    if check is None:
        raise RuntimeError(
            "keras_dks uses tf.__internal__.distribute."
            "strategy_supports_no_merge_call, verified on TensorFlow 2.19.1 "
            f"and 2.21; this is TensorFlow {tf.__version__}. Install a supported "
            "version, e.g. pip install 'tensorflow>=2.19,<2.22'."
        )
    return check()
