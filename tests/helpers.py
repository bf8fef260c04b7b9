"""Shared test helpers (plain functions; `conftest.py` exposes fixtures).

Import with `from helpers import ...` (pytest puts `tests/` on the path).
"""

import os
import tempfile

import keras
import numpy as np


STEMS = ("conv", "conv_bn", "block")


def tiny_backbone(bn=False, size=16, name="tiny", widths=(4, 8, 16), stem="conv"):
    """Stem + stride-2 stages; stage ends are s1, s2, ... (ReLU layers).

    Args:
        bn: BatchNormalization (`s<k>_bn`) before every stage's ReLU, and
            in a `"block"` stem.
        size: input height and width.
        name: model name.
        widths: filters of each stage.
        stem: `"conv"`, a 4-filter Conv2D named `stem`; `"conv_bn"`, the
            same followed by BatchNormalization `stem_bn`; `"block"`, Conv2D
            `stem_conv` (+ `stem_bn` if `bn`) + ReLU `stem`, a tappable
            stage like the others.
    """
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}.")
    inp = keras.Input((size, size, 3))
    if stem == "block":
        x = keras.layers.Conv2D(4, 3, padding="same", name="stem_conv")(inp)
        if bn:
            x = keras.layers.BatchNormalization(name="stem_bn")(x)
        x = keras.layers.ReLU(name="stem")(x)
    else:
        x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inp)
        if stem == "conv_bn":
            x = keras.layers.BatchNormalization(name="stem_bn")(x)
    for k, width in enumerate(widths, start=1):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", name=f"s{k}_conv")(x)
        if bn:
            x = keras.layers.BatchNormalization(name=f"s{k}_bn")(x)
        x = keras.layers.ReLU(name=f"s{k}")(x)
    return keras.Model(inp, x, name=name)


def data(n=32, size=16, classes=5, seed=0):
    """Uniform images and integer labels."""
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(size=(n, size, size, 3)).astype("float32"),
        rng.integers(0, classes, n),
    )


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def assert_serialization_round_trip(obj, inputs=None):
    """`obj` survives `serialize` -> `deserialize` with the same config, and
    a model also a `.keras` save / load with the same outputs on `inputs`.

    The one round-trip check applied to every registered keras_dks class
    (see `test_serialization.py`).
    """
    config = keras.saving.serialize_keras_object(obj)
    back = keras.saving.deserialize_keras_object(config)
    assert type(back) is type(obj)
    # Every plain constructor argument survives (nested objects such as a
    # wrapped backbone are checked through the outputs of the reloaded
    # model below).
    config2 = keras.saving.serialize_keras_object(back)
    for key, value in config["config"].items():
        if not isinstance(value, dict):
            assert config2["config"].get(key) == value, key
    if isinstance(obj, keras.Model):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.keras")
            obj.save(path)
            loaded = keras.saving.load_model(path)
        assert type(loaded) is type(obj)
        if inputs is not None:
            want = keras.tree.flatten(obj(inputs, training=False))
            got = keras.tree.flatten(loaded(inputs, training=False))
            assert len(want) == len(got)
            for a, b in zip(want, got):
                np.testing.assert_allclose(
                    keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
                    rtol=1e-5, atol=1e-6,
                )
    return back
