"""TensorBoard is installed with the package, and the examples' recipe writes
per-head scalars that TensorBoard's own event reader reads back."""

import importlib.util
import os
import re

import numpy as np
import pytest
import keras
import tensorflow as tf

from keras_dks import DKSModel, recipes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_dks():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3, padding="same", name="stem")(inp)
    for k in (1, 2):
        x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name=f"s{k}_conv")(x)
        x = keras.layers.ReLU(name=f"s{k}")(x)
    return DKSModel(keras.Model(inp, x, name="tiny"), num_classes=3, taps=["s1"], head="simple")


def read_scalars(folder):
    """{tag: [value per step]} of a run folder, read by TensorBoard's reader."""
    from tensorboard.backend.event_processing import event_accumulator

    reader = event_accumulator.EventAccumulator(folder, size_guidance={"tensors": 0})
    reader.Reload()
    return {
        tag: [float(tf.make_ndarray(event.tensor_proto)) for event in reader.Tensors(tag)]
        for tag in reader.Tags()["tensors"]
    }


def test_tensorboard_is_installed():
    # Required by the TensorFlow extras (TensorFlow >= 2.21 no longer pulls it in).
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    for extra in ("tensorflow", "tensorflow-cpu"):
        assert any(re.match(r"tensorboard[>=<]", r) for r in extras[extra]), extras[extra]
    assert importlib.util.find_spec("tensorboard") is not None
    assert recipes._has_tensorboard()


def test_train_writes_per_head_scalars(tmp_path):
    model = tiny_dks()
    model.compile(optimizer=keras.optimizers.SGD(0.05), metrics=["accuracy"])
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices(
        (rng.normal(size=(8, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 8))
    ).batch(4)
    model_dir = str(tmp_path / "run")
    result = recipes.train(
        model, data, data, epochs=2, model_dir=model_dir, verbose=0,
        save_model=False, plot=False,
    )
    history = result["history"]
    logs = os.path.join(model_dir, "logs")
    train, validation = read_scalars(os.path.join(logs, "train")), read_scalars(
        os.path.join(logs, "validation")
    )
    aux = model.head_names[1]
    for name in ("loss", "ce_loss", f"{aux}_ce_loss", "synergy_loss", "accuracy",
                 f"{aux}_accuracy"):
        np.testing.assert_allclose(train[f"epoch_{name}"], history[name], rtol=1e-6)
        np.testing.assert_allclose(
            validation[f"epoch_{name}"], history[f"val_{name}"], rtol=1e-6
        )
    assert len(train["epoch_loss"]) == 2
