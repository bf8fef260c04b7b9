"""Every class keras_dks registers for serialization survives a round trip
(one helper, `helpers.assert_serialization_round_trip`, for all), and the
models pass keras-hub's own harness (`run_serialization_test`,
`run_model_saving_test`)."""

import keras
import numpy as np
import pytest

import keras_dks
from keras_dks import backbones, methods
from helpers import assert_serialization_round_trip, tiny_backbone


def _x(size):
    return np.random.default_rng(0).uniform(size=(2, size, size, 3)).astype("float32")


def _chain():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="a1")(inp)
    x = keras.layers.Conv2D(4, 3, padding="same", name="a2")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="b")(x)
    return keras.Model(inp, x)


def _srdl():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inp))
    net = keras.Model(inp, keras.layers.Dense(3)(x))
    return methods.SRDLModel(net, temperature=2.0, table_shape=(4, 3))


# One instance (and its input) per registered class.
FACTORIES = {
    "keras_dks>DKSModel": lambda: (
        keras_dks.DKSModel(tiny_backbone(size=8), num_classes=3, head="conv",
                           pairs="top_down", aux_weight=[0.5, 0.3], seed=1), _x(8)),
    "keras_dks>DHMModel": lambda: (
        methods.DHMModel(_chain(), num_classes=3, roots=[["a1", "a2"]],
                         head="simple", seed=1), _x(8)),
    "keras_dks>RootSelector": lambda: (
        methods.RootSelector(["a", "b"], [0.3, 0.7], seed=2), None),
    "keras_dks>SRDLModel": lambda: (_srdl(), None),
    "keras_dks>WideResNet": lambda: (
        backbones.wide_resnet(10, 1, num_classes=3, input_shape=(8, 8, 3)), _x(8)),
    "keras_dks>CifarResNet": lambda: (
        backbones.resnet_cifar(8, num_classes=3, input_shape=(8, 8, 3)), _x(8)),
    "keras_dks>SkipNonFinite": lambda: (
        keras_dks.optimizers.SkipNonFinite(keras.optimizers.SGD(0.1, momentum=0.9)), None),
    "keras_dks>ResNet": lambda: (
        backbones.resnet18(num_classes=3, input_shape=(16, 16, 3)), _x(16)),
}


def test_every_registered_class_has_a_round_trip():
    registered = {k for k in keras.saving.get_custom_objects() if k.startswith("keras_dks>")}
    assert registered == set(FACTORIES), registered ^ set(FACTORIES)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_serialization_round_trip(name):
    obj, inputs = FACTORIES[name]()
    assert_serialization_round_trip(obj, inputs)


# keras-hub's harness (a test dependency): the round trips by the ecosystem's
# rule. run_serialization_test compares configs and the attributes (dir) of
# the revived object; run_model_saving_test saves, loads and compares outputs.
from keras_hub.src.tests import test_case as hub_test_case  # noqa: E402

HUB_MODELS = {
    "DKSModel": lambda: (keras_dks.DKSModel, dict(
        backbone=tiny_backbone(size=8), num_classes=3, head="conv",
        pairs="top_down", aux_weight=[0.5, 0.3], seed=1), _x(8)),
    "DHMModel": lambda: (methods.DHMModel, dict(
        backbone=_chain(), num_classes=3, roots=[["a1", "a2"]], head="simple",
        branch_keep_prob=0.5, branch_sampling="step", seed=1), _x(8)),
}


class KerasHubHarnessTest(hub_test_case.TestCase):
    test_session = None  # tf.test.TestCase's deprecated helper, not a test

    def test_dks_model_serialization(self):
        cls, kwargs, _ = HUB_MODELS["DKSModel"]()
        self.run_serialization_test(cls(**kwargs))

    def test_dhm_model_serialization(self):
        cls, kwargs, _ = HUB_MODELS["DHMModel"]()
        self.run_serialization_test(cls(**kwargs))

    def test_dks_model_saving(self):
        cls, kwargs, x = HUB_MODELS["DKSModel"]()
        self.run_model_saving_test(cls, kwargs, x)

    def test_dhm_model_saving(self):
        cls, kwargs, x = HUB_MODELS["DHMModel"]()
        self.run_model_saving_test(cls, kwargs, x)
