"""Export the inference network: TF Serving SavedModels, LiteRT, ONNX, OpenVINO.

Two entry points, both exporting the backbone and the main classifier only
(a `DKSModel`'s auxiliary heads are left out):

- `export_saved_model`: a versioned SavedModel laid out for TF Serving, with
  a `serving_default` signature computing probabilities and top-k classes.
- `export_inference` (also `DKSModel.export`): Keras' `Model.export` formats
  (`"tf_saved_model"`, `"litert"`, `"onnx"`, `"openvino"`) of the logits
  network, computed in float32 whatever the training dtype policy.

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
    python -m keras_dks.export --model model.keras --format onnx --output model.onnx

OpenVINO precision: the IR stores float32 weights, but OpenVINO's CPU plugin
computes in bfloat16 by default on CPUs with native bfloat16 (AVX512-BF16 or
AMX: `openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")` reads
`bfloat16` there), which moves logits by ~1e-2. Load it in float32 with

    openvino.Core().compile_model("model.xml", "CPU", OPENVINO_FLOAT32)

(`OPENVINO_FLOAT32 = {"INFERENCE_PRECISION_HINT": "f32"}`). Nothing in the
file can change that default: OpenVINO 2026.4's CPU plugin ignores
`INFERENCE_PRECISION_HINT` and `EXECUTION_MODE_HINT` written into the IR's
`runtime_options`, and `disable_fp16_compression` marks on the nodes
(set from Python or written into the `.xml`) leave it in bfloat16 too
(checked on a CPU with AVX512-BF16); only the configuration passed to
`compile_model` does.
"""

import argparse
import importlib
import json
import numbers
import os
import re
import shutil
import sys
import tempfile

import keras
import tensorflow as tf

from keras_dks import adapt

INPUT_DTYPES = ("uint8", "float32")
# The `compile_model` configuration that makes OpenVINO's CPU plugin compute
# in float32 (its default is bfloat16 on CPUs with native bfloat16).
OPENVINO_FLOAT32 = {"INFERENCE_PRECISION_HINT": "f32"}
OUTPUT_NAMES = ("logits", "probabilities", "classes", "scores")
# Keras' `Model.export` formats that run on the TensorFlow backend. "torch"
# needs the PyTorch backend; this package trains on TensorFlow.
FORMATS = ("tf_saved_model", "litert", "onnx", "openvino")
# Python packages each format needs at export time (TensorFlow's own
# converter writes LiteRT files; the `ai-edge-litert` runtime only loads them).
# (pip and import names are the same for these three).
_FORMAT_PACKAGES = {"onnx": ("tf2onnx", "onnx"), "openvino": ("openvino",)}
_SUFFIXES = {"litert": ".tflite", "onnx": ".onnx", "openvino": ".xml"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def export_inference(
    model,
    filepath,
    format="tf_saved_model",
    verbose=None,
    input_signature=None,
    **kwargs,
):
    """Export the inference network (backbone + main classifier) of a model.

    Same signature and formats as Keras' `Model.export`, but a `DKSModel`
    is replaced by its `inference_model()`: the artifact holds the backbone
    and the main classifier only, no auxiliary-head weight, and takes
    `images` (float32, the model's input shape with a free batch size) to
    `logits` (float32, `(batch, num_classes)`).

    The network is computed in float32 whatever the dtype policy it was
    trained under: a `mixed_bfloat16` / `mixed_float16` model keeps float32
    weights, and the export rebuilds the same network with a float32 policy
    on those weights, so every runtime (LiteRT and ONNX have little or no
    half-precision support on CPU) gives the float32 numbers of the trained
    weights. For a half-precision SavedModel export `model.inference_model()`
    with Keras' own `export` instead.

    Formats (the runtime that loads each is in brackets):

    - `"tf_saved_model"`: a SavedModel folder with a `serve` endpoint, also
      the `serving_default` signature (`tf.saved_model.load`, TF Serving,
      `keras.layers.TFSMLayer`). Unlike Keras' own export, each weight is
      stored once, and the reloaded object lists them in `variables`,
      `trainable_variables` and `non_trainable_variables`.
    - `"litert"`: a `.tflite` file (`ai_edge_litert.interpreter.Interpreter`,
      or `tf.lite.Interpreter`). Keras converter options (e.g.
      `optimizations=[tf.lite.Optimize.DEFAULT]`) pass through `**kwargs`.
    - `"onnx"`: a `.onnx` file, converted by `tf2onnx` (`onnxruntime`).
      `opset_version` passes through `**kwargs`.
    - `"openvino"`: an OpenVINO IR `.xml` (+ `.bin`) (`openvino`). Its
      CPU plugin computes in bfloat16 by default on CPUs with native
      bfloat16; `compile_model(path, "CPU", OPENVINO_FLOAT32)` loads it in
      float32 (see the module docstring).

    For a TF Serving layout with probabilities, top-k classes and baked-in
    preprocessing, use `export_saved_model`.

    Args:
        model: a `keras_dks.DKSModel`, or any single-input, single-output
            functional / Sequential `keras.Model` whose output is logits of
            shape `(batch, num_classes)`.
        filepath: where to write: a folder for `"tf_saved_model"`, a file
            ending in `.tflite` / `.onnx` / `.xml` for the others. A local
            path, except for `"tf_saved_model"`, which any `tf.io.gfile`
            path (`gs://...`) takes.
        format: one of `"tf_saved_model"` (default), `"litert"`, `"onnx"`,
            `"openvino"`.
        verbose: print what was written (Keras' default for the format when
            None, the default).
        input_signature: optional input spec, as in `Model.export`. Default:
            one float32 input named `images` of the model's input shape with
            a free batch dimension.
        **kwargs: passed on to Keras' exporter of the format (none accepted
            for `"tf_saved_model"`).

    Returns:
        The path written, as a `str`.

    Raises:
        ValueError: unknown format (or `"torch"`), a file name the format
            cannot write, a remote path for a file format, extra `**kwargs`
            with `"tf_saved_model"`, or a model that is not a single-output
            logits classifier (or a half-precision model that cannot be
            rebuilt in float32).
        ImportError: the converter the format needs is not installed (the
            message names the pip package).
        RuntimeError: the Keras backend is not TensorFlow.

    Example:
    ```python
    import numpy as np, keras, keras_dks, onnxruntime
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="s1")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="s2")(x)
    model = keras_dks.DKSModel(keras.Model(inputs, x), num_classes=5, taps=["s1"])
    model.export("/tmp/dks.onnx", format="onnx")   # = export_inference(model, ...)
    images = np.random.rand(2, 16, 16, 3).astype("float32")
    session = onnxruntime.InferenceSession("/tmp/dks.onnx")
    logits = session.run(None, {"images": images})[0]   # (2, 5)
    ```
    """
    _require_tensorflow_backend("export_inference")
    filepath = _check_format(format, os.fspath(filepath))
    _require_converters(format)
    network = _float32_network(_serving_network(model))
    if input_signature is None:
        input_signature = [
            tf.TensorSpec(
                (None,) + tuple(network.inputs[0].shape[1:]), tf.float32, name="images"
            )
        ]
    if format == "tf_saved_model":
        _write_keras_saved_model(network, filepath, input_signature, verbose, kwargs)
    else:
        # The converters open the file directly: create its folder.
        os.makedirs(os.path.dirname(os.path.abspath(filepath)), exist_ok=True)
        network.export(
            filepath,
            format=format,
            verbose=verbose,
            input_signature=input_signature,
            **kwargs,
        )
    return filepath


def _require_tensorflow_backend(what):
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"{what} needs the TensorFlow backend (KERAS_BACKEND=tensorflow); "
            f"the backend is {keras.backend.backend()!r}."
        )


def _check_format(format, filepath):
    """`filepath` if `format` can write it, else a ValueError naming the fix."""
    if format == "torch":
        raise ValueError(
            'format="torch" needs the PyTorch backend (KERAS_BACKEND=torch); '
            f"keras-dks trains on TensorFlow. Use one of {list(FORMATS)}."
        )
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}.")
    if format == "tf_saved_model":
        return filepath
    if _URL.match(filepath):
        raise ValueError(
            f'format="{format}" writes local files only, got {filepath!r}: '
            "export to a local path, then copy the file (e.g. "
            "`gcloud storage cp model.onnx gs://bucket/`)."
        )
    suffix = _SUFFIXES[format]
    if not filepath.endswith(suffix):
        raise ValueError(
            f'format="{format}" writes a `{suffix}` file; got {filepath!r}. '
            f"Name the file `<name>{suffix}`."
        )
    return filepath


def _require_converters(format):
    """An ImportError naming the pip package when a converter is missing."""
    for package in _FORMAT_PACKAGES.get(format, ()):
        try:
            importlib.import_module(package)
        except ImportError as e:
            raise ImportError(
                f'format="{format}" needs the `{package}` package, which cannot '
                f"be imported ({e}): pip install {package} (or pip install "
                '"keras-dks[export]" for every export converter).'
            ) from None


def _write_keras_saved_model(network, filepath, input_signature, verbose, kwargs):
    """Keras' tf_saved_model layout, each weight once and listed on reload."""
    if kwargs:
        raise ValueError(
            'format="tf_saved_model" takes no extra keyword arguments on the '
            f"TensorFlow backend; got {sorted(kwargs)}."
        )
    archive = keras.export.ExportArchive()
    # No archive.track(network): it stores each weight a second time
    # (keras-team/keras#23553). The endpoint saves the variables it uses.
    fn = archive.add_endpoint(
        "serve",
        lambda images: network(images, training=False),
        input_signature=input_signature,
    )
    _expose_variables(archive, fn)
    archive.write_out(filepath, verbose=True if verbose is None else verbose)


def _expose_variables(archive, fn):
    """List an endpoint's variables on the reloaded object, each stored once.

    The collections hold the very `tf.Variable`s the endpoint captures, so
    the SavedModel stores each once and `loaded.variables` lists them
    (instead of Keras' `track()`, which adds a second copy of every weight).
    """
    concrete = fn.get_concrete_function()
    trainable = list(concrete.trainable_variables)
    ids = {id(v) for v in trainable}
    non_trainable = [v for v in concrete.variables if id(v) not in ids]
    archive.add_variable_collection("variables", trainable + non_trainable)
    archive.add_variable_collection("trainable_variables", trainable)
    archive.add_variable_collection("non_trainable_variables", non_trainable)


def _float32_network(network):
    """The same network with a float32 dtype policy, on the same weights.

    Returns `network` itself when it already computes in float32; otherwise
    a rebuild from its config with every (mixed / half) dtype policy set to
    float32, holding a copy of its weights.
    """
    changed = []

    def to_float32(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(
                obj.get("config"), dict
            ):
                if obj["config"].get("name") != "float32":
                    changed.append(obj["config"].get("name"))
                    return {**obj, "config": {**obj["config"], "name": "float32"}}
                return obj
            return {key: to_float32(value) for key, value in obj.items()}
        if isinstance(obj, list):
            return [to_float32(value) for value in obj]
        return obj

    config = to_float32(keras.saving.serialize_keras_object(network))
    if not changed:
        return network
    try:
        rebuilt = keras.saving.deserialize_keras_object(config)
    except Exception as e:  # a model whose config cannot be rebuilt
        raise ValueError(
            f"Model {network.name!r} computes in {changed[0]} and could not be "
            f"rebuilt in float32 from its config ({type(e).__name__}: {e}). "
            "Rebuild it under keras.config.set_dtype_policy('float32'), copy the "
            "weights with set_weights(model.get_weights()) and export that."
        ) from e
    weights = network.get_weights()
    if [w.shape for w in rebuilt.get_weights()] != [w.shape for w in weights]:
        raise ValueError(
            f"Model {network.name!r} rebuilt in float32 has other weights than "
            "the original; export it under a float32 dtype policy instead."
        )
    rebuilt.set_weights(weights)
    # A rebuilt functional model returns a list of one output where the
    # original returned a tensor.
    return keras.Model(rebuilt.inputs[0], rebuilt.outputs[0], name=network.name)


def _check_local(export_base):
    if _URL.match(os.fspath(export_base)):
        raise ValueError(
            f"export_base must be a local folder, got {os.fspath(export_base)!r}. "
            "A version folder is written beside its final place and renamed into "
            "place, which object stores cannot do atomically (TF Serving could load "
            "a half-written version). Export to a local folder, then copy the "
            "version folder, e.g. `gcloud storage cp -r export_base/1 "
            "gs://bucket/export_base/`."
        )


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
    `(None, None, None, C)`. Either way the images (after preprocessing)
    must have the model's input size: a request of another size fails
    (`INVALID_ARGUMENT` naming the expected size), even for a model whose
    layers would run at that size (TF Serving does not enforce the
    signature's shape by itself). Include a `keras.layers.Resizing(H, W)`
    preprocessing to serve images of any size.

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
            Serving's `--model_base_path`). Created if missing. A URL
            (`gs://...`, `s3://...`) raises `ValueError`: export locally,
            then copy the version folder.
        version: non-negative integer version (folder name). Default
            (`None`): one more than the largest existing numeric folder, 1
            for an empty or new base.
        input_dtype: `"uint8"` (raw pixels, default) or `"float32"`.
        preprocessing: optional `keras.layers.Layer` (e.g. `Rescaling`,
            `Normalization`, `Resizing`, or a `keras.Sequential` of them) or
            callable applied to the float32 images before the model. Its
            variables (e.g. an adapted `Normalization`'s mean/variance) are
            exported too. Defaults to `None`.
        top_k: integer >= 1, number of classes in `classes` / `scores`;
            clipped to `num_classes`. Defaults to `5`.
        overwrite: replace an existing `<export_base>/<version>/`. Without it
            (default `False`) an existing version raises `FileExistsError`.

    Returns:
        The absolute path of the version folder written, as a `str`.

    Raises:
        ValueError: a remote `export_base`, bad `input_dtype`, `version`,
            `top_k` or `preprocessing`, or a model that is not a
            single-output logits classifier.
        FileExistsError: the version exists and `overwrite=False`.
        RuntimeError: the Keras backend is not TensorFlow.

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
    _require_tensorflow_backend("export_saved_model")
    _check_local(export_base)
    dtype = _check_input_dtype(input_dtype)
    version = _check_version(version)
    _check_top_k(top_k)
    _check_preprocessing(preprocessing)
    network = _serving_network(model)
    image_shape = _request_shape(network, preprocessing)
    # Check the target before the (slow) tracing.
    target = _version_folder(export_base, version, overwrite)
    k = min(int(top_k), network.outputs[0].shape[-1])
    serve = _serving_function(network, preprocessing, k)
    archive = keras.export.ExportArchive()
    # No archive.track(network): add_endpoint already saves every variable
    # the endpoint uses (and built-in layers' lookup tables), and track()
    # makes Keras 3.15 save each weight a second time, doubling the artifact
    # and TF Serving's weight memory (keras-team/keras#23553).
    # Naming the endpoint serving_default makes it the only signature (an
    # endpoint "serve" would be exported twice, as "serve" and its alias).
    fn = archive.add_endpoint(
        "serving_default",
        serve,
        input_signature=[tf.TensorSpec(image_shape, dtype, name="images")],
    )
    # The reloaded SavedModel lists its weights (loaded.variables, ...),
    # still stored once each.
    _expose_variables(archive, fn)
    _write_version(archive, target)
    return target


def _check_top_k(top_k):
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}.")


def _check_preprocessing(preprocessing):
    if preprocessing is not None and not callable(preprocessing):
        raise ValueError(
            "preprocessing must be a keras Layer or a callable taking float32 "
            f"images; got {type(preprocessing).__name__}."
        )


def _request_shape(network, preprocessing):
    """Shape of the signature's `images`: the model's input shape, or free
    height and width when preprocessing comes first (which is built here,
    outside the traced endpoint, where it could not create variables)."""
    image_shape = tuple(network.inputs[0].shape)
    if preprocessing is None:
        return image_shape
    image_shape = (None,) * (len(image_shape) - 1) + image_shape[-1:]
    if isinstance(preprocessing, keras.layers.Layer) and not preprocessing.built:
        # A symbolic call builds without computing.
        preprocessing(keras.KerasTensor(image_shape, dtype="float32"))
    return image_shape


def _version_folder(export_base, version, overwrite):
    """`<export_base>/<version>`; FileExistsError if it exists and not
    `overwrite`."""
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
    return target


def _serving_function(network, preprocessing, k):
    """images -> {logits, probabilities, classes, scores}, all computed in
    the signature."""
    model_shape = tuple(network.inputs[0].shape)

    def serve(images):
        x = tf.cast(images, tf.float32)
        if preprocessing is not None:
            x = preprocessing(x)
        # Neither a signature nor TF Serving checks the shape of a request
        # against the signature's input spec: check it here.
        x = _check_image_size(x, model_shape)
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

    return serve


def _write_version(archive, target):
    """Write `archive` to `target` atomically: into a staging folder beside
    it (same filesystem; its non-numeric name is ignored by TF Serving),
    then renamed into place, restoring the old version if that fails."""
    export_base = os.path.dirname(target)
    os.makedirs(export_base, exist_ok=True)
    staging = tempfile.mkdtemp(
        prefix=f".staging-{os.path.basename(target)}-", dir=export_base
    )
    try:
        # A sub-folder, not `staging` itself: mkdtemp's folder is mode 0700,
        # which a server running as another user could not read.
        written = os.path.join(staging, "model")
        archive.write_out(written, verbose=False)
        if os.path.lexists(target):  # overwrite=True (checked before)
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


def _check_image_size(x, model_shape):
    """Fail the request when (preprocessed) images do not fit the model.

    A Keras functional model runs on inputs of another height / width when
    its layers allow it (convolutions + global pooling do), silently giving
    predictions for a size it was not trained on; and a SavedModel
    signature does not enforce the static shape of its input spec on a
    request. Serving refuses such images instead.
    """
    expected = [d for d in model_shape[1:]]
    if all(d is None for d in expected):
        return x
    actual = tf.shape(x)[1:]
    checks = [
        tf.debugging.assert_equal(
            actual[i],
            tf.constant(d, actual.dtype),
            message=(
                f"images have the wrong size (after preprocessing): the model takes "
                f"{tuple(model_shape[1:])} (height, width, channels); send images "
                "of that size or export with a keras.layers.Resizing preprocessing. "
                f"Axis {i + 1} differs"
            ),
        )
        for i, d in enumerate(expected)
        if d is not None
    ]
    with tf.control_dependencies(checks):
        return tf.identity(x)


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
    if adapt.ends_in_softmax(model):
        raise ValueError(
            f"Model {model.name!r} ends in a softmax; export "
            "needs logits (probabilities are computed in the signature). Build "
            "it with classifier_activation=None or drop the softmax."
        )
    return model


def main(argv=None):
    """`python -m keras_dks.export`: export a saved `.keras` model.

    Prints the path written (and, for OpenVINO, on stderr, the one line
    that loads it in float32). Exits with status 2 and a one-line
    `error: ...` on bad arguments, a missing or unreadable model file, or a
    refused export.

    Flags: `--model` (a `.keras` file, required); `--format` (`serving`, the
    default: `export_saved_model` into `--export_base`, with `--version`,
    `--input_dtype`, `--top_k`, `--overwrite` and `--scale` / `--offset`
    baking in `keras.layers.Rescaling(scale, offset)`; or one of `FORMATS`:
    `export_inference` to `--output`).

    Args:
        argv: the command-line arguments, without the program name.
            Defaults to `None`, meaning `sys.argv[1:]`.

    Returns:
        The path written, as a `str`.

    Raises:
        SystemExit: status 2 on any of the errors above.

    Example:
    ```python
    import keras
    from keras_dks.export import main
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    keras.Model(inputs, keras.layers.Dense(5)(x)).save("/tmp/model.keras")
    main(["--model", "/tmp/model.keras", "--format", "onnx",
          "--output", "/tmp/model.onnx"])      # prints /tmp/model.onnx
    ```
    """
    parser = _parser()
    args = parser.parse_args(argv)
    _check_cli_args(parser, args)
    progress = _Progress(["load", "export"])
    model = _load_model(parser, args.model)
    progress.done("load")
    try:
        path = _export_from_cli(args, model)
    except (ValueError, FileExistsError, ImportError) as e:
        progress.close()
        parser.exit(2, f"error: {e}\n")
    progress.done("export")
    print(path)
    if args.format == "openvino":
        print(_openvino_note(path), file=sys.stderr)
    return path


class _Progress:
    """Keras' progress bar over the CLI's stages, on stderr when stderr is a
    terminal (pipes and logs get only the result lines)."""

    def __init__(self, stages):
        self.stages = list(stages)
        self.bar = None
        if sys.stderr.isatty():
            self.bar = keras.utils.Progbar(len(self.stages), unit_name="stage")
            self._write(lambda: self.bar.update(0))

    def _write(self, update):
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):
            update()

    def done(self, stage):
        if self.bar is not None:
            k = self.stages.index(stage) + 1
            self._write(lambda: self.bar.update(k, finalize=k == len(self.stages)))

    def close(self):
        if self.bar is not None:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_dks.export",
        description="Export a .keras classifier (a DKSModel exports its main "
        "head only): by default as a TF Serving SavedModel in "
        "EXPORT_BASE/<version>/; with --format tf_saved_model|litert|onnx|openvino "
        "as Keras' Model.export artifact at OUTPUT.",
    )
    parser.add_argument("--model", required=True, help="path to a .keras file")
    parser.add_argument(
        "--format", choices=("serving",) + FORMATS, default="serving",
        help="serving (default): TF Serving layout with probabilities and top-k; "
        "otherwise Keras' Model.export format of the logits network",
    )
    parser.add_argument(
        "--export_base", default=None,
        help="--format serving: folder of numeric version folders",
    )
    parser.add_argument(
        "--output", default=None,
        help="other formats: the folder (tf_saved_model) or file "
        "(.tflite, .onnx, .xml) to write",
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
    return parser


# Flags of --format serving, with their defaults.
_SERVING_FLAGS = [
    ("--export_base", "export_base", None),
    ("--version", "version", None),
    ("--input_dtype", "input_dtype", "uint8"),
    ("--top_k", "top_k", 5),
    ("--scale", "scale", None),
    ("--offset", "offset", 0.0),
    ("--overwrite", "overwrite", False),
]


def _check_cli_args(parser, args):
    """Exit 2 (argparse's one-line error) on flags that do not fit --format."""
    if args.format == "serving":
        if args.export_base is None:
            parser.error("--format serving needs --export_base")
    else:
        if args.output is None:
            parser.error(f"--format {args.format} needs --output")
        used = [f for f, key, default in _SERVING_FLAGS if getattr(args, key) != default]
        if used:
            parser.error(
                f"{', '.join(used)} only apply to --format serving; --format "
                f"{args.format} exports float32 images -> logits"
            )
    if not os.path.isfile(args.model):
        parser.exit(2, f"error: no model file at {args.model!r} (--model takes a .keras file)\n")


def _load_model(parser, path):
    """The model in `path` (compile=False: export needs no optimizer, loss
    or metrics); exit 2 with one line if it cannot be loaded."""
    try:
        _import_defining_modules(path)
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # a bad file: one line, not a traceback
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        parser.exit(
            2,
            f"error: cannot load {path!r} as a Keras model "
            f"({type(e).__name__}: {message}); --model takes a .keras file "
            "written by model.save\n",
        )


def _import_defining_modules(path):
    """Import the modules of this package that define the classes a `.keras`
    file names (the `module` fields of its config), so `load_model` finds
    them registered; nothing else of the package is imported here."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    package = __name__.split(".")[0]
    modules, stack = set(), [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            module = node.get("module")
            if isinstance(module, str) and module.split(".")[0] == package:
                modules.add(module)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    for module in sorted(modules):
        importlib.import_module(module)


def _export_from_cli(args, model):
    if args.format != "serving":
        return export_inference(model, args.output, format=args.format, verbose=False)
    preprocessing = None
    if args.scale is not None or args.offset:
        scale = 1.0 if args.scale is None else args.scale
        preprocessing = keras.layers.Rescaling(scale, args.offset)
    return export_saved_model(
        model,
        args.export_base,
        args.version,
        input_dtype=args.input_dtype,
        preprocessing=preprocessing,
        top_k=args.top_k,
        overwrite=args.overwrite,
    )


def _openvino_note(path):
    return (
        "note: OpenVINO's CPU plugin computes in bfloat16 by default on CPUs "
        "with native bfloat16 (logits move by ~1e-2); load it in float32 with: "
        f'openvino.Core().compile_model({path!r}, "CPU", '
        '{"INFERENCE_PRECISION_HINT": "f32"})'
    )


if __name__ == "__main__":
    main(sys.argv[1:])
