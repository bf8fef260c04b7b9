"""Real Fashion-MNIST offline: IDX files and a tf.data pipeline.

The IDX files are read from a folder (by default the one Debian's
`dataset-fashion-mnist` package installs), with `keras.datasets` as the
fallback (which downloads, so it needs internet access or Keras' cache).
"""

import gzip
import os
import struct

import numpy as np
import tensorflow as tf

from keras_dks.data import pipelines

# Where Debian's `dataset-fashion-mnist` package puts the four IDX .gz files.
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Pixel statistics of the training set, on the [0, 1] scale.
MEAN = 0.2860
STD = 0.3530
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# IDX type codes -> big-endian NumPy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path):
    """Read an IDX file (the MNIST format), gzip-compressed or not.

    Format: two zero bytes, a type code, the number of dimensions `d`, `d`
    big-endian uint32 sizes, then the data in C order.

    Args:
        path: file path; gzip is detected from the content, not the name.

    Returns:
        A NumPy array in native byte order (uint8 for images and labels).

    Raises:
        ValueError: not an IDX file, or a size that does not match the
            header.

    Example:
    ```python
    labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    labels.shape   # (10000,)
    ```
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}).")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of data) but "
            f"the file holds {len(raw) - header} bytes."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find(data_dir, stem):
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Neither {stem}.gz nor {stem} in {data_dir}: expected the four "
        "Fashion-MNIST IDX files (on Debian/Ubuntu: apt-get install "
        "dataset-fashion-mnist)."
    )


def default_data_dir():
    """Debian's Fashion-MNIST folder when installed, else None."""
    return DEBIAN_DIR if os.path.isdir(DEBIAN_DIR) else None


def load_data(data_dir=None):
    """Fashion-MNIST as NumPy arrays, like `keras.datasets.fashion_mnist`.

    Args:
        data_dir: folder with the four IDX files (`.gz` or not). None: the
            Debian package's folder when present, else
            `keras.datasets.fashion_mnist.load_data()` (downloads once).

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images
        `(n, 28, 28)` and uint8 labels `(n,)`.

    Example:
    ```python
    (x_train, y_train), (x_test, y_test) = load_data()
    ```
    """
    data_dir = data_dir or default_data_dir()
    if data_dir is None:
        import keras

        return keras.datasets.fashion_mnist.load_data()
    out = []
    for split in ("train", "test"):
        images, labels = (read_idx(_find(data_dir, stem)) for stem in FILES[split])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{data_dir}: {split} images {images.shape} and labels "
                f"{labels.shape} do not form an (n, h, w) / (n,) pair."
            )
        out.append((images, labels))
    return tuple(out)


def subset(x, y, n, seed=1234):
    """A fixed random subset of `n` examples (all when `n` is falsy or too big)."""
    if not n or n >= len(x):
        return x, y
    idx = np.random.default_rng(seed).permutation(len(x))[:n]
    return x[idx], y[idx]


def make_dataset(
    x,
    y,
    training,
    batch_size,
    padding=4,
    seed=None,
    repeat=False,
    drop_remainder=False,
    with_index=False,
    augment=True,
):
    """Batched `(images, labels)`: `(batch, 28, 28, 1)` float32, normalised.

    Training adds the CIFAR recipe's augmentation at 28x28: reflect-pad,
    random crop back to 28x28, random horizontal flip, and shuffling.

    Args:
        x: uint8 images `(n, 28, 28)` or `(n, 28, 28, 1)`.
        y: integer labels `(n,)`.
        training: augment and shuffle.
        batch_size: batch size.
        padding: reflection padding of the random crop.
        seed: shuffle seed.
        repeat: repeat forever (for `fit(steps_per_epoch=...)`).
        drop_remainder: drop the last partial batch.
        augment: with `training`, apply the augmentation (False: shuffle
            only).
        with_index: yield `((images, index), labels)`, `index` being each
            example's position in the data before shuffling (SRDL's
            example index, see `keras_dks.data.pipelines.with_index`).

    Example:
    ```python
    (x, y), (xt, yt) = load_data()
    train = make_dataset(x, y, training=True, batch_size=128)
    ```
    """
    from keras_dks.data import cifar

    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    dataset = tf.data.Dataset.from_tensor_slices((x, np.asarray(y).astype("int64")))
    if with_index:  # before shuffling: the index names the example
        from keras_dks.data.pipelines import with_index as add_index

        dataset = add_index(dataset)
    if training:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()

    def preprocess(image, label):
        if with_index:
            image, index = image
        if training and augment:
            image = cifar.augment(image, padding)
        image = pipelines.normalize(image, MEAN, STD)
        return ((image, index), label) if with_index else (image, label)

    dataset = dataset.map(preprocess, num_parallel_calls=pipelines.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(pipelines.AUTOTUNE)
