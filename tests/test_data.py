"""Input pipelines: IDX parsing, CIFAR and ImageNet transforms, TFDS loading."""

import gzip
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from keras_dks.data import cifar, fashion_mnist, imagenet, pipelines
from helpers import offline_command, require_fashion_mnist_package


# ---------------------------------------------------------------------------
# IDX / Fashion-MNIST
# ---------------------------------------------------------------------------
def write_idx(path, array, type_code=0x08, compress=True):
    """Independent IDX writer: magic (0, 0, type, ndim), big-endian sizes, data."""
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    raw = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    raw += struct.pack(f">{array.ndim}I", *array.shape)
    raw += np.asarray(array, dtype=dtype).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(raw)


def write_fashion_dir(folder, n_train=12, n_test=6, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        image_file, label_file = fashion_mnist.FILES[split]
        write_idx(os.path.join(folder, image_file + ".gz"), images)
        write_idx(os.path.join(folder, label_file + ".gz"), labels)
        arrays[split] = (images, labels)
    return arrays


def test_read_idx_matches_written_arrays(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "img", images, compress=False)
    ints = rng.integers(-(2**31), 2**31 - 1, (7,), dtype=np.int64)
    write_idx(tmp_path / "ints", ints, type_code=0x0C, compress=False)
    floats = rng.normal(size=(2, 3)).astype(np.float32)
    write_idx(tmp_path / "floats.gz", floats, type_code=0x0D)

    for name in ("img.gz", "img"):
        out = fashion_mnist.read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (3, 5, 4)
        np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "ints"), ints)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "floats.gz"), floats)
    assert fashion_mnist.read_idx(tmp_path / "floats.gz").dtype.isnative


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion_mnist.read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", np.zeros((4, 2), np.uint8), compress=False)
    data = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        fashion_mnist.read_idx(tmp_path / "short")


def test_load_data_from_synthetic_dir(tmp_path):
    arrays = write_fashion_dir(tmp_path)
    (x, y), (xt, yt) = fashion_mnist.load_data(str(tmp_path))
    np.testing.assert_array_equal(x, arrays["train"][0])
    np.testing.assert_array_equal(y, arrays["train"][1])
    np.testing.assert_array_equal(xt, arrays["test"][0])
    np.testing.assert_array_equal(yt, arrays["test"][1])
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        fashion_mnist.load_data(str(tmp_path))


def test_load_data_debian_package():
    require_fashion_mnist_package()
    (x, y), (xt, yt) = fashion_mnist.load_data()
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    # Fashion-MNIST is balanced: 6000 / 1000 images per class.
    np.testing.assert_array_equal(np.bincount(y), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(yt), [1000] * 10)
    # The training-set statistics the pipeline normalises with.
    assert abs(x.mean() / 255 - fashion_mnist.MEAN) < 1e-3
    assert abs(x.std() / 255 - fashion_mnist.STD) < 1e-3


def test_fashion_pipeline_shapes_and_normalisation():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 10)
    test = fashion_mnist.make_dataset(x, y, training=False, batch_size=4)
    images = np.concatenate([b.numpy() for b, _ in test])
    expected = (x[..., None] / 255.0 - fashion_mnist.MEAN) / fashion_mnist.STD
    np.testing.assert_allclose(images, expected, atol=1e-5)
    train = fashion_mnist.make_dataset(x, y, training=True, batch_size=4, seed=1)
    xb, yb = next(iter(train))
    assert xb.shape == (4, 28, 28, 1) and xb.dtype == tf.float32 and yb.dtype == tf.int64
    sub_x, sub_y = fashion_mnist.subset(x, y, 3)
    assert len(sub_x) == 3 and fashion_mnist.subset(x, y, 0)[0] is x


def test_read_idx_rejects_truncated_header(tmp_path):
    write_idx(tmp_path / "img", np.zeros((2, 3, 3), np.uint8), compress=False)
    (tmp_path / "img").write_bytes((tmp_path / "img").read_bytes()[:9])
    with pytest.raises(ValueError, match="truncated IDX file"):
        fashion_mnist.read_idx(tmp_path / "img")


def test_load_data_names_a_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*dataset-fashion-mnist"):
        fashion_mnist.load_data(str(tmp_path / "nowhere"))
    write_fashion_dir(tmp_path)
    with pytest.raises(NotADirectoryError, match="is a file"):
        fashion_mnist.load_data(str(tmp_path / "train-images-idx3-ubyte.gz"))
    # The parent folder: names the missing files.
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        fashion_mnist.load_data(str(tmp_path.parent))


def test_load_data_rejects_files_of_another_dataset(tmp_path):
    write_fashion_dir(tmp_path)
    # CIFAR-like 32x32 images under Fashion-MNIST's names.
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((12, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="28x28: not the Fashion-MNIST files"):
        fashion_mnist.load_data(str(tmp_path))
    write_fashion_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8) * 20)
    with pytest.raises(ValueError, match="labels in \\[0, 100\\].*10 classes"):
        fashion_mnist.load_data(str(tmp_path))
    # Images and labels swapped.
    write_fashion_dir(tmp_path)
    os.replace(tmp_path / "t10k-labels-idx1-ubyte.gz", tmp_path / "x.gz")
    os.replace(tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz")
    os.replace(tmp_path / "x.gz", tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(ValueError, match="do not form an"):
        fashion_mnist.load_data(str(tmp_path))


def test_load_data_offline_fallback_names_the_fix(monkeypatch):
    import keras

    def offline():
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", "/nonexistent/fashion-mnist")
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist.*--data_dir"):
        fashion_mnist.load_data()


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(lambda x, y: (x.astype("float32") / 255, y), "uint8 in \\[0, 255\\]", id="float_images"),
        pytest.param(lambda x, y: (x[..., None].repeat(3, -1), y), "grayscale", id="rgb_images"),
        pytest.param(lambda x, y: (x, y[:-1]), "one integer label per image", id="label_count"),
        pytest.param(lambda x, y: (x, np.eye(10)[y]), "one-hot", id="one_hot_labels"),
        pytest.param(lambda x, y: (x, y + 10), "classes 0-9", id="labels_out_of_range"),
        pytest.param(lambda x, y: (x, y - 1.5), "classes 0-9", id="float_labels"),
        pytest.param(lambda x, y: (x[:0], y[:0]), "one integer label per image", id="no_examples"),
    ],
)
def test_fashion_pipeline_rejects_bad_arrays(change, message):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4) % 10
    with pytest.raises(ValueError, match=message):
        fashion_mnist.make_dataset(*change(x, y), training=True, batch_size=2)


def test_fashion_pipeline_rejects_bad_sizes():
    x, y = np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        fashion_mnist.make_dataset(x, y, training=False, batch_size=0)
    with pytest.raises(ValueError, match="padding 28 does not fit 28x28"):
        fashion_mnist.make_dataset(x, y, training=True, batch_size=2, padding=28)
    with pytest.raises(ValueError, match="subset size must be >= 0"):
        fashion_mnist.subset(x, y, -1)


# ---------------------------------------------------------------------------
# CIFAR pipeline
# ---------------------------------------------------------------------------
def cifar_like(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 100, n).astype(np.int64)
    return x, y


def np_normalise(x):
    return (x / 255.0 - np.array(cifar.MEAN)) / np.array(cifar.STD)


def test_cifar_test_split_normalised_and_deterministic():
    x, y = cifar_like()
    raw = tf.data.Dataset.from_tensor_slices((x, y))
    test = cifar.make_dataset(raw, training=False, batch_size=5)
    first = [(a.numpy(), b.numpy()) for a, b in test]
    second = [(a.numpy(), b.numpy()) for a, b in test]
    images = np.concatenate([a for a, _ in first])
    assert images.dtype == np.float32 and images.shape == (16, 32, 32, 3)
    np.testing.assert_allclose(images, np_normalise(x), atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([b for _, b in first]), y)  # stored order
    for (a1, b1), (a2, b2) in zip(first, second):
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(b1, b2)
    # The paper's statistics.
    np.testing.assert_allclose(np.array(cifar.MEAN) * 255, [125.3, 123.0, 113.9])
    np.testing.assert_allclose(np.array(cifar.STD) * 255, [63.0, 62.1, 66.7])


def test_cifar_training_crops_are_windows_of_the_reflect_padded_image():
    x, y = cifar_like(n=24, seed=3)
    tf.random.set_seed(0)
    raw = tf.data.Dataset.from_tensor_slices((x, np.arange(24)))  # label = index
    train = cifar.make_dataset(raw, training=True, batch_size=8, seed=0)
    offsets, flips = set(), []
    for images, idx in train:
        assert images.shape[1:] == (32, 32, 3) and images.dtype == tf.float32
        for image, i in zip(images.numpy(), idx.numpy()):
            padded = np_normalise(np.pad(x[i], ((4, 4), (4, 4), (0, 0)), mode="reflect"))
            match = [
                (dy, dx, flip)
                for dy in range(9)
                for dx in range(9)
                for flip in (False, True)
                if np.allclose(
                    image,
                    padded[dy : dy + 32, dx : dx + 32][:, ::-1] if flip else padded[dy : dy + 32, dx : dx + 32],
                    atol=1e-5,
                )
            ]
            assert len(match) == 1, "not a flipped/unflipped window of the padded image"
            offsets.add(match[0][:2])
            flips.append(match[0][2])
    assert 0 < sum(flips) < len(flips), "the flip never / always happened"
    assert len(offsets) > 5, "crops do not move"


def test_cifar_augment_flip_only():
    image = tf.constant(cifar_like(1)[0][0])
    outs = [cifar.augment(image, padding=0).numpy() for _ in range(20)]
    flipped = [np.array_equal(o, image.numpy()[:, ::-1]) for o in outs]
    same = [np.array_equal(o, image.numpy()) for o in outs]
    assert all(f or s for f, s in zip(flipped, same))
    assert any(flipped) and any(same)


def test_cifar_resize_for_other_image_sizes():
    raw = tf.data.Dataset.from_tensor_slices(
        (np.zeros((4, 40, 40, 1), np.uint8), np.zeros(4, np.int64))
    )
    ds = cifar.make_dataset(raw, training=True, batch_size=4, image_size=32, mean=0.5, std=0.25)
    assert next(iter(ds))[0].shape == (4, 32, 32, 1)


def _raw(images, labels):
    return tf.data.Dataset.from_tensor_slices((images, labels))


@pytest.mark.parametrize(
    "dataset, kwargs, message",
    [
        # TFDS without as_supervised: a dict per example.
        pytest.param(lambda x, y: tf.data.Dataset.from_tensor_slices({"image": x, "label": y}),
                     {}, "as_supervised=True", id="dict_elements"),
        pytest.param(lambda x, y: _raw(x, y).batch(4), {}, "already batched", id="batched"),
        # Already scaled to [0, 1]: would be divided by 255 a second time.
        pytest.param(lambda x, y: _raw(x.astype("float32") / 255, y), {}, "uint8 in \\[0, 255\\]",
                     id="float_images"),
        pytest.param(lambda x, y: _raw(x, np.eye(100)[y]), {}, "one-hot", id="one_hot_labels"),
        pytest.param(lambda x, y: _raw(x, y.astype("float32")), {}, "integer class indices",
                     id="float_labels"),
        # Grayscale data with the 3-channel CIFAR statistics would come out
        # as 3 channels.
        pytest.param(lambda x, y: _raw(x[..., :1], y), {},
                     "3 mean values for images with 1 channel", id="stats_channels"),
        pytest.param(lambda x, y: _raw(x, y), dict(mean=(125.3, 123.0, 113.9)),
                     "0-255 statistics", id="stats_0_255"),
        pytest.param(lambda x, y: _raw(x, y), dict(std=(0.2, 0.0, 0.2)), "std must be > 0",
                     id="zero_std"),
        pytest.param(lambda x, y: _raw(x, y), dict(padding=32), "padding 32 does not fit 32x32",
                     id="padding"),
        pytest.param(lambda x, y: _raw(x, y), dict(batch_size=0), "batch_size must be a positive",
                     id="batch_size_0"),
        pytest.param(lambda x, y: _raw(x, y), dict(batch_size=2.5),
                     "batch_size must be a positive", id="batch_size_float"),
    ],
)
def test_cifar_pipeline_rejects_bad_inputs(dataset, kwargs, message):
    x, y = cifar_like(n=4)
    kwargs = dict(dict(training=True, batch_size=2), **kwargs)
    with pytest.raises(ValueError, match=message):
        cifar.make_dataset(dataset(x, y), **kwargs)


def test_cifar_pipeline_varying_sizes_need_image_size():
    raw, _ = varying_images([(40, 50), (36, 36)])
    with pytest.raises(ValueError, match="varying size.*image_size"):
        cifar.make_dataset(raw, training=False, batch_size=2)
    ds = cifar.make_dataset(raw, training=True, batch_size=2, image_size=32)
    assert next(iter(ds))[0].shape == (2, 32, 32, 3)


# ---------------------------------------------------------------------------
# ImageNet pipeline
# ---------------------------------------------------------------------------
def varying_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    return tf.data.Dataset.from_generator(
        lambda: ((im, np.int64(k)) for k, im in enumerate(images)),
        output_signature=(
            tf.TensorSpec((None, None, 3), tf.uint8),
            tf.TensorSpec((), tf.int64),
        ),
    ), images


def test_imagenet_training_batches():
    raw, _ = varying_images([(50, 40), (33, 61), (24, 24), (80, 30)])
    ds = imagenet.make_dataset(raw, training=True, batch_size=4, image_size=32,
                               augment="random_resized", crop="inception")
    xb, yb = next(iter(ds))
    assert xb.shape == (4, 32, 32, 3) and xb.dtype == tf.float32
    assert sorted(yb.numpy()) == [0, 1, 2, 3]
    # Normalised with the ImageNet statistics: values within [-mean/std, (1-mean)/std].
    lo = -np.array(imagenet.MEAN) / np.array(imagenet.STD)
    hi = (1 - np.array(imagenet.MEAN)) / np.array(imagenet.STD)
    assert np.all(xb.numpy() >= lo - 1e-4) and np.all(xb.numpy() <= hi + 1e-4)


def test_imagenet_center_crop_against_numpy():
    # image_size 28 -> shorter side resized to round(28 * 256 / 224) = 32;
    # a 32x40 image needs no resize, so the result is its central window.
    raw, images = varying_images([(32, 40), (40, 32)])
    ds = imagenet.make_dataset(raw, training=False, batch_size=2, image_size=28,
                               eval_resize="shorter_side")
    xb = next(iter(ds))[0].numpy()
    mean, std = np.array(imagenet.MEAN), np.array(imagenet.STD)
    np.testing.assert_allclose(xb[0], (images[0][2:30, 6:34] / 255 - mean) / std, atol=1e-4)
    np.testing.assert_allclose(xb[1], (images[1][6:34, 2:30] / 255 - mean) / std, atol=1e-4)
    # Larger images: resized so the shorter side is 256, then 224 crop.
    big = imagenet.center_crop(tf.zeros((300, 500, 3), tf.uint8), 224, resize="shorter_side")
    assert big.shape == (224, 224, 3)


def _smooth_image(h, w, seed=0):
    # Photo-like (smooth + noise), so bicubic resizers can be compared.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    wave = 60 * np.sin(xx / 17.0) * np.cos(yy / 11.0)
    image = 127 + wave[..., None] + rng.normal(0, 30, (h, w, 3))
    return image.clip(0, 255).astype(np.uint8)


def _pil_square(image, size):
    from PIL import Image

    resized = Image.fromarray(image).resize((size, size), Image.BICUBIC)
    return np.asarray(resized).astype(np.float32)


def _denormalize(x):
    return (x * np.array(imagenet.STD) + np.array(imagenet.MEAN)) * 255


def test_imagenet_evaluation_is_the_authors_square_bicubic_center_crop():
    # The DKS authors' imagenet/main.py: Scale([256, 256], PIL.Image.BICUBIC),
    # CenterCrop(224) (offset (256 - 224) / 2 = 16), ToTensor, Normalize.
    assert (imagenet.RESIZE_SIZE, imagenet.CROP_SIZE) == (256, 224)
    images = [_smooth_image(375, 500), _smooth_image(240, 200, seed=1)]
    raw = tf.data.Dataset.from_generator(
        lambda: ((im, np.int64(k)) for k, im in enumerate(images)),
        output_signature=(tf.TensorSpec((None, None, 3), tf.uint8), tf.TensorSpec((), tf.int64)),
    )
    xb = next(iter(imagenet.make_dataset(raw, training=False, batch_size=2)))[0].numpy()
    for got, image in zip(_denormalize(xb), images):
        want = _pil_square(image, 256)[16:240, 16:240]
        diff = np.abs(got - want)
        # Bilinear or a shorter-side resize would be off by tens of levels.
        assert diff.mean() < 0.5 and diff.max() <= 12, (diff.mean(), diff.max())


def test_imagenet_simple_training_augmentation_is_the_papers():
    # DKS paper 4.2 (ResNet-18/50): resize to 256x256, random 224x224 crop,
    # random horizontal flip. At image_size 56 the resize is
    # round(56 * 256 / 224) = 64, so the crop offsets range over 0..8.
    image = _smooth_image(90, 120)
    raw = tf.data.Dataset.from_tensors((image, np.int64(0))).repeat(24)
    ds = imagenet.make_dataset(raw, training=True, batch_size=24, image_size=56, seed=0)
    crops = _denormalize(next(iter(ds))[0].numpy())
    resized = _pil_square(image, 64)
    found = []
    for crop in crops:
        best = min(
            (np.abs(crop - (resized[:, ::-1] if flip else resized)[i:i + 56, j:j + 56]).mean(),
             i, j, flip)
            for i in range(9) for j in range(9) for flip in (False, True)
        )
        assert best[0] < 0.5, best  # a window of the resized square (or its mirror)
        found.append(best[1:])
    offsets = {(i, j) for i, j, _ in found}
    assert len(offsets) > 6 and {flip for *_, flip in found} == {False, True}


def test_imagenet_augmentation_per_architecture_is_the_papers():
    # DKS paper 4.2: "we train ResNet-18 and ResNet-50 with a simple data
    # augmentation method, and train ResNet-152 with a more aggressive data
    # augmentation method as in [41]".
    assert imagenet.paper_augmentation(18) == "simple"
    assert imagenet.paper_augmentation(50) == "simple"
    assert imagenet.paper_augmentation(152) == "random_resized"
    # Inception-style box distribution of the aggressive one.
    assert imagenet.AREA_RANGE == (0.08, 1.0)
    assert imagenet.ASPECT_RATIO_RANGE == (3 / 4, 4 / 3)
    with pytest.raises(ValueError, match="depth must be one of"):
        imagenet.paper_augmentation(200)


def test_imagenet_augmentation_arguments_are_checked():
    raw = tf.data.Dataset.from_tensors((tf.zeros((8, 8, 3), tf.uint8), np.int64(0)))
    with pytest.raises(ValueError, match="augment='random_resized'"):
        imagenet.make_dataset(raw, training=True, batch_size=1, crop="inception")
    with pytest.raises(ValueError, match="augment must be one of"):
        imagenet.make_dataset(raw, training=True, batch_size=1, augment="aggressive")
    with pytest.raises(ValueError, match="eval_resize must be one of"):
        imagenet.make_dataset(raw, training=False, batch_size=1, eval_resize="shorter")


def test_inception_crop_decodes_jpeg_window():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    jpeg = tf.io.encode_jpeg(image, quality=95)
    decoded = tf.io.decode_jpeg(jpeg)
    # Area 100 % of a square image with aspect 1: the box is the whole image,
    # so decoding only the window must equal decoding everything.
    kw = dict(area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0))
    from_string = imagenet.inception_crop(jpeg, 32, **kw)
    from_pixels = imagenet.inception_crop(decoded, 32, **kw)
    np.testing.assert_allclose(from_string.numpy(), from_pixels.numpy(), atol=1e-3)
    crops = [imagenet.inception_crop(jpeg, 16).numpy() for _ in range(3)]
    assert all(c.shape == (16, 16, 3) for c in crops)
    assert imagenet.center_crop(jpeg, 16).shape == (16, 16, 3)


def test_imagenet_keras_cv_crop():
    import keras_cv  # noqa: F401  (`make install` installs it; a missing one must fail)
    raw, _ = varying_images([(50, 40), (33, 61)])
    ds = imagenet.make_dataset(raw, training=True, batch_size=2, image_size=24,
                               augment="random_resized", crop="keras_cv")
    assert next(iter(ds))[0].shape == (2, 24, 24, 3)


# ---------------------------------------------------------------------------
# TFDS and throughput
# ---------------------------------------------------------------------------
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"


def write_cifar100_archive(path, splits):
    """A tar.gz in CIFAR-100's binary format (independent of TFDS).

    Each record: coarse label byte, fine label byte, then 3072 bytes: the
    red, green and blue 32x32 planes, each row-major.
    """
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(f"cifar-100-binary/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for name, (images, fine, coarse) in splits.items():
            records = [
                bytes([c, f]) + image.transpose(2, 0, 1).tobytes()
                for image, f, c in zip(images, fine, coarse)
            ]
            add(f"{name}.bin", b"".join(records))
        add("fine_label_names.txt", "\n".join(f"fine{k}" for k in range(100)).encode())
        add("coarse_label_names.txt", "\n".join(f"coarse{k}" for k in range(20)).encode())


def cache_cifar100_download(data_dir, n_train=6, n_test=4, seed=0):
    """Put a tiny CIFAR-100 archive where TFDS keeps a finished download.

    TFDS validates the checksum of every archive it downloads or finds in
    `manual_dir`, so a tiny archive can only enter as a download TFDS made
    earlier: `<data_dir>/downloads/cifar100/<name from URL and registered
    checksum>` plus its `.INFO` file. Everything after (extraction, the
    builder's parsing, writing and reading the records) is TFDS' real code.
    """
    import json

    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import resource

    rng = np.random.default_rng(seed)
    splits = {
        name: (
            rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 100, n, dtype=np.uint8),
            rng.integers(0, 20, n, dtype=np.uint8),
        )
        for name, n in (("train", n_train), ("test", n_test))
    }
    url_info = tfds.builder_cls("cifar100").url_infos[CIFAR100_URL]
    folder = os.path.join(data_dir, "downloads", "cifar100")
    os.makedirs(folder)
    path = os.path.join(folder, resource.get_dl_fname(CIFAR100_URL, url_info.checksum))
    write_cifar100_archive(path, splits)
    with open(path + ".INFO", "w") as f:
        json.dump({"urls": [CIFAR100_URL], "dataset_names": ["cifar100"],
                   "original_fname": "cifar-100-binary.tar.gz"}, f)
    return splits


def test_load_tfds_prepares_cifar100_from_a_real_archive(tmp_path):
    # The real download_and_prepare -> as_dataset -> pipeline path, offline.
    # Fails if a module TFDS needs on it is missing (importlib_resources in
    # tfds 4.9.10, tensorflow/datasets#11212) or its API changes.
    data_dir = str(tmp_path / "tfds")
    splits = cache_cifar100_download(data_dir)
    raw, info = pipelines.load_tfds("cifar100", "train", data_dir=data_dir)
    assert pipelines.image_spec(info) == ((32, 32, 3), 100)
    assert pipelines.num_examples(info, "train") == 6
    assert info.features["label"].names[:2] == ["fine0", "fine1"]
    # TFDS shuffles records when writing: match examples by their pixels.
    images, fine, _ = splits["train"]
    expected = {im.tobytes(): int(label) for im, label in zip(images, fine)}
    got = {im.numpy().tobytes(): int(label) for im, label in raw}
    assert got == expected
    # Prepared: the test split reads without downloading, through the pipeline.
    raw_test, _ = pipelines.load_tfds("cifar100", "test", data_dir=data_dir, download=False)
    batches = list(cifar.make_dataset(raw_test, training=False, batch_size=3))
    x = np.concatenate([b.numpy() for b, _ in batches])
    y = np.concatenate([l.numpy() for _, l in batches])
    assert x.shape == (4, 32, 32, 3) and y.dtype == np.int64
    by_label = {}
    for image, label in zip(*splits["test"][:2]):
        by_label.setdefault(int(label), []).append(np_normalise(image))
    for image, label in zip(x, y):
        assert any(np.allclose(image, ref, atol=1e-5) for ref in by_label[int(label)])
    train = cifar.make_dataset(raw, training=True, batch_size=4, seed=0)
    assert next(iter(train))[0].shape == (4, 32, 32, 3)


def test_load_tfds_mocked_cifar100(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=10):
        raw, info = pipelines.load_tfds("cifar100", "train", data_dir=str(tmp_path), shuffle_files=True)
        assert pipelines.image_spec(info) == ((32, 32, 3), 100)
        assert pipelines.num_examples(info, "train", raw) == 10
        ds = cifar.make_dataset(raw, training=True, batch_size=4)
        xb, yb = next(iter(ds))
        assert xb.shape == (4, 32, 32, 3) and xb.dtype == tf.float32
        # imagenet2012 keeps JPEG strings when asked to (decode in the crop).
        raw, info = pipelines.load_tfds("imagenet2012", "validation", data_dir=str(tmp_path), decode_images=False)
        image, _ = next(iter(raw))
        assert image.dtype == tf.string
        assert pipelines.image_spec(info)[1] == 1000


def test_load_tfds_unknown_name_suggests_close_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'cifar1000'. Did you mean 'cifar100'"):
        pipelines.load_tfds("cifar1000", "train", data_dir=str(tmp_path))


def test_load_tfds_without_download_needs_prepared_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="No prepared TFDS data for 'cifar10'.*--data_dir"):
        pipelines.load_tfds("cifar10", "train", data_dir=str(tmp_path), download=False)


def test_load_tfds_manual_dataset_without_archives(tmp_path):
    # Real TFDS code: imagenet2012 stops at its empty manual folder.
    (tmp_path / "manual").mkdir()
    with pytest.raises(RuntimeError, match="must be downloaded by hand.*--manual_dir"):
        pipelines.load_tfds("imagenet2012", "validation", data_dir=str(tmp_path),
                            manual_dir=str(tmp_path / "manual"))


def _offline_error():
    # The chain TFDS raises offline (after its retries): requests'
    # ConnectionError from urllib3's retries from the failed DNS look-up.
    import socket

    import requests

    try:
        raise socket.gaierror(-2, "Name or service not known")
    except socket.gaierror as e:
        try:
            raise requests.exceptions.ConnectionError(
                "HTTPSConnectionPool(host='www.cs.toronto.edu', port=443): Max retries exceeded"
            ) from e
        except requests.exceptions.ConnectionError as outer:
            return outer


def _checksum_error():
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    return NonMatchingChecksumError("Artifact ..., downloaded to ..., has wrong checksum")


@pytest.mark.parametrize(
    "error, message",
    [
        pytest.param(lambda: ModuleNotFoundError("No module named 'importlib_resources'",
                                                 name="importlib_resources"),
                     "module 'importlib_resources'.*pip install importlib_resources",
                     id="missing_module"),
        pytest.param(_offline_error, "no connection.*--data_dir", id="offline"),
        pytest.param(_checksum_error, "wrong checksum.*Delete it", id="bad_checksum"),
        pytest.param(lambda: PermissionError(13, "Permission denied"),
                     "Permission denied. Pass a writable data_dir", id="read_only"),
        pytest.param(lambda: ValueError("something else"),
                     "^Could not prepare TFDS dataset 'cifar100' in .*ValueError: something else",
                     id="other"),
    ],
)
def test_load_tfds_failed_preparation_names_the_cause(tmp_path, monkeypatch, error, message):
    import tensorflow_datasets as tfds

    def fail(self, *args, **kwargs):
        raise error()

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    # The message for each cause, whatever the network of this machine.
    monkeypatch.setattr(pipelines, "check_download_hosts", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match=message) as info:
        pipelines.load_tfds("cifar100", "train", data_dir=str(tmp_path))
    if "connection" not in message:
        # Only a network failure blames the network.
        assert "internet" not in str(info.value)


_OFFLINE_LOAD = textwrap.dedent(
    """
    import json, sys, time
    from keras_dks.data import pipelines
    found = {}
    for path in ("host_check", "tfds_download"):
        if path == "tfds_download":
            # TFDS' own download and retries (capped), without the check.
            pipelines.check_download_hosts = lambda *args, **kwargs: None
        start = time.monotonic()
        try:
            pipelines.load_tfds("cifar100", "train", data_dir=sys.argv[1] + "/" + path)
            found[path] = [None, "loaded"]
        except RuntimeError as e:
            found[path] = [time.monotonic() - start, str(e)]
    print("FOUND " + json.dumps(found))
    """
)


def test_load_tfds_offline_fails_within_seconds_naming_the_fix(tmp_path):
    """No network: cifar100, not prepared, fails in seconds (TFDS alone
    retries for ~3.5 minutes) with the message that names --data_dir, both
    at the host check and through TFDS' real download with capped retries."""
    command, env = offline_command([sys.executable, "-c", _OFFLINE_LOAD, str(tmp_path)])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=repo,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo, **env))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("FOUND ")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stderr[-3000:]
    found = json.loads(lines[0][len("FOUND "):])
    for path, (seconds, message) in found.items():
        assert seconds is not None, f"{path}: loaded without network?"
        assert message.startswith("Could not download TFDS dataset 'cifar100': no connection"), (
            path, message)
        assert "pass data_dir (--data_dir)" in message, message
        # Budget: the 10 s host timeout is not reached (no route fails at
        # once); TFDS' 3 capped retries wait 1.4 s.
        assert seconds < 15, (path, seconds, message)
    assert "www.cs.toronto.edu:443 is unreachable" in found["host_check"][1]
    assert "is unreachable" not in found["tfds_download"][1]


def test_measure_throughput():
    x, y = cifar_like(n=40)
    ds = cifar.make_dataset(tf.data.Dataset.from_tensor_slices((x, y)), training=True, batch_size=8)
    speed = pipelines.measure_throughput(ds, steps=100, warmup=1)
    assert speed["steps"] == 4  # 5 batches, one of them warm-up: a finite dataset ends early
    assert speed["images_per_second"] > 0 and speed["steps_per_second"] > 0
    # Shorter than the warm-up (a tiny smoke run): a second pass is timed,
    # not 0 images/s reported.
    short = pipelines.measure_throughput(ds.take(2), steps=50, warmup=5)
    assert short["steps"] == 2 and short["images_per_second"] > 0
    with pytest.raises(ValueError, match="no batches"):
        pipelines.measure_throughput(ds.take(0), steps=5)
    assert pipelines.steps_per_epoch(50000, 128) == 391
    assert pipelines.steps_per_epoch(50000, 128, drop_remainder=True) == 390
