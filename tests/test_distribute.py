"""DKSModel under tf.distribute: MirroredStrategy on 2 logical CPU devices and
MultiWorkerMirroredStrategy with 2 local worker processes.

Logical devices and multi-worker servers must be set up before TensorFlow
initialises, so every distributed run happens in a subprocess (with a
timeout, killed on failure) that saves weights and histories to tmp_path;
the comparisons happen here.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_dks
from keras_dks import DKSModel

# Its module-scoped fixtures run once: keep its tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("distribute")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240
EPS32 = float(np.finfo(np.float32).eps)  # 2^-23 = 1.19e-7


def tolerance(steps):
    """Relative/absolute gap allowed between N replicas and one device after
    `steps` SGD steps (momentum 0.9) on the tiny models below, in float32.

    Replicas add a step's gradient in a different grouping than one device:
    each of the ~6 chained layer reductions (<= 8 examples x 64 positions =
    512 terms) may round log2(512) = 9 more times, ~54 eps per step; the
    momentum sums weight the step errors 1, 1.9, 2.71, 3.44, ... Logged
    losses and metrics, one reduction further, stay inside the same bound.
    """
    accumulation = sum(
        sum(0.9**k for k in range(t)) for t in range(1, steps + 1)
    )
    return EPS32 * 6 * 9 * accumulation  # 3 steps: 3.6e-5; 4 steps: 5.8e-5


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def _write_script(directory, name, body):
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(COMMON + textwrap.dedent(body))
    return path


def _check(proc, out, err):
    assert proc.returncode == 0, (
        f"subprocess failed (rc={proc.returncode})\n--- stdout\n{out[-3000:]}"
        f"\n--- stderr\n{err[-6000:]}"
    )


def _run_all(cmds_envs, timeout=TIMEOUT):
    """Start every process, wait for all; kill them all on timeout/failure."""
    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for cmd, env in cmds_envs
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        pytest.fail(f"distributed subprocesses timed out after {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out, err in results:
        _check(p, out, err)
    return results


# Shared by the subprocess scripts: a tiny BN-free (or synchronized-BN)
# backbone with three resolutions (8x8 stem, 4x4 s1, 2x2 s2), so taps
# ["stem", "s1"] give three heads, and a BN-free conv head.
COMMON = textwrap.dedent(
    '''
    import json, os, sys
    import numpy as np

    def backbone(bn=False):
        import keras
        inp = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", name="stem_conv")(inp)
        if bn:
            x = keras.layers.BatchNormalization(synchronized=True, name="stem_bn")(x)
        x = keras.layers.ReLU(name="stem")(x)
        for k, w in enumerate([4, 8], start=1):
            x = keras.layers.Conv2D(
                w, 3, strides=2, padding="same", name=f"s{k}_conv")(x)
            if bn:
                x = keras.layers.BatchNormalization(
                    synchronized=True, name=f"s{k}_bn")(x)
            x = keras.layers.ReLU(name=f"s{k}")(x)
        return keras.Model(inp, x, name="tiny")

    def conv_head(features, num_downsamples, num_classes, name):
        import keras
        x = keras.layers.Conv2D(4, 3, padding="same", name=f"{name}_conv")(features)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
        x = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
        return keras.layers.Dense(num_classes, dtype="float32", name=name)(x)

    def arrays(n, seed, classes=5):
        rng = np.random.default_rng(seed)
        x = rng.uniform(size=(n, 8, 8, 3)).astype("float32")
        y = rng.integers(0, classes, n)
        w = rng.uniform(0.2, 2.0, n).astype("float32")
        return x, y, w

    def history(h):
        return {k: [float(v) for v in vs] for k, vs in h.history.items()}
    '''
)


# --------------------------------------------------------------------------
# MirroredStrategy, 2 logical CPU devices
# --------------------------------------------------------------------------
MIRRORED = '''
import contextlib
import tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_dks import DKSModel

out = sys.argv[1]
strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
assert strategy.num_replicas_in_sync == 2

# name -> (DKSModel kwargs, data options)
# Every case also saves the weights after its first step: with
# "bidirectional" (all DKS defaults, BN-free) that is the core issue's
# one-step test.
CASES = {
    "bidirectional": (dict(head=conv_head), dict(validate=True)),
    # Sample weights and one-hot labels under the strategy, once.
    "top_down": (dict(pairs="top_down", head="simple"),
                 dict(sample_weight=True, onehot=True)),
    # Custom pairs and weights, coupled L2, label smoothing and a layer
    # regularizer. (The named pair strategies differ only in the pair list,
    # checked in test_losses.py.)
    "custom": (dict(pairs=[(2, 0), (1, 2), (0, 1)], head=conv_head,
                    aux_weight=[0.5, 0.3], synergy_weight=[1.0, 2.0, 0.5],
                    weight_decay=5e-4, label_smoothing=0.1),
               dict(regularizer=True)),
    # Synchronized BN in the backbone and in the paper's residual heads.
    "sync_bn": (dict(pairs="bidirectional", head="residual", head_depth=1,
                     sync_batchnorm=True), dict(bn=True)),
}

class FirstStep(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self.weights = self.model.get_weights()

def make(kwargs, opts):
    bb = backbone(bn=opts.get("bn", False))
    if opts.get("regularizer"):
        bb.get_layer("s2_conv").kernel_regularizer = keras.regularizers.L2(1e-3)
    return DKSModel(bb, num_classes=5, taps=["stem", "s1"], seed=0, **kwargs)

def dataset(n, seed, opts):
    x, y, w = arrays(n, seed)
    y = np.eye(5, dtype="float32")[y] if opts.get("onehot") else y
    parts = (x, y, w) if opts.get("sample_weight") else (x, y)
    return tf.data.Dataset.from_tensor_slices(parts).batch(8)

results = {}
for name, (kwargs, opts) in CASES.items():
    keras.utils.set_random_seed(1)
    init = make(kwargs, opts).get_weights()
    np.savez(os.path.join(out, f"{name}_init.npz"), *init)
    train, val = dataset(24, 0, opts), dataset(16, 1, opts)  # 3 steps of 8
    for mode in ("single", "mirrored"):
        scope = strategy.scope() if mode == "mirrored" else contextlib.nullcontext()
        with scope:
            m = make(kwargs, opts)
            m.set_weights(init)
            m.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                      metrics=["accuracy"])
        # Validation (test_step under the strategy) only where it adds
        # something: tracing is most of the time here.
        first = FirstStep()
        h = m.fit(train, validation_data=val if opts.get("validate") else None,
                  epochs=1, verbose=0, callbacks=[first])
        np.savez(os.path.join(out, f"{name}_{mode}.npz"), *m.get_weights())
        np.savez(os.path.join(out, f"{name}_{mode}_step1.npz"), *first.weights)
        replica_gap = 0.0
        if mode == "mirrored":
            for v in m.variables:
                vals = [np.asarray(t) for t in v.value.values]
                replica_gap = max(replica_gap, float(np.max(np.abs(vals[0] - vals[1]))))
        results[f"{name}_{mode}"] = dict(
            history=history(h), iterations=int(m.optimizer.iterations.numpy()),
            replica_gap=replica_gap,
            replicas=strategy.num_replicas_in_sync if mode == "mirrored" else 1,
            sync=[l.name for l in m.layers
                  if isinstance(l, keras.layers.BatchNormalization) and l.synchronized],
        )
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f)
print("done")
'''

MIRRORED_CASES = ["bidirectional", "top_down", "custom", "sync_bn"]


@pytest.fixture(scope="module")
def mirrored_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored")
    script = _write_script(out, "mirrored.py", MIRRORED)
    _run_all([([sys.executable, script, str(out)], _env())])
    with open(out / "results.json") as f:
        return out, json.load(f)


def _load(path):
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


@pytest.mark.parametrize("case", MIRRORED_CASES)
def test_mirrored_equals_single_device(mirrored_runs, case):
    out, results = mirrored_runs
    single, mirrored = results[f"{case}_single"], results[f"{case}_mirrored"]
    assert mirrored["replicas"] == 2
    assert single["iterations"] == mirrored["iterations"] == 3
    # The weights moved, and moved the same way, after step 1 and step 3.
    init = _load(out / f"{case}_init.npz")
    for suffix in ("_step1", ""):
        w_single = _load(out / f"{case}_single{suffix}.npz")
        w_mirrored = _load(out / f"{case}_mirrored{suffix}.npz")
        assert len(w_single) == len(w_mirrored) == len(init)
        for a, b in zip(w_single, w_mirrored):
            np.testing.assert_allclose(b, a, atol=tolerance(3), rtol=tolerance(3))
    moved = [not np.allclose(a, b) for a, b in zip(init, w_single)]
    assert sum(moved) >= len(moved) - 2  # all but e.g. BN moving variances
    assert mirrored["replica_gap"] == 0.0  # both replicas hold the same copy
    # Logged losses and metrics (train and validation) are the same epoch means.
    hs, hm = single["history"], mirrored["history"]
    assert sorted(hs) == sorted(hm)
    assert {"loss", "ce_loss", "synergy_loss", "accuracy"} <= set(hs)
    if case == "bidirectional":
        assert {"val_loss", "val_synergy_loss", "val_accuracy"} <= set(hs)
    for key in hs:
        np.testing.assert_allclose(
            hm[key], hs[key], atol=tolerance(3), rtol=tolerance(3), err_msg=key
        )


def test_one_step_mirrored_equals_one_device(mirrored_runs):
    """Core issue: one step on 2 logical CPU devices under MirroredStrategy
    gives the weights of one device (BN-free DKS, default settings)."""
    out, _ = mirrored_runs
    init = _load(out / "bidirectional_init.npz")
    single = _load(out / "bidirectional_single_step1.npz")
    mirrored = _load(out / "bidirectional_mirrored_step1.npz")
    for a, b, c in zip(single, mirrored, init):
        np.testing.assert_allclose(b, a, atol=tolerance(1), rtol=tolerance(1))
        assert not np.array_equal(a, c)  # every weight took the step


def test_mirrored_sync_batchnorm_reaches_heads(mirrored_runs):
    _, results = mirrored_runs
    sync = results["sync_bn_mirrored"]["sync"]
    # Backbone BN (built synchronized) and every BN of the residual heads.
    assert {"stem_bn", "s1_bn", "s2_bn"} <= set(sync)
    assert any(name.startswith("aux_stem_") for name in sync)
    assert any(name.startswith("aux_s1_") for name in sync)
    assert results["bidirectional_mirrored"]["sync"] == []


def test_sync_batchnorm_heads_and_warning():
    def bb(synchronized):
        inp = keras.Input((8, 8, 3))
        x = inp
        for k, w in enumerate([4, 4, 8]):
            x = keras.layers.Conv2D(w, 3, strides=2 if k else 1, padding="same")(x)
            x = keras.layers.BatchNormalization(synchronized=synchronized)(x)
            x = keras.layers.ReLU(name=f"r{k}")(x)
        return keras.Model(inp, x)

    def head_bns(model):
        return [
            l for l in model.layers
            if isinstance(l, keras.layers.BatchNormalization) and l.name.startswith("aux_")
        ]

    plain = DKSModel(bb(False), num_classes=3, taps=["r1"])
    assert head_bns(plain) and not any(l.synchronized for l in head_bns(plain))
    # A backbone built with synchronized BN gets synchronized heads.
    follows = DKSModel(bb(True), num_classes=3, taps=["r1"])
    assert all(l.synchronized for l in head_bns(follows))
    # sync_batchnorm=True on an unsynchronized backbone: heads sync, and a
    # warning says the backbone's BN does not.
    with pytest.warns(UserWarning, match="not synchronized"):
        forced = DKSModel(bb(False), num_classes=3, taps=["r1"], sync_batchnorm=True)
    assert all(l.synchronized for l in head_bns(forced))


# --------------------------------------------------------------------------
# MultiWorkerMirroredStrategy, 2 worker processes on 127.0.0.1
# --------------------------------------------------------------------------
WORKER = '''
import keras_dks
# Before any other TensorFlow call: starts this worker's server (TF_CONFIG).
strategy = keras_dks.distribute.get_strategy("multi_worker")
import tensorflow as tf
import keras
from keras_dks import DKSModel

out = sys.argv[1]
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
assert strategy.num_replicas_in_sync == 2
assert keras_dks.distribute.is_multi_worker(strategy)

def dataset(n, seed):
    x, y, _ = arrays(n, seed)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # global batch
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return ds.with_options(options)

train, val = dataset(16, 0), dataset(16, 1)
result = {}

# Canary for keras-team/keras#20585: a plain Keras model still fails.
with strategy.scope():
    plain = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(5)])
    plain.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
try:
    plain.fit(train, epochs=1, verbose=0)
    result["plain_error"] = None
except Exception as e:
    msg = f"{type(e).__name__}: {e}"
    known = ("PerReplica" in msg and "unsupported type" in msg) or (
        "Invalid reduction dimension 0" in msg)
    result["plain_error"] = {"known": known, "message": msg[:300]}

keras.utils.set_random_seed(0)
with strategy.scope():
    model = DKSModel(backbone(), num_classes=5, taps=["stem", "s1"],
                     head=conv_head, seed=0)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])
assert keras_dks.distribute.multi_worker_model(model) is model
np.savez(os.path.join(out, f"init{task}.npz"), *model.get_weights())
h = model.fit(train, validation_data=val, epochs=2, verbose=0)
result["eval"] = [float(v) for v in model.evaluate(val, verbose=0)]
np.savez(os.path.join(out, f"final{task}.npz"), *model.get_weights())
result["history"] = history(h)
result["iterations"] = int(model.optimizer.iterations.numpy())
with open(os.path.join(out, f"worker{task}.json"), "w") as f:
    json.dump(result, f)
print("done")
'''


def _free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def multi_worker_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi_worker")
    script = _write_script(out, "worker.py", WORKER)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    runs = []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        runs.append(
            ([sys.executable, script, str(out)], _env(TF_CONFIG=json.dumps(tf_config)))
        )
    _run_all(runs)
    results = []
    for index in range(2):
        with open(out / f"worker{index}.json") as f:
            results.append(json.load(f))
    return out, results


def _single_process_reference(init):
    ns = {}
    exec(COMMON, ns)
    keras.utils.set_random_seed(0)
    model = DKSModel(
        ns["backbone"](), num_classes=5, taps=["stem", "s1"], head=ns["conv_head"], seed=0
    )
    model.set_weights(init)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"])

    def dataset(n, seed):
        x, y, _ = ns["arrays"](n, seed)
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)

    h = model.fit(dataset(16, 0), validation_data=dataset(16, 1), epochs=2, verbose=0)
    evaluation = [float(v) for v in model.evaluate(dataset(16, 1), verbose=0)]
    return model, ns["history"](h), evaluation


def test_multi_worker_fit_equals_single_process(multi_worker_runs):
    out, (w0, w1) = multi_worker_runs
    init0, init1 = _load(out / "init0.npz"), _load(out / "init1.npz")
    for a, b in zip(init0, init1):  # variables are broadcast from the chief
        np.testing.assert_array_equal(a, b)
    final0, final1 = _load(out / "final0.npz"), _load(out / "final1.npz")
    for a, b in zip(final0, final1):
        # Both workers apply the same all-reduced gradients: one rounding.
        np.testing.assert_allclose(a, b, atol=0, rtol=EPS32)
    assert w0["iterations"] == w1["iterations"] == 4  # 2 epochs x 2 global batches

    model, hist, evaluation = _single_process_reference(init0)
    assert int(model.optimizer.iterations.numpy()) == 4
    for a, b in zip(model.get_weights(), final0):
        np.testing.assert_allclose(b, a, atol=tolerance(4), rtol=tolerance(4))
    moved = [not np.allclose(a, b) for a, b in zip(init0, final0)]
    assert sum(moved) >= len(moved) - 1
    for w in (w0, w1):
        assert sorted(w["history"]) == sorted(hist)
        for key in hist:
            np.testing.assert_allclose(
                w["history"][key], hist[key], atol=tolerance(4),
                rtol=tolerance(4), err_msg=key,
            )
        np.testing.assert_allclose(
            w["eval"], evaluation, atol=tolerance(4), rtol=tolerance(4)
        )


def test_keras_20585_still_breaks_plain_models(multi_worker_runs):
    """Canary: when this fails, this Keras version fixed keras-team/keras#20585:
    `keras_dks.distribute.multi_worker_model` need not patch it there."""
    _, results = multi_worker_runs
    for r in results:
        assert r["plain_error"] is not None, (
            "A plain Keras model now trains under MultiWorkerMirroredStrategy: "
            "keras-team/keras#20585 looks fixed in this Keras version; make "
            "keras_dks.distribute.multi_worker_model a no-op on it."
        )
        assert r["plain_error"]["known"], r["plain_error"]["message"]


# --------------------------------------------------------------------------
# get_strategy
# --------------------------------------------------------------------------
def test_get_strategy_names(monkeypatch):
    assert keras_dks.distribute.get_strategy("default") is tf.distribute.get_strategy()
    mirrored = keras_dks.distribute.get_strategy("mirrored", devices=["CPU:0"])
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert not keras_dks.distribute.is_multi_worker(mirrored)
    with pytest.raises(ValueError, match="Unknown strategy 'tpu'"):
        keras_dks.distribute.get_strategy("tpu")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(ValueError, match="TF_CONFIG"):
        keras_dks.distribute.get_strategy("multi_worker")
    # Models built outside a multi-worker strategy take Keras' own path.
    ns = {}
    exec(COMMON, ns)
    model = DKSModel(ns["backbone"](), num_classes=3, taps=["s1"], head="simple")
    assert not keras_dks.distribute.needs_keras_20585_workaround(model)
    with mirrored.scope():
        model = DKSModel(ns["backbone"](), num_classes=3, taps=["s1"], head="simple")
    assert not keras_dks.distribute.needs_keras_20585_workaround(model)
    # ... and multi_worker_model leaves them as they are.
    step = model.train_step
    assert keras_dks.distribute.multi_worker_model(model) is model
    assert model.train_step == step and "_maybe_symbolic_build" not in vars(model)
