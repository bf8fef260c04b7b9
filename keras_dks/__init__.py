"""keras_dks: Deeply-supervised Knowledge Synergy for Keras 3 / TensorFlow."""

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
