"""The standard ImageNet pipeline (the DKS paper's ResNet recipe) in tf.data.

Training: Inception-style random-resized crop (area 8 %-100 %, aspect ratio
3/4-4/3) to `image_size`, random horizontal flip; evaluation: resize the
shorter side to 256 and take the central 224x224 crop (sizes scale with
`image_size`). Both normalise with the ImageNet mean and std.

The crop is `keras_cv.layers.RandomCropAndResize` when keras-cv is
installed (the optional `keras-dks[cv]` extra), otherwise it is built from
`tf.image.sample_distorted_bounding_box`; JPEG strings (TFDS
`SkipDecoding`) are decoded only inside the crop window.
"""

import tensorflow as tf

from keras_dks.data import pipelines

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)


def _shape(image):
    if image.dtype == tf.string:
        return tf.image.extract_jpeg_shape(image)
    return tf.shape(image)


def _decode(image):
    if image.dtype == tf.string:
        return tf.io.decode_jpeg(image, channels=3)
    return image


def inception_crop(
    image,
    image_size,
    area_range=AREA_RANGE,
    aspect_ratio_range=ASPECT_RATIO_RANGE,
    max_attempts=10,
):
    """Random-resized crop: a random box, resized to `image_size` squared.

    The box covers a uniformly drawn fraction of the image area in
    `area_range` with an aspect ratio in `aspect_ratio_range`
    (`tf.image.sample_distorted_bounding_box`); after `max_attempts`
    failures the whole image is used.

    Args:
        image: one uint8 `(height, width, 3)` image, or a JPEG string (then
            only the crop window is decoded).
        image_size: output height and width.
        area_range, aspect_ratio_range, max_attempts: the box distribution.

    Returns:
        float32 `(image_size, image_size, 3)` in [0, 255].

    Example:
    ```python
    crop = inception_crop(tf.zeros((375, 500, 3), tf.uint8), 224)
    ```
    """
    shape = _shape(image)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        min_object_covered=0.0,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    if image.dtype == tf.string:
        window = tf.stack([offset_y, offset_x, height, width])
        crop = tf.image.decode_and_crop_jpeg(image, window, channels=3)
    else:
        crop = tf.image.crop_to_bounding_box(image, offset_y, offset_x, height, width)
    crop = tf.image.resize(crop, (image_size, image_size), method="bilinear")
    return tf.ensure_shape(crop, (image_size, image_size, 3))


def center_crop(image, image_size, resize_size=None):
    """Resize the shorter side to `resize_size`, then take the central square.

    Args:
        image: one uint8 `(height, width, 3)` image or a JPEG string.
        image_size: side of the central crop (224 in the paper).
        resize_size: shorter side after resizing (default
            `round(image_size * 256 / 224)`, i.e. 256 for 224).

    Returns:
        float32 `(image_size, image_size, 3)` in [0, 255].

    Example:
    ```python
    crop = center_crop(tf.zeros((375, 500, 3), tf.uint8), 224)   # 256x341 -> 224x224
    ```
    """
    if resize_size is None:
        resize_size = int(round(image_size * 256 / 224))
    image = _decode(image)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize_size / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
    # Antialiased bilinear, like the PIL resize of torchvision's Resize.
    image = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
    top = (new_shape[0] - image_size) // 2
    left = (new_shape[1] - image_size) // 2
    image = tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)
    return tf.ensure_shape(image, (image_size, image_size, 3))


def keras_cv_crop(image_size):
    """`keras_cv.layers.RandomCropAndResize` with the Inception ranges, or
    None when keras-cv is not installed."""
    try:
        import keras_cv
    except ImportError:
        return None
    return keras_cv.layers.RandomCropAndResize(
        target_size=(image_size, image_size),
        crop_area_factor=AREA_RANGE,
        aspect_ratio_factor=ASPECT_RATIO_RANGE,
    )


def make_dataset(
    dataset,
    training,
    batch_size,
    image_size=224,
    crop="auto",
    mean=MEAN,
    std=STD,
    shuffle_buffer=10000,
    seed=None,
    repeat=False,
    drop_remainder=False,
):
    """Batched, prefetched ImageNet-style `(images, labels)`.

    Args:
        dataset: unbatched `(image, label)` pairs; images uint8 of any size
            (grayscale is converted to RGB) or JPEG strings.
        training: random-resized crop + flip + shuffle; otherwise resize +
            central crop in the stored order.
        batch_size: global batch size.
        image_size: output side (224 in the paper).
        crop: training crop: `"keras_cv"` (`RandomCropAndResize`),
            `"inception"` (tf.image, decodes only the window of JPEG
            strings) or `"auto"` (keras-cv when installed).
        mean, std: per-channel statistics on the [0, 1] scale.
        shuffle_buffer, seed: shuffling of training examples.
        repeat: repeat forever (for `fit(steps_per_epoch=...)`).
        drop_remainder: drop the last partial batch.

    Returns:
        A `tf.data.Dataset` of float32 `(batch, image_size, image_size, 3)`
        images and labels.

    Example:
    ```python
    from keras_dks.data import imagenet, pipelines
    raw, _ = pipelines.load_tfds("imagenet2012", "train", shuffle_files=True,
                                 decode_images=False, data_dir="/data/tfds")
    train = imagenet.make_dataset(raw, training=True, batch_size=256)
    ```
    """
    if crop not in ("auto", "keras_cv", "inception"):
        raise ValueError(f"crop must be 'auto', 'keras_cv' or 'inception'; got {crop!r}.")
    layer = None
    if training and crop != "inception":
        layer = keras_cv_crop(image_size)
        if layer is None and crop == "keras_cv":
            raise ImportError("crop='keras_cv' needs keras-cv: pip install keras-cv")
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()

    def to_rgb(image):
        if image.dtype != tf.string and image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return image

    def preprocess(image, label):
        image = to_rgb(image)
        if training:
            if layer is not None:
                image = layer(tf.cast(_decode(image), tf.float32))
            else:
                image = inception_crop(image, image_size)
            image = tf.image.random_flip_left_right(image)
        else:
            image = center_crop(image, image_size)
        return pipelines.normalize(image, mean, std), label

    dataset = dataset.map(preprocess, num_parallel_calls=pipelines.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(pipelines.AUTOTUNE)
