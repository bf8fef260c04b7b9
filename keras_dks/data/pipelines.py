"""Shared tf.data pieces: TFDS loading, normalisation, pipeline throughput.

The dataset-specific pipelines (`keras_dks.data.cifar`,
`keras_dks.data.imagenet`, `keras_dks.data.fashion_mnist`) build on these.
"""

import math
import os
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
    import tensorflow as tf
    from keras_dks.data import cifar
    from keras_dks.data.pipelines import normalize
    x = normalize(tf.zeros((32, 32, 3), tf.uint8), cifar.MEAN, cifar.STD)
    print(x.shape, x.dtype.name)   # (32, 32, 3) float32
    ```
    """
    image = tf.cast(image, tf.float32) / 255.0
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (image - mean) / std


def check_positive_int(value, name):
    """Raise ValueError unless `value` is an integer >= 1 (batch sizes, steps).

    Args:
        value: the value to check (a Python or NumPy integer; bools are
            refused).
        name: the argument's name, for the message.

    Raises:
        ValueError: `value` is not an integer >= 1.

    Example:
    ```python
    from keras_dks.data.pipelines import check_positive_int
    check_positive_int(128, "batch_size")    # passes
    ```
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_statistics(mean, std, channels=None):
    """Raise ValueError unless `mean`/`std` fit images of `channels` channels.

    Normalising a 1-channel image with 3 means would broadcast it to 3
    channels without an error, so the count is checked here.

    Args:
        mean, std: a scalar or one value per channel, on the [0, 1] scale.
        channels: image channels (None: unknown, the count is not checked).

    Raises:
        ValueError: values that are not finite numbers, a count other than
            1 or `channels`, a `std` <= 0, or a value > 1 (0-255
            statistics).

    Example:
    ```python
    from keras_dks.data.pipelines import check_statistics
    check_statistics((0.5, 0.5, 0.5), (0.25,) * 3, channels=3)   # passes
    ```
    """
    for name, values in (("mean", mean), ("std", std)):
        values = np.asarray(values, dtype=np.float64)
        if values.ndim > 1 or not np.all(np.isfinite(values)):
            raise ValueError(f"{name} must be a number or one number per channel, got {values}.")
        n = values.size if values.ndim else 1
        if channels is not None and n not in (1, channels):
            raise ValueError(
                f"{n} {name} values for images with {channels} channel(s): pass 1 or "
                f"{channels} values (on the [0, 1] scale)."
            )
    if np.any(np.asarray(std, dtype=np.float64) <= 0):
        raise ValueError(f"std must be > 0, got {std}.")
    if np.any(np.asarray(mean, dtype=np.float64) > 1) or np.any(np.asarray(std, dtype=np.float64) > 1):
        raise ValueError(
            f"mean {mean} / std {std} look like 0-255 statistics; the pipelines "
            "take them on the [0, 1] scale: divide by 255."
        )


def check_supervised_images(dataset, image_size=None):
    """The image shape of an unbatched `(uint8 image, integer label)` dataset.

    Catches the inputs that tf.data would turn into an obscure graph error
    or silently into wrong values: dicts (TFDS without `as_supervised`),
    batched data, float images (already scaled to [0, 1]: they would be
    divided by 255 again), one-hot labels, and images of varying size
    without `image_size`.

    Args:
        dataset: the `tf.data.Dataset` a pipeline is given.
        image_size: the size the pipeline resizes to (None: none).

    Returns:
        The images' `tf.TensorShape` `(height, width, channels)`.

    Raises:
        ValueError: with what is wrong and how to fix it.

    Example:
    ```python
    import numpy as np, tensorflow as tf
    from keras_dks.data.pipelines import check_supervised_images
    images = np.zeros((4, 32, 32, 3), np.uint8)
    raw = tf.data.Dataset.from_tensor_slices((images, np.arange(4)))
    print(check_supervised_images(raw))   # (32, 32, 3)
    ```
    """
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2) or not all(
        isinstance(s, tf.TensorSpec) for s in spec
    ):
        raise ValueError(
            "The dataset must yield (image, label) pairs of tensors, got elements "
            f"{spec}. From TFDS, load with as_supervised=True (as "
            "keras_dks.data.load_tfds does); from arrays, "
            "tf.data.Dataset.from_tensor_slices((images, labels))."
        )
    image, label = spec
    if image.shape.rank != 3:
        raise ValueError(
            f"Images must be unbatched (height, width, channels), got shape {image.shape}"
            + (" (already batched? pass the dataset before .batch())" if image.shape.rank == 4
               else " (add a channel axis: images[..., None])" if image.shape.rank == 2 else "")
            + "."
        )
    if image.dtype != tf.uint8:
        raise ValueError(
            f"Images must be uint8 in [0, 255], got {image.dtype.name}: the pipeline "
            "scales by 1/255 itself. Convert first, e.g. "
            "tf.cast(tf.round(image * 255), tf.uint8) for images in [0, 1]."
        )
    if label.shape.rank != 0 or not (label.dtype.is_integer):
        raise ValueError(
            f"Labels must be integer class indices of shape (), got {label.dtype.name} "
            f"{label.shape}" + (" (one-hot? use tf.argmax(label))" if label.shape.rank == 1 else "")
            + "."
        )
    if not image_size and (image.shape[0] is None or image.shape[1] is None):
        raise ValueError(
            f"Images of varying size {image.shape}: pass image_size (--image_size) "
            "to resize them to one size."
        )
    return image.shape


def load_tfds(
    name,
    split,
    data_dir=None,
    manual_dir=None,
    shuffle_files=False,
    seed=None,
    decode_images=True,
    download=True,
    network_timeout=10.0,
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
        data_dir: where the prepared data lives (TFDS default if None, the
            default).
        manual_dir: folder holding manually downloaded archives. Defaults
            to `None`.
        shuffle_files: read the record files in a random order (training).
            Defaults to `False`.
        seed: seed of the file shuffling. Defaults to `None`.
        decode_images: True (default) decodes the images; False keeps JPEG
            images as encoded strings
            (`tfds.decode.SkipDecoding`) so the training crop can decode
            only the crop window (`tf.image.decode_and_crop_jpeg`); images
            stored in other formats are decoded anyway.
        download: call `download_and_prepare` (a no-op when prepared). False
            reads prepared data only. Before a download, the hosts of the
            dataset's archives must answer within `network_timeout` seconds
            (`check_download_hosts`), and TFDS retries a failed request at
            most `DOWNLOAD_RETRIES` times (instead of its 10 over ~3.5
            minutes), so that without network this fails in seconds.
            Defaults to `True`.
        network_timeout: seconds to wait for each download host. Defaults
            to `10.0`.

    Returns:
        `(dataset, info)`.

    Raises:
        ValueError: unknown dataset name (with the closest names).
        RuntimeError: preparation failed; the message names the cause (a
            missing module, no network, a bad archive, missing manual
            archives, an unwritable folder).
        FileNotFoundError: `download=False` and no prepared data in
            `data_dir`.

    Example:
    ```python
    import tensorflow_datasets as tfds
    from keras_dks.data.pipelines import load_tfds
    # train, info = load_tfds("cifar100", "train", shuffle_files=True)
    # downloads CIFAR-100 once; offline, TFDS' mock data stands in for it:
    with tfds.testing.mock_data(num_examples=8):
        train, info = load_tfds("cifar100", "train", shuffle_files=True)
        print(train.element_spec[0].shape, info.features["label"].num_classes)
    # (32, 32, 3) 100
    ```
    """
    import tensorflow_datasets as tfds

    builder = tfds_builder(name, data_dir)
    if download:
        try:
            if _will_download(builder):
                check_download_hosts(builder, network_timeout)
            with _download_retries(DOWNLOAD_RETRIES):
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
                )
        except Exception as e:
            raise RuntimeError(preparation_error(name, builder, e, manual_dir)) from e
    decoders = None
    image_key = builder.info.supervised_keys[0]
    feature = builder.info.features[image_key]
    if not decode_images and getattr(feature, "encoding_format", None) == "jpeg":
        decoders = {image_key: tfds.decode.SkipDecoding()}
    try:
        dataset = builder.as_dataset(
            split=split,
            as_supervised=True,
            shuffle_files=shuffle_files,
            decoders=decoders,
            read_config=tfds.ReadConfig(shuffle_seed=seed),
        )
    except AssertionError as e:  # TFDS' "could not find data in ..."
        if "could not find data" not in str(e):
            raise
        raise FileNotFoundError(
            f"No prepared TFDS data for {name!r} in {builder.data_dir}: pass the "
            "data_dir (--data_dir) that holds it, or let TFDS download and "
            "prepare it (download=True, --download)."
        ) from e
    return dataset, builder.info


# Retries of a failed download request (TFDS: 10, with backoff doubling
# from 0.2 s, ~205 s in all; 3 wait 1.4 s).
DOWNLOAD_RETRIES = 3


def _will_download(builder):
    """Whether `download_and_prepare` would fetch archives from the web: the
    data is not prepared, the archives are not fetched by hand, and TFDS'
    own method runs (`tfds.testing.mock_data` replaces it by a no-op)."""
    method = type(builder).download_and_prepare
    return (
        not builder.is_prepared()
        and not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
        and not (getattr(method, "__module__", "") or "").startswith("tensorflow_datasets.testing")
    )


def check_download_hosts(builder, timeout=10.0):
    """Fail fast when a host the dataset downloads from does not answer.

    Opens a TCP connection to each host of the builder's archive URLs
    (`builder.url_infos`) whose archive is not downloaded yet, or to the
    proxy that `HTTP(S)_PROXY` / `NO_PROXY` choose for it, within `timeout`
    seconds.

    Args:
        builder: a TFDS `DatasetBuilder`.
        timeout: seconds per host. Defaults to `10.0`.

    Raises:
        ConnectionError: naming the host; caused by the socket error.

    Example:
    ```python
    from keras_dks.data.pipelines import check_download_hosts, tfds_builder
    # Tries www.cs.toronto.edu:443 unless CIFAR-100 is already downloaded.
    try:
        check_download_hosts(tfds_builder("cifar100"), timeout=5.0)
    except ConnectionError as e:
        print(e)   # offline: www.cs.toronto.edu:443 is unreachable (...)
    ```
    """
    import socket
    import urllib.parse
    import urllib.request

    proxies = urllib.request.getproxies()
    hosts = []
    for url in _urls_to_download(builder):
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            continue
        proxy = proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname):
            parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        port = parts.port or {"https": 443, "ftp": 21}.get(parts.scheme, 80)
        if (parts.hostname, port) not in hosts:
            hosts.append((parts.hostname, port))
    for host, port in hosts:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            raise ConnectionError(f"{host}:{port} is unreachable ({type(e).__name__}: {e}; "
                                  f"waited at most {timeout:g} s)") from e


def _urls_to_download(builder):
    """The builder's archive URLs without a finished download in
    `<data_dir>/downloads/` (or a folder in it), where TFDS keeps them."""
    import glob

    from tensorflow_datasets.core.download import resource

    downloads = os.path.join(str(builder.data_dir_root), "downloads")
    missing = []
    for url, info in (getattr(builder, "url_infos", None) or {}).items():
        name = resource.get_dl_fname(url, info.checksum)
        if not any(glob.glob(os.path.join(downloads, *parts, glob.escape(name)))
                   for parts in ((), ("*",))):
            missing.append(url)
    return missing


class _download_retries:
    """Within the block, TFDS retries a failed download request at most `n`
    times (its module constant `downloader.MAX_RETRIES`, read per request)."""

    def __init__(self, n):
        self.n = n
        self.saved = None

    def __enter__(self):
        from tensorflow_datasets.core.download import downloader

        self.saved = getattr(downloader, "MAX_RETRIES", None)
        if self.saved is not None:
            downloader.MAX_RETRIES = min(self.saved, self.n)

    def __exit__(self, *exc):
        from tensorflow_datasets.core.download import downloader

        if self.saved is not None:
            downloader.MAX_RETRIES = self.saved


def tfds_builder(name, data_dir=None):
    """`tfds.builder(name, data_dir)`, with close names for an unknown one.

    TFDS lists its ~1000 dataset names when a name is unknown; this names
    the few closest instead.

    Args:
        name: TFDS name, optionally with config and version
            (`"imagenette/160px"`, `"cifar100:3.0.2"`).
        data_dir: TFDS data folder (TFDS default if None, the default).

    Returns:
        The `tfds.core.DatasetBuilder` (nothing is downloaded or read).

    Raises:
        ValueError: unknown dataset name.

    Example:
    ```python
    from keras_dks.data.pipelines import tfds_builder
    builder = tfds_builder("cifar100")
    print(builder.info.features["image"].shape)   # (32, 32, 3)
    ```
    """
    import difflib

    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(), n=4, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown TFDS dataset {name!r}.{hint} All names: "
            "tensorflow_datasets.list_builders()."
        ) from e


def _causes(error):
    """`error` and the exceptions it was raised from, outermost first."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def preparation_error(name, builder, error, manual_dir=None):
    """The message for a failed `download_and_prepare`, naming the cause.

    A missing module, no network, a corrupt archive, missing manual archives
    and an unwritable folder each get their own fix; anything else is
    reported as it is, without guessing.

    Args:
        name: the TFDS name, for the message.
        builder: the `DatasetBuilder` that failed (its `data_dir` is named).
        error: the exception `download_and_prepare` raised; its causes
            (`__cause__` / `__context__`) are searched too.
        manual_dir: the manual folder that was passed, if any.

    Returns:
        The message, a `str` (`load_tfds` raises it as a `RuntimeError`).

    Example:
    ```python
    import socket
    from keras_dks.data.pipelines import preparation_error, tfds_builder
    print(preparation_error("cifar100", tfds_builder("cifar100"),
                            socket.gaierror("Name or service not known")))
    # Could not download TFDS dataset 'cifar100': no connection ...
    ```
    """
    import errno

    causes = _causes(error)
    root = f"{type(error).__name__}: {error}"
    for cause in causes:
        if isinstance(cause, ImportError):
            module = (cause.name or "").split(".")[0] or str(cause)
            declared = " (a dependency of keras-dks: reinstalling it installs it too)"
            return (
                f"Could not prepare TFDS dataset {name!r}: the Python module "
                f"{module!r} that TFDS needs to prepare it is not installed "
                f"({type(cause).__name__}: {cause}). Install it: pip install "
                f"{_PIP_NAMES.get(module, module)}"
                f"{declared if module == 'importlib_resources' else ''}."
            )
    for cause in causes:
        if type(cause).__name__ == "NonMatchingChecksumError":
            return (
                f"Could not prepare TFDS dataset {name!r}: an archive has the wrong "
                f"checksum (corrupt or partial download, or another file under "
                f"the expected name). Delete it and retry. ({root})"
            )
    for cause in causes:
        if _is_network_error(cause):
            return (
                f"Could not download TFDS dataset {name!r}: no connection to its "
                f"server ({type(cause).__name__}: {cause}). Without internet "
                "access, pass data_dir (--data_dir) pointing to TFDS data "
                "prepared on another machine, or manual_dir holding the "
                "dataset's downloaded archives."
            )
    for cause in causes:
        if "Manual directory" in str(cause) or (
            getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
            and isinstance(cause, AssertionError)
        ):
            return (
                f"TFDS dataset {name!r} must be downloaded by hand: put its archives "
                f"in a folder and pass it as manual_dir (--manual_dir); now "
                f"{manual_dir or 'the default <data_dir>/downloads/manual'}. ({root})"
            )
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno in (
            errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EPERM
        ):
            return (
                f"Could not prepare TFDS dataset {name!r} in {builder.data_dir}: "
                f"{cause.strerror or cause}. Pass a writable data_dir (--data_dir) "
                "with enough space."
            )
    return f"Could not prepare TFDS dataset {name!r} in {builder.data_dir} ({root})."


# Modules TFDS builders import whose pip package has another name.
_PIP_NAMES = {"cv2": "opencv-python", "PIL": "pillow", "apache_beam": "apache-beam",
              "skimage": "scikit-image", "sklearn": "scikit-learn"}


def _is_network_error(error):
    import socket
    import urllib.error

    if isinstance(error, (socket.gaierror, socket.timeout, urllib.error.URLError,
                          ConnectionError, TimeoutError)):
        return True
    # requests / urllib3 (what TFDS downloads with) without importing them.
    module = type(error).__module__ or ""
    return module.split(".")[0] in ("requests", "urllib3") and any(
        word in type(error).__name__
        for word in ("Connection", "Timeout", "MaxRetry", "NameResolution", "SSL", "Proxy")
    )


def num_examples(info, split, dataset=None):
    """Examples in a TFDS split; counts `dataset` when the info lacks them.

    `info.splits` understands slices (`"train[:10%]"`); mocked datasets have
    no split metadata, so the dataset's cardinality (or a count) is used.

    Args:
        info: the split's `tfds.core.DatasetInfo`.
        split: TFDS split string.
        dataset: optional unbatched dataset of the split, counted when
            `info` cannot tell.

    Returns:
        The number of examples, an int.

    Raises:
        Exception: whatever `info.splits[split]` raises, when `dataset` is
            None.

    Example:
    ```python
    import tensorflow_datasets as tfds
    from keras_dks.data.pipelines import load_tfds, num_examples
    # Prepared CIFAR-100: num_examples(info, "train[:10%]") is 5000.
    with tfds.testing.mock_data(num_examples=8):   # no split metadata
        train, info = load_tfds("cifar100", "train")
        print(num_examples(info, "train", train))   # 8, counted
    ```
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
    """`(shape, num_classes)` of a supervised image dataset's `DatasetInfo`.

    Args:
        info: a `tfds.core.DatasetInfo` with `supervised_keys`
            `(image, label)`.

    Returns:
        `(image shape tuple, number of label classes)`.

    Example:
    ```python
    from keras_dks.data.pipelines import image_spec, tfds_builder
    print(image_spec(tfds_builder("cifar100").info))   # ((32, 32, 3), 100)
    ```
    """
    image_key, label_key = info.supervised_keys
    return tuple(info.features[image_key].shape), info.features[label_key].num_classes


def steps_per_epoch(examples, batch_size, drop_remainder=False):
    """Optimizer steps in one pass over `examples` (PyTorch `drop_last`).

    Args:
        examples: number of examples.
        batch_size: batch size.
        drop_remainder: whether the last partial batch is dropped. Defaults
            to `False`.

    Returns:
        `ceil(examples / batch_size)`, or `examples // batch_size` with
        `drop_remainder`.

    Example:
    ```python
    from keras_dks.data.pipelines import steps_per_epoch
    print(steps_per_epoch(50000, 128), steps_per_epoch(50000, 128, True))
    # 391 390
    ```
    """
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
            timed; one that ends within the warm-up is timed on a second
            pass.
        steps: batches to time. Defaults to `50`.
        warmup: untimed batches first. Defaults to `5`.

    Returns:
        dict with `images_per_second`, `steps_per_second`, `steps` (timed
        batches) and `seconds`.

    Raises:
        ValueError: the dataset yields no batches.

    Example:
    ```python
    import numpy as np, tensorflow as tf
    from keras_dks.data import cifar
    from keras_dks.data.pipelines import measure_throughput
    images = np.random.randint(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    raw = tf.data.Dataset.from_tensor_slices((images, np.zeros(256, "int64")))
    ds = cifar.make_dataset(raw, training=True, batch_size=32, repeat=True)
    print(measure_throughput(ds, steps=20)["steps"])   # 20
    ```
    """
    iterator = iter(dataset)
    for _ in range(warmup):
        if next(iterator, None) is None:
            # Shorter than the warm-up: time a second pass instead (it is
            # warm now) rather than report 0 images/s.
            iterator = iter(dataset)
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
    if not timed and steps > 0:
        raise ValueError("measure_throughput: the dataset yields no batches.")
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
    import numpy as np, tensorflow as tf
    from keras_dks.data.pipelines import with_index
    images = np.zeros((256, 8, 8, 3), np.uint8)
    ds = tf.data.Dataset.from_tensor_slices((images, np.arange(256) % 10))
    train = (with_index(ds)
             .shuffle(1000).batch(128).prefetch(tf.data.AUTOTUNE))
    (x, index), y = next(iter(train))
    print(x.shape, index.dtype.name)   # (128, 8, 8, 3) int64
    ```
    """
    return dataset.enumerate().map(
        lambda i, elem: ((elem[0], i), elem[1]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
