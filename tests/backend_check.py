"""A DKSModel run on the current Keras backend, reported as JSON.

`python tests/backend_check.py OUT.json` (with KERAS_BACKEND set) builds a
DKSModel on WRN-10-1 and on a keras.applications MobileNetV2, sets the same
NumPy weights on every backend, and records: the loss terms on a fixed
batch, the logits, a NumPy reference of the loss from those logits, `fit`
logs, `evaluate` logs with per-head references, and whether `predict`,
`inference_model()` and a `.keras` round trip agree. `test_backends.py`
runs it per backend and compares with the TensorFlow values.

`python tests/backend_check.py OUT.json --data-parallel N` trains on N
devices with `keras.distribution.DataParallel` (JAX) and records the
weights.
"""

import json
import os
import sys
import tempfile
import zlib

import numpy as np

import keras

import keras_dks
from keras_dks import backbones


def set_weights_by_path(model):
    """He-normal kernels, zero biases, unit BN scales, seeded by path."""
    for v in model.weights:
        rng = np.random.default_rng(zlib.crc32(v.path.encode()))
        shape = tuple(v.shape)
        name = v.path.split("/")[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
            value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        elif name in ("gamma", "moving_variance"):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        v.assign(value.astype(v.dtype))


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def numpy_loss(logits, y, num_classes, pairs, smoothing=0.0):
    t = np.eye(num_classes)[y] * (1 - smoothing) + smoothing / num_classes
    per = sum(-(t * _log_softmax(z)).sum(-1) for z in logits)
    for s, j in pairs:
        per = per - (np.exp(_log_softmax(logits[j])) * _log_softmax(logits[s])).sum(-1)
    return float(per.mean())


CASES = {
    "wrn10_1": dict(
        backbone=lambda: backbones.wide_resnet(
            10, 1, num_classes=None, include_top=False, input_shape=(8, 8, 3),
            name="wrn10"),
        size=8, kwargs=dict(label_smoothing=0.1)),
    "mobilenetv2": dict(
        backbone=lambda: keras.applications.MobileNetV2(
            weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35),
        size=32, kwargs=dict(head="simple")),
}


def batch(size, n=8, classes=4, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=(n, size, size, 3)).astype("float32"),
            rng.integers(0, classes, n))


def run_case(case):
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
    }
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
            -(targets * _log_softmax(z.astype("float64"))).sum(-1).mean())
    out["eval_refs"] = ref
    pred = model.predict(x, verbose=0)
    out["predict_matches"] = bool(np.allclose(pred[0], logits[0], rtol=1e-4, atol=1e-4))
    serving = model.inference_model()
    out["inference_matches"] = bool(np.allclose(
        keras.ops.convert_to_numpy(serving(x)), logits[0], atol=1e-5))
    out["inference_params"] = int(serving.count_params())
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.keras")
        model.save(path)
        back = keras.saving.load_model(path)
        again = [np.asarray(keras.ops.convert_to_numpy(z)) for z in back(x, training=False)]
        out["reload_matches"] = bool(all(
            np.allclose(a, b, atol=1e-5) for a, b in zip(logits, again)))
        out["reload_class"] = type(back).__name__
    return out


def run_data_parallel(devices):
    import jax

    if devices > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()[:devices]))
    spec = CASES["wrn10_1"]
    model = keras_dks.DKSModel(spec["backbone"](), num_classes=4, seed=3,
                               weight_decay=5e-4)
    set_weights_by_path(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    x, y = batch(spec["size"], n=16)
    hist = model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    return {
        "devices": len(jax.devices()),
        "loss": float(hist.history["loss"][-1]),
        "weights": {v.path: np.asarray(keras.ops.convert_to_numpy(v)).tolist()
                    for v in model.weights},
    }


if __name__ == "__main__":
    target = sys.argv[1]
    if "--data-parallel" in sys.argv:
        result = run_data_parallel(int(sys.argv[sys.argv.index("--data-parallel") + 1]))
    else:
        result = {"backend": keras.backend.backend()}
        for case in sys.argv[2:] or sorted(CASES):
            result[case] = run_case(case)
        try:  # a TensorFlow-only feature says so on this backend
            keras_dks.distribute.get_strategy("mirrored")
            result["tf_only_error"] = None
        except RuntimeError as e:
            result["tf_only_error"] = str(e)
    with open(target, "w") as f:
        json.dump(result, f)
