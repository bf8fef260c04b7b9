"""A DKSModel run on the current Keras backend, reported as JSON.

`python tests/backend_check.py OUT.json` (with KERAS_BACKEND set) builds a
DKSModel on WRN-10-1 and on a keras.applications MobileNetV2, sets the same
NumPy weights on every backend, and records: the loss terms on a fixed
batch, the logits, a NumPy reference of the loss from those logits, `fit`
logs, `evaluate` logs with per-head references, and the outputs of the
trained model's eager call, `predict`, `inference_model()` and a `.keras`
round trip. `run_training` records the weights after a few identical SGD
steps (weight decay, label smoothing, an explicit pair list). It also trains
a tiny `DHMModel` (loss under a fixed location mask, per-step draws in
compiled steps, `fit`, `.keras` round trip) and records the errors of
TensorFlow-only features. `test_backends.py` runs it per backend and
compares with the TensorFlow values (computed by the same functions).

`python tests/backend_check.py OUT.json --data-parallel` trains on one
device, then on all with `keras.distribution.DataParallel` (JAX), and
records both runs' weights.
"""

import json
import os
import sys
import tempfile

import numpy as np

import keras

import keras_dks
from keras_dks import backbones

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import np_dks_loss, np_log_softmax, set_weights_by_path  # noqa: E402


def numpy_loss(logits, y, num_classes, pairs, smoothing=0.0):
    """The NumPy DKS objective with unit head and pair weights."""
    onehot = np.eye(num_classes)[y]
    return float(np_dks_loss(logits, onehot, [1.0] * len(logits), pairs, [1.0] * len(pairs),
                             smoothing))


CASES = {
    "wrn10_1": dict(
        backbone=lambda: backbones.wide_resnet(
            10, 1, num_classes=None, include_top=False, input_shape=(8, 8, 3),
            name="wrn10"),
        size=8, kwargs=dict(label_smoothing=0.1)),
    # 64x64, not 32x32: at 32x32 the last stages' BatchNormalization sees
    # 1x1 maps, and two SGD steps leave a model whose float32 outputs carry
    # ~1e-3 (relative) of rounding; at 64x64 they carry ~1e-7.
    "mobilenetv2": dict(
        backbone=lambda: keras.applications.MobileNetV2(
            weights=None, include_top=False, input_shape=(64, 64, 3), alpha=0.35),
        size=64, kwargs=dict(head="simple")),
}

# The weight comparison across backends (`run_training`): WRN-10-1 with every
# option that changes the gradient. Weight decay is large so that its share of
# an update (lr * weight_decay * w) stands far above float32 rounding.
TRAINING = dict(case="wrn10_1", steps=3, batch_size=4, learning_rate=0.05,
                momentum=0.9,
                kwargs=dict(label_smoothing=0.1, weight_decay=0.05,
                            pairs=[(1, 0), (2, 0), (0, 1), (2, 1)]))


def batch(size, n=8, classes=4, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=(n, size, size, 3)).astype("float32"),
            rng.integers(0, classes, n))


def _list(z):
    return np.asarray(keras.ops.convert_to_numpy(z), "float64").tolist()


def run_training(**overrides):
    """Initial weights, and the weights after `TRAINING["steps"]` SGD steps of
    `fit` (momentum, no shuffling), by variable path. `overrides` replace
    DKSModel arguments (the test's "can it fail" controls)."""
    spec = CASES[TRAINING["case"]]
    model = keras_dks.DKSModel(spec["backbone"](), num_classes=4, seed=3,
                               **dict(TRAINING["kwargs"], **overrides))
    set_weights_by_path(model)
    init = {v.path: _list(v) for v in model.weights}
    model.compile(optimizer=keras.optimizers.SGD(TRAINING["learning_rate"],
                                                 momentum=TRAINING["momentum"]))
    x, y = batch(spec["size"], n=TRAINING["steps"] * TRAINING["batch_size"], seed=2)
    hist = model.fit(x, y, batch_size=TRAINING["batch_size"], epochs=1, verbose=0,
                     shuffle=False)
    return {"init": init, "weights": {v.path: _list(v) for v in model.weights},
            "trainable": [v.path for v in model.trainable_variables],
            "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
            "loss": float(hist.history["loss"][-1])}


def run_case(case, loss_only=False):
    spec = CASES[case]
    model = keras_dks.DKSModel(spec["backbone"](), num_classes=4, seed=3,
                               **spec["kwargs"])
    set_weights_by_path(model)
    x, y = batch(spec["size"])
    logits = [np.asarray(keras.ops.convert_to_numpy(z), "float64")
              for z in model(x, training=False)]
    terms = model.compute_dks_loss(y, model(x, training=False))
    out = {
        "loss": float(keras.ops.convert_to_numpy(terms["loss"])),
        "ce": [float(keras.ops.convert_to_numpy(c)) for c in terms["ce"]],
        "synergy": float(keras.ops.convert_to_numpy(terms["synergy"])),
        "numpy_loss": numpy_loss(logits, y, 4, model.pair_list,
                                 spec["kwargs"].get("label_smoothing", 0.0)),
        "logits": [z.tolist() for z in logits],
        "head_names": model.head_names,
        "inference_params": int(model.inference_model().count_params()),
    }
    if loss_only:
        return out
    model.compile(optimizer=keras.optimizers.SGD(0.01), metrics=["accuracy"])
    hist = model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    out["fit_logs"] = {k: float(v[-1]) for k, v in hist.history.items()}
    ev = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    out["eval_logs"] = {k: float(v) for k, v in ev.items()}
    logits = [np.asarray(keras.ops.convert_to_numpy(z)) for z in model(x, training=False)]
    ls = spec["kwargs"].get("label_smoothing", 0.0)
    targets = np.eye(4)[y] * (1 - ls) + ls / 4
    ref = {}
    for name, z in zip(model.head_names, logits):
        prefix = "" if name == "main" else f"{name}_"
        ref[f"{prefix}accuracy"] = float(np.mean(z.argmax(-1) == y))
        ref[f"{prefix}ce_loss"] = float(
            -(targets * np_log_softmax(z.astype("float64"))).sum(-1).mean())
    out["eval_refs"] = ref
    # The trained model's outputs, every way a user gets them (compared in
    # test_backends.py): the eager call, predict (compiled), the serving
    # model and a reloaded .keras file.
    out["trained_logits"] = [z.tolist() for z in logits]
    out["predict"] = _list(model.predict(x, verbose=0)[0])
    out["inference"] = _list(model.inference_model()(x))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.keras")
        model.save(path)
        back = keras.saving.load_model(path)
        out["reload"] = [_list(z) for z in back(x, training=False)]
        out["reload_class"] = type(back).__name__
    return out


def dhm_backbone():
    """a1 -> a2 -> a3, equally shaped (candidate roots), then b."""
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3, strides=2, padding="same", activation="relu",
                            name="a1")(inp)
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="a2")(x)
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="a3")(x)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu",
                            name="b")(x)
    return keras.Model(inp, x, name="chain")


def dhm_model(sampling):
    # Heads: main, aux_a2_a3 (dynamic root a2 | a3), aux_a1.
    return keras_dks.methods.DHMModel(
        dhm_backbone(), num_classes=4, roots=[["a2", "a3"], "a1"], head="simple",
        branch_keep_prob=0.5, branch_sampling=sampling, root_sampling=sampling,
        seed=5)


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v))


def run_dhm(loss_only=False):
    """DHMModel: the loss under a fixed location mask and root; per-step
    draws inside compiled steps; fit with per-epoch draws; `.keras` round
    trip."""
    x, y = batch(8)
    model = dhm_model("epoch")
    set_weights_by_path(model)
    # Fixed mask and root (no draw): aux_a1 off, aux_a2_a3 fed by a3.
    model.branch_mask.assign(np.array([1.0, 0.0], "float32"))
    model.root_selectors[0].index.assign(1)
    logits = model(x, training=True)
    terms = model.compute_dks_loss(y, logits, training=True)
    kept = [np.asarray(_np(z), "float64") for z in logits[:2]]
    out = {
        "loss": float(_np(terms["loss"])),
        "numpy_loss": numpy_loss(kept, y, 4, [(0, 1), (1, 0)]),
        "logits": [z.tolist() for z in kept],
    }
    if loss_only:
        return out

    # Per-step draws: the loss a compiled step logs (lr 0) is the loss of
    # the draws of its step counter, computed eagerly; also when the counter
    # is a LossScaleOptimizer's inner optimizer's (mixed-float16 training).
    for key, optimizer in (
        ("step", lambda: keras.optimizers.SGD(0.0)),
        ("loss_scale_step",
         lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0))),
    ):
        model = dhm_model("step")
        set_weights_by_path(model)
        model.compile(optimizer=optimizer())
        steps = range(4)
        logged = [float(model.train_on_batch(x, y, return_dict=True)["loss"])
                  for _ in steps]
        iterations = int(_np(model.optimizer.iterations))
        eager, draws = [], []
        for s in steps:
            model.step_counter().assign(s)  # the counter its draws are keyed on
            t = model.compute_dks_loss(y, model(x, training=True), training=True)
            eager.append(float(_np(t["loss"])))
            draws.append([_np(model.draw_branch_mask(s)).tolist(),
                          int(_np(model.root_selectors[0].draw(s)))])
        out.update({f"{key}_logged": logged, f"{key}_eager": eager,
                    f"{key}_draws": draws, f"{key}_iterations": iterations})

    # fit with per-epoch draws (RootResampler added by fit), save, reload.
    model = dhm_model("epoch")
    model.compile(optimizer=keras.optimizers.SGD(0.05), metrics=["accuracy"])
    hist = model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False)
    out["fit_logs"] = {k: float(v[-1]) for k, v in hist.history.items()}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dhm.keras")
        model.save(path)
        back = keras.saving.load_model(path)
        out["reload_class"] = type(back).__name__
        out["reload_matches"] = bool(all(
            np.allclose(_np(a), _np(b), atol=1e-5)
            for a, b in zip(model(x, training=False), back(x, training=False))))
        out["reload_fit_loss"] = float(
            back.fit(x, y, batch_size=4, epochs=1, verbose=0).history["loss"][-1])
    return out


def run_data_parallel():
    """The same two steps on one device, then on every device (DataParallel)."""
    import jax

    results = {"devices": len(jax.devices())}
    for label, distribution in (
        ("one", None),
        ("all", keras.distribution.DataParallel(devices=jax.devices())),
    ):
        keras.distribution.set_distribution(distribution)
        spec = CASES["wrn10_1"]
        model = keras_dks.DKSModel(spec["backbone"](), num_classes=4, seed=3,
                                   weight_decay=5e-4)
        set_weights_by_path(model)
        init = {v.path: _list(v) for v in model.weights}
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        x, y = batch(spec["size"], n=16)
        hist = model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        results[label] = {
            "init": init,
            "loss": float(hist.history["loss"][-1]),
            "weights": {v.path: np.asarray(keras.ops.convert_to_numpy(v)).tolist()
                        for v in model.weights},
        }
    return results


if __name__ == "__main__":
    target = sys.argv[1]
    if "--data-parallel" in sys.argv:
        result = run_data_parallel()
    else:
        result = {"backend": keras.backend.backend()}
        for case in sys.argv[2:] or sorted(CASES):
            result[case] = run_case(case)
        result["training"] = run_training()
        result["dhm"] = run_dhm()
        # TensorFlow-only features say so on this backend.
        for key, feature in (
            ("tf_only_error", lambda: keras_dks.distribute.get_strategy("mirrored")),
        ):
            try:
                feature()
                result[key] = None
            except RuntimeError as e:
                result[key] = str(e)
    with open(target, "w") as f:
        json.dump(result, f)
