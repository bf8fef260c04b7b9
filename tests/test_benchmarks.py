"""The statistics and the pairing behind the published accuracy studies."""

import json
import os
import sys

import numpy as np
import pytest
from scipy import stats
from scipy import stats as stats_module

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
    from keras_dks import methods

    def initial_weights(method):
        keras.utils.set_random_seed(5)
        backbone = keras_dks.backbones.wide_resnet(10, 1, 10, input_shape=(16, 16, 1))
        model = methods.build_model(method, backbone, weight_decay=5e-4, seed=5)
        return model.inference_model().get_weights()

    base = initial_weights("baseline")
    for method in ("ds", "dks"):
        other = initial_weights(method)
        assert len(other) == len(base)
        for x, y in zip(base, other):
            np.testing.assert_array_equal(x, y)



def _write_fashion_idx(folder, n_train, n_test, seed=0):
    """Four tiny IDX files in Fashion-MNIST's names (magic, sizes, uint8 data)."""
    import gzip
    import struct

    from keras_dks.data import fashion_mnist

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        arrays = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, n, dtype=np.uint8))
        for name, array in zip(fashion_mnist.FILES[split], arrays):
            raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
            raw += struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
            with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
                f.write(raw)


@pytest.fixture
def study_flags(tmp_path):
    """accuracy.py's flags, parsed and restored after the test, on a tiny
    IDX Fashion-MNIST and a small network."""
    from absl import flags
    from absl.testing import flagsaver

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    data = tmp_path / "idx"
    data.mkdir()
    _write_fashion_idx(str(data), n_train=80, n_test=10)
    with flagsaver.flagsaver(data_dir=str(data), train_examples=48, batch_size=8, epochs=3,
                             depth=10, eval_every=1, out_dir=str(tmp_path / "out"),
                             augment=False):
        yield flags.FLAGS


def test_methods_of_a_seed_see_the_same_batches_in_the_same_order(study_flags, monkeypatch):
    """The pairing claim, through `accuracy.run` itself (its seeding, its
    datasets, its model building): every method of one seed gets the same
    batches in the same order, epoch after epoch, and the same initial
    backbone and main-classifier weights; another seed gets another order."""
    seen, initial = {}, {}

    def recording_train(model, train_ds, test_ds, epochs, **kwargs):
        initial[len(model.head_names)] = model.inference_model().get_weights()
        batches = []
        for _ in range(epochs):  # one pass per epoch, as fit makes
            batches.append([(x.numpy().copy(), y.numpy().copy()) for x, y in train_ds])
        seen[(model.name, len(model.head_names))] = batches
        return {"head_errors": {h: 0.5 for h in model.head_names}, "history": {},
                "wall_seconds": 0.0, "train_images_per_second": 1.0}

    monkeypatch.setattr(accuracy.recipes, "train", recording_train)
    orders, weights = {}, {}
    for method, seed in (("baseline", 3), ("dks", 3), ("ds", 3), ("baseline", 4)):
        seen.clear()
        initial.clear()
        accuracy.run(method, seed)
        (batches,) = seen.values()
        (weights[(method, seed)],) = initial.values()
        orders[(method, seed)] = batches
    base = orders[("baseline", 3)]
    assert len(base) == 3 and len(base[0]) == 6  # 48 images, batch 8
    for method in ("dks", "ds"):
        for epoch_a, epoch_b in zip(base, orders[(method, 3)]):
            assert len(epoch_a) == len(epoch_b)
            for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b):
                np.testing.assert_array_equal(ya, yb)
                np.testing.assert_array_equal(xa, xb)
        assert len(weights[(method, 3)]) == len(weights[("baseline", 3)])
        for wa, wb in zip(weights[("baseline", 3)], weights[(method, 3)]):
            np.testing.assert_array_equal(wa, wb)

    def label_order(batches):
        return [np.concatenate([y for _, y in epoch]).tolist() for epoch in batches]

    # The order is a real shuffle: it changes between epochs and seeds (else
    # equal orders above would prove nothing).
    assert label_order(base)[0] != label_order(base)[1]
    images = lambda b: np.concatenate([x for x, _ in b[0]])  # noqa: E731
    assert not np.array_equal(images(base), images(orders[("baseline", 4)]))


def test_spread_verdict_calls_a_difference_only_without_overlap():
    from benchmarks import common

    # Per-image seconds of the committed precision run (bf16 ~10x slower):
    # once read "within noise" by a one-sided overlap check.
    f32, bf16 = [1 / 150, 1 / 125, 1 / 170], [1 / 18, 1 / 21, 1 / 17]
    assert common.spread_verdict(bf16, f32) == "b faster"
    assert common.spread_verdict(f32, bf16) == "a faster"
    assert common.spread_verdict([1.0, 1.2], [1.1, 1.3]).startswith("overlap")


# --------------------------------------------------------------------------
# The head-cost study's summary (benchmarks/head_cost.py), on synthetic runs
# --------------------------------------------------------------------------
RECIPE_CONFIG = {"augment": False, "batch_size": 64, "depth": 16, "epochs": 24, "eval_every": 4,
                 "lr": 0.1, "threads": 1, "train_examples": 5000, "weight_decay": 0.0005,
                 "width": 1}


def _study_run(folder, method, seed, error, config, commit="5adc4f5"):
    os.makedirs(os.path.join(folder, "runs"), exist_ok=True)
    record = {"method": method, "seed": seed, "config": config, "heads": ["main"],
              "command": "python benchmarks/head_cost.py --threads 1",
              "environment": {"git_commit": commit, "cpu": "cpu", "cpu_count": 2,
                              "tensorflow": "2", "keras": "3"},
              "test_error": {"main": error}, "wall_seconds_last_session": 1.0}
    with open(os.path.join(folder, "runs", f"{method}_seed{seed}.json"), "w") as f:
        json.dump(record, f)


@pytest.fixture
def head_cost():
    from benchmarks import head_cost as module

    return module


@pytest.fixture
def synthetic_study(tmp_path, head_cost):
    """Baseline and authors' runs (5 seeds) and two designs' runs."""
    rng = np.random.default_rng(1)
    base_dir, study_dir = str(tmp_path / "n5000"), str(tmp_path / "study")
    errors = {"baseline": 0.126 + 0.005 * rng.standard_normal(5)}
    errors["authors"] = errors["baseline"] - 0.011 + 0.003 * rng.standard_normal(5)
    errors["width_0.5"] = errors["baseline"] - 0.010 + 0.003 * rng.standard_normal(5)
    errors["conv"] = errors["baseline"] - 0.001 + 0.003 * rng.standard_normal(5)
    for seed in range(5):
        _study_run(base_dir, "baseline", seed, errors["baseline"][seed], RECIPE_CONFIG)
        _study_run(base_dir, "dks", seed, errors["authors"][seed], RECIPE_CONFIG)
        for design in ("width_0.5", "conv"):
            config = dict(RECIPE_CONFIG, model_kwargs=head_cost.DESIGNS[design])
            _study_run(os.path.join(study_dir, design), "dks", seed, errors[design][seed], config)
    return base_dir, study_dir, errors


def test_head_cost_summary_pairs_every_design_with_the_baseline_and_the_authors(
        synthetic_study, head_cost):
    base_dir, study_dir, errors = synthetic_study
    by_design, _ = head_cost.load_study(study_dir, base_dir, list(head_cost.DESIGNS))
    flops = {n: {"train_flops_ratio": 1.0, "params_training": 1} for n in head_cost.DESIGNS}
    stats = head_cost.summarise_study(by_design, flops)
    for name in ("authors", "width_0.5", "conv"):
        gain = stats[name]["gain"]
        t = stats_module.ttest_rel(errors["baseline"], errors[name], alternative="greater")
        np.testing.assert_allclose(gain["mean_gain"], np.mean(errors["baseline"] - errors[name]),
                                   rtol=1e-12)  # float64 mean of 5 numbers
        np.testing.assert_allclose(gain["p_one_sided"], t.pvalue, rtol=1e-10)
        assert stats[name]["seeds_finished"] == 5
    for name in ("width_0.5", "conv"):
        t = stats_module.ttest_rel(errors["authors"], errors[name], alternative="greater")
        np.testing.assert_allclose(stats[name]["vs_authors"]["p_one_sided"], t.pvalue, rtol=1e-10)
        np.testing.assert_allclose(stats[name]["vs_authors"]["mean_gain"],
                                   np.mean(errors["authors"] - errors[name]), rtol=1e-12)
    # Designs not run yet are listed with 0 seeds and no verdict.
    assert stats["depth_1"]["seeds_finished"] == 0
    assert stats["depth_1"]["verdict"].startswith("incomplete")
    assert stats["width_0.5"]["verdict"].startswith("keeps")
    assert stats["conv"]["verdict"].startswith("loses")


def test_head_cost_verdict_needs_every_seed(head_cost):
    strong = accuracy.paired_comparison({0: 0.13, 1: 0.12}, {0: 0.11, 1: 0.10})
    entry = {"seeds_finished": 2, "gain": strong, "vs_authors": strong}
    assert head_cost.verdict(entry).startswith("incomplete (2 of 5")
    lines = head_cost.conclusions({"authors": {"seeds_finished": 5, "verdict": "ref"},
                                   "conv": dict(entry, verdict=head_cost.verdict(entry))})
    assert any("evidence is incomplete" in line and "conv 2/5" in line for line in lines)
    assert any(line.startswith("No cheaper default") for line in lines)


def test_head_cost_summary_refuses_runs_of_another_configuration(synthetic_study, head_cost):
    base_dir, study_dir, _ = synthetic_study
    designs = list(head_cost.DESIGNS)
    config = dict(RECIPE_CONFIG, epochs=12, model_kwargs=head_cost.DESIGNS["conv"])
    _study_run(os.path.join(study_dir, "conv"), "dks", 7, 0.1, config)
    with pytest.raises(ValueError, match="different configurations"):
        head_cost.load_study(study_dir, base_dir, designs)
    # All of a design's runs at another recipe than the baseline's.
    for seed in (0, 1, 2, 3, 4, 7):
        _study_run(os.path.join(study_dir, "conv"), "dks", seed, 0.1, config)
    with pytest.raises(ValueError, match="must match the baseline"):
        head_cost.load_study(study_dir, base_dir, designs)
    # The right recipe, another head than the design's.
    config = dict(RECIPE_CONFIG, model_kwargs={"head_width": 0.3})
    for seed in (0, 1, 2, 3, 4, 7):
        _study_run(os.path.join(study_dir, "conv"), "dks", seed, 0.1, config)
    with pytest.raises(ValueError, match="design conv is"):
        head_cost.load_study(study_dir, base_dir, designs)


def test_head_cost_training_flops_grow_with_the_heads(head_cost, monkeypatch):
    """Training-graph FLOPs on a small study-like network: the authors' heads
    cost more than the baseline, and DS costs what DKS costs up to the
    synergy loss (a few ops per logit). Narrower heads hold fewer parameters.
    (About 3 s per FLOPs count, most of it TensorFlow's graph profiler.)"""
    monkeypatch.setitem(head_cost.NETWORK, "depth", 10)
    monkeypatch.setitem(head_cost.NETWORK, "input_shape", [16, 16, 1])
    monkeypatch.setitem(head_cost.NETWORK, "batch", 8)
    models = {name: head_cost.build_variant(*head_cost.cost_variants()[name])
              for name in ("baseline", "ds", "authors", "width_0.25")}
    flops = {name: head_cost.train_flops(models[name]) for name in ("baseline", "ds", "authors")}
    assert flops["authors"] > 1.5 * flops["baseline"]  # heads of 2 taps at full width
    # The synergy loss: 2 pairs x batch x classes softmax / log-softmax terms,
    # well under 1 % of a training step of even this small network.
    assert 0 <= flops["authors"] - flops["ds"] < 0.01 * flops["ds"]
    params = {name: m.count_params() for name, m in models.items()}
    assert params["baseline"] < params["width_0.25"] < params["authors"]


def test_head_cost_holm_matches_the_step_down_procedure(head_cost):
    """Adjusted p_i <= alpha exactly when Holm's step-down procedure, run
    at level alpha, rejects hypothesis i (its definition), for every alpha
    of a fine grid; a design without a test keeps None."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = {f"d{k}": float(v) for k, v in enumerate(rng.uniform(0, 0.2, size=5))}
        adjusted = head_cost.holm(dict(p, untested=None))
        assert adjusted["untested"] is None
        for alpha in np.linspace(0.001, 0.3, 300):
            rejected, m = set(), len(p)
            for j, (name, value) in enumerate(sorted(p.items(), key=lambda kv: kv[1])):
                if value > alpha / (m - j):
                    break
                rejected.add(name)
            assert {n for n in p if adjusted[n] <= alpha} == rejected, (p, alpha)


def test_head_cost_conclusion_names_the_cheapest_design_that_keeps_the_gain(head_cost):
    """All seeds in, a design keeps the gain but trains above 1.3x: the
    conclusion says no cheaper default and gives that design's numbers; at
    or under 1.3x it is named as possible."""
    strong = accuracy.paired_comparison({s: 0.13 + 0.01 * s for s in range(5)},
                                        {s: 0.11 + 0.01 * s + 0.001 * (s % 2) for s in range(5)})
    def design(ratio):
        entry = {"seeds_finished": 5, "gain": strong, "vs_authors": strong,
                 "train_flops_ratio": 1.2,
                 "step_time_ratio": {"median": ratio, "range": [ratio - 0.1, ratio + 0.1]}}
        return dict(entry, verdict=head_cost.verdict(entry))
    lines = head_cost.conclusions({"authors": {"seeds_finished": 5, "verdict": "ref"},
                                   "depth_1": design(1.66), "depth_1_width_0.5": design(1.32)})
    assert lines[0] == "Keep the gain: depth_1, depth_1_width_0.5."
    assert "No cheaper default: " in lines[-1] and "depth_1_width_0.5, trains at 1.32x" in lines[-1]
    lines = head_cost.conclusions({"authors": {"seeds_finished": 5, "verdict": "ref"},
                                   "depth_1_width_0.5": design(1.30)})
    assert lines[-1].startswith("Cheaper default possible") and "depth_1_width_0.5" in lines[-1]
