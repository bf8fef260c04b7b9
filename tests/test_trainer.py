"""Training DKSModel through Keras' trainers: compile checks, labels in the
graph, per-head metrics and logs, and steps skipped by SkipNonFinite.

`python tests/test_trainer.py OUT.json` (with KERAS_BACKEND set) writes
`_nan_step_run()`'s result, for the check on another backend.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import keras

import keras_dks
from keras_dks import DKSModel, losses
from keras_dks.optimizers import SkipNonFinite, SkippedStepsLogger
from helpers import (data, learnable_data, np_dks_loss, np_log_softmax,
                     set_weights_by_path, tiny_backbone)

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------
# Compile and labels (each error names the fix)
# --------------------------------------------------------------------------
def test_compile_rejects_loss():
    model = DKSModel(tiny_backbone(), num_classes=3, head="simple")
    with pytest.raises(ValueError, match="computes its own loss"):
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="list of metrics"):
        model.compile(optimizer="sgd", metrics={"main": ["accuracy"]})
    with pytest.raises(ValueError, match="aux_weight / synergy_weight"):
        model.compile(optimizer="sgd", loss_weights=[1.0, 0.5, 0.5])


def _label_steps(x, good, bads):
    """One model (SGD under SkipNonFinite): a step on `good` labels, then one
    on each of `bads`. Returns the good step's (loss, weights moved) and per
    bad labels (loss, weights unchanged, evaluate's loss), and the skips."""
    model = DKSModel(tiny_backbone(), num_classes=5, head="simple")
    model.compile(optimizer=SkipNonFinite(keras.optimizers.SGD(0.1)))
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, good, return_dict=True)["loss"]
    moved = any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    results = []
    for labels in bads:
        before = [w.copy() for w in model.get_weights()]
        bad_loss = model.train_on_batch(x, labels, return_dict=True)["loss"]
        same = all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
        ev_loss = model.evaluate(x, labels, verbose=0, return_dict=True)["loss"]
        results.append((bad_loss, same, ev_loss))
    return (loss, moved), results, int(model.optimizer.skipped_steps)


def _assert_skipped(good, bad, skipped, count):
    # The good labels train; each bad batch's loss is NaN, its step skipped.
    assert np.isfinite(good[0]) and good[1]
    for loss, same, ev_loss in bad:
        assert np.isnan(loss) and np.isnan(ev_loss) and same
    assert skipped == count


def test_labels_out_of_range():
    # check_labels names the range; inside a step the label's target is NaN,
    # so the loss is NaN and SkipNonFinite skips the step.
    x, y = data(8)
    bads = []
    for bad in (5, -1):
        yb = y.copy()
        yb[3] = bad
        with pytest.raises(ValueError, match=r"\[0, 5\)"):
            losses.check_labels(yb, 5)
        bads.append(yb)
    _assert_skipped(*_label_steps(x, y, bads), count=2)


def test_float_labels_are_rejected_not_truncated():
    x, y = data(8)
    yf = y.astype("float32")
    losses.check_labels(yf, 5)  # integral floats are fine
    bad = yf.copy()
    bad[2] = 2.5
    with pytest.raises(ValueError, match="2.5.*would be truncated"):
        losses.check_labels(bad, 5)
    _assert_skipped(*_label_steps(x, yf, [bad]), count=1)


def test_soft_labels_must_sum_to_one():
    x, _ = data(8)
    soft = np.full((8, 5), 0.2, "float32")
    losses.check_labels(soft, 5)
    bads = []
    for row in ([1.0] * 5, [-0.2, 0.4, 0.4, 0.2, 0.2], [np.nan, 0.25, 0.25, 0.25, 0.25]):
        bad = soft.copy()
        bad[4] = row  # sums to 5; negative (sums to 1); NaN
        with pytest.raises(ValueError, match=r"row 4 .*Normalise"):
            losses.check_labels(bad, 5)
        bads.append(bad)
    _assert_skipped(*_label_steps(x, soft, bads), count=3)


# --------------------------------------------------------------------------
# Training and per-head logs
# --------------------------------------------------------------------------
def test_fit_lowers_loss_and_logs_every_head():
    model = DKSModel(tiny_backbone(bn=True), num_classes=3, head="conv")
    model.compile(optimizer=SkipNonFinite(keras.optimizers.SGD(0.05, momentum=0.9)),
                  metrics=["accuracy"])
    x, y = learnable_data()
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0, validation_data=(x, y),
                        callbacks=[SkippedStepsLogger()])
    h = history.history
    expected = {
        "loss", "ce_loss", "aux_s2_ce_loss", "aux_s1_ce_loss", "synergy_loss",
        "accuracy", "aux_s2_accuracy", "aux_s1_accuracy",
    }
    # skipped_steps: training steps of the epoch whose gradients were not finite.
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
# Non-finite gradients: SkipNonFinite skips the whole step
# --------------------------------------------------------------------------
def _values(variables):
    return {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in variables}


def _nan_step_run():
    """Three train steps of a BN-free DKSModel (SGD 0.1, momentum 0.9), a
    NaN pixel in the second batch; then a fit logging skipped_steps."""
    keras.utils.set_random_seed(0)
    model = DKSModel(tiny_backbone(), num_classes=5, head="simple")
    model.compile(optimizer=SkipNonFinite(keras.optimizers.SGD(0.1, momentum=0.9)))
    x, y = data(12)
    x[5, 3, 3, 0] = np.nan  # in the second batch of 4
    model.train_on_batch(x[:4], y[:4])
    weights, states = _values(model.weights), _values(model.optimizer.variables)
    second = model.train_on_batch(x[4:8], y[4:8], return_dict=True)
    after_weights = _values(model.weights)
    after_states = _values(model.optimizer.variables)
    out = {
        "second_loss": float(second["loss"]),
        "changed_weights": [p for p in weights
                            if not np.array_equal(weights[p], after_weights[p])],
        "changed_states": [p for p in states
                           if not np.array_equal(states[p], after_states[p])],
        "momentum_nonzero": int(sum(np.abs(v).sum() > 0 for p, v in states.items()
                                    if "momentum" in p)),
        "skipped_after_second": int(keras.ops.convert_to_numpy(model.optimizer.skipped_steps)),
        "iterations_after_second": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    }
    model.train_on_batch(x[8:], y[8:])
    out["iterations_after_third"] = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    out["third_moved"] = any(not np.array_equal(after_weights[p], v)
                             for p, v in _values(model.weights).items())
    out["finite"] = all(np.isfinite(v).all() for v in _values(model.weights).values())
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False,
                        callbacks=[SkippedStepsLogger()])
    out["fit_skipped_steps"] = history.history["skipped_steps"]
    out["iterations_after_fit"] = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    return out


def _check_nan_step(r):
    # The skipped step changed no weight and no optimizer variable but the
    # skip count (momentum was non-zero: zero gradients would have moved
    # the weights by it).
    assert r["momentum_nonzero"] > 0
    assert r["changed_weights"] == [], r["changed_weights"]
    # Names without the optimizer's path, which Keras numbers per process.
    changed = [p.split("/")[-1] for p in r["changed_states"]]
    assert changed == ["skipped_steps"], r["changed_states"]
    assert r["skipped_after_second"] == 1
    assert r["iterations_after_second"] == 1 and r["iterations_after_third"] == 2
    assert r["third_moved"] and r["finite"]
    # fit: one skipped step per epoch (the NaN batch), 2 applied steps each.
    assert r["fit_skipped_steps"] == [1.0, 1.0]
    assert r["iterations_after_fit"] == 2 + 2 * 2


def test_nan_image_skips_the_step():
    _check_nan_step(_nan_step_run())


def test_nan_image_skips_the_step_on_jax(tmp_path):
    out = tmp_path / "jax.json"
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.path.dirname(HERE))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["backend"] == "jax"
    _check_nan_step(r)


def test_nan_image_stops_training_naming_the_batch():
    model = DKSModel(tiny_backbone(), num_classes=5, head="simple")
    model.compile(optimizer=SkipNonFinite(keras.optimizers.SGD(0.1)))
    x, y = data(16)
    x[9, 3, 3, 0] = np.nan  # in the third batch of 4
    model.fit(x[:8], y[:8], batch_size=4, verbose=0, shuffle=False)
    stop = keras_dks.callbacks.StopOnNonFiniteLoss()
    h = model.fit(x, y, batch_size=4, epochs=3, verbose=0, shuffle=False,
                  callbacks=[SkippedStepsLogger(), stop])
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert stop.message is not None and "the step was skipped" in stop.message
    assert "epoch 1, batch 3" in stop.message, stop.message
    assert stop.step == 2 + 2  # applied steps: two earlier, two in this fit
    assert len(h.history["loss"]) == 1  # stopped in the first epoch


# --------------------------------------------------------------------------
# Per-head metrics against NumPy
# --------------------------------------------------------------------------
def _np_topk(z, labels, k):
    top = np.argsort(-z, axis=-1)[:, :k]
    return float(np.mean([labels[i] in top[i] for i in range(len(labels))]))


@pytest.mark.parametrize("source", ["arrays", "dataset", "onehot_dataset"])
def test_metrics_of_every_head_match_numpy(source):
    """Epoch metrics of every head (int and one-hot labels, arrays and
    datasets) equal NumPy's accuracy and top-2 accuracy of that head's
    logits from predict (lr 0 and no BatchNorm: the model does not change)."""
    import tensorflow as tf

    model = DKSModel(tiny_backbone(), num_classes=3, head="simple")
    # Weights seeded by variable path: the heads' predictions differ in
    # every run, whatever ran before in the process.
    set_weights_by_path(model)
    top2 = (keras.metrics.TopKCategoricalAccuracy(k=2, name="top2")
            if source == "onehot_dataset"
            else keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2"))
    model.compile(optimizer=keras.optimizers.SGD(0.0), metrics=["accuracy", top2])
    x, y = learnable_data(32)
    if source == "arrays":
        kwargs = dict(x=x, y=y, batch_size=8)
    else:
        labels = np.eye(3, dtype="float32")[y] if source == "onehot_dataset" else y
        kwargs = dict(x=tf.data.Dataset.from_tensor_slices((x, labels)).batch(8))
    h = model.fit(**kwargs, epochs=2, verbose=0).history
    ev = model.evaluate(**kwargs, verbose=0, return_dict=True)
    logits = model.predict(x, verbose=0)
    for name, z in zip(model.head_names, logits):
        prefix = "" if name == "main" else f"{name}_"
        acc = float(np.mean(np.argmax(z, -1) == y))
        top = _np_topk(z, y, 2)
        # Counts over 32 examples: exact up to float32 rounding of the mean.
        for logs in (h, ev):
            got_acc = logs[prefix + "accuracy"]
            got_top = logs[prefix + "top2"]
            for g_acc, g_top in zip(np.atleast_1d(got_acc), np.atleast_1d(got_top)):
                np.testing.assert_allclose(g_acc, acc, atol=1e-6, err_msg=name)
                np.testing.assert_allclose(g_top, top, atol=1e-6, err_msg=name)
    # The heads differ, so a metric fed from the wrong head would show.
    preds = [np.argmax(z, -1) for z in logits]
    assert any(np.sum(p != preds[0]) >= 4 for p in preds[1:]), preds


def test_first_train_on_batch_metrics_count_only_its_batch():
    """The first train_on_batch's metrics score exactly its batch: each
    head's accuracy is NumPy's on the (BN-free) network's predictions before
    the step."""
    model = DKSModel(tiny_backbone(), num_classes=3, head="simple")
    model.compile(optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"])
    x, y = learnable_data(16)
    before = [np.asarray(z) for z in model.predict(x, verbose=0)]
    logs = model.train_on_batch(x, y, return_dict=True)
    for name, z in zip(model.head_names, before):
        key = "accuracy" if name == "main" else f"{name}_accuracy"
        np.testing.assert_allclose(logs[key], np.mean(z.argmax(-1) == y), atol=1e-6)


if __name__ == "__main__":
    result = _nan_step_run()
    result["backend"] = keras.backend.backend()
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)


def test_per_head_metrics_when_the_backbone_names_its_own_logits():
    """A backbone that ends in its own logits layer (here `logits`, as
    keras.applications' `predictions` or our WRN's `fc`): every head's
    metrics are logged under the head's name and equal NumPy's accuracy
    (Keras < 3.12 matches metric keys against the model's output names)."""
    body = tiny_backbone()
    x = keras.layers.GlobalAveragePooling2D()(body.outputs[0])
    backbone = keras.Model(body.inputs, keras.layers.Dense(3, name="logits")(x))
    model = DKSModel(backbone, head="simple")
    model.compile(optimizer=keras.optimizers.SGD(0.0), metrics=["accuracy"])
    x, y = learnable_data(32)
    h = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    logits = model.predict(x, verbose=0)
    for name, z in zip(model.head_names, logits):
        key = "accuracy" if name == "main" else f"{name}_accuracy"
        # Counts over 32 examples: exact up to float32 rounding of the mean.
        np.testing.assert_allclose(h[key][-1], np.mean(np.argmax(z, -1) == y), atol=1e-6)
