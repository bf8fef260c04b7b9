"""DKSModel on JAX and PyTorch (Keras' own trainers run `compute_loss`).

Each backend runs `backend_check.py` in a subprocess (the backend is fixed
at import). Its loss on the same NumPy weights and batch must equal the
NumPy reference and the TensorFlow value computed here; fit / evaluate /
predict / inference_model / `.keras` round trip must work, and per-head
logs must match per-head references. A tiny DHMModel trains, draws per
step inside compiled steps and reloads; TensorFlow-only features (tf.distribute,
SRDL) raise an error naming the fix. JAX DataParallel on 2 CPU devices
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="drives the other backends from the TensorFlow run",
)


# With `--dist loadgroup` (setup.cfg) a backend's tests share one xdist
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
    keras.utils.set_random_seed(0)
    ref = {case: backend_check.run_case(case, loss_only=True)
           for case in backend_check.CASES}
    ref["dhm"] = backend_check.run_dhm(loss_only=True)
    return ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_dks_model_on_backend(backend, backend_run, tf_reference):
    got = backend_run(backend)
    assert got["backend"] == backend
    assert "TensorFlow feature" in got["tf_only_error"]
    assert "KERAS_BACKEND=tensorflow" in got["tf_only_error"]
    assert "TensorFlow feature" in got["srdl_error"]
    assert "KERAS_BACKEND=tensorflow" in got["srdl_error"]
    for case in backend_check.CASES:
        ref, r = tf_reference[case], got[case]
        # Same loss as NumPy (from this backend's logits) and as TensorFlow.
        np.testing.assert_allclose(r["loss"], r["numpy_loss"], rtol=1e-5)
        np.testing.assert_allclose(r["loss"], ref["loss"], rtol=1e-4)
        np.testing.assert_allclose(r["ce"], ref["ce"], rtol=1e-4)
        np.testing.assert_allclose(r["synergy"], ref["synergy"], rtol=1e-4)
        for a, b in zip(r["logits"], ref["logits"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        # Per-head logs: every head's CE and accuracy, against its own head.
        assert r["head_names"] == ref["head_names"]
        for key, value in r["eval_refs"].items():
            np.testing.assert_allclose(r["eval_logs"][key], value, rtol=1e-4,
                                       err_msg=f"{case} {key}")
        assert set(r["fit_logs"]) >= set(r["eval_refs"]) | {"loss", "synergy_loss"}
        assert all(np.isfinite(v) for v in r["fit_logs"].values())
        assert r["predict_matches"] and r["inference_matches"]
        assert r["inference_params"] == ref["inference_params"]
        assert r["reload_matches"] and r["reload_class"] == "DKSModel"


def test_jax_data_parallel_two_devices_trains_like_one(tmp_path):
    flags = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    got = _run("jax", tmp_path, "--data-parallel", env=flags)
    assert got["devices"] == 2
    one, two = got["one"], got["all"]
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    for path, w in one["weights"].items():
        np.testing.assert_allclose(two["weights"][path], w, rtol=1e-4, atol=1e-5,
                                   err_msg=path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dhm_model_on_backend(backend, backend_run, tf_reference):
    r = backend_run(backend)["dhm"]
    # Fixed location mask (aux_a1 off) and root: NumPy's and TensorFlow's loss.
    np.testing.assert_allclose(r["loss"], r["numpy_loss"], rtol=1e-5)
    np.testing.assert_allclose(r["loss"], tf_reference["dhm"]["loss"], rtol=1e-4)
    # Compiled steps draw from their own step counter (a JAX step reading a
    # traced-in constant would repeat the first step's draw).
    # Also with a LossScaleOptimizer, whose counter is its inner optimizer's.
    for key in ("step", "loss_scale_step"):
        assert r[f"{key}_iterations"] == 4, key
        assert len({str(d) for d in r[f"{key}_draws"]}) > 1, r[f"{key}_draws"]
        np.testing.assert_allclose(r[f"{key}_logged"], r[f"{key}_eager"], rtol=1e-5,
                                   err_msg=key)
    assert all(np.isfinite(v) for v in r["fit_logs"].values())
    assert {"aux_a1_ce_loss", "aux_a2_a3_accuracy"} <= set(r["fit_logs"])
    assert r["reload_class"] == "DHMModel" and r["reload_matches"]
    assert np.isfinite(r["reload_fit_loss"])
