"""The method family: registry, SRDL, KD (DHM: tests/test_dhm.py)."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dks
import helpers
from helpers import np_log_softmax, np_softmax, stage_backbone
from keras_dks import DKSModel
from keras_dks import methods
from keras_dks.methods import DHMModel, SRDL


def data(n=16, size=8, classes=5, seed=0):
    return helpers.data(n, size, classes, seed)


# --------------------------------------------------------------------------
# One switch
# --------------------------------------------------------------------------
def test_method_registry_and_kwargs():
    assert methods.METHODS == ("baseline", "ds", "dks", "dhm", "srdl")
    assert keras_dks.methods is methods
    assert methods.dks_kwargs("baseline") == {"taps": []}
    assert methods.dks_kwargs("ds") == {"pairs": "none"}
    assert methods.dks_kwargs("dks", pairs="top_down") == {"pairs": "top_down"}
    assert methods.dks_kwargs("dhm", head="conv") == {
        "pairs": "bidirectional", "head": "conv"
    }
    with pytest.raises(ValueError, match="SRDL"):
        methods.dks_kwargs("srdl")
    with pytest.raises(ValueError, match="Unknown method"):
        methods.dks_kwargs("kd")
    with pytest.raises(ValueError, match="baseline has no auxiliary"):
        methods.dks_kwargs("baseline", taps=["s1"])
    with pytest.raises(ValueError, match="DS has no synergy"):
        methods.dks_kwargs("ds", pairs="bidirectional")
    with pytest.raises(ValueError, match="method='dhm'"):
        methods.dks_kwargs("dks", roots=[["s1", "s2"]])

    built = {
        m: methods.build_model(m, stage_backbone(), num_classes=5, head="simple")
        for m in ("baseline", "ds", "dks", "dhm")
    }
    assert built["baseline"].head_names == ["main"]
    assert built["ds"].pair_list == [] and len(built["ds"].head_names) == 3
    assert len(built["dks"].pair_list) == 6 and built["dks"].pair_keep_prob == 1.0
    assert isinstance(built["dhm"], DHMModel) and built["dhm"].pair_keep_prob == 1.0
    assert built["dhm"].taps == built["dks"].taps  # roots="auto": DKS's taps
    assert built["dhm"].roots == built["dks"].taps


_MIRRORED = textwrap.dedent(
    """
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    sys_path = {path!r}
    import sys; sys.path.insert(0, sys_path)
    from test_methods import data
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    x, y = data(16)

    # SRDL stage 2: CE + T^2 KL is scaled for the replicas exactly once, so
    # one step on 2 replicas equals one step on a single device.
    from keras_dks.methods import SRDLModel
    from test_methods import small_net
    net = small_net()
    weights = net.get_weights()
    table = np.random.default_rng(0).dirichlet(np.ones(5), size=16).astype("float32")
    after = []
    for scope in (strategy.scope(), tf.distribute.get_strategy().scope()):
        with scope:
            copy = small_net()
            copy.set_weights(weights)
            trainer = SRDLModel(copy, soft_targets=table)
            trainer.compile(keras.optimizers.SGD(0.5),
                            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        trainer.fit((x, np.arange(16)), y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        after.append(copy.get_weights())
    for a, b in zip(*after):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(after[0][0], weights[0])
    print("OK")
    """
)


def test_srdl_loss_under_mirrored_strategy():
    code = _MIRRORED.format(path=os.path.dirname(__file__))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env,
        timeout=300,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# --------------------------------------------------------------------------
# SRDL
# --------------------------------------------------------------------------
def small_net():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(5, name="logits"),
        ]
    )


class LearningRateLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.stages = []

    def on_train_begin(self, logs=None):
        self.stages.append([])

    def on_train_batch_begin(self, batch, logs=None):
        self.stages[-1].append(float(self.model.optimizer.learning_rate))


def test_srdl_targets_restart_and_schedule():
    n, T = 48, 3.0
    x, y = data(n)
    created = []

    def model_fn():
        net = small_net()
        created.append([w.copy() for w in net.get_weights()])
        return net

    ds = (
        methods.with_index(tf.data.Dataset.from_tensor_slices((x, y)))
        .shuffle(n, seed=1, reshuffle_each_iteration=True)
        .batch(16)
    )
    lr_log = LearningRateLog()
    srdl = SRDL(
        model_fn, epochs=4, temperature=T,
        optimizer_fn=lambda steps: keras.optimizers.SGD(
            methods.step_decay(0.05, steps), momentum=0.9),
        metrics=["accuracy"],
    )
    h1, h2 = srdl.fit(ds, callbacks=[lr_log], verbose=0, validation_data=(x, y))
    assert srdl.stage_epochs == 2 and srdl.stage_steps == 6
    assert len(h1.history["loss"]) == len(h2.history["loss"]) == 2
    assert "distill_loss" in h2.history and "distill_loss" not in h1.history

    # The table is softmax(z / T) of the stage-1 model, row i = example i,
    # computed here independently by predicting all examples in order.
    z1 = srdl.stage1_model.predict(x, verbose=0)
    table = np_softmax(z1 / T)
    np.testing.assert_allclose(srdl.soft_targets, table, rtol=1e-5, atol=1e-7)

    # Under shuffling, the compiled stage-2 step gathers the stored
    # probabilities of the very examples in the batch...
    trainer = srdl.trainers[1]
    (images, index), labels = next(iter(ds))
    index = index.numpy()
    assert not np.array_equal(index, np.arange(16))  # really shuffled
    got = trainer.distillation_targets(index).numpy()
    np.testing.assert_allclose(got, table[index], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        got, np_softmax(srdl.stage1_model(images).numpy() / T), rtol=1e-5, atol=1e-7
    )
    # ... and its loss is CE + T^2 KL(stored || softmax(z / T)).
    z2 = srdl.model(images).numpy()
    log_q = np_log_softmax(z2 / T)
    kl = (got * (np.log(got) - log_q)).sum(-1).mean()
    ce = -np_log_softmax(z2)[np.arange(16), labels.numpy()].mean()
    loss = trainer.compute_loss(
        x=(images, index), y=labels, y_pred=trainer((images, index)), training=True
    )
    np.testing.assert_allclose(float(loss), ce + T**2 * kl, rtol=1e-4)
    # Evaluation is CE only (no index needed).
    loss_eval = trainer.compute_loss(
        x=images, y=labels, y_pred=trainer(images), training=False
    )
    np.testing.assert_allclose(float(loss_eval), ce, rtol=1e-4)

    # Restart: stage 2 started from new random weights (unseeded Keras
    # initialisers), neither stage 1's initial nor its final weights.
    assert len(created) == 2
    init1, init2 = created[0][0], created[1][0]  # conv kernels
    final1 = srdl.stage1_model.get_weights()[0]
    assert not np.allclose(init2, init1) and not np.allclose(init2, final1)
    assert not np.allclose(final1, init1)  # stage 1 did train

    # The schedule restarts: the same complete schedule in each stage.
    s1, s2 = lr_log.stages
    assert len(s1) == len(s2) == 6
    assert s2[0] == pytest.approx(0.05) and s1[0] == pytest.approx(0.05)
    assert s1[-1] == pytest.approx(0.0005) and s2 == pytest.approx(s1)


class StartWeights(keras.callbacks.Callback):
    def __init__(self, store):
        super().__init__()
        self.store = store

    def on_train_begin(self, logs=None):
        self.store.append(self.model.model.get_weights())


def test_srdl_numpy_inputs_no_restart_and_saving(tmp_path):
    x, y = data(24)
    starts = []
    srdl = SRDL(small_net(), epochs=2, restart=False)
    h1, h2 = srdl.fit(
        x, y, batch_size=8, verbose=0, callbacks=lambda stage: [StartWeights(starts)]
    )
    assert srdl.soft_targets.shape == (24, 5) and srdl.stage_steps == 3
    np.testing.assert_allclose(srdl.soft_targets.sum(-1), 1.0, rtol=1e-5)
    assert np.isfinite(h2.history["distill_loss"]).all()
    # restart=False (the paper's ablation): stage 2 continues from stage 1.
    for a, b in zip(starts[1], srdl.stage1_model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert srdl.model is not srdl.stage1_model
    # A stage-2 trainer saves and loads with its table.
    path = str(tmp_path / "stage2.keras")
    srdl.trainers[1].save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.soft_targets.numpy(), srdl.soft_targets)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), srdl.model.predict(x, verbose=0), rtol=1e-5
    )
    with pytest.raises(ValueError, match="even"):
        SRDL(small_net, epochs=3)
    stage2 = methods.SRDLModel(small_net(), soft_targets=np.full((4, 5), 0.2))
    stage2.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="index"):
        stage2.fit(x[:4], y[:4], epochs=1, verbose=0)


def test_srdl_weight_decay_is_coupled_l2_in_both_stages():
    """One plain-SGD step of each stage against NumPy: the update is
    lr * (dCE/dw + wd * w) for every variable, biases included."""
    x, y = data(8)
    lr, wd = 0.1, 0.05
    keras.utils.set_random_seed(3)
    net = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                            keras.layers.Dense(5, bias_initializer="ones")])
    w0, b0 = [v.copy() for v in net.get_weights()]
    trainer = methods.SRDLModel(net, weight_decay=wd)
    trainer.compile(keras.optimizers.SGD(lr),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trainer.fit((x, np.arange(8)), y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    flat = x.reshape(8, -1)
    p = np_softmax(flat @ w0 + b0)
    dz = (p - np.eye(5)[y]) / 8
    w1, b1 = net.get_weights()
    np.testing.assert_allclose(w1, w0 - lr * (flat.T @ dz + wd * w0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b1, b0 - lr * (dz.sum(0) + wd * b0), rtol=1e-4, atol=1e-6)
    # The stage-2 wrapper adds the same term to CE + T^2 KL.
    stage2 = methods.SRDLModel(net, soft_targets=np.full((8, 5), 0.2), weight_decay=wd)
    stage2.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    plain = methods.SRDLModel(net, soft_targets=np.full((8, 5), 0.2))
    plain.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    inputs = (x, np.arange(8))
    l2 = wd / 2 * sum((v ** 2).sum() for v in net.get_weights())
    np.testing.assert_allclose(
        float(stage2.compute_loss(x=inputs, y=y, y_pred=net(x), training=True)),
        float(plain.compute_loss(x=inputs, y=y, y_pred=net(x), training=True)) + l2,
        rtol=1e-5,
    )
    assert SRDL(small_net, epochs=2, weight_decay=wd).weight_decay == wd
    with pytest.raises(ValueError, match="weight_decay"):
        methods.SRDLModel(net, weight_decay=-1.0)


class DieInStage2(keras.callbacks.Callback):
    """Simulates a crash once the first epoch of stage 2 is backed up."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise SystemExit("crash")


def test_srdl_checkpoint_dir_resumes_without_rerunning_stage1(tmp_path):
    x, y = data(24)

    def run(checkpoint_dir, callbacks=None):
        keras.utils.set_random_seed(5)
        srdl = SRDL(small_net, epochs=4, metrics=["accuracy"],
                    optimizer_fn=lambda steps: keras.optimizers.SGD(
                        methods.step_decay(0.05, steps), momentum=0.9))
        histories = srdl.fit(x, y, batch_size=8, verbose=0, shuffle=False,
                             checkpoint_dir=checkpoint_dir, callbacks=callbacks)
        return srdl, histories

    reference, _ = run(None)
    ckpt = tmp_path / "srdl"
    with pytest.raises(SystemExit):
        run(str(ckpt), callbacks=lambda stage: [DieInStage2()] if stage == 2 else [])
    assert sorted(os.listdir(ckpt)) == ["soft_targets.npy", "stage1.weights.h5", "stage2"]
    np.testing.assert_allclose(np.load(ckpt / "soft_targets.npy"), reference.soft_targets,
                               rtol=1e-5, atol=1e-7)

    epochs = {1: [], 2: []}

    def record(stage):
        cb = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: epochs[stage].append(epoch))
        return [cb]

    resumed, (h1, h2) = run(str(ckpt), callbacks=record)
    assert h1 is None and epochs == {1: [], 2: [1]}  # stage 1 skipped, epoch 0 of stage 2 kept
    assert int(resumed.trainers[1].optimizer.iterations.numpy()) == 2 * 3
    for a, b in zip(reference.model.get_weights(), resumed.model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(reference.stage1_model.get_weights(), resumed.stage1_model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not ckpt.exists()  # completed: the next run starts afresh


def test_dataset_with_index_names_each_example():
    from keras_dks.data import fashion_mnist

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 20)
    ds = fashion_mnist.make_dataset(x, y, training=True, batch_size=7, padding=0,
                                    seed=1, with_index=True)
    seen = []
    for (images, index), labels in ds:
        for image, i, label in zip(images.numpy(), index.numpy(), labels.numpy()):
            expected = (x[i][..., None] / 255.0 - fashion_mnist.MEAN) / fashion_mnist.STD
            # Training flips at random: the image is example i or its mirror.
            assert (np.allclose(image, expected, atol=1e-5)
                    or np.allclose(image, expected[:, ::-1], atol=1e-5))
            assert label == y[i]
            seen.append(int(i))
    assert sorted(seen) == list(range(20)) and seen != list(range(20))  # shuffled
    # augment=False: shuffled, never flipped.
    plain = fashion_mnist.make_dataset(x, y, training=True, batch_size=20, seed=1,
                                       with_index=True, augment=False)
    (images, index), _ = next(iter(plain))
    expected = (x[index.numpy()][..., None] / 255.0 - fashion_mnist.MEAN) / fashion_mnist.STD
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-5)


# --------------------------------------------------------------------------
# KD with keras.distillation
# --------------------------------------------------------------------------
def test_distiller_with_dks_teacher():
    x, y = data(64, seed=1)
    dks = DKSModel(stage_backbone(), num_classes=5, taps=["s1"], head="simple")
    dks.compile(optimizer=keras.optimizers.Adam(0.01))
    dks.fit(x, y, epochs=2, batch_size=16, verbose=0)
    trainable = len(dks.trainable_variables)

    teacher = methods.frozen_teacher(dks)
    before = teacher.predict(x, verbose=0)
    np.testing.assert_allclose(before, dks.inference_model().predict(x, verbose=0), rtol=1e-5)
    assert not teacher.trainable_variables
    assert len(dks.trainable_variables) == trainable  # its own variables
    if not hasattr(keras, "distillation"):
        # keras.distillation arrived in Keras 3.12; the oldest supported
        # Keras (3.10) checks frozen_teacher alone.
        assert tuple(int(v) for v in keras.__version__.split(".")[:2]) < (3, 12)
        return
    student = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(5)]
    )
    distiller = keras.distillation.Distiller(
        teacher=teacher, student=student,
        distillation_losses=keras.distillation.LogitsDistillation(temperature=3.0),
        student_loss_weight=0.5,
    )
    distiller.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = distiller.fit(x, y, epochs=6, batch_size=16, verbose=0)
    losses = history.history["total_loss"]
    assert losses[-1] < losses[0], losses
    # The teacher is frozen, and the DKSModel it came from is untouched.
    np.testing.assert_array_equal(teacher.predict(x, verbose=0), before)
    assert len(dks.trainable_variables) == trainable

    # Why frozen_teacher copies: the raw inference model shares layers with
    # the DKSModel, and the Distiller freezes them.
    keras.distillation.Distiller(
        teacher=dks.inference_model(), student=student,
        distillation_losses=keras.distillation.LogitsDistillation(),
    )
    assert len(dks.trainable_variables) < trainable
