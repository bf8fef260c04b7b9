"""The CIFAR input pipeline of the DKS authors' code, in tf.data.

Training: reflect-pad 4, random 32x32 crop, random horizontal flip,
per-channel normalisation; test: normalisation only. Works for any TFDS
image classification dataset of fixed-size images (`image_size` resizes
others first).
"""

import tensorflow as tf

from keras_dks.data import pipelines

# The authors' statistics (0-255 scale divided by 255).
MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def augment(image, padding=4):
    """Reflect-pad, random crop back to the input size, random flip.

    Args:
        image: one `(height, width, channels)` image with a static shape.
        padding: pixels of reflection padding on every side, less than the
            height and the width. Defaults to `4` (the DKS authors' code);
            0 skips the pad and crop (the flip remains).

    Returns:
        An image of the same shape and dtype.

    Example:
    ```python
    import tensorflow as tf
    from keras_dks.data.cifar import augment
    crop = augment(tf.zeros((32, 32, 3), tf.uint8))
    print(crop.shape)   # (32, 32, 3)
    ```
    """
    shape = image.shape
    if padding:
        # REFLECT mirrors without repeating the edge pixel, as PyTorch's
        # RandomCrop(padding_mode="reflect") used by the authors.
        image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
        image = tf.image.random_crop(image, shape)
    return tf.image.random_flip_left_right(image)


def make_dataset(
    dataset,
    training,
    batch_size,
    mean=MEAN,
    std=STD,
    padding=4,
    image_size=None,
    shuffle_buffer=50000,
    seed=None,
    cache=True,
    repeat=False,
    drop_remainder=False,
    with_index=False,
):
    """Batched, prefetched `(images, labels)` for training or evaluation.

    Args:
        dataset: unbatched `(image, label)` pairs with uint8 images in
            [0, 255] (e.g. `pipelines.load_tfds(...)[0]`).
        training: augment and shuffle (the test split is only normalised,
            in its stored order, so evaluation is deterministic).
        batch_size: global batch size, a positive integer.
        mean, std: per-channel statistics on the [0, 1] scale. Default:
            `MEAN` and `STD`, the DKS authors' CIFAR statistics
            ([125.3, 123.0, 113.9] / 255 and [63.0, 62.1, 66.7] / 255).
        padding: reflection padding of the random crop (0: no crop).
            Defaults to `4` (the authors' code).
        image_size: resize images to `(image_size, image_size)` first
            (None, the default, keeps them; they must then all have the
            same shape).
        shuffle_buffer: shuffle buffer. Defaults to `50000` (the whole
            CIFAR training set).
        seed: shuffle seed. Defaults to `None`.
        cache: keep the decoded uint8 images in memory after the first
            pass (CIFAR is 150 MB); augmentation still runs every epoch.
            Defaults to `True`.
        repeat: repeat forever (for `fit(steps_per_epoch=...)`). Defaults
            to `False`.
        drop_remainder: drop the last partial batch. Defaults to `False`.
        with_index: yield `((images, index), labels)`, `index` being each
            example's position in the data before shuffling (SRDL's
            example index, see `keras_dks.data.pipelines.with_index`).
            Defaults to `False`.

    Returns:
        A `tf.data.Dataset` of float32 `(batch, H, W, C)` images and the
        dataset's integer labels, in their dtype (int64 from TFDS).

    Raises:
        ValueError: elements that are not unbatched `(uint8 image, integer
            label)` pairs, images of varying size without `image_size`,
            `mean`/`std` that do not match the channels or are on the 0-255
            scale, a padding too large for the images, a bad batch size.

    Example:
    ```python
    import numpy as np, tensorflow as tf
    from keras_dks.data import cifar
    images = np.random.randint(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = np.random.randint(0, 100, 64)
    raw = tf.data.Dataset.from_tensor_slices((images, labels))
    # Real CIFAR-100: raw, info = pipelines.load_tfds("cifar100", "train")
    train = cifar.make_dataset(raw, training=True, batch_size=16)
    x, y = next(iter(train))
    print(x.shape, x.dtype.name, y.dtype.name)  # (16, 32, 32, 3) float32 int64
    ```
    """
    pipelines.check_positive_int(batch_size, "batch_size")
    shape = pipelines.check_supervised_images(dataset, image_size)
    pipelines.check_statistics(mean, std, shape[-1])
    size = (image_size, image_size) if image_size else tuple(shape[:2])
    if training and padding and (padding < 0 or padding >= min(size)):
        raise ValueError(
            f"padding {padding} does not fit {size[0]}x{size[1]} images: reflection "
            f"padding needs 0 <= padding < {min(size)}."
        )
    if image_size:
        def resize(image, label):
            image = tf.image.resize(image, (image_size, image_size), antialias=True)
            return tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8), label

        dataset = dataset.map(resize, num_parallel_calls=pipelines.AUTOTUNE)
    if with_index:  # before shuffling: the index names the example
        from keras_dks.data.pipelines import with_index as add_index

        dataset = add_index(dataset)
    if cache:
        dataset = dataset.cache()
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()

    def preprocess(image, label):
        if with_index:
            image, index = image
        if training:
            image = augment(image, padding)
        # Normalisation commutes with pad/crop/flip, so it runs last, on the
        # crop only.
        image = pipelines.normalize(image, mean, std)
        return ((image, index), label) if with_index else (image, label)

    dataset = dataset.map(preprocess, num_parallel_calls=pipelines.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(pipelines.AUTOTUNE)
