"""keras_dks: Deeply-supervised Knowledge Synergy for Keras 3 / TensorFlow."""


def _check_backend_installed():
    # The backend is the user's to install (keras-dks requires none, like
    # keras-hub). Keras runs on TensorFlow unless KERAS_BACKEND or
    # ~/.keras/keras.json says otherwise: name the fix instead of failing
    # inside `import keras`.
    import json
    import os
    import sys

    if "keras" in sys.modules:
        backend = sys.modules["keras"].backend.backend()
    else:
        backend = os.environ.get("KERAS_BACKEND")
        home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
        if not backend:
            try:
                with open(os.path.join(home, "keras.json")) as f:
                    backend = json.load(f).get("backend")
            except (OSError, ValueError, AttributeError):
                backend = None
    if (backend or "tensorflow") != "tensorflow":
        return
    try:
        import tensorflow  # noqa: F401 (Keras imports it next anyway)
    except ImportError as e:
        raise ImportError(
            "keras_dks runs on Keras' TensorFlow backend here (KERAS_BACKEND is "
            "unset or 'tensorflow') and TensorFlow is not installed. Install it: "
            "`pip install tensorflow` (or `tensorflow-cpu`), or "
            "`pip install keras-dks[tensorflow]`; or use another backend, e.g. "
            "KERAS_BACKEND=jax with `pip install keras-dks[jax]`."
        ) from e


_check_backend_installed()

from keras_dks import backbones
from keras_dks import blocks
from keras_dks import callbacks
from keras_dks import distribute
from keras_dks import draws
from keras_dks import heads
from keras_dks import losses
from keras_dks import optimizers
from keras_dks import taps
from keras_dks.model import DKSModel
from keras_dks import methods  # after DKSModel: methods subclasses it

__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily: an eager `from keras_dks.export import ...` here would
    # make `python -m keras_dks.export` warn that the module was imported twice.
    if name in ("export_saved_model", "export_inference"):
        from keras_dks import export

        return getattr(export, name)
    # Submodules of the examples' plumbing, loaded on first use
    # (`keras_dks.data.fashion_mnist`, `keras_dks.recipes`, `keras_dks.plots`).
    if name in ("data", "plots", "recipes"):
        import importlib

        return importlib.import_module(f"keras_dks.{name}")
    raise AttributeError(f"module 'keras_dks' has no attribute {name!r}")
