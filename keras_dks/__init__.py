"""keras_dks: Deeply-supervised Knowledge Synergy for Keras 3 / TensorFlow."""

from keras_dks import blocks
from keras_dks import heads
from keras_dks import losses
from keras_dks import taps
from keras_dks.model import DKSModel

__version__ = "0.1.0"
