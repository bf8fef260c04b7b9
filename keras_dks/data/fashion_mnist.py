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
    from keras_dks.data.fashion_mnist import read_idx
    labels = read_idx(
        "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    print(labels.shape, labels.dtype)   # (10000,) uint8
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
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX file ({len(raw)} bytes, the header of a "
            f"{ndim}-d array alone takes {header})."
        )
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
    if not os.path.exists(data_dir):
        raise FileNotFoundError(
            f"Fashion-MNIST folder {data_dir} does not exist: pass the folder holding "
            "the four IDX files (on Debian/Ubuntu: apt-get install "
            f"dataset-fashion-mnist, then {DEBIAN_DIR})."
        )
    if not os.path.isdir(data_dir):
        raise NotADirectoryError(
            f"{data_dir} is a file: pass the folder holding the four Fashion-MNIST "
            "IDX files, not one of them."
        )
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
    """Debian's Fashion-MNIST folder when installed, else None.

    Returns:
        `DEBIAN_DIR` (`"/usr/share/datasets/fashion-mnist"`) when it is a
        folder, else None.

    Example:
    ```python
    from keras_dks.data.fashion_mnist import default_data_dir
    print(default_data_dir())   # /usr/share/datasets/fashion-mnist, or None
    ```
    """
    return DEBIAN_DIR if os.path.isdir(DEBIAN_DIR) else None


def load_data(data_dir=None):
    """Fashion-MNIST as NumPy arrays, like `keras.datasets.fashion_mnist`.

    Args:
        data_dir: folder with the four IDX files (`.gz` or not). None (the
            default): the Debian package's folder when present, else
            `keras.datasets.fashion_mnist.load_data()` (downloads once).

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images
        `(n, 28, 28)` and uint8 labels `(n,)`.

    Raises:
        FileNotFoundError: no such folder, or a file missing in it.
        NotADirectoryError: `data_dir` is a file.
        ValueError: files that are not IDX, or not Fashion-MNIST (image
            size, label range, mismatched counts).
        RuntimeError: no folder and the `keras.datasets` download failed.

    Example:
    ```python
    from keras_dks.data.fashion_mnist import load_data
    (x_train, y_train), (x_test, y_test) = load_data()
    print(x_train.shape, x_test.shape)   # (60000, 28, 28) (10000, 28, 28)
    ```
    """
    data_dir = data_dir or default_data_dir()
    if data_dir is None:
        import keras

        try:
            return keras.datasets.fashion_mnist.load_data()
        except Exception as e:  # offline: urllib's error names no fix
            raise RuntimeError(
                "No Fashion-MNIST IDX folder given and keras.datasets could not "
                f"download it ({type(e).__name__}: {e}). Offline, install the IDX "
                f"files (Debian/Ubuntu: apt-get install dataset-fashion-mnist, "
                f"which puts them in {DEBIAN_DIR}) or pass their folder as "
                "data_dir (--data_dir)."
            ) from e
    out = []
    for split in ("train", "test"):
        paths = [_find(data_dir, stem) for stem in FILES[split]]
        images, labels = (read_idx(path) for path in paths)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{data_dir}: {split} images {images.shape} and labels "
                f"{labels.shape} do not form an (n, h, w) / (n,) pair."
            )
        if images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise ValueError(
                f"{paths[0]} holds {images.dtype} images of {images.shape[1]}x"
                f"{images.shape[2]}; Fashion-MNIST's are uint8 28x28: not the "
                "Fashion-MNIST files?"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
            raise ValueError(
                f"{paths[1]} holds labels in [{labels.min()}, {labels.max()}]; "
                f"Fashion-MNIST has {len(CLASS_NAMES)} classes (0-9): not the "
                "Fashion-MNIST label file?"
            )
        out.append((images, labels))
    return tuple(out)


def subset(x, y, n, seed=1234):
    """A fixed random subset of `n` examples (all when `n` is 0 or too big).

    Args:
        x: array of examples (indexed along axis 0).
        y: array of labels, same length as `x`.
        n: number of examples to keep, >= 0; 0 or `n >= len(x)` keeps all
            (`x` and `y` themselves are returned).
        seed: seed of the permutation (NumPy's `default_rng`). Defaults to
            `1234`.

    Returns:
        `(x_subset, y_subset)`, the same `n` examples of both.

    Raises:
        ValueError: `n` is None or negative.

    Example:
    ```python
    import numpy as np
    from keras_dks.data.fashion_mnist import subset
    x, y = np.zeros((100, 28, 28), np.uint8), np.arange(100) % 10
    xs, ys = subset(x, y, 10)
    print(xs.shape, ys.shape)   # (10, 28, 28) (10,)
    ```
    """
    if n is None or n < 0:
        raise ValueError(f"The subset size must be >= 0 (0: all), got {n}.")
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
        batch_size: batch size, a positive integer.
        padding: reflection padding of the random crop. Defaults to `4`.
        seed: shuffle seed. Defaults to `None`.
        repeat: repeat forever (for `fit(steps_per_epoch=...)`). Defaults
            to `False`.
        drop_remainder: drop the last partial batch. Defaults to `False`.
        with_index: yield `((images, index), labels)`, `index` being each
            example's position in the data before shuffling (SRDL's
            example index, see `keras_dks.data.pipelines.with_index`).
            Defaults to `False`.
        augment: with `training`, apply the augmentation (False: shuffle
            only). Defaults to `True`.

    Returns:
        A `tf.data.Dataset` of float32 `(batch, 28, 28, 1)` images,
        normalised with `MEAN` and `STD`, and int64 labels.

    Raises:
        ValueError: images that are not uint8 grayscale, labels that are not
            one class 0-9 per image, a padding too large, a bad batch size.

    Example:
    ```python
    from keras_dks.data.fashion_mnist import load_data, make_dataset, subset
    (x, y), (xt, yt) = load_data()
    x, y = subset(x, y, 1000)
    train = make_dataset(x, y, training=True, batch_size=128)
    images, labels = next(iter(train))
    print(images.shape, labels.shape)   # (128, 28, 28, 1) (128,)
    ```
    """
    from keras_dks.data import cifar

    x, y = np.asarray(x), np.asarray(y)
    pipelines.check_positive_int(batch_size, "batch_size")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(
            f"Images must be (n, 28, 28) or (n, 28, 28, 1) grayscale, got {x.shape}."
        )
    if x.dtype != np.uint8:
        raise ValueError(
            f"Images must be uint8 in [0, 255], got {x.dtype}: the pipeline scales "
            "by 1/255 itself (for images in [0, 1]: np.round(x * 255).astype('uint8'))."
        )
    if y.ndim != 1 or len(y) != len(x) or not len(x):
        raise ValueError(
            f"Need one integer label per image: {len(x)} images, labels of shape "
            f"{y.shape}" + (" (one-hot? use y.argmax(-1))" if y.ndim == 2 else "") + "."
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= len(CLASS_NAMES):
        raise ValueError(
            f"Labels must be integer classes 0-{len(CLASS_NAMES) - 1}, got {y.dtype} "
            f"values in [{y.min()}, {y.max()}]."
        )
    if training and augment and padding and not 0 < padding < min(x.shape[1:3]):
        raise ValueError(
            f"padding {padding} does not fit {x.shape[1]}x{x.shape[2]} images: "
            f"reflection padding needs 0 <= padding < {min(x.shape[1:3])}."
        )
    dataset = tf.data.Dataset.from_tensor_slices((x, y.astype("int64")))
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
