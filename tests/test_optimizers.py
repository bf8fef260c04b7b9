"""keras_dks.optimizers.SkipNonFinite on a plain Keras model: a skipped step
changes nothing but its count; it composes with LossScaleOptimizer and
serialises. (DKSModel on TensorFlow and JAX: test_trainer.py.)"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import keras

from keras_dks.optimizers import SkipNonFinite, SkippedStepsLogger, skipped_steps


def _model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    out = keras.layers.Dense(3)(keras.layers.Dense(5, activation="relu")(inp))
    return keras.Model(inp, out)


def _values(variables):
    return [np.array(v) for v in variables]


def _batches():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 4)).astype("float32")
    y = rng.integers(0, 3, 8)
    bad = x.copy()
    bad[1, 2] = np.nan
    return x, y, bad


@pytest.mark.parametrize("loss_scale", [False, True])
def test_a_skipped_step_changes_nothing_but_its_count(loss_scale):
    model = _model()
    opt = SkipNonFinite(keras.optimizers.SGD(0.1, momentum=0.9))
    if loss_scale:
        opt = keras.optimizers.LossScaleOptimizer(opt)
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y, bad = _batches()
    model.train_on_batch(x, y)
    weights, states = _values(model.weights), _values(model.optimizer.variables)
    model.train_on_batch(bad, y)
    for a, b in zip(weights, _values(model.weights)):
        np.testing.assert_array_equal(a, b)
    # Variable names without the optimizer's path: Keras numbers optimizer
    # names per process ("loss_scale_optimizer_1"), so paths depend on what
    # ran before in the same worker.
    changed = [v.name for v, a in zip(model.optimizer.variables, states)
               if not np.array_equal(a, np.array(v))]
    if loss_scale:
        # The loss-scale optimizer sees the overflow first: it halves its
        # scale and skips; SkipNonFinite never sees the step.
        assert sorted(changed) == ["dynamic_scale", "step_counter"]
        assert skipped_steps(model.optimizer) == 0
    else:
        assert changed == ["skipped_steps"]
        assert skipped_steps(model.optimizer) == 1
    assert int(model.optimizer.iterations) == 1
    model.train_on_batch(x, y)
    assert int(model.optimizer.iterations) == 2
    assert any(not np.array_equal(a, b) for a, b in zip(weights, _values(model.weights)))


def test_wrapping_order_and_arguments_are_checked():
    with pytest.raises(ValueError, match="LossScaleOptimizer outside"):
        SkipNonFinite(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)))
    with pytest.raises(ValueError, match="set them on the inner optimizer"):
        SkipNonFinite(keras.optimizers.SGD(0.1), clipnorm=1.0)
    with pytest.raises(ValueError, match="keras.optimizers.Optimizer instance"):
        SkipNonFinite("sgd")
    opt = SkipNonFinite(keras.optimizers.SGD(0.1))
    opt.learning_rate = 0.05  # schedules and callbacks set the inner rate
    np.testing.assert_allclose(float(opt.inner_optimizer.learning_rate), 0.05)


def test_serialises_and_keeps_its_state_through_save(tmp_path):
    model = _model()
    model.compile(optimizer=SkipNonFinite(keras.optimizers.SGD(0.1, momentum=0.9)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y, bad = _batches()
    model.train_on_batch(x, y)
    model.train_on_batch(bad, y)
    config = keras.saving.serialize_keras_object(model.optimizer)
    back = keras.saving.deserialize_keras_object(config)
    assert isinstance(back, SkipNonFinite)
    assert back.inner_optimizer.get_config() == model.optimizer.inner_optimizer.get_config()
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, SkipNonFinite)
    assert skipped_steps(loaded.optimizer) == 1
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_logger_counts_the_epochs_skipped_steps():
    model = _model()
    model.compile(optimizer=SkipNonFinite(keras.optimizers.SGD(0.1)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y, bad = _batches()
    xs = np.concatenate([x, bad, x])
    ys = np.concatenate([y, y, y])
    h = model.fit(xs, ys, batch_size=8, epochs=2, shuffle=False, verbose=0,
                  callbacks=[SkippedStepsLogger()])
    assert h.history["skipped_steps"] == [1.0, 1.0]
    assert skipped_steps(model.optimizer) == 2
    assert int(model.optimizer.iterations) == 4


_MIRRORED = textwrap.dedent(
    """
    import json
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    from keras_dks.optimizers import SkipNonFinite, skipped_steps
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(24, 4)).astype("float32")
    y = rng.integers(0, 3, 24)
    x[13, 1] = np.nan  # second global batch, second replica's half only
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inp = keras.Input((4,))
        out = keras.layers.Dense(3)(keras.layers.Dense(5, activation="relu")(inp))
        m = keras.Model(inp, out)
        m.compile(optimizer=SkipNonFinite(keras.optimizers.SGD(0.1, momentum=0.9)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    m.fit(ds.take(1), verbose=0)
    w = [np.array(v) for v in m.weights]
    o = [np.array(v) for v in m.optimizer.variables]
    m.fit(ds.skip(1).take(1), verbose=0)
    out = dict(
        same_weights=all(np.array_equal(a, np.array(b)) for a, b in zip(w, m.weights)),
        changed=[v.path for v, a in zip(m.optimizer.variables, o)
                 if not np.array_equal(a, np.array(v))],
        skipped=skipped_steps(m.optimizer))
    m.fit(ds.skip(2), verbose=0)
    out["iterations"] = int(m.optimizer.iterations.numpy())
    out["finite"] = all(np.isfinite(np.array(v)).all() for v in m.weights)
    print("RESULT" + json.dumps(out))
    """
)


def test_replicas_agree_on_the_skip_under_mirrored_strategy():
    """A NaN in one replica's half of the global batch skips the step on
    both replicas (each holds only its own gradients before the all-reduce)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _MIRRORED], capture_output=True,
                          text=True, env=env, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert r["same_weights"] and r["changed"] == ["skip_non_finite/skipped_steps"]
    assert r["skipped"] == 1 and r["iterations"] == 2 and r["finite"]
