"""The ImageNet pipelines of the DKS paper (section 4.2) in tf.data.

Training augmentation (`make_dataset(augment=...)`):

- `"simple"` (default): resize every image to 256x256 (aspect ratio not
  kept), take a random 224x224 crop, flip horizontally at random. The DKS
  paper trains ResNet-18 and ResNet-50 this way: "images are resized to
  [a fixed size] first, and then crops are randomly sampled from the
  resized images or their horizontal flips". The sizes are missing from
  the text of the paper we checked; 256x256 is what the authors' evaluation
  script resizes to and 224 their crop, so we use those. The paper gives
  no interpolation; we use the bicubic one of that script.
- `"random_resized"`: the Inception-style crop the paper keeps for
  ResNet-152 ("a more aggressive data augmentation method as in [41]",
  i.e. GoogLeNet): a random box of 8 %-100 % of the area with aspect ratio
  3/4-4/3, resized to 224, plus a random flip (torchvision's
  `RandomResizedCrop`, also what the DHM code uses for every depth).
  GoogLeNet's photometric distortions are not included.

Evaluation (`eval_resize=...`): `"square"` (default) resizes to 256x256
with bicubic interpolation and takes the central 224x224 crop, exactly the
authors' released ImageNet script (`imagenet/main.py`:
`Scale([256, 256], BICUBIC)`, `CenterCrop(224)`); `"shorter_side"` resizes
the shorter side to 256 (bilinear, aspect ratio kept) before the central
crop, torchvision's reference recipe and the DHM code's. All sizes scale
with `image_size` (resize = round(image_size * 256 / 224)). Both normalise
with the ImageNet mean and std.

The random-resized crop is `keras_cv.layers.RandomCropAndResize` when
keras-cv is installed (the optional `keras-dks[cv]` extra), otherwise it is
built from `tf.image.sample_distorted_bounding_box`; JPEG strings (TFDS
`SkipDecoding`) are decoded only inside the crop window.
"""

import tensorflow as tf

from keras_dks.data import pipelines

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Inception-style random-resized crop (GoogLeNet; torchvision's defaults).
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
# Resize before cropping, for a 224 crop (paper and authors' script: 256).
RESIZE_SIZE = 256
CROP_SIZE = 224
AUGMENTATIONS = ("simple", "random_resized")
EVAL_RESIZES = ("square", "shorter_side")


# The DKS paper's training augmentation per ResNet depth (section 4.2):
# simple for ResNet-18 and ResNet-50, aggressive (Inception-style) for
# ResNet-152. ResNet-34 and ResNet-101 are not in the paper; they follow
# their nearest neighbour in depth.
PAPER_AUGMENTATION = {
    18: "simple",
    34: "simple",
    50: "simple",
    101: "random_resized",
    152: "random_resized",
}


def paper_augmentation(depth):
    """The DKS paper's training augmentation for an ImageNet ResNet-`depth`.

    Args:
        depth: 18, 34, 50, 101 or 152.

    Returns:
        `"simple"` (ResNet-18/34/50) or `"random_resized"` (ResNet-101/152).
        The paper states 18, 50 (simple) and 152 (aggressive); 34 and 101
        follow their nearest neighbour in depth.

    Raises:
        ValueError: `depth` is not one of the five.

    Example:
    ```python
    from keras_dks.data.imagenet import paper_augmentation
    print(paper_augmentation(50))    # simple
    print(paper_augmentation(152))   # random_resized
    ```
    """
    if depth not in PAPER_AUGMENTATION:
        raise ValueError(
            f"depth must be one of {sorted(PAPER_AUGMENTATION)}; got {depth!r}."
        )
    return PAPER_AUGMENTATION[depth]


def _resize_size(image_size, resize_size):
    if resize_size is None:
        resize_size = int(round(image_size * RESIZE_SIZE / CROP_SIZE))
    return resize_size


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
        area_range: range of the box's fraction of the image area.
            Defaults to `AREA_RANGE`, `(0.08, 1.0)` (GoogLeNet's,
            torchvision's default).
        aspect_ratio_range: range of the box's width / height. Defaults to
            `ASPECT_RATIO_RANGE`, `(3/4, 4/3)` (same source).
        max_attempts: boxes tried before falling back to the whole image.
            Defaults to `10` (torchvision's).

    Returns:
        float32 `(image_size, image_size, 3)` in [0, 255].

    Example:
    ```python
    import tensorflow as tf
    from keras_dks.data.imagenet import inception_crop
    crop = inception_crop(tf.zeros((375, 500, 3), tf.uint8), 224)
    print(crop.shape, crop.dtype.name)   # (224, 224, 3) float32
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


def resize_square(image, size):
    """Resize to `size` x `size` (aspect ratio not kept), bicubic, like PIL.

    PIL's `resize(..., BICUBIC)` (the authors' `transforms.Scale([256,
    256], PIL.Image.BICUBIC)`) is antialiased when it shrinks and rounds
    to uint8; `tf.image.resize(antialias=True)` with the same cubic kernel,
    clipped and rounded, matches it to about one grey level.

    Args:
        image: one uint8 `(height, width, 3)` image or a JPEG string.
        size: output height and width.

    Returns:
        float32 `(size, size, 3)` with integer values in [0, 255].

    Example:
    ```python
    import tensorflow as tf
    from keras_dks.data.imagenet import resize_square
    square = resize_square(tf.zeros((375, 500, 3), tf.uint8), 256)
    print(square.shape)   # (256, 256, 3)
    ```
    """
    image = _decode(image)
    image = tf.image.resize(image, (size, size), method="bicubic", antialias=True)
    return tf.round(tf.clip_by_value(image, 0.0, 255.0))


def simple_crop(image, image_size, resize_size=None, seed=None):
    """The paper's simple training crop: resize to a square, random crop.

    Resizes to `resize_size` squared (`resize_square`) and takes an
    `image_size` square at a uniformly random offset. The flip is applied
    separately (`make_dataset`).

    Args:
        image: one uint8 `(height, width, 3)` image or a JPEG string.
        image_size: crop side (224 in the paper).
        resize_size: side of the resized square (default
            `round(image_size * 256 / 224)`, i.e. 256 for 224).
        seed: optional op seed of the crop offset.

    Returns:
        float32 `(image_size, image_size, 3)` in [0, 255].

    Raises:
        ValueError: `resize_size` is smaller than `image_size`.

    Example:
    ```python
    import tensorflow as tf
    from keras_dks.data.imagenet import simple_crop
    crop = simple_crop(tf.zeros((375, 500, 3), tf.uint8), 224)
    print(crop.shape)   # (224, 224, 3): 256x256, then a random 224 crop
    ```
    """
    resize_size = _resize_size(image_size, resize_size)
    if resize_size < image_size:
        raise ValueError(
            f"resize_size ({resize_size}) must be at least image_size ({image_size})."
        )
    image = resize_square(image, resize_size)
    crop = tf.image.random_crop(image, (image_size, image_size, 3), seed=seed)
    return tf.ensure_shape(crop, (image_size, image_size, 3))


def center_crop(image, image_size, resize_size=None, resize="square"):
    """Resize, then take the central `image_size` square.

    Args:
        image: one uint8 `(height, width, 3)` image or a JPEG string.
        image_size: side of the central crop (224 in the paper).
        resize_size: size after resizing (default
            `round(image_size * 256 / 224)`, i.e. 256 for 224).
        resize: `"square"` resizes to `resize_size` squared, bicubic (the
            DKS authors' evaluation script); `"shorter_side"` resizes the
            shorter side to `resize_size` keeping the aspect ratio,
            antialiased bilinear (torchvision's `Resize(256)`, the DHM
            code's). Defaults to `"square"`.

    Returns:
        float32 `(image_size, image_size, 3)` in [0, 255].

    Raises:
        ValueError: `resize` is not one of `EVAL_RESIZES`.

    Example:
    ```python
    import tensorflow as tf
    from keras_dks.data.imagenet import center_crop
    image = tf.zeros((375, 500, 3), tf.uint8)
    crop = center_crop(image, 224)                 # 256x256 -> 224x224
    crop = center_crop(image, 224, resize="shorter_side")  # 256x341 -> 224x224
    print(crop.shape)   # (224, 224, 3)
    ```
    """
    if resize not in EVAL_RESIZES:
        raise ValueError(f"resize must be one of {EVAL_RESIZES}; got {resize!r}.")
    resize_size = _resize_size(image_size, resize_size)
    if resize == "square":
        image = resize_square(image, max(resize_size, image_size))
        new_shape = tf.shape(image)[:2]
    else:
        image = _decode(image)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = resize_size / tf.reduce_min(shape)
        new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
        # Antialiased bilinear, like the PIL resize of torchvision's Resize.
        image = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
    # torchvision's CenterCrop: offset round((size - crop) / 2).
    top = tf.cast(tf.round((new_shape[0] - image_size) / 2), tf.int32)
    left = tf.cast(tf.round((new_shape[1] - image_size) / 2), tf.int32)
    image = tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)
    return tf.ensure_shape(image, (image_size, image_size, 3))


def keras_cv_crop(image_size):
    """`keras_cv.layers.RandomCropAndResize` with the Inception ranges, or
    None when keras-cv is not installed.

    Args:
        image_size: output height and width.

    Returns:
        A `keras_cv.layers.RandomCropAndResize` with `AREA_RANGE` and
        `ASPECT_RATIO_RANGE`, or None.

    Example:
    ```python
    from keras_dks.data.imagenet import keras_cv_crop
    layer = keras_cv_crop(224)   # None without keras-cv
    ```
    """
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
    augment="simple",
    crop="auto",
    eval_resize="square",
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
        training: augment (see `augment`) + shuffle; otherwise resize +
            central crop (see `eval_resize`) in the stored order.
        batch_size: global batch size.
        image_size: output side. Defaults to `224` (the paper's).
        augment: training augmentation: `"simple"` (default; resize to
            256x256, random 224 crop, flip: the DKS paper's ResNet-18/50
            recipe) or `"random_resized"` (Inception-style crop + flip: the
            paper's ResNet-152 recipe, and the DHM code's).
        crop: implementation of the `"random_resized"` crop: `"keras_cv"`
            (`RandomCropAndResize`), `"inception"` (tf.image, decodes only
            the window of JPEG strings) or `"auto"` (default; keras-cv when
            installed).
        eval_resize: evaluation resize: `"square"` (default; 256x256
            bicubic, the DKS authors' script) or `"shorter_side"` (shorter
            side 256, bilinear); see `center_crop`.
        mean, std: per-channel statistics on the [0, 1] scale. Default:
            `MEAN` and `STD`, the ImageNet statistics.
        shuffle_buffer: shuffle buffer of the training examples. Defaults
            to `10000`.
        seed: shuffle seed. Defaults to `None`.
        repeat: repeat forever (for `fit(steps_per_epoch=...)`). Defaults
            to `False`.
        drop_remainder: drop the last partial batch. Defaults to `False`.

    Returns:
        A `tf.data.Dataset` of float32 `(batch, image_size, image_size, 3)`
        images and the dataset's labels.

    Raises:
        ValueError: an unknown `augment`, `crop` or `eval_resize`, or a
            `crop` other than `"auto"` without `augment="random_resized"`.
        ImportError: `crop="keras_cv"` without keras-cv installed.

    Example:
    ```python
    import numpy as np, tensorflow as tf
    from keras_dks.data import imagenet
    images = np.random.randint(0, 256, (8, 75, 100, 3), dtype=np.uint8)
    raw = tf.data.Dataset.from_tensor_slices((images, np.arange(8)))
    # ImageNet: raw, _ = pipelines.load_tfds("imagenet2012", "train",
    #     shuffle_files=True, decode_images=False, data_dir="/data/tfds")
    train = imagenet.make_dataset(raw, training=True, batch_size=4,
                                  image_size=64)
    test = imagenet.make_dataset(raw, training=False, batch_size=4,
                                 image_size=64)
    print(next(iter(train))[0].shape)   # (4, 64, 64, 3)
    ```
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}; got {augment!r}.")
    if crop not in ("auto", "keras_cv", "inception"):
        raise ValueError(f"crop must be 'auto', 'keras_cv' or 'inception'; got {crop!r}.")
    if crop != "auto" and augment != "random_resized":
        raise ValueError(
            f"crop={crop!r} chooses how the random-resized crop is computed, but "
            f"augment={augment!r} does not use it: pass augment='random_resized' "
            "(or leave crop='auto')."
        )
    if eval_resize not in EVAL_RESIZES:
        raise ValueError(f"eval_resize must be one of {EVAL_RESIZES}; got {eval_resize!r}.")
    layer = None
    if training and augment == "random_resized" and crop != "inception":
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
            if augment == "simple":
                image = simple_crop(image, image_size)
            elif layer is not None:
                image = layer(tf.cast(_decode(image), tf.float32))
            else:
                image = inception_crop(image, image_size)
            image = tf.image.random_flip_left_right(image)
        else:
            image = center_crop(image, image_size, resize=eval_resize)
        return pipelines.normalize(image, mean, std), label

    dataset = dataset.map(preprocess, num_parallel_calls=pipelines.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(pipelines.AUTOTUNE)
