"""The statistics and the pairing behind the published accuracy studies."""

import json
import os
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import accuracy  # noqa: E402


def test_paired_comparison_matches_scipy_paired_t_test_and_textbook_ci():
    rng = np.random.default_rng(0)
    base = {s: 0.16 + 0.005 * rng.standard_normal() for s in range(8)}
    dks = {s: base[s] - 0.004 + 0.004 * rng.standard_normal() for s in range(8)}
    dks[99] = 0.01  # unpaired seeds are ignored
    r = accuracy.paired_comparison(base, dks)
    a = np.array([base[s] for s in range(8)])
    b = np.array([dks[s] for s in range(8)])
    ref = stats.ttest_rel(a, b, alternative="greater")
    assert r["n"] == 8 and r["seeds"] == list(range(8))
    np.testing.assert_allclose(r["mean_gain"], np.mean(a - b), rtol=1e-12)
    np.testing.assert_allclose(r["t"], ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(r["p_one_sided"], ref.pvalue, rtol=1e-10)
    # 95 % CI: mean +- t_{0.975, 7} sd / sqrt(8); t_{0.975, 7} = 2.364624 (tables).
    half = 2.364624 * np.std(a - b, ddof=1) / np.sqrt(8)
    np.testing.assert_allclose(r["ci95"], [np.mean(a - b) - half, np.mean(a - b) + half], rtol=1e-5)


def test_paired_comparison_sign_worse_method_gets_large_p():
    r = accuracy.paired_comparison({0: 0.10, 1: 0.11, 2: 0.12}, {0: 0.12, 1: 0.12, 2: 0.14})
    assert r["mean_gain"] < 0 and r["p_one_sided"] > 0.9
    assert accuracy.paired_comparison({0: 0.1}, {0: 0.2})["p_one_sided"] is None


def _write_run(folder, method, seed, config):
    os.makedirs(os.path.join(folder, "runs"), exist_ok=True)
    with open(os.path.join(folder, "runs", f"{method}_seed{seed}.json"), "w") as f:
        json.dump({"method": method, "seed": seed, "config": config, "heads": ["main"],
                   "test_error": {"main": 0.1}, "wall_seconds_last_session": 1.0}, f)


def test_runs_of_different_configurations_are_never_summarised_together(tmp_path):
    _write_run(str(tmp_path), "baseline", 0, {"train_examples": 2000})
    _write_run(str(tmp_path), "dks", 0, {"train_examples": 1000})
    with pytest.raises(ValueError, match="different configurations"):
        accuracy.load_runs(str(tmp_path))


def test_methods_of_a_seed_start_from_the_same_inference_network():
    """The pairing claim: for one seed, baseline, DS and DKS start with the
    same backbone and main-classifier weights (the study builds them so)."""
    import keras

    import keras_dks
    from keras_dks import recipes

    def initial_weights(method):
        keras.utils.set_random_seed(5)
        backbone = keras_dks.backbones.wide_resnet(10, 1, 10, input_shape=(16, 16, 1))
        model = recipes.build_model(method, backbone, weight_decay=5e-4, seed=5)
        return model.inference_model().get_weights()

    base = initial_weights("baseline")
    for method in ("ds", "dks"):
        other = initial_weights(method)
        assert len(other) == len(base)
        for x, y in zip(base, other):
            np.testing.assert_array_equal(x, y)



def test_spread_verdict_calls_a_difference_only_without_overlap():
    from benchmarks import common

    # Per-image seconds of the committed precision run (bf16 ~10x slower):
    # once read "within noise" by a one-sided overlap check.
    f32, bf16 = [1 / 150, 1 / 125, 1 / 170], [1 / 18, 1 / 21, 1 / 17]
    assert common.spread_verdict(bf16, f32) == "b faster"
    assert common.spread_verdict(f32, bf16) == "a faster"
    assert common.spread_verdict([1.0, 1.2], [1.1, 1.3]).startswith("overlap")
