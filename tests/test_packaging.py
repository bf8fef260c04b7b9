"""The package installs right anywhere.

- Its requirements are static (`pyproject.toml`; no `setup.py` that could
  read the building machine): the wheel's unconditional requirements name no
  TensorFlow distribution, so installing it beside `tensorflow` or
  `tensorflow-cpu` never adds the other; TensorFlow comes through the
  `tensorflow` / `tensorflow-cpu` extras.
- `import keras_dks` and a tiny `fit` work on JAX where TensorFlow cannot be
  imported at all; on the TensorFlow backend without TensorFlow the import
  fails with an error that names the fix.

`.ci/compat` installs the built wheel into a fresh virtualenv beside
tensorflow-cpu and runs `pip check` and a `fit` there.
"""

import os
import re
import subprocess
import sys
import textwrap
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF_DISTRIBUTIONS = {"tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel",
                    "tensorflow-macos", "tf-nightly", "tf-nightly-cpu"}


def _tensorflows(requirements):
    """The requirements that name a TensorFlow distribution."""
    names = [re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-")
             for r in requirements]
    return [r for r, n in zip(requirements, names) if n in TF_DISTRIBUTIONS]


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_requirements_are_static_and_leave_the_backend_to_the_user():
    assert not os.path.exists(os.path.join(ROOT, "setup.py"))
    project = _project()
    assert "dependencies" not in project.get("dynamic", [])
    deps = project["dependencies"]
    assert "keras>=3.10" in deps
    assert not _tensorflows(deps), deps
    extras = project["optional-dependencies"]
    assert any(r.startswith("tensorflow>=2.19") for r in extras["tensorflow"])
    assert any(r.startswith("tensorflow-cpu>=2.19") for r in extras["tensorflow-cpu"])


@pytest.fixture(scope="module")
def wheel_metadata(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), ROOT],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("keras_dks-*.whl")
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def test_wheel_requires_no_tensorflow_outside_extras(wheel_metadata):
    requires = [line.split(":", 1)[1].strip() for line in wheel_metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    unconditional = [r for r in requires if "extra ==" not in r]
    assert "keras>=3.10" in unconditional, unconditional
    assert not _tensorflows(unconditional), unconditional
    assert not [r for r in unconditional if r.startswith("tensorboard")], unconditional
    assert 'tensorflow>=2.19; extra == "tensorflow"' in requires, requires
    assert 'tensorflow-cpu>=2.19; extra == "tensorflow-cpu"' in requires, requires


# Makes `import tensorflow` fail as if TensorFlow were not installed.
BLOCK_TENSORFLOW = textwrap.dedent("""
    import sys

    class _NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoTensorFlow())
""")

FIT = textwrap.dedent("""
    import sys
    import keras
    import numpy as np
    import keras_dks

    assert "tensorflow" not in sys.modules
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="s1")(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="s2")(x)
    model = keras_dks.DKSModel(keras.Model(inp, x), num_classes=3, taps=["s1"],
                               head="simple", weight_decay=5e-4)
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    rng = np.random.default_rng(0)
    hist = model.fit(rng.uniform(size=(16, 8, 8, 3)).astype("float32"),
                     rng.integers(0, 3, 16), batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(hist.history["loss"]).all(), hist.history
    assert "tensorflow" not in sys.modules
    print("fit ok", keras.backend.backend())
""")


def _run_without_tensorflow(tmp_path, backend, code):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
    env = dict(os.environ, KERAS_BACKEND=backend,
               PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_jax_backend_imports_and_trains_without_tensorflow(tmp_path):
    proc = _run_without_tensorflow(tmp_path, "jax", FIT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fit ok jax" in proc.stdout


def test_tensorflow_backend_without_tensorflow_names_the_fix(tmp_path):
    proc = _run_without_tensorflow(tmp_path, "tensorflow", "import keras_dks")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "pip install tensorflow" in proc.stderr, proc.stderr[-2000:]
    assert "keras-dks[tensorflow]" in proc.stderr
    # The blocker works: TensorFlow really could not be imported.
    check = _run_without_tensorflow(tmp_path, "jax", "import tensorflow")
    assert check.returncode != 0 and "No module named 'tensorflow'" in check.stderr
