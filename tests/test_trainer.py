"""keras_dks.trainer through DKSModel: compile checks, label checks, the train
and test steps, per-head metrics and logs, skipped non-finite steps."""

import numpy as np
import pytest
import keras

import keras_dks
from keras_dks import DKSModel
from helpers import data, learnable_data, np_dks_loss, np_log_softmax, tiny_backbone


# --------------------------------------------------------------------------
# Compile and labels (each error names the fix)
# --------------------------------------------------------------------------
def test_compile_rejects_loss():
    model = DKSModel(tiny_backbone(), num_classes=3, head="simple")
    with pytest.raises(ValueError, match="computes its own loss"):
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="list of metrics"):
        model.compile(optimizer="sgd", metrics={"main": ["accuracy"]})



@pytest.mark.parametrize("bad", [5, -1])
def test_labels_out_of_range(bad):
    model = DKSModel(tiny_backbone(), num_classes=5, head="simple")
    model.compile(optimizer="sgd")
    x, y = data(8)
    y[3] = bad
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        model.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        model.evaluate(x, y, verbose=0)



def test_float_labels_are_rejected_not_truncated():
    model = DKSModel(tiny_backbone(), num_classes=5, head="simple")
    model.compile(optimizer="sgd")
    x, y = data(8)
    yf = y.astype("float32")
    model.fit(x, yf, verbose=0)  # integral floats are fine
    yf[2] = 2.5
    with pytest.raises(ValueError, match="2.5.*would be truncated"):
        model.fit(x, yf, verbose=0)
    with pytest.raises(ValueError, match="would be truncated"):
        model.evaluate(x, yf, verbose=0)



def test_soft_labels_must_sum_to_one():
    model = DKSModel(tiny_backbone(), num_classes=5, head="simple")
    model.compile(optimizer="sgd")
    x, y = data(8)
    soft = np.full((8, 5), 0.2, "float32")
    model.fit(x, soft, verbose=0)
    soft[4] = 1.0
    with pytest.raises(ValueError, match=r"row 4 .*sum 5.*Normalise"):
        model.fit(x, soft, verbose=0)



# --------------------------------------------------------------------------
# Training and per-head logs
# --------------------------------------------------------------------------
def test_fit_lowers_loss_and_logs_every_head():
    model = DKSModel(tiny_backbone(bn=True), num_classes=3, head="conv")
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), metrics=["accuracy"])
    x, y = learnable_data()
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0, validation_data=(x, y))
    h = history.history
    expected = {
        "loss", "ce_loss", "aux_s2_ce_loss", "aux_s1_ce_loss", "synergy_loss",
        "accuracy", "aux_s2_accuracy", "aux_s1_accuracy",
    }
    # skipped_steps: training steps whose gradients were not finite.
    assert expected | {"val_" + k for k in expected} | {"skipped_steps"} == set(h)
    assert h["skipped_steps"] == [0.0] * 6
    assert h["loss"][-1] < 0.7 * h["loss"][0]
    assert h["ce_loss"][-1] < h["ce_loss"][0]



def test_epoch_logs_are_true_epoch_means():
    model = DKSModel(tiny_backbone(), num_classes=5, head="simple")
    model.compile(optimizer=keras.optimizers.SGD(0.0), metrics=["accuracy"])
    x, y = data(40)
    # lr=0: the model is fixed, so the epoch mean over uneven batches
    # (16, 16, 8) must equal the full-data value.
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    logits = [z.numpy() for z in model(x)]
    ref = np_dks_loss(logits, np.eye(5)[y], [1, 1, 1], model.pair_list, [1.0] * 6)
    np.testing.assert_allclose(history.history["loss"][0], ref, rtol=1e-5)
    acc = np.mean(logits[0].argmax(-1) == y)
    np.testing.assert_allclose(history.history["accuracy"][0], acc, rtol=1e-6)
    ev = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    np.testing.assert_allclose(ev["loss"], ref, rtol=1e-5)



def test_int_and_onehot_labels_train_identically():
    x, y = data(16)
    results = []
    for labels in (y, np.eye(5, dtype="float32")[y]):
        keras.utils.set_random_seed(3)
        model = DKSModel(tiny_backbone(), num_classes=5, head="simple")
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        model.fit(x, labels, batch_size=8, epochs=1, verbose=0, shuffle=False)
        results.append(model.get_weights())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)



def _plain_head_model(model, head):
    # The same weights, one output: what a Keras user would evaluate.
    index = model.head_names.index(head)
    return keras.Model(model.inputs, model.outputs[index])



def test_standard_metrics_match_a_plain_keras_model_per_head():
    model = DKSModel(tiny_backbone(), num_classes=5, taps=["s2"], head="conv")

    def metrics():
        return [
            "categorical_accuracy",
            keras.metrics.AUC(name="auc", from_logits=True),
            keras.metrics.Precision(name="precision", thresholds=0.0),
            keras.metrics.TopKCategoricalAccuracy(k=2, name="top2"),
            "mae",
        ]

    model.compile(optimizer="sgd", metrics=metrics())
    x, y = data(24)
    onehot = np.eye(5, dtype="float32")[y]
    logs = model.evaluate(x, onehot, batch_size=8, verbose=0, return_dict=True)
    for head, prefix in (("main", ""), ("aux_s2", "aux_s2_")):
        plain = _plain_head_model(model, head)
        plain.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                      metrics=metrics())
        ref = plain.evaluate(x, onehot, batch_size=8, verbose=0, return_dict=True)
        for name in ("categorical_accuracy", "auc", "precision", "top2", "mae"):
            np.testing.assert_allclose(logs[prefix + name], ref[name], rtol=1e-5,
                                       err_msg=prefix + name)
        # The head's own CE log is the plain model's CE loss.
        np.testing.assert_allclose(logs[f"{head}_ce_loss" if prefix else "ce_loss"],
                                   ref["loss"], rtol=1e-5)



def test_per_head_logs_have_the_values_of_each_head():
    model = DKSModel(tiny_backbone(), num_classes=5, taps=["s1", "s2"], head="simple")
    model.compile(optimizer="sgd", metrics=["accuracy"])
    x, y = data(16)
    logs = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    logits = [z.numpy().astype("float64") for z in model(x)]
    onehot = np.eye(5)[y]
    for name, z in zip(model.head_names, logits):
        prefix = "" if name == "main" else f"{name}_"
        ce = -(onehot * np_log_softmax(z)).sum(-1).mean()
        np.testing.assert_allclose(logs[f"{prefix}ce_loss"], ce, rtol=1e-5, err_msg=name)
        acc = keras.metrics.SparseCategoricalAccuracy()
        acc.update_state(y, z)
        np.testing.assert_allclose(logs[f"{prefix}accuracy"], float(acc.result()),
                                   err_msg=name)
    # The heads differ, so a log fed from the wrong head would show it.
    assert len({round(logs[f"{h}_ce_loss"], 6) for h in model.head_names[1:]}) == 2



# --------------------------------------------------------------------------
# Non-finite gradients
# --------------------------------------------------------------------------
def test_nan_image_skips_the_step_and_stops_training():
    # No BatchNorm: a NaN input poisons the kernels' gradients only.
    model = DKSModel(tiny_backbone(), num_classes=5, head="simple")
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    x, y = data(16)
    x[9, 3, 3, 0] = np.nan  # in the third batch of 4
    before = [w.copy() for w in model.get_weights()]
    model.fit(x[:8], y[:8], batch_size=4, verbose=0, shuffle=False)
    after_good = [w.copy() for w in model.get_weights()]
    stop = keras_dks.callbacks.StopOnNonFiniteLoss()
    h = model.fit(x, y, batch_size=4, epochs=3, verbose=0, shuffle=False,
                  callbacks=[stop])
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert stop.message is not None and "the step was skipped" in stop.message
    assert "epoch 1, batch 3" in stop.message, stop.message
    assert stop.step == 2 + 3  # two earlier steps + three steps of this fit
    assert len(h.history["loss"]) == 1  # stopped in the first epoch
    assert any(not np.allclose(a, b) for a, b in zip(before, after_good))


# --------------------------------------------------------------------------
# One trace per step function
# --------------------------------------------------------------------------
class _CountingDKS(DKSModel):
    """Counts Python executions of the steps (= tf.function traces)."""

    traces = None

    def train_step(self, data):
        self.traces["train"] += 1
        return super().train_step(data)

    def test_step(self, data):
        self.traces["test"] += 1
        return super().test_step(data)


@pytest.mark.parametrize("source", ["arrays", "dataset", "onehot_dataset"])
def test_fit_traces_each_step_function_once(source):
    """The optimizer's and the metrics' variables exist before the first
    trace: Keras alone creates them in it, and tf.function then traces the
    step again. Metrics keep working (int and one-hot labels)."""
    import tensorflow as tf

    model = _CountingDKS(tiny_backbone(), num_classes=3, head="simple")
    model.traces = {"train": 0, "test": 0}
    extra = (keras.metrics.AUC(name="extra") if source == "onehot_dataset"
             else keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="extra"))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy", extra])
    x, y = learnable_data(32)
    if source == "arrays":
        kwargs = dict(x=x, y=y, batch_size=8)
    else:
        labels = np.eye(3, dtype="float32")[y] if source == "onehot_dataset" else y
        kwargs = dict(x=tf.data.Dataset.from_tensor_slices((x, labels)).batch(8))
    h = model.fit(**kwargs, epochs=2, verbose=0)
    assert model.traces["train"] == 1
    assert int(model.optimizer.iterations) == 8
    model.evaluate(**kwargs, verbose=0)
    assert model.traces["test"] == 1
    for key in ("accuracy", "aux_s2_accuracy", "extra", "aux_s2_extra"):
        assert all(0.0 <= v <= 1.0 for v in h.history[key]), (key, h.history[key])


def test_first_train_on_batch_metrics_count_only_its_batch():
    """Metrics built before the first trace (from a dummy batch, then reset)
    score exactly the first batch: each head's accuracy is NumPy's on the
    (BN-free) network's predictions before the step."""
    model = DKSModel(tiny_backbone(), num_classes=3, head="simple")
    model.compile(optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"])
    x, y = learnable_data(16)
    before = [np.asarray(z) for z in model.predict(x, verbose=0)]
    logs = model.train_on_batch(x, y, return_dict=True)
    for name, z in zip(model.head_names, before):
        key = "accuracy" if name == "main" else f"{name}_accuracy"
        np.testing.assert_allclose(logs[key], np.mean(z.argmax(-1) == y), atol=1e-6)
