"""keras_dks.utils: atomic writes and the step learning-rate schedule."""

import json
import os

import numpy as np
import pytest

from keras_dks import utils


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "w.weights.h5")
    seen = []

    def write(tmp):
        seen.append(tmp)
        with open(tmp, "w") as f:
            f.write("new")

    with open(path, "w") as f:
        f.write("old")
    utils.atomic_write(path, write, ".weights.h5")
    # Writers that check the extension (Keras' save_weights) get it.
    assert seen[0].endswith(".weights.h5") and seen[0] != path
    assert open(path).read() == "new"
    assert os.listdir(tmp_path) == ["w.weights.h5"]


def test_a_failing_write_keeps_the_old_file_and_cleans_up(tmp_path):
    path = str(tmp_path / "state.json")
    utils.atomic_write_json(path, {"epoch": 3})

    def dies_half_way(tmp):
        with open(tmp, "w") as f:
            f.write('{"epoch": 4, "trunc')
        raise KeyboardInterrupt  # e.g. Ctrl-C while writing

    with pytest.raises(KeyboardInterrupt):
        utils.atomic_write(path, dies_half_way)
    assert json.load(open(path)) == {"epoch": 3}
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_json_round_trips(tmp_path):
    path = str(tmp_path / "h.json")
    data = {"loss": [1.5, 0.25], "heads": ["main", "aux_s1"], "nested": {"k": None}}
    utils.atomic_write_json(path, data, indent=1)
    assert json.load(open(path)) == data


@pytest.mark.parametrize(
    "spe,boundaries,decay",
    [(391, (60, 120, 160), 0.2), (5005, (30, 60, 90), 0.1), (10, (0.35, 0.9), 0.5),
     (3, (0.3, 0.6, 0.8), 0.5), (7, (0, 2), 0.1), (10, (), 0.2)],
)
def test_step_schedule_is_lr_times_decay_per_boundary_reached(spe, boundaries, decay):
    schedule = utils.step_schedule(0.1, spe, boundaries, decay)
    last = int(spe * (max(boundaries, default=1) + 1))
    steps = np.unique(np.concatenate([
        np.arange(0, min(last, 50)),
        [max(0, int(round(b * spe)) + d) for b in boundaries for d in (-1, 0, 1)],
        [last],
    ]))
    for step in steps:
        # Update number `step` (0-based) of epoch step // spe: the rate is
        # decayed once per boundary epoch it has reached.
        reached = sum(step >= round(b * spe) for b in boundaries)
        expected = 0.1 * decay**reached
        assert float(schedule(int(step))) == pytest.approx(expected, rel=1e-6), step


def test_step_schedule_rejects_unordered_or_negative_boundaries():
    with pytest.raises(ValueError, match="increasing"):
        utils.step_schedule(0.1, 10, (60, 30), 0.2)
    with pytest.raises(ValueError, match="non-negative"):
        utils.step_schedule(0.1, 10, (-1, 3), 0.2)
