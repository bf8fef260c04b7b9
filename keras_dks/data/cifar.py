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
        padding: pixels of reflection padding on every side.

    Returns:
        An image of the same shape and dtype.

    Example:
    ```python
    crop = augment(tf.zeros((32, 32, 3), tf.uint8))   # (32, 32, 3)
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
        batch_size: global batch size.
        mean, std: per-channel statistics on the [0, 1] scale.
        padding: reflection padding of the random crop (0: no crop).
        image_size: resize images to `(image_size, image_size)` first
            (None keeps them; they must then all have the same shape).
        shuffle_buffer: shuffle buffer (the whole CIFAR training set by
            default).
        seed: shuffle seed.
        cache: keep the decoded uint8 images in memory after the first
            pass (CIFAR is 150 MB); augmentation still runs every epoch.
        repeat: repeat forever (for `fit(steps_per_epoch=...)`).
        drop_remainder: drop the last partial batch.
        with_index: yield `((images, index), labels)`, `index` being each
            example's position in the data before shuffling (SRDL's
            example index, see `keras_dks.data.pipelines.with_index`).

    Returns:
        A `tf.data.Dataset` of float32 `(batch, H, W, C)` images and int64
        labels.

    Example:
    ```python
    from keras_dks.data import cifar, pipelines
    raw, info = pipelines.load_tfds("cifar100", "train", shuffle_files=True)
    train = cifar.make_dataset(raw, training=True, batch_size=128)
    ```
    """
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
