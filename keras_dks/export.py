"""Export the inference network as a versioned SavedModel for TF Serving.

`export_saved_model` writes `<export_base>/<version>/` with one
`serving_default` signature:

    images (uint8 or float32, (batch, H, W, C))
      -> logits, probabilities (float32, (batch, num_classes)),
         classes (int32, (batch, k)), scores (float32, (batch, k))

Only the backbone and the main classifier are exported: a `DKSModel` is
replaced by its `inference_model()`, so auxiliary heads cost nothing at
serving time.

Command line:

    python -m keras_dks.export --model model.keras --export_base exports/dks
"""

import argparse
import numbers
import os
import re
import shutil
import sys
import tempfile

import keras
import tensorflow as tf

INPUT_DTYPES = ("uint8", "float32")
OUTPUT_NAMES = ("logits", "probabilities", "classes", "scores")


def export_saved_model(
    model,
    export_base,
    version=None,
    *,
    input_dtype="uint8",
    preprocessing=None,
    top_k=5,
    overwrite=False,
):
    """Write a TF Serving SavedModel of a classifier to `<export_base>/<version>/`.

    The `serving_default` signature takes one input, `images`, and returns
    `logits` and `probabilities` (float32, `(batch, num_classes)`), `classes`
    (int32 indices of the `k` most probable classes, most probable first) and
    `scores` (float32, their probabilities), with `k = min(top_k,
    num_classes)`. Outputs are float32 even under a `mixed_float16` /
    `mixed_bfloat16` policy.

    The images are cast to float32, passed through `preprocessing` if given,
    then through the model. With `input_dtype="uint8"` and no preprocessing
    the model therefore sees raw 0..255 values: if it was trained on scaled
    inputs, bake the scaling in (e.g. `keras.layers.Rescaling(1 / 255)`) so
    clients can send raw pixels.

    Shape of `images`: `(None,) + model input shape` without preprocessing.
    With preprocessing the spatial dimensions are left free,
    `(None, None, None, C)`: whatever the preprocessing accepts is accepted
    (a `keras.layers.Resizing` takes any size; a size the model cannot take
    fails at request time).

    The version is written to a temporary folder beside the target and
    renamed into place only once complete, so TF Serving (which polls
    `export_base` for numeric folders) never sees a half-written version and
    a failed export loses nothing.

    Args:
        model: a `keras_dks.DKSModel` (its `inference_model()` is exported:
            backbone + main classifier only), or any single-input,
            single-output functional / Sequential `keras.Model` whose output
            is logits of shape `(batch, num_classes)`.
        export_base: local folder holding the numeric version folders (TF
            Serving's `--model_base_path`). Created if missing.
        version: integer version (folder name). Default: one more than the
            largest existing numeric folder, 1 for an empty or new base.
        input_dtype: `"uint8"` (raw pixels) or `"float32"`.
        preprocessing: optional `keras.layers.Layer` (e.g. `Rescaling`,
            `Normalization`, `Resizing`, or a `keras.Sequential` of them) or
            callable applied to the float32 images before the model. Its
            variables (e.g. an adapted `Normalization`'s mean/variance) are
            exported too.
        top_k: number of classes in `classes` / `scores`; clipped to
            `num_classes`.
        overwrite: replace an existing `<export_base>/<version>/`. Without it
            an existing version raises `FileExistsError`.

    Returns:
        The absolute path of the version folder written, as a `str`.

    Raises:
        ValueError: bad `input_dtype`, `version`, `top_k` or `preprocessing`,
            or a model that is not a single-output logits classifier.
        FileExistsError: the version exists and `overwrite=False`.

    Example:
    ```python
    import numpy as np, keras, tensorflow as tf, keras_dks
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(5)(x))
    path = keras_dks.export_saved_model(
        model, "/tmp/exports/dks",
        preprocessing=keras.layers.Rescaling(1 / 255), top_k=3)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    out = serve(images=np.zeros((2, 16, 16, 3), np.uint8))
    print(out["classes"].shape)  # (2, 3)
    ```
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "export_saved_model needs the TensorFlow backend "
            f"(KERAS_BACKEND=tensorflow); the backend is {keras.backend.backend()!r}."
        )
    dtype = _check_input_dtype(input_dtype)
    version = _check_version(version)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}.")
    if preprocessing is not None and not callable(preprocessing):
        raise ValueError(
            "preprocessing must be a keras Layer or a callable taking float32 "
            f"images; got {type(preprocessing).__name__}."
        )
    network = _serving_network(model)
    num_classes = network.outputs[0].shape[-1]
    k = min(int(top_k), num_classes)

    image_shape = tuple(network.inputs[0].shape)
    if preprocessing is not None:
        image_shape = (None,) * (len(image_shape) - 1) + image_shape[-1:]
        if isinstance(preprocessing, keras.layers.Layer) and not preprocessing.built:
            # Build it outside the traced endpoint (variables cannot be
            # created there); a symbolic call builds without computing.
            preprocessing(keras.KerasTensor(image_shape, dtype="float32"))

    # Check the target before the (slow) tracing.
    export_base = os.path.abspath(os.fspath(export_base))
    if version is None:
        version = _next_version(export_base)
    target = os.path.join(export_base, str(version))
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(
            f"Version {version} already exists at {target}; pick another version, "
            "omit it (the next free one is used) or pass overwrite=True (--overwrite "
            "on the command line) to replace it."
        )

    def serve(images):
        x = tf.cast(images, tf.float32)
        if preprocessing is not None:
            x = preprocessing(x)
        # Cast: under mixed precision the logits may be float16/bfloat16,
        # and clients expect float32 whatever the training policy was.
        logits = tf.cast(network(x, training=False), tf.float32)
        probabilities = tf.nn.softmax(logits, axis=-1)
        # Rank by logits, not probabilities: same order, but large logits
        # underflow several probabilities to 0.0 and would tie them.
        _, classes = tf.math.top_k(logits, k=k)
        scores = tf.gather(probabilities, classes, batch_dims=1)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "classes": tf.cast(classes, tf.int32),
            "scores": scores,
        }

    archive = keras.export.ExportArchive()
    # No archive.track(network): add_endpoint already saves every variable
    # the endpoint uses (and built-in layers' lookup tables), and track()
    # makes Keras 3.15 save each weight a second time, doubling the artifact
    # and TF Serving's weight memory (keras-team/keras#23553).
    # Naming the endpoint serving_default makes it the only signature (an
    # endpoint "serve" would be exported twice, as "serve" and its alias).
    archive.add_endpoint(
        "serving_default",
        serve,
        input_signature=[tf.TensorSpec(image_shape, dtype, name="images")],
    )

    os.makedirs(export_base, exist_ok=True)
    # Staging folder beside the target: same filesystem, so the final
    # rename is atomic; its non-numeric name is ignored by TF Serving.
    staging = tempfile.mkdtemp(prefix=f".staging-{version}-", dir=export_base)
    try:
        # A sub-folder, not `staging` itself: mkdtemp's folder is mode 0700,
        # which a server running as another user could not read.
        written = os.path.join(staging, "model")
        archive.write_out(written, verbose=False)
        if os.path.lexists(target):  # overwrite=True (checked above)
            old = os.path.join(staging, "old")
            os.rename(target, old)
            try:
                os.rename(written, target)
            except BaseException:
                os.rename(old, target)
                raise
        else:
            os.rename(written, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_input_dtype(input_dtype):
    try:
        name = tf.as_dtype(input_dtype).name
    except TypeError:
        name = None
    if name not in INPUT_DTYPES:
        raise ValueError(
            f"input_dtype must be one of {list(INPUT_DTYPES)}, got {input_dtype!r}."
        )
    return tf.as_dtype(name)


def _check_version(version):
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, numbers.Integral):
        raise ValueError(
            f"version must be a non-negative integer or None, got {version!r} "
            "(TF Serving only loads numeric version folders)."
        )
    if version < 0:
        raise ValueError(f"version must be a non-negative integer, got {version}.")
    return int(version)


def _next_version(export_base):
    if not os.path.isdir(export_base):
        return 1
    versions = [
        int(name)
        for name in os.listdir(export_base)
        if re.fullmatch(r"[0-9]+", name)
        and os.path.isdir(os.path.join(export_base, name))
    ]
    return max(versions, default=0) + 1


def _serving_network(model):
    """The single-output logits model to export."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"model must be a keras.Model, got {type(model).__name__}."
        )
    if callable(getattr(model, "inference_model", None)):  # a DKSModel
        return model.inference_model(softmax=False)
    inputs = getattr(model, "inputs", None)
    outputs = getattr(model, "outputs", None)
    if not inputs or not outputs:
        raise ValueError(
            f"Model {model.name!r} has no known inputs/outputs (a subclassed or "
            "unbuilt model). Wrap it: `inputs = keras.Input(image_shape); "
            "model = keras.Model(inputs, model(inputs))`."
        )
    if len(inputs) != 1:
        raise ValueError(
            f"Model {model.name!r} has {len(inputs)} inputs; export_saved_model "
            "serves single-input image classifiers."
        )
    if len(outputs) != 1:
        raise ValueError(
            f"Model {model.name!r} has {len(outputs)} outputs and is not a "
            "DKSModel. Export a single-output logits model, e.g. "
            "keras.Model(model.input, model.outputs[0])."
        )
    out = outputs[0]
    if len(out.shape) != 2 or out.shape[-1] is None:
        raise ValueError(
            f"Model {model.name!r} outputs shape {out.shape}; expected logits of "
            "shape (batch, num_classes)."
        )
    history = getattr(out, "_keras_history", None)
    layer = history.operation if history is not None else None
    activation = getattr(getattr(layer, "activation", None), "__name__", None)
    if isinstance(layer, keras.layers.Softmax) or activation == "softmax":
        raise ValueError(
            f"Model {model.name!r} ends in a softmax ({layer.name!r}); export "
            "needs logits (probabilities are computed in the signature). Build "
            "it with classifier_activation=None or drop the softmax."
        )
    return model


def main(argv=None):
    """`python -m keras_dks.export`: export a saved `.keras` model."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_dks.export",
        description="Export a .keras classifier (a DKSModel exports its main "
        "head only) as a TF Serving SavedModel in EXPORT_BASE/<version>/.",
    )
    parser.add_argument("--model", required=True, help="path to a .keras file")
    parser.add_argument(
        "--export_base", required=True, help="folder of numeric version folders"
    )
    parser.add_argument(
        "--version", type=int, default=None,
        help="version number (default: next free one)",
    )
    parser.add_argument("--input_dtype", choices=INPUT_DTYPES, default="uint8")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument(
        "--scale", type=float, default=None,
        help="bake in keras.layers.Rescaling(scale, offset), e.g. 0.00392156862745098 "
        "(1/255) for a model trained on [0, 1] images",
    )
    parser.add_argument("--offset", type=float, default=0.0)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing version"
    )
    args = parser.parse_args(argv)

    import keras_dks  # noqa: F401  (registers DKSModel etc. for load_model)

    # compile=False: serving needs no optimizer, loss or metrics.
    model = keras.models.load_model(args.model, compile=False)
    preprocessing = None
    if args.scale is not None or args.offset:
        scale = 1.0 if args.scale is None else args.scale
        preprocessing = keras.layers.Rescaling(scale, args.offset)
    try:
        path = export_saved_model(
            model,
            args.export_base,
            args.version,
            input_dtype=args.input_dtype,
            preprocessing=preprocessing,
            top_k=args.top_k,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as e:
        parser.exit(2, f"error: {e}\n")
    print(path)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
