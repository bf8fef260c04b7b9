"""keras_dks.callbacks: surviving faults (SIGKILL mid-epoch, death while a
checkpoint is written) and non-finite losses.

The crash tests run a real training script in subprocesses (each with a
timeout, killed by pid on failure). Data order is deterministic (no
shuffling: `shuffle=False` on in-memory arrays), so a resumed run must end
with exactly the weights of an uninterrupted one.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import keras

import helpers
import keras_dks
from keras_dks import DKSModel
from keras_dks.callbacks import SafeBackupAndRestore
from keras_dks.callbacks import StopOnNonFiniteLoss

# Its module-scoped fixtures run once: keep its tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("callbacks")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240
EPOCHS, STEPS = 3, 4  # 32 examples, batch 8
# Resumed vs uninterrupted: the same ops on the same restored state and the
# same batches, so equal but for a reduction that a fresh process' trace may
# group differently: a few float32 roundings (8 eps = 9.5e-7) per weight.
RESUME_TOL = 8 * float(np.finfo(np.float32).eps)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(size=(n, 8, 8, 3)).astype("float32"),
        rng.integers(0, 5, n),
    )


def make_model(light=False, **kwargs):
    """Tiny BN backbone + residual heads (BN, momentum: state to restore);
    `light`: BN-free with pooling heads, for the quick in-process tests."""
    if light:
        kwargs.setdefault("head", "simple")
    else:
        kwargs.setdefault("head_depth", 1)
    model = DKSModel(
        helpers.tiny_backbone(bn=not light, size=8, widths=(4, 8), stem="block"),
        num_classes=5, taps=["stem", "s1"], seed=0,
        **kwargs,
    )
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), metrics=["accuracy"])
    return model


class EpochRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


# --------------------------------------------------------------------------
# Crash tests in subprocesses
# --------------------------------------------------------------------------
TRAIN_SCRIPT = textwrap.dedent(
    '''
    """Train a tiny DKSModel with SafeBackupAndRestore; same command resumes.

    KILL_AT="epoch,batch": at that batch, write the marker file and sleep
    (the test SIGKILLs the process). DIE_IN_SAVE=n: the n-th checkpoint save
    is cut in half and the process SIGKILLs itself, as if it died while
    writing. Both only happen while the marker file does not exist.
    """
    import json, os, signal, sys, time
    sys.path.insert(0, os.environ["TEST_DIR"])
    import keras
    from test_callbacks import EPOCHS, EpochRecorder, data, make_model
    from keras_dks.callbacks import SafeBackupAndRestore

    backup, out, marker = sys.argv[1:4]
    keras.utils.set_random_seed(0)
    model = make_model()
    x, y = data()

    class Pause(keras.callbacks.Callback):
        target = tuple(int(v) for v in os.environ.get("KILL_AT", "-1,-1").split(","))
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if (self.epoch, batch) == self.target and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(int(self.model.optimizer.iterations.numpy())))
                time.sleep(600)  # killed here

    die_at = int(os.environ.get("DIE_IN_SAVE", "0"))
    if die_at:
        real_save = model.save_weights
        saves = [0]
        def save_weights(filepath, *args, **kwargs):
            real_save(filepath, *args, **kwargs)
            saves[0] += 1
            if saves[0] == die_at and not os.path.exists(marker):
                open(marker, "w").close()
                with open(filepath, "r+b") as f:  # half-written file
                    f.truncate(os.path.getsize(filepath) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        model.save_weights = save_weights

    recorder = EpochRecorder()
    model.fit(x, y, batch_size=8, epochs=EPOCHS, shuffle=False, verbose=0,
              callbacks=[SafeBackupAndRestore(backup), Pause(), recorder])
    model.save_weights(os.path.join(out, "final.weights.h5"))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"iterations": int(model.optimizer.iterations.numpy()),
                   "epochs": recorder.epochs}, f)
    '''
)


def _start(tmp, name, **env):
    """Start the training script; the same call again is the restart."""
    run_dir = tmp / name
    run_dir.mkdir(exist_ok=True)
    script = tmp / "train.py"
    if not script.exists():
        script.write_text(TRAIN_SCRIPT)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    full_env.update(TF_CPP_MIN_LOG_LEVEL="2", TEST_DIR=os.path.join(REPO, "tests"), **env)
    cmd = [
        sys.executable, str(script), str(run_dir / "backup"), str(run_dir),
        str(run_dir / "marker"),
    ]
    proc = subprocess.Popen(
        cmd, env=full_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    return proc, run_dir


def _finish(proc, expect_rc=0, timeout=TIMEOUT):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"training subprocess timed out after {timeout} s")
    assert proc.returncode == expect_rc, (
        f"rc={proc.returncode}, expected {expect_rc}\n{out[-2000:]}\n{err[-5000:]}"
    )


def _wait_for(path, proc, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited (rc={proc.returncode}) early:\n{err[-5000:]}")
        if time.time() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail("marker never appeared")
        time.sleep(0.2)


def _result(run_dir):
    with open(run_dir / "result.json") as f:
        result = json.load(f)
    model = make_model()
    model.optimizer.build(model.trainable_variables)  # so its state loads too
    model.load_weights(str(run_dir / "final.weights.h5"))
    return result, model.get_weights() + [v.numpy() for v in model.optimizer.variables]


@pytest.fixture(scope="module")
def crash_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    procs = []
    try:
        # Phase 1, concurrently: the uninterrupted reference, a run SIGKILLed
        # from outside in the middle of epoch 2 (index 1, after its 3rd
        # batch), and a run that dies while writing its 2nd checkpoint.
        ref, ref_dir = _start(tmp, "reference")
        kill, kill_dir = _start(tmp, "sigkill", KILL_AT="1,2")
        die, die_dir = _start(tmp, "die_in_save", DIE_IN_SAVE="2")
        procs += [ref, kill, die]
        _wait_for(kill_dir / "marker", kill)
        os.kill(kill.pid, signal.SIGKILL)
        _finish(kill, expect_rc=-signal.SIGKILL)
        _finish(die, expect_rc=-signal.SIGKILL)
        state = {
            "killed_at_step": int((kill_dir / "marker").read_text()),
            "sigkill_meta": json.loads((kill_dir / "backup/training_metadata.json").read_text()),
            "die_meta": json.loads((die_dir / "backup/training_metadata.json").read_text()),
            "die_files": sorted(os.listdir(die_dir / "backup")),
        }
        # Phase 2: the same commands again.
        kill2, _ = _start(tmp, "sigkill", KILL_AT="1,2")
        die2, _ = _start(tmp, "die_in_save", DIE_IN_SAVE="2")
        procs += [kill2, die2]
        for p in (ref, kill2, die2):
            _finish(p)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    state["reference"] = _result(ref_dir)
    state["sigkill"] = _result(kill_dir)
    state["die_in_save"] = _result(die_dir)
    state["leftovers"] = {
        name: os.path.exists(tmp / name / "backup") for name in ("sigkill", "die_in_save")
    }
    return state


def test_sigkill_mid_epoch_resumes_from_last_completed_epoch(crash_runs):
    ref_result, ref_weights = crash_runs["reference"]
    assert ref_result == {"iterations": EPOCHS * STEPS, "epochs": [0, 1, 2]}
    # Killed after 3 batches of epoch index 1; the backup holds epoch 0.
    assert crash_runs["killed_at_step"] == STEPS + 3
    assert crash_runs["sigkill_meta"]["epoch"] == 1
    result, weights = crash_runs["sigkill"]
    assert result["epochs"] == [1, 2]  # restarted the interrupted epoch
    assert result["iterations"] == EPOCHS * STEPS  # optimizer state restored
    for a, b in zip(ref_weights, weights):
        np.testing.assert_allclose(b, a, rtol=RESUME_TOL, atol=RESUME_TOL)
    assert not crash_runs["leftovers"]["sigkill"]  # deleted after success


def test_death_while_writing_checkpoint_restores_last_good_one(crash_runs):
    # Died inside the 2nd save (end of epoch index 1): the metadata still
    # names the 1st checkpoint; the half-written file is never read.
    meta = crash_runs["die_meta"]
    assert (meta["epoch"], meta["weights"]) == (1, "ckpt-000000.weights.h5")
    assert "ckpt-000001.weights.h5" in crash_runs["die_files"]
    result, weights = crash_runs["die_in_save"]
    assert result["epochs"] == [1, 2]
    assert result["iterations"] == EPOCHS * STEPS
    for a, b in zip(crash_runs["reference"][1], weights):
        np.testing.assert_allclose(b, a, rtol=RESUME_TOL, atol=RESUME_TOL)


# --------------------------------------------------------------------------
# Checkpoint files, in process
# --------------------------------------------------------------------------
def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_keras_backup_and_restore_cannot_resume_from_a_half_written_file(tmp_path):
    """Why SafeBackupAndRestore exists: Keras writes latest.weights.h5 in place."""
    x, y = data()
    backup = str(tmp_path / "keras")
    make_model(light=True).fit(
        x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
        callbacks=[keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)],
    )
    _truncate(os.path.join(backup, "latest.weights.h5"))  # died mid-write
    with pytest.raises(OSError):
        make_model(light=True).fit(
            x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
            callbacks=[keras.callbacks.BackupAndRestore(backup)],
        )


def test_safe_backup_ignores_leftovers_of_an_interrupted_save(tmp_path):
    x, y = data()
    backup = tmp_path / "safe"
    model = make_model(light=True)
    model.fit(
        x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(backup, delete_checkpoint=False)],
    )
    saved = model.get_weights()
    assert sorted(os.listdir(backup)) == ["ckpt-000000.weights.h5", "training_metadata.json"]
    # What a death during the next save can leave behind: a truncated new
    # checkpoint and a garbage temporary metadata file.
    (backup / "ckpt-000001.weights.h5").write_bytes(
        (backup / "ckpt-000000.weights.h5").read_bytes()[:5000]
    )
    (backup / "training_metadata.json.tmp-12345").write_text('{"epoch": 7, "wei')
    resumed = make_model(light=True)
    recorder = EpochRecorder()
    resumed.fit(
        x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(backup, delete_checkpoint=False), recorder],
    )
    assert recorder.epochs == []  # epoch 0 was complete: nothing left to do
    for a, b in zip(saved, resumed.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(resumed.optimizer.iterations.numpy()) == STEPS
    # The next save replaces the leftovers.
    resumed.fit(
        x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(backup, delete_checkpoint=False)],
    )
    assert sorted(os.listdir(backup)) == ["ckpt-000001.weights.h5", "training_metadata.json"]
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2


def test_safe_backup_crash_between_weights_and_commit(tmp_path, monkeypatch):
    """Weights written, metadata not yet replaced: the resumed run uses the
    previous checkpoint *and* its epoch (Keras could pair new weights with
    the old epoch and repeat an epoch)."""
    x, y = data()
    backup = tmp_path / "safe"
    keras.utils.set_random_seed(0)
    reference = make_model(light=True)
    init = reference.get_weights()
    reference.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)

    commits = []
    real_commit = keras_dks.callbacks.atomic_write_json

    def dying_commit(path, payload):
        commits.append(payload["epoch"])
        if len(commits) == 2:
            raise SystemExit("killed before the commit")
        real_commit(path, payload)

    monkeypatch.setattr(keras_dks.callbacks, "atomic_write_json", dying_commit)
    first = make_model(light=True)
    first.set_weights(init)
    with pytest.raises(SystemExit):
        first.fit(
            x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
            callbacks=[SafeBackupAndRestore(backup)],
        )
    monkeypatch.setattr(keras_dks.callbacks, "atomic_write_json", real_commit)
    assert "ckpt-000001.weights.h5" in os.listdir(backup)  # written, uncommitted

    resumed = make_model(light=True)
    recorder = EpochRecorder()
    resumed.fit(
        x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(backup), recorder],
    )
    assert recorder.epochs == [1]
    assert int(resumed.optimizer.iterations.numpy()) == 2 * STEPS
    for a, b in zip(reference.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(b, a, rtol=RESUME_TOL, atol=RESUME_TOL)
    assert not backup.exists()  # finished: deleted as in Keras


def test_safe_backup_double_checkpoint_falls_back(tmp_path):
    x, y = data()
    backup = tmp_path / "safe"
    model = make_model(light=True)
    model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(backup, double_checkpoint=True, delete_checkpoint=False)],
    )
    meta = json.loads((backup / "training_metadata.json").read_text())
    assert meta["epoch"] == 2 and meta["previous"]["epoch"] == 1
    _truncate(backup / meta["weights"])  # damaged after the commit
    resumed = make_model(light=True)
    recorder = EpochRecorder()
    resumed.fit(
        x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(backup, double_checkpoint=True), recorder],
    )
    assert recorder.epochs == [1]
    # Without a previous checkpoint a damaged one is a clear error.
    model = make_model(light=True)
    model.fit(
        x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(tmp_path / "single", delete_checkpoint=False)],
    )
    _truncate(tmp_path / "single" / "ckpt-000000.weights.h5")
    with pytest.raises(OSError, match="could not load the committed checkpoint"):
        make_model(light=True).fit(
            x, y, batch_size=8, epochs=2, verbose=0,
            callbacks=[SafeBackupAndRestore(tmp_path / "single")],
        )
    with pytest.raises(ValueError, match="local backup_dir"):
        SafeBackupAndRestore("gs://bucket/backup")


def test_safe_backup_save_freq_in_batches(tmp_path):
    """save_freq=3: saved after the 3rd batch of epoch 0 (0-based batch 2);
    a resumed run restarts that epoch from those weights, as Keras does."""
    x, y = data()
    backup = tmp_path / "safe"
    model = make_model(light=True)
    model.fit(
        x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(backup, save_freq=3, delete_checkpoint=False)],
    )
    meta = json.loads((backup / "training_metadata.json").read_text())
    assert (meta["epoch"], meta["batch"]) == (0, 2)
    resumed = make_model(light=True)
    recorder = EpochRecorder()
    resumed.fit(
        x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(backup, save_freq=3), recorder],
    )
    assert recorder.epochs == [0]
    assert int(resumed.optimizer.iterations.numpy()) == 3 + STEPS
    with pytest.raises(ValueError, match="save_freq"):
        SafeBackupAndRestore(backup, save_freq=0)


def test_safe_backup_resumes_a_keras_backup_directory(tmp_path):
    """A directory written by keras.callbacks.BackupAndRestore is restored
    (weights, optimizer state, epoch); the next save is an atomic one."""
    x, y = data()
    backup = tmp_path / "keras"
    model = make_model(light=True)
    model.fit(
        x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
        callbacks=[keras.callbacks.BackupAndRestore(str(backup), delete_checkpoint=False)],
    )
    saved = model.get_weights()
    resumed = make_model(light=True)
    recorder, first = EpochRecorder(), {}

    class Weights(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            first.setdefault("weights", self.model.get_weights())

    resumed.fit(
        x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(backup, delete_checkpoint=False), recorder, Weights()],
    )
    assert recorder.epochs == [1]
    for a, b in zip(saved, first["weights"]):
        np.testing.assert_array_equal(a, b)
    assert int(resumed.optimizer.iterations.numpy()) == 2 * STEPS
    meta = json.loads((backup / "training_metadata.json").read_text())
    assert meta["epoch"] == 2 and meta["weights"] == "ckpt-000000.weights.h5"


# --------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------
def test_stop_on_non_finite_names_the_head_and_step():
    def head(features, num_downsamples, num_classes, name):
        x = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(features)
        if name == "aux_s1":  # only this head blows up
            x = keras.layers.Rescaling(float("inf"), name=f"{name}_boom")(x)
        return keras.layers.Dense(num_classes, dtype="float32", name=name)(x)

    x, y = data()
    model = make_model(light=True, head=head)
    stop = StopOnNonFiniteLoss()
    history = model.fit(
        x, y, batch_size=8, epochs=3, verbose=0, shuffle=False, callbacks=[stop]
    )
    assert model.stop_training
    assert (stop.epoch, stop.batch, stop.step) == (0, 0, 1)
    assert set(stop.terms) == {"aux_s1_ce_loss", "synergy_loss", "loss"}
    assert stop.message.startswith(
        "Non-finite loss at epoch 1, batch 1 (optimizer step 1): "
        "aux_s1_ce_loss=nan, synergy_loss=nan (loss=nan)."
    )
    assert "Lower the learning rate" in stop.message
    assert len(history.history["loss"]) == 1  # stopped in the first epoch


def test_stop_on_non_finite_inf_inputs_and_huge_learning_rate(tmp_path):
    x, y = data()
    x[19, 0, 0, 0] = np.inf  # batch index 2 of epoch index 0
    backup = tmp_path / "backup"
    model = make_model(light=True)
    stop = StopOnNonFiniteLoss()
    # delete_checkpoint=False: a NaN state saved at the epoch's end would
    # stay on disk (with the default the folder could be gone either way).
    model.fit(
        x, y, batch_size=8, epochs=3, verbose=0, shuffle=False,
        callbacks=[stop, SafeBackupAndRestore(backup, delete_checkpoint=False)],
    )
    assert (stop.epoch, stop.batch, stop.step) == (0, 2, 3)
    assert "loss" in stop.terms and any(k.endswith("ce_loss") for k in stop.terms)
    assert "at epoch 1, batch 3 (optimizer step 3)" in stop.message
    # The NaN state was not backed up: no checkpoint, no metadata.
    assert glob.glob(str(backup / "ckpt-*")) == []
    assert not (backup / "training_metadata.json").exists()

    # A learning rate far too large diverges; raise_error turns it into an
    # exception for scripts.
    clean_x, y = data()
    keras.utils.set_random_seed(0)
    model = make_model(light=True)
    model.compile(keras.optimizers.SGD(1e30))
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at epoch 1, batch \d"):
        model.fit(
            clean_x, y, batch_size=8, epochs=3, verbose=0, shuffle=False,
            callbacks=[StopOnNonFiniteLoss(raise_error=True)],
        )
    assert int(model.optimizer.iterations.numpy()) < EPOCHS * STEPS


def test_safe_backup_keeps_last_good_checkpoint_on_divergence(tmp_path):
    x, y = data()
    backup = tmp_path / "backup"
    model = make_model(light=True)
    model.fit(
        x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(backup)],
    )  # finished normally: deleted
    assert not backup.exists()
    good = model.get_weights()

    class PoisonSecondEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                kernel = self.model.get_layer("main").kernel
                kernel.assign(np.full(kernel.shape, np.nan, "float32"))

    model = make_model(light=True)
    model.set_weights(good)
    stop = StopOnNonFiniteLoss()
    model.fit(
        x, y, batch_size=8, epochs=3, verbose=0, shuffle=False,
        callbacks=[SafeBackupAndRestore(backup), PoisonSecondEpoch(), stop],
    )
    assert stop.epoch == 1
    meta = json.loads((backup / "training_metadata.json").read_text())
    assert meta["epoch"] == 1  # the epoch-1 state, saved before the NaN
    restored = make_model(light=True)
    restored.load_weights(str(backup / meta["weights"]))
    assert all(np.isfinite(w).all() for w in restored.get_weights())


def test_stop_on_non_finite_blames_regularization_only_when_the_terms_are_logged():
    """A model that logs its loss terms, all finite, beside a NaN total: the
    regularisation overflowed. A plain model logs only `loss`: no blame."""
    inp = keras.Input((2,))
    plain = keras.Model(inp, keras.layers.Dense(1)(inp))
    plain.compile("sgd", "mse")
    for logs, culprit, other in (
        ({"loss": float("nan"), "ce_loss": 1.0, "synergy_loss": 0.5},
         "regularization (weight decay / layer losses) only", ": the loss ("),
        ({"loss": float("nan")}, ": the loss (loss=nan)", "regularization"),
    ):
        stop = StopOnNonFiniteLoss()
        stop.set_model(plain)
        stop.on_train_begin()
        stop.on_epoch_begin(0)
        stop.on_train_batch_end(2, logs)
        assert culprit in stop.message and other not in stop.message, stop.message
        assert "epoch 1, batch 3" in stop.message and plain.stop_training
