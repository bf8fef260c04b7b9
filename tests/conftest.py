"""Shared fixtures. Plain helpers live in `helpers.py`."""

import pytest

import helpers


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
