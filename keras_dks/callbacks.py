"""Callbacks that make long DKS runs survive faults.

- `SafeBackupAndRestore`: `keras.callbacks.BackupAndRestore` whose
  checkpoint is committed atomically, so a process killed while saving
  resumes from the last complete checkpoint instead of a half-written one.
- `StopOnNonFiniteLoss`: stops training at the first non-finite loss term
  and says which term, at which epoch and step (`TerminateOnNaN` only looks
  at the total `loss` and says nothing about where it came from).

Resuming after a crash:

```python
import numpy as np, keras, keras_dks
backbone = keras_dks.backbones.wide_resnet(10, 1, num_classes=10)
model = keras_dks.DKSModel(backbone)                      # built
model.compile(keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])
x = np.random.rand(8, 32, 32, 3).astype("float32")
y = np.random.randint(0, 10, 8)
model.fit(x, y, epochs=2, verbose=0, callbacks=[
    keras_dks.callbacks.SafeBackupAndRestore("/tmp/run1/backup"),
    keras_dks.callbacks.StopOnNonFiniteLoss(),
])
```

Start the same command again after the process died (SIGKILL, preemption,
out of memory): training continues at the start of the epoch that was
interrupted, with weights and optimizer state (momentum, iteration count,
loss scale) as they were at the end of the previous epoch, and ends with the
same number of optimizer steps as an uninterrupted run. The resumed run is
step-for-step identical to an uninterrupted one only if every epoch sees the
same batches in the same order whatever the process: no shuffling, or
shuffling seeded per epoch (e.g. `keras.utils.set_random_seed` does not make
`Dataset.shuffle(reshuffle_each_iteration=True)` repeat the interrupted
epoch's order, since a fresh process starts the dataset over).
"""

import glob
import json
import math
import os
import re
import shutil

import keras
from absl import logging

from keras_dks import compat
from keras_dks import utils


# --------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------
def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


atomic_write_json = utils.atomic_write_json


def _non_finite_losses(logs):
    """{key: value} of the non-finite `loss` / `*_loss` entries of logs."""
    bad = {}
    for key, value in (logs or {}).items():
        if key == "loss" or key.endswith("_loss"):
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(value):
                bad[key] = value
    return bad


# --------------------------------------------------------------------------
# SafeBackupAndRestore
# --------------------------------------------------------------------------
_CKPT = re.compile(r"^ckpt-(\d+)\.weights\.h5$")
_METADATA = "training_metadata.json"


class SafeBackupAndRestore(keras.callbacks.Callback):
    """`keras.callbacks.BackupAndRestore` with an atomic commit.

    Saves the weights and optimizer state every epoch (or every `save_freq`
    batches) to `backup_dir`, and on `fit` restores them and resumes at the
    start of the interrupted epoch, like Keras' `BackupAndRestore`. A save
    is committed atomically:

    1. the weights (with the optimizer state) go to a new file
       `ckpt-<n>.weights.h5`, which is flushed to disk;
    2. `training_metadata.json`, naming that file and the epoch, is written
       to a temporary file and `os.replace`d: this is the commit;
    3. only then are older checkpoint files deleted.

    So whenever the process dies, `training_metadata.json` names a
    completely written checkpoint whose epoch matches its weights; leftovers
    of an interrupted save are never read and are deleted by the next save.
    With `double_checkpoint=True` the previous checkpoint is kept and used
    if the latest cannot be read. A state whose loss is non-finite (NaN or
    inf in the logs) is never backed up: the last good checkpoint is kept,
    also at the end of training. A directory written by Keras'
    `BackupAndRestore` (`latest.weights.h5`) is restored too.

    Atomicity relies on `os.replace`, so `backup_dir` must be a local (or
    POSIX-like network) file system. Under multi-worker training give each
    worker its own `backup_dir`. The model must be built before `fit`.

    Args:
        backup_dir: local directory for the checkpoint, used by this
            callback only.
        save_freq: `"epoch"` (default) or a positive integer number of
            batches. Resuming restarts the interrupted epoch from its first
            batch, so an integer `save_freq` repeats batches; `"epoch"`
            resumes exactly.
        double_checkpoint: keep the previous checkpoint as a fallback.
            Defaults to `False`.
        delete_checkpoint: delete `backup_dir` when training ends normally
            (not after a non-finite loss). Defaults to `True`.

    Raises:
        ValueError: at construction, an empty or remote (`"://"`)
            `backup_dir`, or a `save_freq` that is neither `"epoch"` nor a
            positive integer; when `fit` starts, a model that is not built,
            or a `training_metadata.json` that is not valid JSON.
        OSError: when `fit` starts, no committed checkpoint in `backup_dir`
            can be loaded.

    Example:
    ```python
    import numpy as np, keras, keras_dks
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    x, y = np.random.rand(16, 4), np.random.randint(0, 3, 16)
    backup = keras_dks.callbacks.SafeBackupAndRestore("/tmp/run1/backup")
    model.fit(x, y, epochs=2, callbacks=[backup], verbose=0)
    # Killed? Run the same script again: it resumes at the killed epoch.
    ```
    """

    def __init__(
        self,
        backup_dir,
        save_freq="epoch",
        double_checkpoint=False,
        delete_checkpoint=True,
    ):
        super().__init__()
        if not backup_dir:
            raise ValueError("SafeBackupAndRestore needs a backup_dir; got an empty one.")
        if "://" in str(backup_dir):
            raise ValueError(
                f"SafeBackupAndRestore needs a local backup_dir (atomic "
                f"os.replace); got {backup_dir!r}. Use a local directory, or "
                "keras.callbacks.BackupAndRestore for remote storage."
            )
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1
        ):
            raise ValueError(
                f"save_freq must be 'epoch' or a positive number of batches; got {save_freq!r}."
            )
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.double_checkpoint = double_checkpoint
        self.delete_checkpoint = delete_checkpoint
        self.metadata_path = os.path.join(self.backup_dir, _METADATA)
        self._epoch = 0  # epochs completed, as saved in the metadata
        self._batch = 0  # last batch seen in the current epoch
        self._since_save = 0
        self._skipped_non_finite = False
        self._resumed = False

    # --- reading ----------------------------------------------------------
    def _read_metadata(self, path=None):
        path = path or self.metadata_path
        if not os.path.exists(path):
            return None
        with open(path) as f:
            text = f.read()
        try:
            return json.loads(text)
        except ValueError:
            # Cannot come from an interrupted save (the file is replaced
            # atomically); the file was damaged some other way.
            raise ValueError(
                f"{path} is not valid JSON ({text[:80]!r}). It was not "
                "written by an interrupted SafeBackupAndRestore save; delete "
                "backup_dir to start over."
            ) from None

    def _candidates(self, metadata):
        """[(weights path, epoch)] to try, newest first."""
        if "weights" in metadata:
            records = [metadata] + ([metadata["previous"]] if metadata.get("previous") else [])
            return [(os.path.join(self.backup_dir, r["weights"]), r["epoch"]) for r in records]
        # Written by keras.callbacks.BackupAndRestore.
        latest = os.path.join(self.backup_dir, "latest.weights.h5")
        candidates = [(latest, metadata["epoch"])]
        previous = self._read_metadata(self.metadata_path + ".bkp")
        if previous is not None and os.path.exists(latest + ".bkp"):
            candidates.append((latest + ".bkp", previous["epoch"]))
        return candidates

    def on_train_begin(self, logs=None):
        self._skipped_non_finite = False
        self._resumed = False
        self._epoch = self._batch = self._since_save = 0
        if not self.model.built:
            raise ValueError(
                "To use SafeBackupAndRestore the model must be built before "
                "fit() (DKSModel always is; call other models on a batch)."
            )
        metadata = self._read_metadata()
        if metadata is None:
            return
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        errors = []
        candidates = self._candidates(metadata)
        for i, (path, epoch) in enumerate(candidates):
            try:
                self.model.load_weights(path)
            except Exception as e:  # h5py raises OSError, Keras ValueError
                errors.append(f"{path}: {type(e).__name__}: {e}")
                continue
            if i:
                logging.warning(
                    "SafeBackupAndRestore: could not load %s; resumed from the "
                    "previous checkpoint (epoch %d).",
                    candidates[0][0],
                    epoch,
                )
            compat.set_initial_epoch(self.model, epoch)
            self._epoch = epoch
            self._resumed = True
            return
        raise OSError(
            "SafeBackupAndRestore could not load the committed checkpoint "
            f"in {self.backup_dir}: " + "; ".join(errors)
        )

    # --- writing ----------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        self._epoch, self._batch = epoch + 1, 0
        if self.save_freq == "epoch" and not self._refuse(logs, f"epoch {epoch + 1}"):
            self._save()

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch":
            return
        # `batch` may jump by steps_per_execution; a smaller one is a new epoch.
        self._since_save += batch + 1 if batch <= self._batch else batch - self._batch
        self._batch = batch
        if self._since_save >= self.save_freq:
            if self._refuse(logs, f"batch {batch + 1}"):
                return
            self._since_save = 0
            self._save()

    def _refuse(self, logs, where):
        bad = _non_finite_losses(logs)
        if not bad:
            return False
        if not self._skipped_non_finite:
            logging.warning(
                "SafeBackupAndRestore: not backing up at %s, the loss is "
                "non-finite (%s); the last good checkpoint in %s is kept.",
                where,
                ", ".join(f"{k}={v}" for k, v in bad.items()),
                self.backup_dir,
            )
        self._skipped_non_finite = True
        return True

    def _save(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        try:
            previous = self._read_metadata()
        except ValueError:
            previous = None
        if previous is not None and "weights" not in previous:
            previous = None  # Keras-format metadata: nothing to chain to
        seq = previous["seq"] + 1 if previous else 0
        name = f"ckpt-{seq:06d}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        # 1. Weights and optimizer state to a file nobody reads yet.
        self.model.save_weights(path, overwrite=True)
        _fsync_file(path)
        # 2. Commit: atomically point the metadata at it.
        record = {
            "epoch": self._epoch,
            "batch": self._batch,
            "weights": name,
            "seq": seq,
            "previous": None,
        }
        if self.double_checkpoint and previous is not None:
            record["previous"] = {
                k: previous[k] for k in ("epoch", "batch", "weights", "seq")
            }
        atomic_write_json(self.metadata_path, record)
        # 3. Clean up what is no longer referenced.
        keep = {name}
        if record["previous"]:
            keep.add(record["previous"]["weights"])
        self._remove_stale(keep)

    def _remove_stale(self, keep):
        for path in glob.glob(os.path.join(self.backup_dir, "*")):
            base = os.path.basename(path)
            stale_ckpt = _CKPT.match(base) and base not in keep
            stale_tmp = ".tmp-" in base
            if stale_ckpt or stale_tmp:
                try:
                    os.remove(path)
                except OSError:
                    pass

    def on_train_end(self, logs=None):
        if self._resumed:
            # The resume epoch applies to this fit only.
            compat.set_initial_epoch(self.model, None)
        if self._skipped_non_finite:
            logging.warning(
                "SafeBackupAndRestore: training ended on a non-finite loss; "
                "keeping the last good checkpoint in %s.",
                self.backup_dir,
            )
            return
        if self.delete_checkpoint and os.path.exists(self.backup_dir):
            shutil.rmtree(self.backup_dir)


# --------------------------------------------------------------------------
# StopOnNonFiniteLoss
# --------------------------------------------------------------------------
class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop training at the first batch whose loss terms are not finite.

    After every training batch it checks `loss` and every `*_loss` entry of
    the logs (for `DKSModel`: `ce_loss` of the main head, `<head>_ce_loss`
    of each auxiliary head and `synergy_loss`). The batch logs are running
    means over the epoch, so a NaN or inf stays visible from the batch where
    it appeared until the epoch ends: the first batch that shows it is the
    culprit. On that batch the callback

    - sets `model.stop_training = True` (`fit` returns after the batch;
      `keras_dks.callbacks.SafeBackupAndRestore` does not back up the
      broken state),
    - logs an error and keeps it in `.message`, e.g.
      `"Non-finite loss at epoch 2, batch 7 (optimizer step 32):
      aux_conv3_block4_out_ce_loss=nan, synergy_loss=nan (loss=nan). ..."`,
      with the non-finite terms in `.terms`, the 0-based `.epoch` and
      `.batch` and the optimizer step count in `.step`,
    - with `raise_error=True`, raises `FloatingPointError(message)` instead
      of returning normally from `fit` (useful in scripts that must exit
      non-zero; `History` is then not returned).

    It also stops at the first batch whose `skipped_steps` log is positive
    (written by `keras_dks.optimizers.SkippedStepsLogger` when a
    `keras_dks.optimizers.SkipNonFinite` optimizer skipped a step whose
    gradients were not finite, which can happen with a finite loss, e.g. a
    NaN image); the message then says "Non-finite gradients".

    Epochs and batches in the message are 1-based, as in the progress bar.
    When only `loss` is non-finite while the model logs its loss terms
    (`DKSModel`'s `*_ce_loss`, `synergy_loss`) and they are finite, the
    message blames the regularisation (weight decay or layer losses). With `jit_compile=True` a label outside
    `[0, num_classes)` also shows up here as a NaN, because XLA skips
    `DKSModel`'s label-range check.

    Args:
        raise_error: raise `FloatingPointError` after stopping. Defaults to
            `False`.

    Attributes:
        message: the error message, or None while every loss is finite.
        terms: dict of the non-finite loss terms (and the total `loss`),
            or `{"skipped_steps": n}` for a skipped step.
        epoch: 0-based epoch of the stop.
        batch: 0-based batch of the stop.
        step: the optimizer's step count at the stop (None without an
            optimizer).

    Raises:
        FloatingPointError: with `raise_error=True`, on the stopping batch.

    Example:
    ```python
    import numpy as np, keras, keras_dks
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.random.rand(8, 4).astype("float32")
    x[5] = np.nan                                  # a broken input
    stop = keras_dks.callbacks.StopOnNonFiniteLoss()
    model.fit(x, np.zeros(8), batch_size=2, epochs=3, shuffle=False,
              callbacks=[stop], verbose=0)
    print(stop.epoch, stop.batch)  # 0 2: the batch holding x[5]
    print(stop.message)            # Non-finite loss at epoch 1, batch 3 ...
    ```
    """

    def __init__(self, raise_error=False):
        super().__init__()
        self.raise_error = raise_error
        self.message = None
        self.terms = None
        self.epoch = None
        self.batch = None
        self.step = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self.message = self.terms = self.epoch = self.batch = self.step = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        skipped = float((logs or {}).get("skipped_steps", 0.0) or 0.0)
        bad = _non_finite_losses(logs)
        if skipped > 0 and not bad and self.message is None:
            self._stop_on_skipped_step(batch, skipped)
            return
        if not bad or self.message is not None:
            return
        total = bad.pop("loss", (logs or {}).get("loss"))
        self.terms = dict(bad)
        if total is not None:
            self.terms["loss"] = float(total)
        self.epoch, self.batch = self._epoch, batch
        optimizer = getattr(self.model, "optimizer", None)
        self.step = (
            int(keras.ops.convert_to_numpy(optimizer.iterations))
            if optimizer is not None
            else None
        )
        if bad:
            culprits = ", ".join(f"{k}={v}" for k, v in bad.items())
        elif any(k.endswith("_loss") for k in (logs or {})):
            # The model logs its loss terms and all are finite.
            culprits = "regularization (weight decay / layer losses) only"
        else:
            culprits = "the loss"
        where = f"epoch {self._epoch + 1}, batch {batch + 1}"
        if self.step is not None:
            where += f" (optimizer step {self.step})"
        self.message = (
            f"Non-finite loss at {where}: {culprits} (loss={total}). "
            "Training stopped. Lower the learning rate (or add warm-up / "
            "gradient clipping), lower synergy_weight or aux_weight, check "
            "the inputs for NaN/inf and, under mixed_float16, keep the "
            "default loss scaling (compile(auto_scale_loss=True)). With "
            "jit_compile=True, labels outside [0, num_classes) also give NaN."
        )
        if skipped > 0:
            self.message += (
                " Its gradients were not finite: the step was skipped, the "
                "weights were not updated."
            )
        logging.error(self.message)
        self.model.stop_training = True
        if self.raise_error:
            raise FloatingPointError(self.message)

    def _stop_on_skipped_step(self, batch, skipped):
        # A SkipNonFinite optimizer dropped a step whose gradients were not
        # finite (the weights stay as they were), counted in `skipped_steps`;
        # the loss itself may still look finite.
        self.epoch, self.batch = self._epoch, batch
        optimizer = getattr(self.model, "optimizer", None)
        self.step = (
            int(keras.ops.convert_to_numpy(optimizer.iterations))
            if optimizer is not None
            else None
        )
        self.terms = {"skipped_steps": skipped}
        where = f"epoch {self._epoch + 1}, batch {batch + 1}"
        if self.step is not None:
            where += f" (optimizer step {self.step})"
        self.message = (
            f"Non-finite gradients at {where}: the step was skipped, the "
            "weights were not updated. Training stopped. Check the inputs "
            "for NaN/inf (a NaN image gives NaN gradients even when the loss "
            "stays finite), lower the learning rate or add gradient clipping."
        )
        logging.error(self.message)
        self.model.stop_training = True
        if self.raise_error:
            raise FloatingPointError(self.message)
