"""The paper's recipe: LR schedule, coupled weight decay, methods, train/report."""

import json
import os

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_dks
from keras_dks import recipes

SPE = 391  # CIFAR: ceil(50000 / 128) steps per epoch


def lr_at(optimizer, step):
    optimizer.iterations.assign(step)
    return float(optimizer.learning_rate)


def test_cifar_schedule_switches_at_the_first_step_of_epochs_60_120_160():
    schedule = recipes.step_schedule(0.1, SPE, (60, 120, 160), 0.2)
    assert isinstance(schedule, keras.optimizers.schedules.PiecewiseConstantDecay)
    opt = recipes.sgd(schedule)
    # Guarded: a step with non-finite gradients is skipped as a whole.
    assert isinstance(opt, keras_dks.optimizers.SkipNonFinite)
    assert opt.inner_optimizer.momentum == 0.9 and not opt.inner_optimizer.nesterov
    assert isinstance(recipes.sgd(schedule, skip_non_finite=False), keras.optimizers.SGD)
    expected = {
        0: 0.1,
        59 * SPE: 0.1,               # epoch 59 (0-based)
        60 * SPE - 1: 0.1,           # last step of epoch 59
        60 * SPE: 0.02,              # first step of epoch 60
        61 * SPE: 0.02,
        120 * SPE - 1: 0.02,
        120 * SPE: 0.004,
        160 * SPE - 1: 0.004,
        160 * SPE: 0.0008,
        200 * SPE - 1: 0.0008,
    }
    for step, lr in expected.items():
        assert lr_at(opt, step) == pytest.approx(lr, rel=1e-6), step


def test_schedule_drives_the_actual_update():
    # Plain SGD (no momentum): the update at step 60 * SPE is -0.02 * grad.
    opt = keras.optimizers.SGD(recipes.step_schedule(0.1, SPE, (60,), 0.2))
    v = keras.Variable(1.0)
    opt.build([v])
    for step, lr in ((60 * SPE - 1, 0.1), (60 * SPE, 0.02)):
        opt.iterations.assign(step)
        before = float(v)
        opt.apply_gradients([(tf.constant(1.0), v)])
        assert before - float(v) == pytest.approx(lr, rel=1e-6)


def test_imagenet_schedule_and_fractional_boundaries():
    opt = recipes.sgd(recipes.step_schedule(0.1, 5005, (30, 60, 90), 0.1))
    for epoch, lr in ((29, 0.1), (30, 0.01), (59, 0.01), (60, 1e-3), (90, 1e-4)):
        assert lr_at(opt, epoch * 5005) == pytest.approx(lr, rel=1e-6)
    # Fractions of an epoch (the Fashion-MNIST demo's 30 % of 3 epochs).
    opt = recipes.sgd(recipes.step_schedule(0.1, 10, (0.9,), 0.2))
    assert lr_at(opt, 8) == pytest.approx(0.1) and lr_at(opt, 9) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="increasing"):
        recipes.step_schedule(0.1, 10, (60, 30), 0.2)
    # Short runs: boundaries on the same step decay together.
    opt = recipes.sgd(recipes.step_schedule(0.1, 3, (0.3, 0.6, 0.8), 0.5))
    assert [lr_at(opt, k) for k in range(4)] == pytest.approx([0.1, 0.05, 0.0125, 0.0125])
    const = recipes.sgd(recipes.step_schedule(0.05, 10, (), 0.2))
    assert lr_at(const, 10**6) == pytest.approx(0.05)


def small_dks(method="dks", weight_decay=5e-4, **kwargs):
    keras.utils.set_random_seed(0)
    backbone = keras_dks.backbones.wide_resnet(10, 1, 5, input_shape=(16, 16, 3))
    return keras_dks.methods.build_model(method, backbone, weight_decay=weight_decay, seed=0,
                                         **kwargs)


def test_weight_decay_is_coupled_l2_on_every_trainable_variable():
    wd = 5e-4
    model = small_dks(weight_decay=wd)
    # Make every variable non-trivial (BN beta and biases start at 0).
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    x = tf.random.uniform((2, 16, 16, 3))
    y = tf.constant([0, 3])
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        terms = model.compute_dks_loss(y, model(x, training=False))
        reg = terms["regularization"]
    grads = dict(zip([v.path for v in variables], tape.gradient(reg, variables)))
    expected_reg = wd / 2 * sum(np.sum(np.square(v.numpy().astype(np.float64))) for v in variables)
    assert float(reg) == pytest.approx(expected_reg, rel=1e-5)

    gammas = [v for v in variables if v.path.endswith("gamma")]
    biases = [v for v in variables if v.path.endswith("bias")]
    aux = [v for v in variables if "aux" in v.path]
    assert gammas and biases and aux, "expected BN, Dense bias and auxiliary variables"
    # d(wd/2 ||w||^2)/dw = wd * w for BN gammas, Dense biases (main and aux)
    # and every other trainable variable.
    for v in gammas[:1] + gammas[-1:] + biases + aux[:1]:
        np.testing.assert_allclose(grads[v.path].numpy(), wd * v.numpy(), rtol=1e-5, atol=1e-12)
    # The baseline decays all its variables too, and nothing when wd is 0.
    assert small_dks("baseline", weight_decay=0.0).weight_decay == 0.0


def test_build_model_methods():
    # The recipes build with keras_dks.methods; recipes.build_model is a
    # deprecated alias that builds the same model and names the new place.
    assert small_dks("baseline").head_names == ["main"]
    ds = small_dks("ds")
    assert ds.pair_list == [] and len(ds.head_names) == 3
    backbone = keras_dks.backbones.wide_resnet(10, 1, 5, input_shape=(16, 16, 3))
    for method, pairs in (("ds", 6), ("dks", 6), ("dhm", 6)):
        with pytest.warns(DeprecationWarning, match="keras_dks.methods.build_model"):
            old = recipes.build_model(method, backbone, weight_decay=5e-4)
        new = small_dks(method)
        assert type(old) is type(new) and old.head_names == new.head_names
        assert old.pair_list == new.pair_list and len(new.pair_list) == (0 if method == "ds" else pairs)
    assert len(small_dks("dks", pairs="top_down").pair_list) == 3
    dhm = small_dks("dhm")  # DHM's released code: every pair, every branch
    assert dhm.pair_keep_prob == 1.0 and dhm.branch_keep_prob == 1.0
    with pytest.raises(ValueError, match="SRDL"):
        small_dks("srdl")
    with pytest.warns(DeprecationWarning, match="keras_dks.methods.MODEL_METHODS"):
        assert recipes.METHODS == keras_dks.methods.MODEL_METHODS
    with pytest.warns(DeprecationWarning, match="keras_dks.distribute.get_strategy"):
        assert recipes.get_strategy("default") is tf.distribute.get_strategy()


def tiny_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 5, n)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


def test_train_writes_history_curves_model_and_reports(tmp_path):
    model = small_dks()
    model.compile(recipes.sgd(recipes.step_schedule(0.01, 2, (1,), 0.2)), metrics=["accuracy"])
    data = tiny_data()
    model_dir = str(tmp_path / "run")

    class AddsToLogs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["extra_metric"] = 10.0 + epoch

    result = recipes.train(model, data, data, epochs=2, model_dir=model_dir, batch_size=8,
                           verbose=0, callbacks=[AddsToLogs()])
    assert set(result["head_errors"]) == {"main", "aux_group1", "aux_group0"}
    # What user callbacks add is recorded in the per-epoch log.
    assert result["history"]["extra_metric"] == [10.0, 11.0]
    assert result["train_steps_per_second"] > 0
    assert result["train_images_per_second"] == pytest.approx(8 * result["train_steps_per_second"])
    for name in ("history.json", "curves.png", "model.keras", "epochs.jsonl"):
        assert os.path.getsize(os.path.join(model_dir, name)) > 0
    backup = os.path.join(model_dir, "backup")
    assert not os.path.isdir(backup) or not os.listdir(backup)  # deleted when finished
    with open(os.path.join(model_dir, "history.json")) as f:
        saved = json.load(f)
    assert len(saved["history"]["val_aux_group0_accuracy"]) == 2
    assert saved["eval"]["accuracy"] == pytest.approx(1 - result["head_errors"]["main"])
    reloaded = keras.models.load_model(os.path.join(model_dir, "model.keras"))
    assert reloaded.head_names == model.head_names

    line = recipes.summary_line("tiny dks", result["head_errors"], 3725, 123.4, 5000.0)
    assert line.startswith("RESULT tiny dks | test error main ")
    assert "aux_group1" in line and "wall 1h02m05s" in line and "123.4 images/s" in line
    assert "5000.0 images/s" in line


class _Writes:
    """A stream that keeps each `write` call apart."""

    def __init__(self):
        self.calls = []

    def write(self, text):
        self.calls.append(text)

    def flush(self):
        pass


def test_progress_is_one_whole_line_per_epoch_without_empty_columns(monkeypatch):
    stream = _Writes()
    monkeypatch.setattr("sys.stdout", stream)
    lines = {}
    for method in ("baseline", "dks"):
        stream.calls.clear()
        model = small_dks(method)
        model.compile(recipes.sgd(0.01), metrics=["accuracy"])
        recipes.train(model, tiny_data(), tiny_data(), epochs=2, validation_freq=2,
                      verbose=2, label=method, plot=False, save_model=False)
        lines[method] = list(stream.calls)
    for method, calls in lines.items():
        # One write per epoch, a whole line labelled with the method.
        assert len(calls) == 2, calls
        for epoch, call in enumerate(calls, 1):
            assert call.endswith("\n") and call.count("\n") == 1, call
            assert call.startswith(f"{method:<8} Epoch {epoch}/2 - 2 steps - "), call
            assert " - loss: " in call and " - accuracy: " in call and "ce_loss" not in call
        assert "val_accuracy: " in calls[1] and "val_" not in calls[0]
        # No step was skipped: no skipped_steps column.
        assert "skipped_steps" not in "".join(calls)
    # The baseline has no synergy pairs and no auxiliary heads.
    assert "synergy_loss" not in "".join(lines["baseline"])
    assert "aux_" not in "".join(lines["baseline"])
    assert all(" - synergy_loss: " in c and " - aux_group1_accuracy: " in c for c in lines["dks"])


def test_train_checks_array_labels_before_any_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16, 16, 3)).astype("float32")
    model = small_dks()
    model.compile(recipes.sgd(0.01), metrics=["accuracy"])
    with pytest.raises(ValueError, match="label"):
        recipes.train(model, (x, np.array([0, 1, 2, 3, 4, 5, 1, 2])), epochs=1, batch_size=4,
                      verbose=0, plot=False, save_model=False)
    assert int(model.optimizer.iterations) == 0
    result = recipes.train(model, (x, rng.integers(0, 5, 8)), (x, rng.integers(0, 5, 8)),
                           epochs=1, batch_size=4, verbose=0, plot=False, save_model=False)
    assert int(model.optimizer.iterations) == 2 and set(result["head_errors"]) == set(model.head_names)


def test_build_before_first_trace_creates_optimizer_and_metric_variables():
    model = small_dks()
    model.compile(recipes.sgd(0.01), metrics=["accuracy"])
    assert not model.optimizer.built
    recipes.build_before_first_trace(model, tiny_data())
    assert model.optimizer.built and model.optimizer.inner_optimizer.built
    compiled = [m for m in model.metrics if hasattr(m, "built")]  # the compiled metrics
    assert compiled and all(m.built for m in compiled)
    # Building left every metric at its start.
    assert all(float(v) == 0 for m in model.metrics for v in m.variables)
    # ... and fit traces its step once (Keras alone traces it twice: the
    # first trace creates these variables, so tf.function traces again).
    traces = []
    step = model.train_step

    def counted(data):
        traces.append(1)  # runs once per trace, not per step
        return step(data)

    model.train_step = counted
    model.fit(tiny_data(), epochs=2, verbose=0)
    assert len(traces) == 1, len(traces)


def test_epoch_log_survives_restarts(tmp_path):
    path = tmp_path / "epochs.jsonl"
    log = recipes.EpochLog(str(path))
    log.on_epoch_end(0, {"loss": 2.0, "accuracy": 0.1})
    log.on_epoch_end(1, {"loss": 1.5, "accuracy": 0.2, "val_accuracy": 0.3})
    log.on_epoch_end(1, {"loss": 1.4, "accuracy": 0.25, "val_accuracy": 0.35})  # re-run epoch
    history = recipes.read_epoch_log(str(path))
    assert history["loss"] == [2.0, 1.4]
    assert np.isnan(history["val_accuracy"][0]) and history["val_accuracy"][1] == 0.35


def test_export_bakes_in_the_normalisation(tmp_path):
    model = small_dks()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    path = recipes.export_inference_model(model, str(tmp_path / "export"), mean, std)
    assert path.endswith(os.path.join("export", "1"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    out = serve(images=tf.constant(pixels))
    expected = model.inference_model()((pixels / 255.0 - np.array(mean)) / np.array(std))
    np.testing.assert_allclose(out["logits"].numpy(), np.asarray(expected), atol=1e-4)


def test_chief_and_worker_dirs(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert recipes.is_chief() and recipes.worker_dir("m") == "m"
    cluster = {"worker": ["a:1", "b:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert recipes.is_chief() and recipes.worker_dir("m") == "m"
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert not recipes.is_chief()
    assert recipes.worker_dir("m") == os.path.join("m", "workers", "worker_1")


def test_steps_summary():
    text = recipes.steps_summary(2.0, {"steps_per_second": 50.0})
    assert "2.00 steps/s with the model" in text and "not the bottleneck" in text
    assert "may limit" in recipes.steps_summary(2.0, {"steps_per_second": 3.0})
