"""The paper's training recipes, shared by the examples.

- `step_schedule`, `sgd`: step learning-rate decay on optimizer steps
  (`keras.optimizers.schedules.PiecewiseConstantDecay`) and SGD with
  momentum, as in the authors' code (CIFAR: lr 0.1 x0.2 at epochs 60, 120,
  160; ImageNet: lr 0.1 /10 every 30 epochs), guarded by
  `keras_dks.optimizers.SkipNonFinite`.
- `train(...)`: `fit` with resumable checkpoints, a stop on non-finite
  losses, one progress line per epoch, TensorBoard, a per-epoch log kept
  across restarts, a history JSON, the per-head error curves PNG (paper
  Figure 1), the final `model.keras` and the training speed.
  `train_srdl(...)`: the same for SRDL's two stages.
- `export_inference_model`, `set_precision`, `worker_dir`, `summary_line`:
  the rest of an example's plumbing.

Models come from `keras_dks.methods.build_model`, strategies from
`keras_dks.distribute.get_strategy`.

Example:
```python
import keras, keras_dks
from keras_dks import recipes
backbone = keras_dks.backbones.wide_resnet(28, 10, num_classes=100)
model = keras_dks.methods.build_model("dks", backbone, weight_decay=5e-4)
schedule = recipes.step_schedule(0.1, steps_per_epoch=391,
                                 boundaries=(60, 120, 160), decay=0.2)
model.compile(recipes.sgd(schedule), metrics=["accuracy"])
result = recipes.train(model, train_ds, test_ds, epochs=200,
                       model_dir="runs/wrn28_10_dks", batch_size=128)
print(result["head_errors"])
```
"""

import importlib.util
import json
import os
import sys
import time
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_dks import callbacks as callbacks_lib
from keras_dks import losses as losses_lib
from keras_dks import methods as methods_lib
from keras_dks import optimizers as optimizers_lib
from keras_dks import utils
from keras_dks.utils import step_schedule

# Names that moved out of this module: {old name: (new place, value)}.
_MOVED = {
    "METHODS": ("keras_dks.methods.MODEL_METHODS", lambda: methods_lib.MODEL_METHODS),
    "PAIRS": ("keras_dks.losses.PAIR_STRATEGIES", lambda: losses_lib.PAIR_STRATEGIES),
}


def __getattr__(name):
    if name in _MOVED:
        place, value = _MOVED[name]
        warnings.warn(
            f"keras_dks.recipes.{name} is deprecated; use {place}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return value()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(method, backbone, num_classes=None, pairs="bidirectional", **kwargs):
    """Deprecated: use `keras_dks.methods.build_model`.

    Builds the same model; `pairs` is passed for `"dks"` and `"dhm"` only.
    """
    warnings.warn(
        "keras_dks.recipes.build_model is deprecated; use "
        "keras_dks.methods.build_model(method, backbone, ...).",
        DeprecationWarning,
        stacklevel=2,
    )
    if method in ("dks", "dhm"):
        kwargs["pairs"] = pairs
    return methods_lib.build_model(method, backbone, num_classes=num_classes, **kwargs)


def get_strategy(name="default"):
    """Deprecated: use `keras_dks.distribute.get_strategy`."""
    warnings.warn(
        "keras_dks.recipes.get_strategy is deprecated; use "
        "keras_dks.distribute.get_strategy(name).",
        DeprecationWarning,
        stacklevel=2,
    )
    from keras_dks import distribute

    return distribute.get_strategy(name)


# ---------------------------------------------------------------------------
# Optimizer and environment
# ---------------------------------------------------------------------------
def sgd(learning_rate, momentum=0.9, nesterov=False, skip_non_finite=True):
    """SGD with momentum (no Nesterov, as in the authors' code).

    Weight decay is not the optimizer's: it is `DKSModel(weight_decay=...)`,
    an L2 term on every trainable variable (PyTorch's coupled decay).

    Args:
        learning_rate: a float or a schedule (`step_schedule`).
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        skip_non_finite: wrap the optimizer in
            `keras_dks.optimizers.SkipNonFinite`: a step whose gradients
            are not finite changes nothing and is counted (`train` then
            stops with a message naming it).

    Returns:
        The optimizer.

    Example:
    ```python
    optimizer = sgd(step_schedule(0.1, 391, (60, 120, 160), 0.2))
    ```
    """
    optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=nesterov)
    return optimizers_lib.SkipNonFinite(optimizer) if skip_non_finite else optimizer


def is_chief():
    """True unless this process is a non-chief worker of a `TF_CONFIG` cluster."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    task_type, index = task.get("type"), int(task.get("index", 0))
    if task_type in (None, "chief"):
        return True
    return task_type == "worker" and index == 0 and "chief" not in config.get("cluster", {})


def worker_dir(model_dir):
    """`model_dir` on the chief; a per-worker scratch folder below it on the
    other workers (every worker must write its own checkpoints, only the
    chief's files are kept).

    Example:
    ```python
    # TF_CONFIG task {"type": "worker", "index": 1}:
    worker_dir("runs/dks")   # 'runs/dks/workers/worker_1'
    ```
    """
    if model_dir is None or is_chief():
        return model_dir
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    return os.path.join(model_dir, "workers", f"{task['type']}_{task['index']}")


def set_precision(mixed):
    """Global Keras dtype policy: mixed precision when `mixed`.

    `mixed_float16` on GPUs (`DKSModel` scales the loss through Keras'
    `LossScaleOptimizer`); `mixed_bfloat16` on CPUs/TPUs, where float16
    kernels are slow or missing. Heads compute their logits in float32.

    Args:
        mixed: use mixed precision.

    Returns:
        The policy name.

    Example:
    ```python
    set_precision(True)   # 'mixed_float16' on a GPU machine
    ```
    """
    if not mixed:
        name = "float32"
    elif tf.config.list_physical_devices("GPU"):
        name = "mixed_float16"
    else:
        name = "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(name)
    return name


# ---------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------
class EpochLog(keras.callbacks.Callback):
    """Appends each epoch's logs to a JSON-lines file.

    Unlike `History` (only the epochs of the current `fit`) the file spans
    restarts from `BackupAndRestore`; unlike `CSVLogger` it keeps keys that
    appear only in some epochs (validation with `validation_freq > 1`).

    Args:
        path: the `.jsonl` file.
        offset: added to the epoch numbers (SRDL's second stage follows the
            first).
    """

    def __init__(self, path, offset=0):
        super().__init__()
        self.path = path
        self.offset = offset

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": int(epoch) + self.offset}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_epoch_log(path):
    """`{key: [value per epoch]}` from an `EpochLog` file; a repeated epoch
    (re-run after a crash) keeps its last row, a key missing in an epoch is
    NaN."""
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[row.pop("epoch")] = row
    keys = []
    for epoch in sorted(rows):
        keys += [k for k in rows[epoch] if k not in keys]
    return {k: [rows[e].get(k, float("nan")) for e in sorted(rows)] for k in keys}


class Throughput(keras.callbacks.Callback):
    """Training speed without validation: steps/s per epoch.

    Times each epoch from its start to the start of validation (or its end)
    and counts its batches.
    """

    def __init__(self):
        super().__init__()
        self.epochs = []  # (steps, seconds) per epoch
        self._start = self._steps = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def _stop(self):
        if self._start is not None:
            self.epochs.append((self._steps, time.perf_counter() - self._start))
            self._start = None

    def on_test_begin(self, logs=None):
        self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self._stop()

    def steps_per_second(self):
        """Mean over the epochs after the first (which pays for tracing and
        compilation), or the first when it is the only one."""
        epochs = self.epochs[1:] or self.epochs
        steps = sum(s for s, _ in epochs)
        seconds = sum(t for _, t in epochs)
        return steps / seconds if seconds > 0 else float("nan")


def _format_value(value):
    # Keras' progress bar: 4 decimals, scientific below 1e-3.
    value = float(value)
    return f"{value:.4f}" if value == 0 or abs(value) > 1e-3 else f"{value:.4e}"


class EpochProgress(keras.callbacks.Callback):
    """One line per epoch, in the format of Keras' `fit(verbose=2)`, whole.

    `Epoch 3/24 - 16 steps - 9s - 560ms/step - accuracy: 0.4512 - loss: ...`,
    written with a single `write` and flushed, so lines of processes that
    share a terminal never mix mid-line; `label` starts the line (e.g. the
    method when several train side by side). Left out, to keep it readable:
    the per-head cross-entropies `*ce_loss` (terms of `loss`; `EpochLog`
    and TensorBoard keep them), `synergy_loss` of a model without synergy
    pairs (baseline, DS) and `skipped_steps` while no step was skipped.
    Keras' own line is two lines (`Epoch k/n`, then the values) that another
    process can split.

    Args:
        label: text before `Epoch` (None: none).
        stream: where to write (default `sys.stdout`).

    Example:
    ```python
    model.fit(train_ds, epochs=24, verbose=0,
              callbacks=[EpochProgress(label="dks")])
    # dks      Epoch 1/24 - 16 steps - 31s - 1938ms/step - accuracy: ...
    ```
    """

    def __init__(self, label=None, stream=None):
        super().__init__()
        self.label = label
        self.stream = stream
        self._start = None
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def hidden(self, key, value):
        """Whether a log entry carries nothing for this model."""
        base = key[len("val_"):] if key.startswith("val_") else key
        if base.endswith("ce_loss"):
            return True  # the per-head terms of `loss`: in the epoch log
        if base == "synergy_loss":
            return not getattr(self.model, "pair_list", [None])
        return base == "skipped_steps" and not value

    def line(self, epoch, logs):
        """The progress line of a finished epoch (without newline)."""
        seconds = time.perf_counter() - (self._start or time.perf_counter())
        parts = [f"Epoch {epoch + 1}/{self.params.get('epochs', '?')}"]
        if self._steps:
            parts.append(f"{self._steps} steps - {seconds:.0f}s - "
                         f"{1000 * seconds / self._steps:.0f}ms/step")
        parts += [f"{k}: {_format_value(v)}" for k, v in (logs or {}).items()
                  if not self.hidden(k, v)]
        text = " - ".join(parts)
        return f"{self.label:<8} {text}" if self.label else text

    def on_epoch_end(self, epoch, logs=None):
        stream = self.stream or sys.stdout
        stream.write(self.line(epoch, logs) + "\n")
        stream.flush()


def _has_tensorboard():
    # tf.summary needs the tensorboard package (tensorflow-cpu does not
    # require it); without it the TensorBoard callback would fail mid-epoch.
    if importlib.util.find_spec("tensorboard") is None:
        logging.warning("tensorboard is not installed: no TensorBoard logs.")
        return False
    return True


def write_json(path, obj):
    """Write `obj` as indented JSON, replacing `path` atomically."""
    utils.atomic_write_json(path, obj, indent=1, sort_keys=True)


# ---------------------------------------------------------------------------
# Training: the steps shared by `train` and `train_srdl`
# ---------------------------------------------------------------------------
class RunFolder:
    """The files of one training run in `model_dir` (None: no files).

    `backup/` holds the resumable checkpoints, `epochs.jsonl` the per-epoch
    log across restarts. Creating a `RunFolder` makes the folder and, when
    no backup is there to resume from, drops the log of a finished run.
    """

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.log_path = self.backup_dir = None
        if model_dir:
            os.makedirs(model_dir, exist_ok=True)
            self.backup_dir = os.path.join(model_dir, "backup")
            self.log_path = os.path.join(model_dir, "epochs.jsonl")
            resuming = os.path.isdir(self.backup_dir) and bool(os.listdir(self.backup_dir))
            if not resuming and os.path.exists(self.log_path):
                os.remove(self.log_path)

    def callbacks(self, meter, callbacks=(), verbose=2, label=None, epoch_offset=0,
                  tensorboard_dir=None):
        """The callbacks of one `fit`, in the order they must run.

        The step guard's count and the non-finite stop come first, user
        callbacks next (what they add to the logs is recorded and shown),
        then the progress line, the epoch log and TensorBoard; the backup
        comes last: a crash between log and backup repeats the epoch
        (`read_epoch_log` keeps the last row), never loses it. The backup
        itself is not included (see `train`).
        """
        found = [meter, optimizers_lib.SkippedStepsLogger(),
                 callbacks_lib.StopOnNonFiniteLoss(raise_error=True)]
        found += list(callbacks)
        if verbose == 2:
            found.append(EpochProgress(label=label))
        if self.log_path:
            found.append(EpochLog(self.log_path, offset=epoch_offset))
        if tensorboard_dir:
            found.append(keras.callbacks.TensorBoard(tensorboard_dir, write_graph=False))
        return found

    def logs(self, fallback):
        """The per-epoch logs: the epoch log when there is one, else `fallback`."""
        if self.log_path and os.path.exists(self.log_path):
            return read_epoch_log(self.log_path)
        return fallback


def _array_pair(data):
    """`(x, y)` when `data` is a pair of arrays (NumPy or tensors), else None."""
    if isinstance(data, tuple) and len(data) == 2 and all(
        isinstance(a, np.ndarray) or hasattr(a, "numpy") for a in data
    ):
        return data
    return None


def check_array_labels(model, data):
    """Reject bad labels of array data before any step
    (`keras_dks.losses.check_labels`); datasets are left to the in-graph
    check, which gives a bad label a NaN target.

    Args:
        model: the model (its `num_classes`).
        data: `(x, y)` arrays, or a dataset (nothing to check).

    Raises:
        ValueError: naming the first bad label and the fix.
    """
    pair = _array_pair(data)
    if pair is not None:
        losses_lib.check_labels(np.asarray(pair[1]), model.num_classes)


def build_before_first_trace(model, data):
    """Create the optimizer's and the compiled metrics' variables before
    the first step is traced (TensorFlow, no distribution strategy).

    Keras creates them inside the first trace of the step function, and
    `tf.function` then traces a function that created variables a second
    time; building them here halves the time to the first step. Under a
    strategy Keras builds them itself, in the strategy's scope, and when the
    label shape is unknown nothing is built here.

    Args:
        model: a compiled multi-head model (`DKSModel`).
        data: `(x, y)` arrays or a dataset of `(x, y)` batches.
    """
    if tf.distribute.has_strategy() or model.distribute_strategy is not tf.distribute.get_strategy():
        return
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    if all(getattr(m, "built", True) for m in model.metrics):
        return
    pair = _array_pair(data)
    if pair is not None:
        labels = np.asarray(pair[1])
        shape, dtype = labels.shape[1:], labels.dtype
    elif isinstance(data, tf.data.Dataset) and isinstance(data.element_spec, tuple) and len(
            data.element_spec) >= 2 and isinstance(data.element_spec[1], tf.TensorSpec):
        spec = data.element_spec[1]
        shape, dtype = tuple(spec.shape[1:]), spec.dtype.as_numpy_dtype
    else:
        return
    if None in shape:
        return
    heads = [np.zeros((1, model.num_classes), "float32") for _ in model.head_names]
    model.compute_metrics(None, np.zeros((1,) + tuple(shape), dtype),
                          heads if len(heads) > 1 else heads[0])
    model.reset_metrics()


def _fit_data(data, batch_size):
    """`fit` / `evaluate` keyword arguments for a dataset or `(x, y)` arrays."""
    pair = _array_pair(data)
    if pair is None:
        return {"x": data}
    return {"x": pair[0], "y": pair[1], "batch_size": batch_size}


def train(
    model,
    train_data,
    eval_data=None,
    *,
    epochs,
    steps_per_epoch=None,
    eval_steps=None,
    model_dir=None,
    batch_size=None,
    validation_freq=1,
    callbacks=(),
    verbose=2,
    label=None,
    save_model=True,
    plot=True,
    title=None,
    tensorboard=True,
):
    """Fit a compiled `DKSModel` the way the examples do, and report.

    With a `model_dir` it writes

    - `backup/`: checkpoints after every epoch; running the same command
      again after a crash resumes there (`SafeBackupAndRestore`, deleted
      when training completes),
    - `logs/`: TensorBoard (when the tensorboard package is installed),
    - `epochs.jsonl`: every epoch's logs, across restarts,
    - `history.json`: the per-epoch logs, final evaluation and speed,
    - `curves.png`: per-head train/test error per epoch (paper Figure 1),
    - `model.keras`: the trained model.

    Before training, array labels are checked (`check_array_labels`), the
    optimizer's and metrics' variables are built
    (`build_before_first_trace`) and, under `MultiWorkerMirroredStrategy`,
    `keras_dks.distribute.multi_worker_model` is applied. Training stops
    with `FloatingPointError` on a non-finite loss term or a skipped step
    (`sgd` skips steps with non-finite gradients). Under
    `MultiWorkerMirroredStrategy`, pass `worker_dir(model_dir)`.

    Args:
        model: a compiled `DKSModel`.
        train_data: batched training `tf.data.Dataset` (repeated when
            `steps_per_epoch` is given), or `(x, y)` arrays.
        eval_data: batched test dataset (finite; `eval_steps` batches if
            given) or `(x, y)` arrays, evaluated every `validation_freq`
            epochs and at the end.
        epochs: number of epochs.
        steps_per_epoch: steps per epoch (None: one pass over `train_data`).
        eval_steps: test batches per evaluation (None: all).
        model_dir: output folder (None: write nothing).
        batch_size: global batch size, for images/s (and the batch size of
            array data).
        validation_freq: evaluate every this many epochs.
        callbacks: extra callbacks.
        verbose: 0 silent, 1 Keras' progress bar, 2 one `EpochProgress`
            line per epoch.
        label: text that starts each progress line (e.g. the method).
        save_model, plot, tensorboard: write `model.keras`, `curves.png`,
            TensorBoard logs.
        title: title of the curves figure.

    Returns:
        dict with `head_names`, `history` (per-epoch logs), `eval` (final
        evaluation),
        `head_errors` (`{head: error}` of the final evaluation),
        `wall_seconds` (this `fit`), `train_steps_per_second`,
        `train_images_per_second` and the written `paths`.

    Example:
    ```python
    result = train(model, train_ds, test_ds, epochs=200,
                   model_dir="runs/dks", batch_size=128)
    ```
    """
    from keras_dks import distribute

    check_array_labels(model, train_data)
    run = RunFolder(model_dir)
    meter = Throughput()
    paths = {}
    if model_dir and tensorboard and _has_tensorboard():
        paths["tensorboard"] = os.path.join(model_dir, "logs")
    all_callbacks = run.callbacks(meter, callbacks, verbose=verbose, label=label,
                                  tensorboard_dir=paths.get("tensorboard"))
    if run.backup_dir:
        all_callbacks.append(callbacks_lib.SafeBackupAndRestore(run.backup_dir))
    distribute.multi_worker_model(model)
    build_before_first_trace(model, train_data)

    start = time.perf_counter()
    history = model.fit(
        **_fit_data(train_data, batch_size),
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=eval_data,
        validation_steps=eval_steps,
        validation_freq=validation_freq,
        callbacks=all_callbacks,
        verbose=1 if verbose == 1 else 0,
        shuffle=False,  # the tf.data pipeline shuffles
    )
    wall = time.perf_counter() - start
    final = {}
    if eval_data is not None:
        final = model.evaluate(**_fit_data(eval_data, batch_size), steps=eval_steps, verbose=0,
                               return_dict=True)
    return _report(
        model, list(model.head_names), run.logs(history.history), final, wall, meter,
        batch_size, paths, model_dir, plot, save_model, title,
    )


def _report(model, heads, logs, final, wall, meter, batch_size, paths, model_dir, plot,
            save_model, title):
    """The result dict of `train` / `train_srdl`; writes history, curves, model."""
    final = {k: float(v) for k, v in final.items()}
    steps_per_second = meter.steps_per_second()
    result = {
        "head_names": heads,
        "history": logs,
        "eval": final,
        "head_errors": {  # {head: error} as fractions
            h: 1.0 - final["accuracy" if h == "main" else f"{h}_accuracy"] for h in heads
        } if final else {},
        "wall_seconds": wall,
        "train_steps_per_second": steps_per_second,
        "train_images_per_second": steps_per_second * batch_size if batch_size else None,
        "paths": paths,
    }
    if model_dir:
        paths["history"] = os.path.join(model_dir, "history.json")
        write_json(paths["history"], {k: v for k, v in result.items() if k != "paths"})
        if plot:
            from keras_dks import plots

            paths["curves"] = plots.plot_error_curves(
                logs, os.path.join(model_dir, "curves.png"), title=title, heads=heads
            )
        if save_model:
            paths["model"] = os.path.join(model_dir, "model.keras")
            model.save(paths["model"])
    return result


def train_srdl(
    model_fn,
    train_data,
    eval_data,
    extraction_data,
    *,
    epochs,
    steps_per_epoch,
    optimizer_fn,
    weight_decay=0.0,
    model_dir=None,
    batch_size=None,
    strategy=None,
    jit_compile=False,
    validation_freq=1,
    callbacks=(),
    verbose=2,
    label=None,
    save_model=True,
    plot=True,
    title=None,
):
    """SRDL (`keras_dks.methods.SRDL`) with the reporting of `train`.

    Two stages of `epochs / 2`, each with the full schedule that
    `optimizer_fn(stage_steps)` returns; stage 2 restarts from fresh weights
    and learns from stage 1's stored soft labels. With a `model_dir` it is
    resumable like `train` (`model_dir/backup/`: a finished stage 1 is not
    run again, the interrupted stage resumes at its last epoch) and writes
    `epochs.jsonl`, `history.json`, `curves.png` (both stages in a row, the
    restart visible halfway) and `model.keras` (the stage-2 network).

    Args:
        model_fn: returns a new, uncompiled logits classifier.
        train_data: batched `((images, index), labels)` dataset (e.g.
            `make_dataset(..., with_index=True)`).
        eval_data: batched `(images, labels)` test dataset.
        extraction_data: one un-augmented pass over the training examples,
            batched `((images, index), labels)`: the stored soft labels are
            computed on it.
        epochs: SRDL's total budget M (even).
        steps_per_epoch: optimizer steps per epoch.
        optimizer_fn: `optimizer_fn(stage_steps) -> optimizer`.
        weight_decay: coupled L2 on all trainable variables.
        model_dir, batch_size, validation_freq, callbacks, verbose, label,
        save_model, plot, title: as in `train` (callbacks serve both stages;
        the progress lines name the stage).
        strategy: `tf.distribute` strategy (None: the current one).
        jit_compile: compile the train step with XLA.

    Returns:
        The dict of `train` (head `"main"` only) and `"model"`, the trained
        stage-2 network.

    Example:
    ```python
    result = train_srdl(
        lambda: keras_dks.backbones.wide_resnet(16, 1, 10, input_shape=(28, 28, 1)),
        train_ds, test_ds, extraction_ds, epochs=30, steps_per_epoch=79,
        optimizer_fn=lambda n: sgd(step_schedule(0.1, 79, (5, 10), 0.2)),
        model_dir="runs/srdl", batch_size=128)
    ```
    """
    run = RunFolder(model_dir)
    meter = Throughput()
    stage_epochs = epochs // 2

    def stage_callbacks(stage):
        stage_label = f"{label} stage {stage}" if label else f"stage {stage}"
        return run.callbacks(meter, callbacks, verbose=verbose, label=stage_label,
                             epoch_offset=(stage - 1) * stage_epochs)

    srdl = methods_lib.SRDL(
        model_fn, epochs, optimizer_fn=optimizer_fn, metrics=["accuracy"],
        weight_decay=weight_decay, strategy=strategy,
        compile_kwargs={"jit_compile": jit_compile},
    )
    start = time.perf_counter()
    histories = srdl.fit(
        train_data, validation_data=eval_data, steps_per_epoch=steps_per_epoch,
        extraction_data=extraction_data, callbacks=stage_callbacks,
        checkpoint_dir=run.backup_dir, validation_freq=validation_freq,
        verbose=1 if verbose == 1 else 0,
    )
    wall = time.perf_counter() - start
    both = {}  # both stages in a row, when there is no epoch log
    for history in histories:
        for k, v in (history.history if history else {}).items():
            both.setdefault(k, []).extend(v)
    final = srdl.trainers[1].evaluate(eval_data, verbose=0, return_dict=True)
    result = _report(
        srdl.model, ["main"], run.logs(both), final, wall, meter, batch_size, {}, model_dir,
        plot, save_model, title,
    )
    result["model"] = srdl.model
    return result


# ---------------------------------------------------------------------------
# Export and reporting
# ---------------------------------------------------------------------------
def export_inference_model(model, export_dir, mean, std, input_dtype="uint8", **kwargs):
    """SavedModel of the inference network (backbone + main head) for TF
    Serving, taking raw pixels: the training normalisation is built in.

    Args:
        model: the trained `DKSModel`.
        export_dir: base folder; the SavedModel goes to a new numeric
            version folder inside (`export_dir/1`, ...).
        mean, std: the training normalisation, per channel on the [0, 1]
            scale.
        input_dtype: `"uint8"` (raw pixels) or `"float32"` (0-255 floats).
        **kwargs: more `keras_dks.export_saved_model` arguments (`version`,
            `overwrite`, `top_k`).

    Returns:
        The path of the written SavedModel.

    Example:
    ```python
    path = export_inference_model(model, "exports/wrn", cifar.MEAN, cifar.STD)
    ```
    """
    mean255 = [255.0 * m for m in _as_list(mean)]
    var255 = [(255.0 * s) ** 2 for s in _as_list(std)]
    normalization = keras.layers.Normalization(mean=mean255, variance=var255)
    from keras_dks.export import export_saved_model

    return export_saved_model(
        model, export_dir, input_dtype=input_dtype, preprocessing=normalization, **kwargs
    )


def _as_list(x):
    return [float(v) for v in x] if isinstance(x, (list, tuple)) else [float(x)]


def _duration(seconds):
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def summary_line(name, errors, wall_seconds, images_per_second, pipeline_images_per_second=None):
    """One line: main-head test error, each auxiliary head's, wall time, speed.

    Example:
    ```python
    summary_line("cifar100 WRN-28-10 dks", {"main": 0.1724, "aux_group1": 0.18},
                 7200, 512.0)
    # 'RESULT cifar100 WRN-28-10 dks | test error main 17.24% | aux_group1 18.00%
    #  | wall 2h00m00s | train 512.0 images/s'
    ```
    """
    parts = [f"RESULT {name}"]
    for k, (head, err) in enumerate(errors.items()):
        parts.append(f"{'test error ' if k == 0 else ''}{head} {100 * err:.2f}%")
    parts.append(f"wall {_duration(wall_seconds)}")
    speed = f"train {images_per_second:.1f} images/s"
    if pipeline_images_per_second is not None:
        speed += f" (input pipeline alone {pipeline_images_per_second:.1f} images/s)"
    parts.append(speed)
    return " | ".join(parts)


def steps_summary(train_steps_per_second, pipeline):
    """A line comparing training steps/s with the pipeline's steps/s.

    Args:
        train_steps_per_second: training speed (`train(...)` result).
        pipeline: `keras_dks.data.measure_throughput(...)` of the training
            dataset, or None.

    Example:
    ```python
    print(steps_summary(result["train_steps_per_second"],
                        measure_throughput(train_ds, steps=100)))
    ```
    """
    if pipeline is None:
        return f"speed: {train_steps_per_second:.2f} training steps/s"
    ratio = pipeline["steps_per_second"] / train_steps_per_second
    verdict = (
        "the pipeline is not the bottleneck"
        if ratio >= 2
        else "WARNING: the input pipeline may limit training speed"
    )
    return (
        f"speed: {train_steps_per_second:.2f} steps/s with the model, "
        f"{pipeline['steps_per_second']:.2f} steps/s input pipeline alone "
        f"({ratio:.1f}x: {verdict})"
    )

