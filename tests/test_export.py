"""export_saved_model (TF Serving) and DKSModel.export (SavedModel, LiteRT, ONNX, OpenVINO):
signatures, numerics checked in each format's own runtime, versions, CLI, distribution."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_dks
from helpers import tiny_backbone
from keras_dks import DKSModel
from keras_dks.export import OPENVINO_FLOAT32
from keras_dks.export import export_saved_model

# Its module-scoped fixtures run once: keep its tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("export")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, CLASSES = 16, 5


def classifier(seed=0, classes=CLASSES, name="net"):
    """Input(16,16,3) -> Conv2D -> BN -> GAP -> Dense logits."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(classes)(x), name=name)


def uint8_images(n=6, size=SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def np_reference(logits, k):
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    # Ranked by logits: probabilities of large logits underflow and tie.
    classes = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return p, classes, np.take_along_axis(p, classes, -1)


def check_outputs(out, logits, k, atol=1e-5):
    """Signature outputs vs. the model's logits and a NumPy softmax/top-k."""
    out = {name: np.asarray(v) for name, v in out.items()}
    assert sorted(out) == ["classes", "logits", "probabilities", "scores"]
    assert out["logits"].dtype == np.float32
    assert out["probabilities"].dtype == np.float32
    assert out["scores"].dtype == np.float32
    assert out["classes"].dtype == np.int32
    probs, classes, scores = np_reference(logits, k)
    np.testing.assert_allclose(out["logits"], logits, atol=atol, rtol=atol)
    np.testing.assert_allclose(out["probabilities"], probs, atol=atol)
    np.testing.assert_array_equal(out["classes"], classes)
    np.testing.assert_allclose(out["scores"], scores, atol=atol)


def serving_fn(path):
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    serve.loaded = loaded  # the signature holds its variables by weak reference
    return serve


def checkpoint_sizes(path):
    """(count, total size) of the values stored in a SavedModel's checkpoint."""
    entries = [
        shape
        for name, shape in tf.train.list_variables(os.path.join(path, "variables", "variables"))
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    ]
    return len(entries), sum(int(np.prod(s)) for s in entries)


def sizes(variables):
    return len(variables), sum(int(np.prod(v.shape)) for v in variables)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One uint8 export of a plain classifier, shared by the read-only tests."""
    model = classifier()
    path = export_saved_model(model, tmp_path_factory.mktemp("base"), top_k=3)
    return model, path


# --------------------------------------------------------------------------
# Signature and numerics
# --------------------------------------------------------------------------
def test_signature_matches_predictions(exported):
    model, path = exported
    assert path.endswith(os.sep + "1") and os.path.isabs(path)
    loaded = tf.saved_model.load(path)
    assert list(loaded.signatures) == ["serving_default"]
    serve = loaded.signatures["serving_default"]
    (spec,) = serve.structured_input_signature[1].values()
    assert spec.name == "images" and spec.dtype == tf.uint8
    assert tuple(spec.shape) == (None, SIZE, SIZE, 3)
    images = uint8_images()
    logits = model.predict(images.astype("float32"), verbose=0)
    check_outputs(serve(images=tf.constant(images)), logits, k=3)


def test_saved_model_cli_shows_serving_signature(exported):
    _, path = exported
    cli = shutil.which("saved_model_cli")
    cmd = [cli] if cli else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    result = subprocess.run(
        cmd + ["show", "--dir", path, "--all"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    block = text[text.index("signature_def['serving_default']"):]
    block = block[: block.index("Method name is:")]
    assert re.search(
        r"inputs\['images'\] tensor_info:\s+dtype: DT_UINT8\s+shape: \(-1, 16, 16, 3\)", block
    ), block
    for name, dtype, shape in [
        ("classes", "DT_INT32", "(-1, 3)"),
        ("logits", "DT_FLOAT", "(-1, 5)"),
        ("probabilities", "DT_FLOAT", "(-1, 5)"),
        ("scores", "DT_FLOAT", "(-1, 3)"),
    ]:
        assert re.search(
            rf"outputs\['{name}'\] tensor_info:\s+dtype: {dtype}\s+shape: {re.escape(shape)}",
            block,
        ), (name, block)
    assert len(re.findall(r"outputs\['", block)) == 4
    assert "tensorflow/serving/predict" in text


def decode_instances(body, spec):
    """A REST `{"instances": ...}` body -> the signature's input tensor.

    The JSON values become a tensor of the signature's input dtype through
    `tf.make_tensor_proto` (which refuses, e.g., fractions for an integer
    dtype and ragged nesting), whose shape must then fit the input spec.
    """
    proto = tf.make_tensor_proto(json.loads(body)["instances"], dtype=spec.dtype)
    tensor = tf.constant(tf.make_ndarray(proto))
    if not spec.is_compatible_with(tensor):
        raise ValueError(f"shape {tensor.shape} does not fit the signature's {spec}")
    return tensor


@pytest.mark.parametrize("input_dtype", ["uint8", "float32"])
def test_rest_instances_body_fits_the_signature_input(tmp_path, input_dtype):
    model = classifier(seed=1)
    path = export_saved_model(model, tmp_path, input_dtype=input_dtype)
    if input_dtype == "uint8":
        images = uint8_images(4)
    else:
        images = np.random.default_rng(1).uniform(size=(4, SIZE, SIZE, 3)).astype("float32")
    body = json.dumps({"instances": images.tolist()})  # what a client POSTs

    serve = serving_fn(path)
    (spec,) = serve.structured_input_signature[1].values()
    decoded = decode_instances(body, spec)
    assert decoded.dtype == spec.dtype
    np.testing.assert_array_equal(decoded.numpy(), images)
    out = serve(images=decoded)
    check_outputs(out, model.predict(images.astype("float32"), verbose=0), k=CLASSES)
    # Row-format response ({"predictions": [{name: value}, ...]}) is JSON-able.
    rows = [{k: np.asarray(v)[i].tolist() for k, v in out.items()} for i in range(4)]
    response = json.loads(json.dumps({"predictions": rows}))
    assert [r["classes"][0] for r in response["predictions"]] == list(
        np.argmax(out["logits"], -1)
    )

    # Bodies that do not fit the signature are refused before the model runs.
    small = json.dumps({"instances": images[:, :8, :8].tolist()})  # 8x8 images
    with pytest.raises(ValueError, match="does not fit"):
        decode_instances(small, spec)
    # The signature itself does not enforce its static shape (nor does TF
    # Serving); the export checks the size in the graph.
    with pytest.raises(tf.errors.InvalidArgumentError, match="wrong size"):
        serve(images=tf.constant(images[:, :8, :8]))
    ragged = json.dumps({"instances": [images[0].tolist(), images[1, :8].tolist()]})
    with pytest.raises(ValueError):
        decode_instances(ragged, spec)
    if input_dtype == "uint8":
        fractions = json.dumps({"instances": (images / 255).tolist()})
        with pytest.raises(TypeError, match="Expected uint8"):
            decode_instances(fractions, spec)


# --------------------------------------------------------------------------
# DKSModel: only the backbone and the main classifier are exported
# --------------------------------------------------------------------------
def test_dks_model_exports_main_head_only(tmp_path):
    keras.utils.set_random_seed(0)
    model = DKSModel(tiny_backbone(size=SIZE), num_classes=CLASSES, taps=["s1", "s2"], head="residual")
    inference = model.inference_model()
    aux = model.head_names[1:]
    assert aux == ["aux_s2", "aux_s1"]
    # Not vacuous: the DKS model does hold auxiliary variables.
    assert any(h in v.path for v in model.variables for h in aux)
    assert sizes(model.variables)[1] > sizes(inference.variables)[1]

    path = export_saved_model(model, tmp_path, top_k=2)
    serve = serving_fn(path)
    assert sizes(serve.variables) == sizes(inference.variables)
    # The reloaded object lists its weights too, each once.
    loaded = serve.loaded
    assert sizes(loaded.variables) == sizes(inference.variables)
    assert len({id(v) for v in loaded.variables}) == len(loaded.variables)
    assert sizes(loaded.trainable_variables) == sizes(inference.trainable_variables)
    assert sizes(loaded.non_trainable_variables) == sizes(inference.non_trainable_variables)
    assert sorted(v.name for v in loaded.variables) == sorted(v.name for v in serve.variables)
    # Stored once each (model.export stores every weight twice, keras#23553).
    assert checkpoint_sizes(path) == sizes(inference.variables)
    names = [v.name for v in serve.variables]
    assert not [n for n in names if any(h in n for h in aux)], names
    assert any(n.startswith("s3_conv/") for n in names)

    images = uint8_images(seed=2)
    logits = inference.predict(images.astype("float32"), verbose=0)
    np.testing.assert_allclose(
        logits, model.predict(images.astype("float32"), verbose=0)[0], atol=1e-6
    )
    check_outputs(serve(images=images), logits, k=2)


def test_plain_export_holds_exactly_the_model_variables(exported):
    model, path = exported
    assert sizes(serving_fn(path).variables) == sizes(model.variables)
    assert checkpoint_sizes(path) == sizes(model.variables)
    loaded = tf.saved_model.load(path)
    assert sizes(loaded.trainable_variables) == sizes(model.trainable_variables)
    assert sizes(loaded.non_trainable_variables) == sizes(model.non_trainable_variables)  # BN
    assert sizes(loaded.variables) == sizes(model.variables)
    # Reloadable as a Keras layer too, with the same weights.
    layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
    assert sizes(layer.weights) == sizes(model.variables)
    images = uint8_images(2)
    np.testing.assert_allclose(
        layer(images)["logits"], model.predict(images.astype("float32"), verbose=0), atol=1e-5
    )


# --------------------------------------------------------------------------
# Preprocessing and mixed precision
# --------------------------------------------------------------------------
@pytest.mark.parametrize("adapted", [False, True])
def test_preprocessing_is_baked_in(tmp_path, adapted):
    model = classifier(seed=3)
    mean, variance = np.float32([0.5, 0.4, 0.3]), np.float32([0.06, 0.05, 0.04])
    if adapted:  # mean/variance held in variables, which must be exported
        normalization = keras.layers.Normalization()
        rng = np.random.default_rng(3)
        normalization.adapt(rng.normal(mean, np.sqrt(variance), (64, 4, 4, 3)).astype("float32"))
        mean, variance = (
            np.asarray(v).reshape(3) for v in (normalization.mean, normalization.variance)
        )
    else:
        normalization = keras.layers.Normalization(mean=mean, variance=variance)
    preprocessing = keras.Sequential(
        [keras.layers.Resizing(SIZE, SIZE), keras.layers.Rescaling(1 / 255), normalization]
    )
    path = export_saved_model(model, tmp_path, preprocessing=preprocessing)
    serve = serving_fn(path)
    (spec,) = serve.structured_input_signature[1].values()
    # Free spatial size: the Resizing layer accepts any.
    assert tuple(spec.shape) == (None, None, None, 3) and spec.dtype == tf.uint8
    # Each value the signature uses is stored once (Keras may fold adapted
    # statistics into constants, so preprocessing adds 0 or more variables).
    assert checkpoint_sizes(path) == sizes(serve.variables)
    assert sizes(model.variables) <= sizes(serve.variables) <= sizes(
        model.variables + preprocessing.variables
    )

    images = uint8_images(3, size=SIZE)  # resizing to the same size is exact
    floats = (images.astype("float32") / 255 - mean) / np.sqrt(variance)
    check_outputs(serve(images=images), model.predict(floats, verbose=0), k=CLASSES)

    big = uint8_images(3, size=24, seed=4)  # raw client images of another size
    reference = model.predict(preprocessing(big.astype("float32")), verbose=0)
    check_outputs(serve(images=big), reference, k=CLASSES)


def test_images_of_another_size_fail_without_resizing(tmp_path):
    # Conv + global pooling run on 80x80 images in a graph whose input size
    # is free (Keras checks the size only in eager calls); serving refuses
    # them rather than answer for a size the model was not trained on.
    model = classifier(seed=4)
    path = export_saved_model(model, tmp_path, preprocessing=keras.layers.Rescaling(1 / 255))
    serve = serving_fn(path)
    (spec,) = serve.structured_input_signature[1].values()
    assert tuple(spec.shape) == (None, None, None, 3)
    images = uint8_images(2, seed=4)
    check_outputs(
        serve(images=images), model.predict(images.astype("float32") / 255, verbose=0), CLASSES
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"wrong size \(after preprocessing\)"):
        serve(images=uint8_images(2, size=80))
    with pytest.raises(tf.errors.InvalidArgumentError, match="keras.layers.Resizing"):
        serve(images=uint8_images(2, size=SIZE)[:, :, :12])


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model_exports_float32_outputs(tmp_path, policy):
    try:
        keras.config.set_dtype_policy(policy)
        model = classifier(seed=5)  # its Dense outputs float16 / bfloat16
        assert model.outputs[0].dtype != "float32"
        path = export_saved_model(model, tmp_path, preprocessing=keras.layers.Rescaling(1 / 255))
        images = uint8_images(seed=5)
        logits = np.asarray(model.predict(images.astype("float32") / 255, verbose=0), "float32")
    finally:
        keras.config.set_dtype_policy("float32")
    out = serving_fn(path)(images=images)
    # Same half-precision graph, so close; check_outputs checks the dtypes.
    check_outputs(out, logits, k=CLASSES, atol=2e-2)
    # Softmax and top-k are computed in float32 from the float32 logits.
    probs, classes, _ = np_reference(np.asarray(out["logits"]), CLASSES)
    np.testing.assert_allclose(out["probabilities"], probs, atol=1e-6)
    np.testing.assert_array_equal(out["classes"], classes)


# --------------------------------------------------------------------------
# Versions and overwriting
# --------------------------------------------------------------------------
def test_versions_increment_and_top_k_is_clipped(tmp_path):
    model = classifier()
    base = tmp_path / "new" / "base"  # created on demand
    assert export_saved_model(model, base) == str(base / "1")
    assert export_saved_model(model, base, top_k=50) == str(base / "2")
    (base / "9").mkdir()
    (base / "assets_not_a_version").mkdir()
    (base / "12").write_text("a file, not a version folder")
    assert export_saved_model(model, base, input_dtype="float32") == str(base / "10")
    assert export_saved_model(model, base, version=4) == str(base / "4")
    assert sorted(os.listdir(base)) == sorted(
        ["1", "2", "4", "9", "10", "12", "assets_not_a_version"]
    )  # no staging folder left behind
    out = serving_fn(str(base / "2"))(images=uint8_images(2))
    assert tuple(out["classes"].shape) == (2, CLASSES)


def test_existing_version_needs_overwrite(tmp_path):
    old, new = classifier(seed=6), classifier(seed=7)
    images = uint8_images(seed=6)
    path = export_saved_model(old, tmp_path, version=3)
    before = open(os.path.join(path, "saved_model.pb"), "rb").read()
    with pytest.raises(FileExistsError, match=r"overwrite=True"):
        export_saved_model(new, tmp_path, version=3)
    assert open(os.path.join(path, "saved_model.pb"), "rb").read() == before
    check_outputs(serving_fn(path)(images=images), old.predict(images.astype("float32"), verbose=0), 5)

    assert export_saved_model(new, tmp_path, version=3, overwrite=True) == path
    check_outputs(serving_fn(path)(images=images), new.predict(images.astype("float32"), verbose=0), 5)
    assert os.listdir(tmp_path) == ["3"]


def test_failed_overwrite_loses_nothing(tmp_path, monkeypatch):
    model = classifier(seed=8)
    path = export_saved_model(model, tmp_path, version=1)
    files = sorted(os.listdir(path))

    def broken_write_out(self, filepath, **kwargs):
        os.makedirs(filepath)
        open(os.path.join(filepath, "saved_model.pb"), "w").write("partial")
        raise OSError("disk full")

    # ExportArchive() returns a backend subclass: patch that one.
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", broken_write_out)
    with pytest.raises(OSError, match="disk full"):
        export_saved_model(classifier(seed=9), tmp_path, version=1, overwrite=True)
    assert os.listdir(tmp_path) == ["1"] and sorted(os.listdir(path)) == files
    images = uint8_images(seed=8)
    check_outputs(serving_fn(path)(images=images), model.predict(images.astype("float32"), verbose=0), 5)


# --------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------
def test_bad_arguments(tmp_path):
    model = classifier()
    base = tmp_path / "base"
    for kwargs, match in [
        ({"input_dtype": "int8"}, "input_dtype must be one of"),
        ({"input_dtype": "float16"}, "input_dtype must be one of"),
        ({"input_dtype": "pixels"}, "input_dtype must be one of"),
        ({"version": "1"}, "version must be a non-negative integer"),
        ({"version": 1.5}, "version must be a non-negative integer"),
        ({"version": True}, "version must be a non-negative integer"),
        ({"version": -1}, "version must be a non-negative integer"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"top_k": 2.0}, "top_k must be an integer >= 1"),
        ({"preprocessing": "rescale"}, "preprocessing must be a keras Layer or a callable"),
    ]:
        with pytest.raises(ValueError, match=match):
            export_saved_model(model, base, **kwargs)

    two_heads = keras.Model(model.inputs, [model.outputs[0], model.outputs[0] * 2])
    with pytest.raises(ValueError, match="2 outputs and is not a DKSModel"):
        export_saved_model(two_heads, base)
    softmax = keras.Model(model.inputs, keras.layers.Softmax()(model.outputs[0]))
    with pytest.raises(ValueError, match="ends in a softmax"):
        export_saved_model(softmax, base)
    with pytest.raises(ValueError, match="must be a keras.Model"):
        export_saved_model(keras.layers.Dense(3), base)
    assert not base.exists()  # nothing written on bad input


def test_package_level_name():
    assert keras_dks.export_saved_model is export_saved_model


# --------------------------------------------------------------------------
# Subprocesses: CLI and MirroredStrategy
# --------------------------------------------------------------------------
def run_python(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable] + args, capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_cli_exports_a_saved_dks_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = DKSModel(tiny_backbone(size=SIZE), num_classes=CLASSES, taps=["s1"], head="simple")
    model.save(tmp_path / "model.keras")
    base = tmp_path / "exports"
    result = run_python(
        ["-m", "keras_dks.export", "--model", str(tmp_path / "model.keras"),
         "--export_base", str(base), "--top_k", "2", "--scale", str(1 / 255)],
        tmp_path,
    )
    assert result.stdout.strip().splitlines()[-1] == str(base / "1")
    assert "RuntimeWarning" not in result.stderr  # no runpy double-import warning
    images = uint8_images(seed=10)
    logits = model.inference_model().predict(images.astype("float32") / 255, verbose=0)
    check_outputs(serving_fn(str(base / "1"))(images=images), logits, k=2)


MIRRORED_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf

cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import keras_dks

base = sys.argv[1]
keras.utils.set_random_seed(0)
strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
with strategy.scope():
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inp)
    for k, width in enumerate([4, 8], start=1):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", name=f"s{k}_conv")(x)
        x = keras.layers.ReLU(name=f"s{k}")(x)
    model = keras_dks.DKSModel(keras.Model(inp, x), num_classes=4, taps=["s1"], head="simple")
    model.compile(optimizer=keras.optimizers.SGD(0.5))
rng = np.random.default_rng(0)
x = rng.uniform(size=(8, 16, 16, 3)).astype("float32")
y = rng.integers(0, 4, 8)
before = model.inference_model().predict(x, verbose=0)
model.fit(x, y, batch_size=8, epochs=1, verbose=0)
assert strategy.num_replicas_in_sync == 2
logits = model.inference_model().predict(x, verbose=0)
assert np.abs(logits - before).max() > 1e-4, "the training step changed nothing"

with strategy.scope():
    inside = keras_dks.export_saved_model(model, base, input_dtype="float32")
outside = keras_dks.export_saved_model(model, base, input_dtype="float32")
for path in (inside, outside):
    out = tf.saved_model.load(path).signatures["serving_default"](images=x)
    np.testing.assert_allclose(out["logits"].numpy(), logits, atol=1e-5)
    np.testing.assert_array_equal(
        out["classes"].numpy()[:, 0], np.argmax(logits, -1))
print("OK", inside, outside)
"""


def test_export_under_mirrored_strategy(tmp_path):
    script = tmp_path / "mirrored_export.py"
    script.write_text(textwrap.dedent(MIRRORED_SCRIPT))
    base = tmp_path / "exports"
    result = run_python([str(script), str(base)], tmp_path)
    assert f"OK {base / '1'} {base / '2'}" in result.stdout


# --------------------------------------------------------------------------
# DKSModel.export: the inference network in every format, each loaded by
# its own runtime
# --------------------------------------------------------------------------
def dks_model(policy="float32", seed=0):
    """A tiny DKSModel under `policy` (the global policy is restored)."""
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy(policy)
        keras.utils.set_random_seed(seed)
        backbone = tiny_backbone(size=SIZE, stem="conv_bn")
        return DKSModel(backbone, num_classes=CLASSES, taps=["s1", "s2"], head="residual")
    finally:
        keras.config.set_dtype_policy(previous)


TRAIN_X = np.random.default_rng(0).uniform(size=(8, SIZE, SIZE, 3)).astype("float32")
TRAIN_Y = np.random.default_rng(1).integers(0, CLASSES, 8)


_TRAINED = {}


@pytest.fixture
def trained(request):
    """(policy, model, reference), built once per policy for the module."""
    if request.param not in _TRAINED:
        _TRAINED[request.param] = make_trained(request.param)
    return _TRAINED[request.param]


def make_trained(policy):
    """A DKSModel trained a few SGD steps under `policy`, and its float32
    reference.

    Training makes the weights and the BatchNormalization statistics
    non-trivial (BN momentum 0.5 so 10 steps move the moving statistics
    well away from their (0, 1) start; checked below).
    The reference is the same architecture built independently under the
    float32 policy and given the model's weights: the float32 numbers every
    export must reproduce (the mixed_bfloat16 graph itself is ~1e-3 off).
    """
    model = dks_model(policy)
    for layer in model.layers + model.backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5
    start = [w.copy() for w in model.get_weights()]
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    model.fit(TRAIN_X, TRAIN_Y, batch_size=4, epochs=5, verbose=0)
    moved = [np.abs(a - b).max() for a, b in zip(model.get_weights(), start)]
    # Every weight and BN statistic moved, except the stem conv's bias:
    # BatchNormalization follows it and cancels its gradient.
    assert sorted(moved)[1] > 1e-3, moved
    stem_bn = model.backbone.get_layer("stem_bn")
    assert np.abs(stem_bn.moving_mean.numpy()).max() > 0.05
    reference = dks_model("float32", seed=1)
    reference.set_weights(model.get_weights())
    reference = reference.inference_model()
    own = np.asarray(logits_of(model.inference_model(), TRAIN_X), "float32")
    if policy == "float32":
        # The reference is the model's own inference network.
        np.testing.assert_array_equal(logits_of(reference, TRAIN_X), own)
    else:
        assert model.get_layer("s3_conv").compute_dtype == "bfloat16"
        # Same network, computed in bfloat16 (~3 significant digits).
        np.testing.assert_allclose(own, logits_of(reference, TRAIN_X), atol=5e-2, rtol=2e-2)
    # Not vacuous: the auxiliary heads hold as many weights as the network.
    aux = sum(int(np.prod(v.shape)) for v in model.variables if v.path.startswith("aux_"))
    assert aux > 1000
    return policy, model, reference


def logits_of(network, x):
    return np.asarray(network(x, training=False))


def inference_size(network):
    return sum(int(np.prod(v.shape)) for v in network.variables)


def run_saved_model(path, x):
    loaded = tf.saved_model.load(path)
    return loaded.serve(tf.constant(x)).numpy(), loaded


def run_litert(path, x):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    (inp,) = interpreter.get_input_details()
    assert list(inp["shape_signature"]) == [-1, SIZE, SIZE, 3]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    (out,) = interpreter.get_output_details()
    return interpreter.get_tensor(out["index"])


def litert_float_constants(path):
    """{tensor name: element count} of the float32 constants of a .tflite file."""
    from ai_edge_litert import schema_py_generated as schema

    data = open(path, "rb").read()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    constants = {}
    for tensor in model.subgraphs[0].tensors:
        buffer = model.buffers[tensor.buffer]
        if tensor.type == schema.TensorType.FLOAT32 and buffer.data is not None and len(buffer.data):
            constants[tensor.name.decode()] = len(buffer.data) // 4
    return constants


def run_onnx(path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.shape[1:] == [SIZE, SIZE, 3]
    return session.run(None, {"images": x})[0]


def onnx_float_constants(path):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    tensors = list(graph.initializer) + [
        a.t for node in graph.node if node.op_type == "Constant" for a in node.attribute
        if a.type == onnx.AttributeProto.TENSOR
    ]
    return {
        t.name: numpy_helper.to_array(t).size
        for t in tensors
        if t.data_type == onnx.TensorProto.FLOAT
    }


def run_openvino(path, x, config=OPENVINO_FLOAT32):
    """Logits of the IR at `path` on OpenVINO's CPU plugin; float32 unless
    `config` is None (the plugin's default precision)."""
    import openvino

    compiled = openvino.Core().compile_model(path, "CPU", config or {})
    return np.asarray(compiled(x)[0])


def openvino_float_constants(path):
    import openvino

    model = openvino.Core().read_model(path)
    return {
        op.get_friendly_name(): int(np.prod(list(op.get_output_shape(0))))
        for op in model.get_ops()
        if op.get_type_name() == "Constant"
        and op.get_output_element_type(0) == openvino.Type.f32
    }


FORMAT_FILES = {
    "tf_saved_model": "saved_model",
    "litert": "model.tflite",
    "onnx": "model.onnx",
    "openvino": "model.xml",
}


@pytest.mark.parametrize(
    "trained, format",
    [("float32", format) for format in FORMAT_FILES]
    # The float32 rebuild of a mixed-precision model is format-independent:
    # three runtimes check it.
    + [("mixed_bfloat16", format) for format in ("tf_saved_model", "litert", "onnx")],
    indirect=["trained"],
)
def test_dks_export_runs_in_each_runtime(tmp_path, trained, format):
    policy, model, reference = trained
    target = str(tmp_path / FORMAT_FILES[format])
    assert model.export(target, format=format, verbose=False) == target
    x = np.random.default_rng(5).uniform(size=(3, SIZE, SIZE, 3)).astype("float32")
    want = logits_of(reference, x)
    n = inference_size(reference)

    if format == "tf_saved_model":
        got, loaded = run_saved_model(target, x)
        # Each weight once, listed on the reloaded object, no auxiliary one.
        assert sizes(loaded.variables) == sizes(reference.variables)
        assert sizes(loaded.trainable_variables) == sizes(reference.trainable_variables)
        assert checkpoint_sizes(target) == sizes(reference.variables)
        assert not [v.name for v in loaded.variables if "aux" in v.name]
        # The reloaded weights can be fine-tuned: gradients reach every one.
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loaded.serve(tf.constant(x)) ** 2)
        grads = tape.gradient(loss, loaded.trainable_variables)
        assert all(g is not None for g in grads)
    else:
        runner, constants = {
            "litert": (run_litert, litert_float_constants),
            "onnx": (run_onnx, onnx_float_constants),
            "openvino": (run_openvino, openvino_float_constants),
        }[format]
        got = runner(target, x)
        # Weights only of the inference network: converters fold
        # BatchNormalization into the convolution, so the artifact may hold
        # fewer values than the network, never an auxiliary head's (> 1000).
        stored = constants(target)
        assert not [name for name in stored if "aux" in name], stored
        assert n - 200 < sum(stored.values()) <= n + 50, (sum(stored.values()), n)
    assert got.dtype == np.float32 and got.shape == (3, CLASSES)
    # float32 in another summation order: ~1e-6 relative per reduction over
    # 7 stages, logits O(1): 1e-4 is 10x that.
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("trained", ["float32"], indirect=True)
def test_openvino_default_precision_is_bfloat16_only_where_the_cpu_has_it(tmp_path, trained):
    """OpenVINO's CPU plugin picks its own precision when `compile_model`
    gets no config: bfloat16 on CPUs with native bfloat16, float32
    elsewhere. Checked on either kind of CPU."""
    import openvino

    _, model, reference = trained
    target = model.export(str(tmp_path / "model.xml"), format="openvino", verbose=False)
    core = openvino.Core()
    native_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    hint = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    assert hint == ("<Type: 'bfloat16'>" if native_bf16 else "<Type: 'float32'>"), hint
    x = np.random.default_rng(7).uniform(size=(16, SIZE, SIZE, 3)).astype("float32")
    want = logits_of(reference, x)
    default = run_openvino(target, x, config=None)
    scale = np.abs(want).max()
    if native_bf16:
        # bfloat16 rounds each op's inputs and outputs to 8 mantissa bits
        # (eps 2^-8); 7 rounding stages on the inference path (stem conv,
        # BN, three convs, pooling, dense), each off by at most ~eps of the
        # logits' scale: |error| <= 7 * 2^-8 * max|logit|.
        bound = 7 * 2.0**-8 * scale
        error = np.abs(default - want).max()
        assert error <= bound, (error, bound)
        # ... and the default is not float32: its error is far above
        # float32's (~1e-6 relative), which the explicit config restores.
        assert error > 1e-4 * scale, error
        np.testing.assert_allclose(run_openvino(target, x), want, atol=1e-4, rtol=1e-4)
    else:
        # float32 by default; same 1e-4 as the float32 comparison above.
        np.testing.assert_allclose(default, want, atol=1e-4, rtol=1e-4)


def test_missing_converter_raises_an_import_error_naming_the_package(tmp_path, monkeypatch, capsys):
    """A converter that cannot be imported (simulated: `sys.modules[name] =
    None` makes `import name` fail) gives an ImportError naming the pip
    package, from the API and as a one-line CLI error."""
    model = dks_model(seed=4)
    for format, package, file in [
        ("onnx", "tf2onnx", "m.onnx"),
        ("openvino", "openvino", "m.xml"),
    ]:
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, package, None)
            with pytest.raises(ImportError, match=rf"needs the `{package}` package.*pip install {package}"):
                model.export(str(tmp_path / file), format=format)
    assert not os.listdir(tmp_path)  # refused before writing anything
    classifier().save(tmp_path / "model.keras")
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    code, out, err = run_main(
        ["--model", str(tmp_path / "model.keras"), "--format", "onnx",
         "--output", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: format=\"onnx\" needs the `tf2onnx` package")
    assert len(err.strip().splitlines()) == 1


def test_keras_track_still_stores_each_weight_twice(tmp_path):
    """Canary for keras-team/keras#23553.

    `ExportArchive.track(model)` + `add_endpoint` stores every weight twice;
    our exports avoid `track()`. When this test fails, Keras has fixed it:
    drop the workaround (`_expose_variables`) and this test.
    """
    model = classifier()
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve", model.call,
        input_signature=[tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32)],
    )
    archive.write_out(str(tmp_path / "tracked"), verbose=False)
    count, size = sizes(model.variables)
    assert checkpoint_sizes(str(tmp_path / "tracked")) == (2 * count, 2 * size)
    path = export_saved_model(model, tmp_path / "ours")
    assert checkpoint_sizes(path) == (count, size)


def test_remote_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = dks_model()
    # TF Serving layout: refused (no atomic rename on object stores), and
    # nothing is written locally (it used to create ./gs:/bucket/x/1).
    with pytest.raises(ValueError, match=r"local folder.*gcloud storage cp -r"):
        export_saved_model(model, "gs://bucket/x")
    with pytest.raises(ValueError, match="writes local files only"):
        model.export("gs://bucket/model.onnx", format="onnx")
    assert os.listdir(tmp_path) == []
    # tf_saved_model goes through tf.io.gfile: any registered filesystem.
    path = model.export("ram://dks_export/saved_model", verbose=False)
    assert tf.io.gfile.exists(path + "/saved_model.pb")
    loaded = tf.saved_model.load(path)
    np.testing.assert_allclose(
        loaded.serve(TRAIN_X[:2]),
        logits_of(model.inference_model(), TRAIN_X[:2]),
        atol=1e-5,
    )
    assert os.listdir(tmp_path) == []


def test_dks_export_bad_arguments(tmp_path):
    model = dks_model()
    for kwargs, error, match in [
        ({"format": "keras"}, ValueError, "format must be one of"),
        ({"format": "torch"}, ValueError, "needs the PyTorch backend"),
    ]:
        with pytest.raises(error, match=match):
            model.export(str(tmp_path / "m"), **kwargs)
    for name, format, match in [
        ("m.onnx", "litert", r"\.tflite"),
        ("m.tflite", "onnx", r"\.onnx"),
        ("m", "openvino", r"\.xml"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.export(str(tmp_path / name), format=format)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------
# Fine-tuning from pretrained keras-hub weights (a local preset folder)
# --------------------------------------------------------------------------
def test_fine_tune_a_keras_hub_preset_and_export(tmp_path):
    import keras_hub

    keras.utils.set_random_seed(0)
    pretrained = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 4, 4], stackwise_num_blocks=[1, 1, 1],
        stackwise_num_strides=[1, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(SIZE, SIZE, 3),
    )
    preset = str(tmp_path / "tiny_resnet_preset")
    pretrained.save_to_preset(preset)

    backbone = keras_hub.models.Backbone.from_preset(preset)  # local: nothing downloaded
    for a, b in zip(backbone.weights, pretrained.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    model = DKSModel(backbone, num_classes=3, taps="auto")
    assert model.taps == ["P3", "P2"]
    start = {v.path: v.numpy() for v in backbone.trainable_variables}
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.fit(TRAIN_X, TRAIN_Y % 3, batch_size=4, epochs=1, verbose=0)
    changed = sum(
        not np.allclose(start[v.path], v.numpy()) for v in backbone.trainable_variables
    )
    assert changed == len(start)  # every pretrained weight was fine-tuned

    path = model.export(str(tmp_path / "model.onnx"), format="onnx", verbose=False)
    np.testing.assert_allclose(
        run_onnx(path, TRAIN_X[:3]),
        logits_of(model.inference_model(), TRAIN_X[:3]),
        atol=1e-4, rtol=1e-4,
    )


# --------------------------------------------------------------------------
# Command line, in process: every flag, and bad input as one-line errors
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_dks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    model = dks_model(seed=3)
    model.save(folder / "model.keras")
    return model, str(folder / "model.keras")


def run_main(argv, capsys):
    """keras_dks.export.main(argv) -> (exit code, stdout, stderr)."""
    from keras_dks.export import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_flags(tmp_path, saved_dks, capsys):
    model, path = saved_dks
    base = tmp_path / "exports"
    x = np.random.default_rng(6).uniform(0, 4, size=(3, SIZE, SIZE, 3)).astype("float32")
    logits = logits_of(model.inference_model(), x * 0.5 - 1.0)
    argv = ["--model", path, "--export_base", str(base), "--version", "7",
            "--input_dtype", "float32", "--scale", "0.5", "--offset", "-1", "--top_k", "2"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert out.strip() == str(base / "7")
    serve = serving_fn(str(base / "7"))
    (spec,) = serve.structured_input_signature[1].values()
    assert spec.dtype == tf.float32
    check_outputs(serve(images=x), logits, k=2)  # Rescaling(0.5, offset=-1) baked in

    # The same version again: refused without --overwrite, replaced with it.
    code, _, err = run_main(argv[:-6] + ["--top_k", "3"], capsys)
    assert code == 2 and err.startswith("error: Version 7 already exists") and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_main(argv[:-6] + ["--top_k", "3", "--overwrite"], capsys)
    assert code == 0, err
    check_outputs(serving_fn(str(base / "7"))(images=x), logits_of(model.inference_model(), x), k=3)
    assert os.listdir(base) == ["7"]

    # Another format.
    onnx_path = str(tmp_path / "model.onnx")
    code, out, err = run_main(["--model", path, "--format", "onnx", "--output", onnx_path], capsys)
    assert code == 0, err
    assert out.strip() == onnx_path
    np.testing.assert_allclose(
        run_onnx(onnx_path, x), logits_of(model.inference_model(), x), atol=1e-4, rtol=1e-4
    )


def test_cli_bad_input_is_one_line(tmp_path, saved_dks, capsys):
    _, path = saved_dks
    not_a_model = tmp_path / "broken.keras"
    not_a_model.write_text("not a zip file")
    for argv, match in [
        (["--model", str(tmp_path / "missing.keras"), "--export_base", str(tmp_path)],
         "no model file at"),
        (["--model", str(not_a_model), "--export_base", str(tmp_path / "b")],
         "cannot load .* as a Keras model"),
        (["--model", path, "--export_base", "gs://bucket/x"], "must be a local folder"),
        (["--model", path, "--format", "onnx", "--output", str(tmp_path / "m.onnx"),
          "--top_k", "3"], "--top_k only apply to --format serving"),
        (["--model", path, "--format", "litert"], "needs --output"),
        (["--model", path], "needs --export_base"),
        (["--model", path, "--format", "litert", "--output", str(tmp_path / "m.onnx")],
         r"\.tflite"),
    ]:
        code, out, err = run_main(argv, capsys)
        assert code == 2, (argv, err)
        assert re.search(match, err), (match, err)
        assert "Traceback" not in err and out == ""
        assert len([line for line in err.splitlines() if "error: " in line]) == 1
    assert sorted(os.listdir(tmp_path)) == ["broken.keras"]


def test_cli_openvino_export_says_how_to_load_it_in_float32(tmp_path, capsys):
    classifier().save(tmp_path / "model.keras")
    target = str(tmp_path / "model.xml")
    code, out, err = run_main(
        ["--model", str(tmp_path / "model.keras"), "--format", "openvino", "--output", target],
        capsys)
    assert code == 0 and out.strip() == target
    assert "bfloat16" in err and "INFERENCE_PRECISION_HINT" in err and target in err
    line = re.search(r"openvino\.Core\(\)\.compile_model\(.*\)", err).group(0)
    import openvino

    compiled = eval(line, {"openvino": openvino})  # the line the CLI prints runs
    x = np.random.default_rng(8).uniform(size=(2, SIZE, SIZE, 3)).astype("float32")
    model = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(np.asarray(compiled(x)[0]), logits_of(model, x), atol=1e-4, rtol=1e-4)


def test_cli_shows_keras_progress_bar_on_a_terminal(tmp_path):
    """On a terminal the CLI draws Keras' progress bar over its stages on
    stderr; stdout still ends with the path written."""
    import pty

    keras.utils.set_random_seed(0)
    model = DKSModel(tiny_backbone(size=SIZE), num_classes=CLASSES, taps=["s1"], head="simple")
    model.save(tmp_path / "model.keras")
    base = tmp_path / "exports"
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_dks.export", "--model", str(tmp_path / "model.keras"),
         "--export_base", str(base)],
        stdout=subprocess.PIPE, stderr=slave, cwd=tmp_path, env=env, text=True,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    out = proc.stdout.read()
    assert proc.wait(timeout=300) == 0
    os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert out.strip().splitlines()[-1] == str(base / "1")
    assert "2/2" in err and "━" in err, err[-2000:]  # Keras' Progbar, both stages
