"""SRDL: the paper's recipe as the default, clear errors for bad inputs, the
same training on TensorFlow, JAX and PyTorch.

The recipe numbers are the SRDL paper's (Lan, Zhu & Gong, ACCV 2018,
section 4, "Implementation Details"): "SGD with Nesterov momentum ...
mini-batch size 128, the initial learning rate 0.1, the weight decay 0.0002,
and the momentum 0.9 ... the learning rate drops by 0.1 at the 50% and 75%
epochs", T = 3, applied to each stage (stage-complete schedule, Eq. 4).
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dks import methods
from keras_dks.methods import SRDL
from keras_dks.methods import srdl as srdl_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data(n=16, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, 4, 4, 3)).astype("float32"), rng.integers(0, classes, n)


def logits_net():
    return keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(5)])


class CountBatches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.batches += 1


# ---------------------------------------------------------------------------
# The paper's recipe
# ---------------------------------------------------------------------------
def test_paper_recipe_is_the_srdl_papers():
    assert srdl_lib.PAPER_RECIPE == {
        "learning_rate": 0.1, "momentum": 0.9, "nesterov": True, "drops": (0.5, 0.75),
        "decay": 0.1, "weight_decay": 2e-4, "batch_size": 128, "temperature": 3.0,
    }
    srdl = SRDL(logits_net, epochs=4)
    assert srdl.weight_decay == 2e-4 and srdl.temperature == 3.0
    optimizer = srdl.optimizer_fn(1000)  # 1000 optimizer steps per stage
    assert optimizer.nesterov and optimizer.momentum == pytest.approx(0.9)
    lr = optimizer._learning_rate  # the schedule (learning_rate is its current value)
    # The update at step 500 (0-based: the first of the second half) is the
    # first at the lower rate, as PyTorch's MultiStepLR at an epoch boundary.
    got = [float(lr(s)) for s in (0, 499, 500, 749, 750, 999)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    # Your own optimizer may decay weights itself: no L2 unless asked for.
    own = SRDL(logits_net, epochs=4, optimizer_fn=lambda n: keras.optimizers.SGD(0.1))
    assert own.weight_decay == 0.0


def test_cifar_example_srdl_runs_the_srdl_papers_recipe_unless_overridden():
    code = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from absl import flags
        import keras
        import cifar100_wrn as ex
        out = []
        for argv in (["--method", "srdl"],
                     ["--method", "srdl", "--weight_decay", "5e-4", "--lr_decay", "0.2",
                      "--lr_boundaries", "60,120,160", "--nonesterov"]):
            flags.FLAGS.unparse_flags()
            flags.FLAGS(["cifar100_wrn.py"] + argv)
            recipe = ex.srdl_recipe()
            steps = 391  # CIFAR, batch 128; a stage of 100 epochs
            opt = ex.srdl_optimizer_fn(recipe, steps)(100 * steps)
            opt = getattr(opt, "inner_optimizer", opt)  # under a SkipNonFinite
            schedule = keras.optimizers.schedules.deserialize(opt.get_config()["learning_rate"])
            lrs = [float(schedule(e * steps + d)) for e in (30, 50, 75) for d in (-1, 0)]
            out.append(dict(recipe, lrs=lrs, nesterov_opt=bool(opt.nesterov),
                            momentum_opt=float(opt.momentum)))
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "examples")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paper, overridden = json.loads(proc.stdout.strip().splitlines()[-1])
    assert paper["weight_decay"] == 2e-4 and paper["nesterov"] and paper["nesterov_opt"]
    assert paper["momentum_opt"] == pytest.approx(0.9)
    # lr 0.1, x0.1 at epochs 50 and 75 of a 100-epoch stage (not the DKS
    # recipe's x0.2 at 30/60/80).
    np.testing.assert_allclose(paper["lrs"], [0.1, 0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)
    # Flags given on the command line win; boundaries halved into the stage.
    assert overridden["weight_decay"] == 5e-4 and not overridden["nesterov_opt"]
    # (DKS boundaries 60,120,160 -> 30,60,80 of the stage: x0.2 at 30 and 60.)
    np.testing.assert_allclose(overridden["lrs"], [0.1, 0.02, 0.02, 0.02, 0.004, 0.004], rtol=1e-6)


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "last",
    [
        lambda: [keras.layers.Dense(5, activation="softmax")],
        lambda: [keras.layers.Dense(5), keras.layers.Softmax()],
        lambda: [keras.layers.Dense(5), keras.layers.Activation("sigmoid")],
    ],
)
def test_srdl_rejects_a_classifier_that_outputs_probabilities(last):
    x, y = data()
    built = []

    def model_fn():
        built.append(1)
        return keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten()] + last())

    counter = CountBatches()
    with pytest.raises(ValueError, match=r"outputs logits.*Dense\(num_classes\)"):
        SRDL(model_fn, epochs=2).fit(x, y, verbose=0, callbacks=[counter])
    assert counter.batches == 0 and len(built) == 1  # before any training
    # A nested model and a functional keras.ops.softmax are seen through too.
    inputs = keras.Input((4, 4, 3))
    probs = keras.ops.softmax(keras.layers.Dense(5)(keras.layers.Flatten()(inputs)))
    with pytest.raises(ValueError, match="outputs logits"):
        methods.SRDLModel(keras.Model(inputs, probs))
    with pytest.raises(ValueError, match="outputs logits"):
        methods.SRDLModel(keras.Sequential([model_fn()]))


def test_srdl_rejects_out_of_range_labels_with_the_range():
    x, y = data()
    bad = y.copy()
    bad[3] = 7
    counter = CountBatches()
    # NumPy labels: before stage 1 starts.
    with pytest.raises(ValueError, match=r"in \[0, 5\).*label \S*7\b"):
        SRDL(logits_net, epochs=2).fit(x, bad, batch_size=8, verbose=0, callbacks=[counter])
    assert counter.batches == 0
    negative = y.copy()
    negative[0] = -1
    with pytest.raises(ValueError, match=r"in \[0, 5\).*label \S*-1\b"):
        SRDL(logits_net, epochs=2).fit(x, negative, verbose=0)
    # A tf.data pipeline: at its first bad batch, as a ValueError too (not
    # the raw InvalidArgumentError of the cross-entropy op).
    for labels in (bad, negative):
        ds = methods.with_index(tf.data.Dataset.from_tensor_slices((x, labels))).batch(8)
        with pytest.raises(ValueError, match=r"SRDL labels must be integer class indices in \[0, 5\)"):
            SRDL(logits_net, epochs=2).fit(ds, verbose=0)
    # Fine labels still train.
    history1, history2 = SRDL(logits_net, epochs=2).fit(x, y, batch_size=8, verbose=0)
    assert np.isfinite(history2.history["loss"][-1])


# ---------------------------------------------------------------------------
# Every backend
# ---------------------------------------------------------------------------
BACKEND_SCRIPT = """
import json, sys
import numpy as np
import keras
from keras_dks.methods import SRDL, SRDLModel


def main(path):

    def net():
        model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                                  keras.layers.Dense(8, activation="relu"), keras.layers.Dense(5)])
        rng = np.random.default_rng(3)
        model.set_weights([rng.normal(0, 0.3, w.shape).astype("float32") for w in model.get_weights()])
        return model

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, 4, 4, 3)).astype("float32")
    y = rng.integers(0, 5, 16)
    srdl = SRDL(net(), epochs=4, restart=False, weight_decay=1e-3,
                optimizer_fn=lambda steps: keras.optimizers.SGD(0.1, momentum=0.9))
    h1, h2 = srdl.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    # A label outside [0, 5) and an index outside the table: NaN loss off TensorFlow.
    trainer = srdl.trainers[1]
    logits = srdl.model(x[:4])
    index = np.arange(4)
    def loss_or_error(**kwargs):
        try:
            return float(keras.ops.convert_to_numpy(trainer.compute_loss(y_pred=logits, **kwargs)))
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    bad_label = loss_or_error(x=(x[:4], index), y=np.array([0, 1, 7, 2]))
    bad_index = loss_or_error(x=(x[:4], index + 14), y=y[:4])
    json.dump(dict(
        backend=keras.backend.backend(),
        table=srdl.soft_targets.tolist(),
        stage1=[w.tolist() for w in srdl.stage1_model.get_weights()],
        stage2=[w.tolist() for w in srdl.model.get_weights()],
        loss2=h2.history["loss"], distill=h2.history["distill_loss"],
        good=loss_or_error(x=(x[:4], index), y=y[:4]), bad_label=bad_label, bad_index=bad_index,
    ), open(path, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
"""


def run_on_backend(backend, tmp_path):
    """BACKEND_SCRIPT's record: in this (TensorFlow) process, or in a
    subprocess with KERAS_BACKEND=backend."""
    out = tmp_path / f"{backend}.json"
    if backend == keras.backend.backend():
        namespace = {"__name__": "srdl_backend"}
        exec(BACKEND_SCRIPT, namespace)
        namespace["main"](str(out))
        return json.loads(out.read_text())
    script = tmp_path / "srdl_backend.py"
    script.write_text(BACKEND_SCRIPT)
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    if backend != "tensorflow":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


_REFERENCE = {}


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_srdl_trains_the_same_on_every_backend(backend, tmp_path):
    """Both stages (8 SGD steps, the soft-target table, the stage-2 KL on
    its rows, weight decay) on JAX / PyTorch give TensorFlow's numbers."""
    if "tensorflow" not in _REFERENCE:
        _REFERENCE["tensorflow"] = run_on_backend("tensorflow", tmp_path)
    want = _REFERENCE["tensorflow"]
    got = run_on_backend(backend, tmp_path)
    assert got["backend"] == backend
    # float32, 8 steps of a 2-layer net: each step's rounding (~1e-7
    # relative) compounds over 8 steps and 2 stages; 1e-5 leaves ~10x.
    np.testing.assert_allclose(got["table"], want["table"], rtol=1e-5, atol=1e-6)
    for stage in ("stage1", "stage2"):
        for a, b in zip(got[stage], want[stage]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["loss2"], want["loss2"], rtol=1e-5)
    # The KL is a difference of two sums of t * log(.) ~ log(5) each, times
    # T^2 = 9: float32 rounding leaves ~1e-6 * 9 * log(5) absolute.
    np.testing.assert_allclose(got["distill"], want["distill"], rtol=1e-5,
                               atol=1e-6 * 9 * np.log(5))
    assert min(want["distill"]) > 0  # the KL term is on and logged
    assert np.isfinite(got["good"]) and np.isclose(got["good"], want["good"], rtol=1e-5)
    # TensorFlow fails the step (tests above); an index outside the table
    # gives a NaN loss elsewhere; a label outside [0, 5) too, unless the
    # backend's own cross-entropy raises first (PyTorch's runs eagerly).
    assert isinstance(want["bad_label"], str) and "keras_dks SRDL" in want["bad_label"]
    assert isinstance(want["bad_index"], str) and "soft-target table" in want["bad_index"]
    assert np.isnan(got["bad_index"])
    if backend == "jax":
        assert np.isnan(got["bad_label"])
    else:
        assert np.isnan(got["bad_label"]) if not isinstance(got["bad_label"], str) else (
            "out of bounds" in got["bad_label"]), got["bad_label"]
