"""DKSModel on JAX and PyTorch (Keras' own trainers run `compute_loss`).

Each backend runs `backend_check.py` in a subprocess (the backend is fixed
at import). Its loss on the same NumPy weights and batch must equal the
NumPy reference and the TensorFlow value computed here; fit / evaluate /
predict / inference_model / `.keras` round trip must work, and per-head
logs must match per-head references; `fit`'s weights after a few SGD steps
must equal TensorFlow's. A tiny DHMModel trains, draws per
step inside compiled steps and reloads; TensorFlow-only features (tf.distribute)
raise an error naming the fix. JAX DataParallel on 2 CPU devices
must train like 1 device.
"""

import fcntl
import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import backend_check
import keras_dks

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="drives the other backends from the TensorFlow run",
)


# With `--dist loadgroup` (pyproject.toml) a backend's tests share one xdist
# worker, so its backend_check.py run is made once and not waited for.
BACKENDS = [pytest.param(b, marks=pytest.mark.xdist_group(b)) for b in ("jax", "torch")]


def _run(backend, tmp_path, *args, env=None, out=None):
    out = out or tmp_path / f"{backend}.json"
    full_env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT,
                    TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "backend_check.py"), str(out), *args],
        env=full_env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def backend_run(tmp_path_factory, worker_id):
    """`backend_run(name)`: backend_check.py's results, one run per backend
    and pytest session, shared by the xdist workers (a file lock makes the
    second worker wait for the first one's run instead of repeating it)."""
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # this session's

    def run(backend):
        # A missing backend must fail, not skip.
        assert importlib.util.find_spec(backend), f"{backend} is not installed: run `make install`"
        out = shared / f"backend_check_{backend}.json"
        with open(shared / f"backend_check_{backend}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not out.exists():
                _run(backend, None, out=out)
        return json.loads(out.read_text())

    return run


@pytest.fixture(scope="module")
def tf_reference():
    """The same functions on TensorFlow (in this process): the reference."""
    keras.utils.set_random_seed(0)
    ref = {case: backend_check.run_case(case) for case in backend_check.CASES}
    ref["dhm"] = backend_check.run_dhm(loss_only=True)
    ref["training"] = backend_check.run_training()
    return ref


# Tolerances, from float32 and the size of the computation.
U32 = 2.0**-24  # float32 unit roundoff
# A forward pass: each layer's dot products of K <= 1280 terms (MobileNetV2's
# 1x1 convolutions and head inputs) round like u * sqrt(K), through <= 60
# layers in series; relative to the largest logit.
FORWARD_RTOL = U32 * np.sqrt(1280) * 60  # 1.3e-4
# `run_training`: a gradient is a forward and a backward pass of WRN-10-1's
# ~15 layers (K <= 3 * 3 * 64 = 576), summed over 3 momentum steps; x10 for
# the growth of a difference from step to step (a later gradient is taken at
# slightly different weights). Relative to each variable's update.
UPDATE_RTOL = 10 * U32 * np.sqrt(576) * 2 * 15 * backend_check.TRAINING["steps"]  # 1.3e-3


def max_abs(values):
    return float(max(np.abs(np.asarray(v)).max() for v in values))


def loss_atol(loss, logits, terms):
    """|loss - loss'| bound for two computations of a DKS loss with `terms`
    CE and synergy terms from logits that differ by FORWARD_RTOL: each term
    moves by at most 2 |dz| (its gradient in z has L1 norm <= 2), plus
    float32 rounding of the sums over batch, classes and terms."""
    batch, classes = np.shape(logits[0])
    return (2 * terms * FORWARD_RTOL * max_abs(logits)
            + U32 * batch * classes * terms * abs(loss))


def update_errors(init, ref, got, trainable):
    """Per variable: |dw_got - dw_ref| / bound, where dw = w - w0 and the
    bound is UPDATE_RTOL |dw_ref| plus the rounding of storing w in float32
    each step. A value > 1 fails."""
    steps = backend_check.TRAINING["steps"]
    out = {}
    for path in trainable:
        w0, r, g = (np.asarray(d[path]) for d in (init, ref, got))
        bound = (UPDATE_RTOL * np.linalg.norm(r - w0)
                 + steps * U32 * np.linalg.norm(w0) + 1e-30)
        out[path] = float(np.linalg.norm(g - r) / bound)
    return out


def test_training_check_can_fail(tf_reference, monkeypatch):
    """The weight comparison of `test_dks_model_on_backend` sees a teacher
    that receives gradient and weight decay that is not applied."""
    ref = tf_reference["training"]
    worst = lambda run: max(update_errors(ref["init"], ref["weights"], run["weights"],
                                          ref["trainable"]).values())
    no_decay = backend_check.run_training(weight_decay=0.0)
    assert worst(no_decay) > 10, worst(no_decay)

    def no_stop_gradient(target_logits, logits, temperature=1.0):
        t, z = target_logits / temperature, logits / temperature
        return -keras.ops.sum(keras.ops.softmax(t) * keras.ops.log_softmax(z), axis=-1)

    monkeypatch.setattr(keras_dks.losses, "soft_cross_entropy", no_stop_gradient)
    teacher_gets_gradient = backend_check.run_training()
    assert worst(teacher_gets_gradient) > 10, worst(teacher_gets_gradient)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dks_model_on_backend(backend, backend_run, tf_reference):
    got = backend_run(backend)
    assert got["backend"] == backend
    assert "TensorFlow feature" in got["tf_only_error"]
    assert "KERAS_BACKEND=tensorflow" in got["tf_only_error"]
    for case in backend_check.CASES:
        ref, r = tf_reference[case], got[case]
        terms = len(r["ce"]) + len(r["head_names"]) * (len(r["head_names"]) - 1)
        # Same loss as NumPy (from this backend's logits: float32 rounding of
        # the loss only) and as TensorFlow (also the logits' rounding).
        np.testing.assert_allclose(r["loss"], r["numpy_loss"], rtol=0,
                                   atol=loss_atol(r["loss"], [np.zeros((8, 4))], terms))
        atol = loss_atol(ref["loss"], ref["logits"], terms)
        np.testing.assert_allclose(r["loss"], ref["loss"], rtol=0, atol=atol)
        np.testing.assert_allclose(r["ce"], ref["ce"], rtol=0, atol=atol)
        np.testing.assert_allclose(r["synergy"], ref["synergy"], rtol=0, atol=atol)
        z_atol = FORWARD_RTOL * max_abs(ref["logits"])
        for a, b in zip(r["logits"], ref["logits"]):
            np.testing.assert_allclose(a, b, rtol=0, atol=z_atol)
        # Per-head logs: every head's CE and accuracy, against its own head.
        assert r["head_names"] == ref["head_names"]
        trained = r["trained_logits"]
        ce_atol = loss_atol(max(v for k, v in r["eval_refs"].items()
                                if k.endswith("ce_loss")), trained, 1)
        for key, value in r["eval_refs"].items():
            np.testing.assert_allclose(r["eval_logs"][key], value, rtol=0,
                                       atol=0 if key.endswith("accuracy") else ce_atol,
                                       err_msg=f"{case} {key}")
        assert set(r["fit_logs"]) >= set(r["eval_refs"]) | {"loss", "synergy_loss"}
        assert all(np.isfinite(v) for v in r["fit_logs"].values())
        # The trained model's main logits, however obtained, are its eager
        # call's; every head survives the .keras round trip.
        z_atol = FORWARD_RTOL * max_abs(trained)
        for key in ("predict", "inference"):
            np.testing.assert_allclose(r[key], trained[0], rtol=0, atol=z_atol,
                                       err_msg=f"{case} {key}")
        for a, b in zip(r["reload"], trained):
            np.testing.assert_allclose(a, b, rtol=0, atol=z_atol, err_msg=f"{case} reload")
        assert r["inference_params"] == ref["inference_params"]
        assert r["reload_class"] == "DKSModel"
    # fit: the same weights as TensorFlow's after the same SGD steps (weight
    # decay, label smoothing, a pair list; test_training_check_can_fail shows
    # a teacher receiving gradient or a missing weight decay fails this).
    ref, r = tf_reference["training"], got["training"]
    assert r["iterations"] == ref["iterations"] == backend_check.TRAINING["steps"]
    assert r["trainable"] == ref["trainable"]
    for path in ref["init"]:
        np.testing.assert_array_equal(r["init"][path], ref["init"][path], err_msg=path)
    errors = update_errors(ref["init"], ref["weights"], r["weights"], ref["weights"])
    bad = {p: e for p, e in errors.items() if not e <= 1}
    assert not bad, f"updates differ from TensorFlow's beyond the bound: {bad}"


def test_jax_data_parallel_two_devices_trains_like_one(tmp_path):
    flags = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    got = _run("jax", tmp_path, "--data-parallel", env=flags)
    assert got["devices"] == 2
    one, two = got["one"], got["all"]
    # Two devices sum the batch's gradient in another order: float32
    # rounding only, bounded like the cross-backend updates.
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=UPDATE_RTOL)
    errors = update_errors(one["init"], one["weights"], two["weights"], one["weights"])
    bad = {p: e for p, e in errors.items() if not e <= 1}
    assert not bad, f"2-device updates differ from 1-device ones beyond the bound: {bad}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_dhm_model_on_backend(backend, backend_run, tf_reference):
    r = backend_run(backend)["dhm"]
    # Fixed location mask (aux_a1 off) and root: NumPy's and TensorFlow's
    # loss (2 heads, 2 pairs).
    ref = tf_reference["dhm"]
    np.testing.assert_allclose(r["loss"], r["numpy_loss"], rtol=0,
                               atol=loss_atol(r["loss"], [np.zeros((8, 4))], 4))
    np.testing.assert_allclose(r["loss"], ref["loss"], rtol=0,
                               atol=loss_atol(ref["loss"], ref["logits"], 4))
    # Compiled steps draw from their own step counter (a JAX step reading a
    # traced-in constant would repeat the first step's draw).
    # Also with a LossScaleOptimizer, whose counter is its inner optimizer's.
    for key in ("step", "loss_scale_step"):
        assert r[f"{key}_iterations"] == 4, key
        assert len({str(d) for d in r[f"{key}_draws"]}) > 1, r[f"{key}_draws"]
        # Same weights (lr 0), compiled vs eager: 4 convolutions of <= 18
        # terms round the logits by ~u * sqrt(18) * 4 = 1e-6 (relative), each
        # of the 4 loss terms moves by <= 2x that: 1e-5.
        np.testing.assert_allclose(r[f"{key}_logged"], r[f"{key}_eager"], rtol=1e-5,
                                   err_msg=key)
    assert all(np.isfinite(v) for v in r["fit_logs"].values())
    assert {"aux_a1_ce_loss", "aux_a2_a3_accuracy"} <= set(r["fit_logs"])
    assert r["reload_class"] == "DHMModel" and r["reload_matches"]
    assert np.isfinite(r["reload_fit_loss"])
