"""The golden run: a few float64 DKS training steps, and the command that records them.

`tests/test_golden.py` compares a run of `run_case(case)` with the values in
`tests/golden/dks_golden.json`. Only this command writes that file:

    python tests/golden/record.py            # every case
    python tests/golden/record.py wrn16_1    # one case

Record only when a change of the numerics is intended (and say so in the
commit); a refactor that changes code layout only must pass the test as
recorded.

Why float64: float32 training losses move by ~1e-5 (relative) between CPUs,
thread counts and oneDNN on / off (different summation orders in convolutions
and reductions), so a float32 reference holds only on the machine that
recorded it. In float64 the same reorderings move the results by ~1e-12, and
oneDNN does not run float64 kernels. Everything runs in float64: inputs,
every layer (floatx and the global dtype policy are float64 while the model
is built), BatchNormalization, the heads, the loss terms, the weight decay and
the optimizer's slots (`run_case` checks it).
"""

import json
import os
import sys
import zlib

import keras
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for helpers

import keras_dks  # noqa: E402
from keras_dks import backbones  # noqa: E402
from helpers import set_weights_by_path  # noqa: E402

GOLDEN = os.path.join(HERE, "dks_golden.json")
STEPS = 3
BATCH = 4


def _wrn():
    return backbones.wide_resnet(16, 1, num_classes=None, include_top=False,
                                 input_shape=(16, 16, 3), name="wrn16")


def _mobilenet():
    # 64x64: the last stages are 2x2, so their BatchNormalization averages
    # 16 values. At 32x32 (1x1, 4 values) the training steps amplify a
    # rounding difference ~1e3x per step, which makes any reference
    # machine-dependent after 3 steps even in float64.
    return keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(64, 64, 3), alpha=0.35
    )


# label_smoothing, weight_decay, an explicit pair list, head kinds: the DKS
# options that change numerics are all on in one case or the other.
CASES = {
    "wrn16_1": dict(backbone=_wrn, size=16, kwargs=dict(weight_decay=5e-4)),
    "mobilenetv2": dict(backbone=_mobilenet, size=64,
                        kwargs=dict(head="conv", label_smoothing=0.1,
                                    pairs=[(1, 0), (2, 0), (2, 1)])),
}


def tolerance(case):
    """Relative tolerance of every recorded value of `case`.

    Summing K float64 terms in another order (another thread count, another
    CPU's vector width) moves the sum by at most ~K * eps relative
    (eps = 2**-52 = 2.2e-16). The longest sums of a step run over
    batch x height x width (kernel gradients, BatchNormalization moments):
    K <= 4 x 16 x 16 = 1024 (WRN-16-1), 4 x 64 x 64 = 16384 (MobileNetV2).
    Such a difference is carried through `STEPS` steps and may grow through
    the network's depth; a factor of 1e2 covers that growth (measured
    between 1 and 2 intra-op threads: <= 1e-11 for MobileNetV2, ~1e-15 for
    WRN-16-1). The result, ~1e-9 and ~7e-11, is far below any change of
    the DKS numerics (a synergy weight changed by 1e-6 moves the loss by
    ~1e-6 relative).
    """
    size = CASES[case]["size"]
    return 1e2 * STEPS * BATCH * size * size * float(np.finfo("float64").eps)


def _unit(path, n):
    v = np.random.default_rng(zlib.crc32(path.encode()) + 1).normal(size=n)
    return v / np.linalg.norm(v)


def fingerprint(model):
    """Per variable: its norm, its projection on a fixed random unit vector
    and its size. A change dw moves the first two by at most |dw|
    (Cauchy-Schwarz); see `weight_tolerance`."""
    out = {}
    for v in model.weights:
        w = np.asarray(keras.ops.convert_to_numpy(v), dtype="float64").ravel()
        out[v.path] = [float(np.linalg.norm(w)), float(w @ _unit(v.path, w.size)),
                       int(w.size)]
    return out


def weight_tolerance(rtol, norm, size):
    """Absolute tolerance of a variable's fingerprint: rtol * max(|w|, sqrt(size)).

    rtol * |w| for a variable of ordinary size. Some variables are zero but
    for rounding (a moving mean of zero-mean activations, the beta of a
    BatchNormalization whose output has zero gradient): their values,
    ~1e-17, are rounding of sums of O(1) terms (normalised activations), so
    they get the rounding scale of O(1) elements, rtol * sqrt(size).
    """
    return rtol * max(norm, float(np.sqrt(size)))


def _assert_float64(model, terms):
    """Fail unless the whole training step is float64."""
    bad = [l.name for l in model._flatten_layers()
           if getattr(l, "compute_dtype", "float64") != "float64"]
    assert not bad, f"layers not computing in float64: {bad[:5]}"
    bad = [v.path for v in model.weights if v.dtype != "float64"]
    assert not bad, f"weights not float64: {bad[:5]}"
    slots = [v for v in model.optimizer.variables if v.dtype != "int64"]  # iterations
    bad = [v.path for v in slots if v.dtype != "float64"]
    assert slots and not bad, f"optimizer variables not float64: {bad[:5]}"
    values = [terms["loss"], terms["synergy"], terms["regularization"], *terms["ce"]]
    bad = [keras.backend.standardize_dtype(t.dtype) for t in values]
    assert set(bad) == {"float64"}, f"loss terms in {bad}"


def run_case(case):
    """`STEPS` SGD steps (momentum 0.9) of a float64 DKSModel from fixed
    NumPy weights and batches; returns the per-step logs, the trained
    model's eval logits on the first batch and a fingerprint of every
    weight."""
    spec = CASES[case]
    floatx = keras.config.floatx()
    policy = keras.mixed_precision.global_policy()
    keras.config.set_floatx("float64")
    keras.mixed_precision.set_global_policy("float64")
    try:
        keras.utils.set_random_seed(0)
        model = keras_dks.DKSModel(spec["backbone"](), num_classes=5, seed=3,
                                   **spec["kwargs"])
        set_weights_by_path(model)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                      run_eagerly=True)
        rng = np.random.default_rng(1)
        size = spec["size"]
        x = rng.uniform(size=(STEPS, BATCH, size, size, 3))
        y = rng.integers(0, 5, (STEPS, BATCH))
        logs = []
        for step in range(STEPS):
            out = model.train_on_batch(x[step], y[step], return_dict=True)
            logs.append({k: float(v) for k, v in sorted(out.items())})
        logits = model(x[0], training=False)
        _assert_float64(model, model.compute_dks_loss(y[0], logits))
        return {
            "logs": logs,
            "eval_logits": [np.asarray(z, "float64").tolist() for z in logits],
            "weights": fingerprint(model),
        }
    finally:
        keras.mixed_precision.set_global_policy(policy)
        keras.config.set_floatx(floatx)


def main(cases):
    data = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else {}
    for case in cases or sorted(CASES):
        data[case] = run_case(case)
        print(f"recorded {case}: step losses "
              f"{[round(l['loss'], 6) for l in data[case]['logs']]}")
    data["_recorded_with"] = {
        "keras": keras.__version__, "backend": keras.backend.backend(),
        "keras_dks": keras_dks.__version__,
    }
    with open(GOLDEN, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if keras.backend.backend() != "tensorflow":
        sys.exit("Record the golden run with KERAS_BACKEND=tensorflow.")
    main(sys.argv[1:])
