"""Golden run: the DKS numerics stay what was recorded.

A fixed seed, three float64 DKS training steps of WRN-16-1 (weight decay) and
of a keras.applications MobileNetV2 (conv heads, label smoothing, an explicit
pair list) on the TensorFlow backend; the losses of every step, the trained
model's logits and a fingerprint of every weight are compared with
`tests/golden/dks_golden.json`. The run is defined in `tests/golden/record.py`.

Initial weights are set by variable path from NumPy (He-normal kernels, zero
biases, unit BN scales), so the run does not depend on the order in which
layers draw from Keras' seed generator. Refactors that change only code
layout must keep this test green; a change of numerics must say so and
re-record with the separate command

    python tests/golden/record.py

(a test run never writes the reference). The run is float64 end to end, so
the recorded values hold on any x86-64 CPU, thread count and oneDNN setting
to the tolerance derived in `record.tolerance` (~1e-9 relative), while a
change of the loss, its gradient or the optimizer moves them by far more.
"""

import json

import keras
import numpy as np
import pytest

from golden import record

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="values recorded on the TensorFlow backend",
)


@pytest.mark.parametrize("case", sorted(record.CASES))
def test_golden_run(case):
    with open(record.GOLDEN) as f:
        want = json.load(f)[case]
    got = record.run_case(case)
    rtol = record.tolerance(case)
    assert len(got["logs"]) == len(want["logs"]) == record.STEPS
    for step, (g, w) in enumerate(zip(got["logs"], want["logs"])):
        assert sorted(g) == sorted(w), step
        # Every loss term (total, CE of every head, synergy).
        for key in sorted(k for k in w if k.endswith("loss")):
            np.testing.assert_allclose(g[key], w[key], rtol=rtol, atol=0,
                                       err_msg=f"step {step} {key}")
    for g, w in zip(got["eval_logits"], want["eval_logits"]):
        w = np.asarray(w)
        # Relative to the largest logit: small logits carry its rounding.
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * np.abs(w).max())
    assert sorted(got["weights"]) == sorted(want["weights"])
    for path, (norm, proj, size) in want["weights"].items():
        g_norm, g_proj, g_size = got["weights"][path]
        assert g_size == size, path
        # |d norm|, |d projection| <= |dw| (see record.fingerprint).
        tol = record.weight_tolerance(rtol, norm, size)
        assert abs(g_norm - norm) <= tol, (path, g_norm, norm, tol)
        assert abs(g_proj - proj) <= tol, (path, g_proj, proj, tol)
