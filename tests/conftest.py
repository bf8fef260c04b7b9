"""Shared fixtures. Plain helpers live in `helpers.py`."""

import os

import pytest

# The tests compile many tiny XLA programs (JAX, `jit_compile=True`), each
# run a few times: LLVM's optimisation passes cost more compile time than
# they save. Set before any test imports TensorFlow or JAX; subprocesses
# inherit it.
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA_FLAGS}".strip()

# The modules holding the long subprocess runs, longest first. xdist hands
# out work in collection order (pyproject.toml: --no-loadscope-reorder), so the
# long runs start first and the many short tests fill in at the end, instead
# of one worker finishing a long example alone.
SLOW_MODULES = ("test_distribute.py", "test_backends.py", "test_examples.py",
                "test_callbacks.py", "test_mixed_precision.py", "test_export.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable

import helpers


@pytest.fixture(autouse=True)
def _seeded():
    """Each test starts from seed 0 (Python, NumPy, Keras' global seed
    generator and TensorFlow's): unseeded initialisations draw the same
    weights whichever tests ran before in the same worker."""
    import keras

    keras.utils.set_random_seed(0)


@pytest.fixture
def tiny_backbone():
    """Factory: `tiny_backbone(bn=False, size=16, name="tiny", widths=...,
    stem="conv")`, see `helpers.tiny_backbone`."""
    return helpers.tiny_backbone


@pytest.fixture
def make_data():
    """Factory: `make_data(n=32, size=16, classes=5, seed=0)` -> (x, y)."""
    return helpers.data


@pytest.fixture
def round_trip():
    """`round_trip(obj, inputs=None)`: see `helpers.assert_serialization_round_trip`."""
    return helpers.assert_serialization_round_trip
