"""Shared tf.data pieces: TFDS loading, normalisation, pipeline throughput.

The dataset-specific pipelines (`keras_dks.data.cifar`,
`keras_dks.data.imagenet`, `keras_dks.data.fashion_mnist`) build on these.
"""

import math
import time

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def normalize(image, mean, std):
    """Cast to float32, scale to [0, 1], subtract `mean`, divide by `std`.

    Args:
        image: image tensor with values in [0, 255] (any dtype), channels
            last.
        mean, std: per-channel statistics on the [0, 1] scale (a scalar or
            one value per channel).

    Returns:
        A float32 tensor of the same shape.

    Example:
    ```python
    x = normalize(tf.zeros((32, 32, 3), tf.uint8), CIFAR_MEAN, CIFAR_STD)
    ```
    """
    image = tf.cast(image, tf.float32) / 255.0
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (image - mean) / std


def load_tfds(
    name,
    split,
    data_dir=None,
    manual_dir=None,
    shuffle_files=False,
    seed=None,
    decode_images=True,
    download=True,
):
    """A supervised `(image, label)` dataset and its `DatasetInfo` from TFDS.

    Prepares the dataset first if needed (`download_and_prepare`: downloads,
    or reads `manual_dir` for datasets such as `imagenet2012` whose archives
    must be fetched by hand). Works under `tfds.testing.mock_data`, which is
    how the tests run it offline.

    Args:
        name: TFDS name, e.g. `"cifar100"`, `"imagenet2012"`,
            `"imagenette/160px"`.
        split: TFDS split string, e.g. `"train"`, `"train[:5000]"`, `"test"`.
        data_dir: where the prepared data lives (TFDS default if None).
        manual_dir: folder holding manually downloaded archives.
        shuffle_files: read the record files in a random order (training).
        seed: seed of the file shuffling.
        decode_images: False keeps JPEG images as encoded strings
            (`tfds.decode.SkipDecoding`) so the training crop can decode
            only the crop window (`tf.image.decode_and_crop_jpeg`); images
            stored in other formats are decoded anyway.
        download: call `download_and_prepare` (a no-op when prepared). False
            reads prepared data only.

    Returns:
        `(dataset, info)`.

    Example:
    ```python
    train, info = load_tfds("cifar100", "train", shuffle_files=True)
    ```
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
            )
        except Exception as e:  # offline, or missing manual archives
            raise RuntimeError(
                f"Could not prepare TFDS dataset {name!r} ({type(e).__name__}: {e}). "
                "Without internet access, pass --data_dir pointing to prepared "
                "TFDS data (or --manual_dir holding the archives for manual "
                "datasets such as imagenet2012)."
            ) from e
    decoders = None
    image_key = builder.info.supervised_keys[0]
    feature = builder.info.features[image_key]
    if not decode_images and getattr(feature, "encoding_format", None) == "jpeg":
        decoders = {image_key: tfds.decode.SkipDecoding()}
    dataset = builder.as_dataset(
        split=split,
        as_supervised=True,
        shuffle_files=shuffle_files,
        decoders=decoders,
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    return dataset, builder.info


def num_examples(info, split, dataset=None):
    """Examples in a TFDS split; counts `dataset` when the info lacks them.

    `info.splits` understands slices (`"train[:10%]"`); mocked datasets have
    no split metadata, so the dataset's cardinality (or a count) is used.
    """
    try:
        return int(info.splits[split].num_examples)
    except Exception:  # mocked data or unknown split
        if dataset is None:
            raise
    n = int(dataset.cardinality())
    if n >= 0:
        return n
    return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))


def image_spec(info):
    """`(shape, num_classes)` of a supervised image dataset's `DatasetInfo`."""
    image_key, label_key = info.supervised_keys
    return tuple(info.features[image_key].shape), info.features[label_key].num_classes


def steps_per_epoch(examples, batch_size, drop_remainder=False):
    """Optimizer steps in one pass over `examples` (PyTorch `drop_last`)."""
    if drop_remainder:
        return examples // batch_size
    return math.ceil(examples / batch_size)


def measure_throughput(dataset, steps=50, warmup=5):
    """Speed of an input pipeline alone (no model): images/s and batches/s.

    Iterates a *batched* dataset and times `steps` batches after `warmup`
    batches (the first ones pay for the pipeline's start-up, e.g. filling
    the shuffle buffer and the prefetch buffer). Compare its `steps_per_second`
    with the training speed: a pipeline much faster than training is not the
    bottleneck.

    Args:
        dataset: a batched `tf.data.Dataset` of `(images, labels)` (or of
            images). A finite dataset may end early: then fewer steps are
            timed.
        steps: batches to time.
        warmup: untimed batches first.

    Returns:
        dict with `images_per_second`, `steps_per_second`, `steps` (timed
        batches) and `seconds`.

    Example:
    ```python
    ds = keras_dks.data.cifar.make_dataset(train, training=True, batch_size=128)
    print(measure_throughput(ds, steps=100)["images_per_second"])
    ```
    """
    iterator = iter(dataset)
    for _ in range(warmup):
        if next(iterator, None) is None:
            break
    images = timed = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(iterator, None)
        if batch is None:
            break
        # The first leaf: the images of (images, labels) or ((images, index), labels).
        images += int(tf.nest.flatten(batch)[0].shape[0])
        timed += 1
    seconds = max(time.perf_counter() - start, 1e-9)
    return {
        "images_per_second": images / seconds,
        "steps_per_second": timed / seconds,
        "steps": timed,
        "seconds": seconds,
    }


def with_index(dataset):
    """Turn an *unbatched* dataset of `(x, y)` into `((x, index), y)`.

    Apply it first, before `shuffle`, `map` (augmentation) and `batch`, so
    each example keeps its own index whatever the order.

    Args:
        dataset: a `tf.data.Dataset` whose elements are `(x, y)`.

    Returns:
        A dataset of `((x, index), y)` with `index` an int64 in `[0, n)`.

    Example:
    ```python
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    train = (keras_dks.data.pipelines.with_index(ds)
             .shuffle(1000).batch(128).prefetch(tf.data.AUTOTUNE))
    ```
    """
    return dataset.enumerate().map(
        lambda i, elem: ((elem[0], i), elem[1]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
