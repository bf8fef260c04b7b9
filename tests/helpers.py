"""Shared test helpers (plain functions; `conftest.py` exposes fixtures).

Import with `from helpers import ...` (pytest puts `tests/` on the path).
"""

import os
import shutil
import subprocess
import tempfile
import zlib

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


def np_dks_loss(logits, labels_onehot, alphas, pairs, betas, smoothing=0.0, w=None):
    """The DKS objective in NumPy: weighted CE of every head plus the synergy
    terms, (student, teacher) pairs with teacher probabilities as targets."""
    c = labels_onehot.shape[-1]
    targets = labels_onehot * (1 - smoothing) + smoothing / c
    b = labels_onehot.shape[0]
    w = np.ones(b) if w is None else w
    per = np.zeros(b)
    for a, z in zip(alphas, logits):
        per += a * -(targets * np_log_softmax(z)).sum(-1)
    for (s, t), beta in zip(pairs, betas):
        p_t = np.exp(np_log_softmax(logits[t]))
        per += beta * -(p_t * np_log_softmax(logits[s])).sum(-1)
    return (w * per).sum() / b


def learnable_data(n=96, classes=3, seed=0):
    """Images whose class is the brightest channel: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(scale=0.3, size=(n, 16, 16, 3)).astype("float32")
    x[np.arange(n), :, :, y] += 1.0  # the class is the brightest channel
    return x, y


def set_weights_by_path(model):
    """He-normal kernels, zero biases, unit BN scales, each seeded by the
    variable's path: the same weights on every backend and in every run."""
    for v in model.weights:
        rng = np.random.default_rng(zlib.crc32(v.path.encode()))
        shape = tuple(v.shape)
        name = v.path.split("/")[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
            value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        elif name in ("gamma", "moving_variance"):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        v.assign(value.astype(v.dtype))


def stage_backbone(size=8, name="stages"):
    """Stem + three stride-2 stages; stage ends s1 (4x4), s2 (2x2), s3."""
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inp)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="s1")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="s2")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="s3")(x)
    return keras.Model(inp, x, name=name)


def require_fashion_mnist_package():
    """The folder of Debian's dataset-fashion-mnist; fails (does not skip)
    with the fix when the package is missing: a test input, like a test
    dependency."""
    from keras_dks.data import fashion_mnist

    assert os.path.isdir(fashion_mnist.DEBIAN_DIR), (
        f"{fashion_mnist.DEBIAN_DIR} is missing: this test reads the real Fashion-MNIST "
        "files of Debian's dataset-fashion-mnist package. Install it: `make data` (as root), "
        "or `sudo apt-get install dataset-fashion-mnist`."
    )
    return fashion_mnist.DEBIAN_DIR


def offline_command(command):
    """`(command, extra environment)` that run `command` with the network
    truly unreachable: in a new network namespace (`unshare -n`: no
    interface up, not even DNS) when this user may create one, else with
    every proxy variable pointing at a closed local port (requests, which
    TFDS downloads with, then reaches nothing)."""
    unshare = subprocess.run(["unshare", "-n", "true"], capture_output=True) if shutil.which(
        "unshare") else None
    if unshare is not None and unshare.returncode == 0:
        return ["unshare", "-n"] + command, {}
    closed = "http://127.0.0.1:9"  # the discard port, closed unless a service runs
    return command, {k: closed for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                                         "https_proxy", "all_proxy")} | {"NO_PROXY": "",
                                                                          "no_proxy": ""}
