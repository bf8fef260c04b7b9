"""The paper's training recipes, shared by the examples.

- `build_model(method, backbone, ...)`: baseline / DS / DKS / DHM as a
  `DKSModel` (dispatches to `keras_dks.methods`).
- `step_schedule`, `sgd`: step learning-rate decay on optimizer steps
  (`keras.optimizers.schedules.PiecewiseConstantDecay`) and SGD with
  momentum, as in the authors' code (CIFAR: lr 0.1 x0.2 at epochs 60, 120,
  160; ImageNet: lr 0.1 /10 every 30 epochs).
- `train(...)`: `fit` with resumable checkpoints, a stop on non-finite
  losses, TensorBoard, a per-epoch log kept across restarts, a history
  JSON, the per-head error curves PNG (paper Figure 1), the final
  `model.keras` and the training speed.
- `export_inference_model`, `get_strategy`, `set_precision`,
  `summary_line`: the rest of an example's plumbing.

Example:
```python
import keras, keras_dks
from keras_dks import recipes
backbone = keras_dks.backbones.wide_resnet(28, 10, num_classes=100)
model = recipes.build_model("dks", backbone, weight_decay=5e-4)
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
import time

import keras
import tensorflow as tf
from absl import logging

from keras_dks import callbacks as callbacks_lib
from keras_dks import losses as losses_lib
from keras_dks import methods as methods_lib
from keras_dks import utils
from keras_dks.utils import step_schedule

# Model configurations of the examples' --method flag; the examples' "srdl"
# is a two-stage procedure (`train_srdl`), not a model configuration.
METHODS = methods_lib.MODEL_METHODS
PAIRS = losses_lib.PAIR_STRATEGIES


# ---------------------------------------------------------------------------
# Model and optimizer
# ---------------------------------------------------------------------------
def build_model(method, backbone, num_classes=None, pairs="bidirectional", **kwargs):
    """The model of a method on `backbone`.

    `"baseline"` is the plain network (`DKSModel(taps=[])`, main head
    only), `"ds"` deep supervision (`pairs="none"`), `"dks"` DKS with the
    given pair strategy, `"dhm"` `DHMModel` (by default DHM's released
    code: the DKS loss; see `keras_dks.methods.DHMModel`). The
    backbone's own head design is used (e.g. `wide_resnet` builds the
    authors' branches).

    Args:
        method: one of `METHODS`.
        backbone: the backbone `keras.Model` (see `DKSModel`).
        num_classes: classes (taken from the backbone's logits when None).
        pairs: pair strategy of `dks` / `dhm` (ignored by the others).
        **kwargs: any other `DKSModel` argument, e.g. `weight_decay`
            (coupled L2 on all trainable variables, like PyTorch's SGD
            `weight_decay`), `sync_batchnorm`, `label_smoothing`.

    Returns:
        A `DKSModel` (or `DHMModel`).

    Example:
    ```python
    model = build_model("ds", keras_dks.backbones.wide_resnet(16, 1, 10),
                        weight_decay=5e-4)
    model.head_names   # ['main', 'aux_group1', 'aux_group0']
    ```
    """
    if method not in METHODS:
        raise ValueError(
            f"Unknown method {method!r}; use one of {METHODS}"
            + (" (SRDL: keras_dks.methods.SRDL)." if method == "srdl" else ".")
        )
    if method in ("dks", "dhm"):
        kwargs["pairs"] = pairs
    return methods_lib.build_model(method, backbone, num_classes=num_classes, **kwargs)


def sgd(learning_rate, momentum=0.9, nesterov=False):
    """SGD with momentum (no Nesterov, as in the authors' code).

    Weight decay is not the optimizer's: it is `DKSModel(weight_decay=...)`,
    an L2 term on every trainable variable (PyTorch's coupled decay).

    Example:
    ```python
    optimizer = sgd(step_schedule(0.1, 391, (60, 120, 160), 0.2))
    ```
    """
    return keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=nesterov)


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------
def get_strategy(name="default"):
    """`"default"`, `"mirrored"` or `"multi_worker"` strategy.

    Call it before any other TensorFlow work: a multi-worker strategy starts
    the worker's server (see `keras_dks.distribute`).

    Args:
        name: strategy name, as in `keras_dks.distribute.get_strategy`.

    Example:
    ```python
    strategy = get_strategy("mirrored")
    with strategy.scope():
        model = build_model("dks", backbone, weight_decay=5e-4)
        model.compile(sgd(0.1), metrics=["accuracy"])
    ```
    """
    from keras_dks import distribute

    return distribute.get_strategy(name)


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
# Training
# ---------------------------------------------------------------------------
class EpochLog(keras.callbacks.Callback):
    """Appends each epoch's logs to a JSON-lines file.

    Unlike `History` (only the epochs of the current `fit`) the file spans
    restarts from `BackupAndRestore`; unlike `CSVLogger` it keeps keys that
    appear only in some epochs (validation with `validation_freq > 1`).
    """

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": int(epoch)}
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

    Training stops with `FloatingPointError` on a non-finite loss term.
    Under `MultiWorkerMirroredStrategy`, pass `worker_dir(model_dir)`.

    Args:
        model: a compiled `DKSModel`.
        train_data: batched training `tf.data.Dataset` (repeated when
            `steps_per_epoch` is given).
        eval_data: batched test dataset, evaluated every `validation_freq`
            epochs and at the end (finite; `eval_steps` batches if given).
        epochs: number of epochs.
        steps_per_epoch: steps per epoch (None: one pass over `train_data`).
        eval_steps: test batches per evaluation (None: all).
        model_dir: output folder (None: write nothing).
        batch_size: global batch size, for images/s.
        validation_freq: evaluate every this many epochs.
        callbacks: extra callbacks.
        verbose: `fit` verbosity.
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
    meter = Throughput()
    all_callbacks = [meter]
    paths = {}
    log_path = None
    if model_dir:
        os.makedirs(model_dir, exist_ok=True)
        backup_dir = os.path.join(model_dir, "backup")
        log_path = os.path.join(model_dir, "epochs.jsonl")
        resuming = os.path.isdir(backup_dir) and bool(os.listdir(backup_dir))
        if not resuming and os.path.exists(log_path):
            os.remove(log_path)  # a fresh run: drop the log of a finished one
        backup = callbacks_lib.SafeBackupAndRestore(backup_dir)
        stop = callbacks_lib.StopOnNonFiniteLoss(raise_error=True)
        # User callbacks run first, so what they add to the logs is recorded;
        # the log row is written before the backup: a crash in between
        # repeats the epoch (read_epoch_log keeps the last row), never loses it.
        all_callbacks += [stop] + list(callbacks) + [EpochLog(log_path)]
        if tensorboard and _has_tensorboard():
            paths["tensorboard"] = os.path.join(model_dir, "logs")
            all_callbacks.append(
                keras.callbacks.TensorBoard(paths["tensorboard"], write_graph=False)
            )
        all_callbacks.append(backup)
    else:
        all_callbacks += [callbacks_lib.StopOnNonFiniteLoss(raise_error=True)]
        all_callbacks += list(callbacks)

    start = time.perf_counter()
    history = model.fit(
        train_data,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=eval_data,
        validation_steps=eval_steps,
        validation_freq=validation_freq,
        callbacks=all_callbacks,
        verbose=verbose,
        shuffle=False,  # the tf.data pipeline shuffles
    )
    wall = time.perf_counter() - start
    logs = read_epoch_log(log_path) if log_path and os.path.exists(log_path) else history.history

    final = {}
    if eval_data is not None:
        final = model.evaluate(eval_data, steps=eval_steps, verbose=0, return_dict=True)
    return _report(
        model, list(model.head_names), logs, final, wall, meter, batch_size, paths,
        model_dir, plot, save_model, title,
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
        model_dir, batch_size, validation_freq, callbacks, verbose,
        save_model, plot, title: as in `train` (callbacks serve both stages).
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
    from keras_dks import methods

    meter = Throughput()
    log_path = os.path.join(model_dir, "epochs.jsonl") if model_dir else None
    backup_dir = os.path.join(model_dir, "backup") if model_dir else None
    if model_dir:
        os.makedirs(model_dir, exist_ok=True)
        resuming = os.path.isdir(backup_dir) and bool(os.listdir(backup_dir))
        if not resuming and os.path.exists(log_path):
            os.remove(log_path)
    stage_epochs = epochs // 2

    def stage_callbacks(stage):
        found = [meter, callbacks_lib.StopOnNonFiniteLoss(raise_error=True)]
        found += list(callbacks)
        if log_path:
            found.append(_StageEpochLog(log_path, offset=(stage - 1) * stage_epochs))
        return found

    srdl = methods.SRDL(
        model_fn, epochs, optimizer_fn=optimizer_fn, metrics=["accuracy"],
        weight_decay=weight_decay, strategy=strategy,
        compile_kwargs={"jit_compile": jit_compile},
    )
    start = time.perf_counter()
    histories = srdl.fit(
        train_data, validation_data=eval_data, steps_per_epoch=steps_per_epoch,
        extraction_data=extraction_data, callbacks=stage_callbacks,
        checkpoint_dir=backup_dir, validation_freq=validation_freq, verbose=verbose,
    )
    wall = time.perf_counter() - start
    if log_path and os.path.exists(log_path):
        logs = read_epoch_log(log_path)
    else:  # both stages in a row
        logs = {}
        for history in histories:
            for k, v in (history.history if history else {}).items():
                logs.setdefault(k, []).extend(v)
    final = srdl.trainers[1].evaluate(eval_data, verbose=0, return_dict=True)
    result = _report(
        srdl.model, ["main"], logs, final, wall, meter, batch_size, {}, model_dir, plot,
        save_model, title,
    )
    result["model"] = srdl.model
    return result


class _StageEpochLog(EpochLog):
    """`EpochLog` numbering the epochs of SRDL's second stage after the first."""

    def __init__(self, path, offset):
        super().__init__(path)
        self.offset = offset

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + self.offset, logs)


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

