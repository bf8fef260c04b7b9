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
    """The pairing claim for data: `accuracy.run` (its seeding, its datasets,
    its model building) hands every method of one seed the same batches in
    the same order, epoch after epoch; another seed gets another order."""
    seen = {}

    def recording_train(model, train_ds, test_ds, epochs, **kwargs):
        batches = []
        for _ in range(epochs):  # one pass per epoch, as fit makes
            batches.append([(x.numpy().copy(), y.numpy().copy()) for x, y in train_ds])
        seen[(model.name, len(model.head_names))] = batches
        return {"head_errors": {h: 0.5 for h in model.head_names}, "history": {},
                "wall_seconds": 0.0, "train_images_per_second": 1.0}

    monkeypatch.setattr(accuracy.recipes, "train", recording_train)
    orders = {}
    for method, seed in (("baseline", 3), ("dks", 3), ("ds", 3), ("baseline", 4)):
        seen.clear()
        accuracy.run(method, seed)
        (batches,) = seen.values()
        orders[(method, seed)] = batches
    base = orders[("baseline", 3)]
    assert len(base) == 3 and len(base[0]) == 6  # 48 images, batch 8
    for method in ("dks", "ds"):
        for epoch_a, epoch_b in zip(base, orders[(method, 3)]):
            assert len(epoch_a) == len(epoch_b)
            for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b):
                np.testing.assert_array_equal(ya, yb)
                np.testing.assert_array_equal(xa, xb)

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
