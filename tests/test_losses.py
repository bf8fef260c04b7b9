"""Synergy loss and per-head CE against independent NumPy formulas."""

import numpy as np
import pytest
import tensorflow as tf

from keras_dks import losses
from helpers import np_log_softmax


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_pairs(name, n):
    # Written out from the paper's Fig. 2, independently of resolve_pairs.
    all_pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    return {
        "bidirectional": all_pairs,
        "top_down": [(i, j) for (i, j) in all_pairs if j < i],
        "bottom_up": [(i, j) for (i, j) in all_pairs if j > i],
        "none": [],
    }[name]


def np_synergy(logits, pairs, betas, sample_weight=None):
    """Value and analytic gradient of sum beta * mean_b H(p_t, p_s)."""
    b = logits[0].shape[0]
    w = np.ones(b) if sample_weight is None else sample_weight
    value = 0.0
    grads = [np.zeros_like(z) for z in logits]
    for (s, t), beta in zip(pairs, betas):
        target = np_softmax(logits[t])
        h = -(target * np_log_softmax(logits[s])).sum(-1)
        value += beta * (w * h).sum() / b
        # dH/dz_s = softmax(z_s) - target; the teacher gets nothing.
        grads[s] += beta * w[:, None] * (np_softmax(logits[s]) - target) / b
    return value, grads


def make_logits(n_heads=3, batch=6, classes=7, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, classes)) * scale for _ in range(n_heads)]


@pytest.mark.parametrize("strategy", ["bidirectional", "top_down", "bottom_up", "none"])
@pytest.mark.parametrize("n_heads", [2, 3, 4])
def test_synergy_value_and_gradients_match_numpy(strategy, n_heads):
    logits = make_logits(n_heads)
    pairs = np_pairs(strategy, n_heads)
    betas = list(np.linspace(0.5, 2.0, len(pairs))) if pairs else []
    vars_ = [tf.Variable(z, dtype=tf.float32) for z in logits]
    with tf.GradientTape() as tape:
        loss = losses.synergy_loss(vars_, pairs=strategy, weights=betas or 1.0)
    grads = tape.gradient(loss, vars_)
    ref_value, ref_grads = np_synergy(logits, pairs, betas)
    np.testing.assert_allclose(float(loss), ref_value, rtol=1e-5, atol=1e-6)
    for g, ref in zip(grads, ref_grads):
        g = np.zeros_like(ref) if g is None else g.numpy()
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)


def test_strategy_pair_sets():
    assert losses.resolve_pairs("bidirectional", 3) == np_pairs("bidirectional", 3)
    assert losses.resolve_pairs("top_down", 3) == [(1, 0), (2, 0), (2, 1)]
    assert losses.resolve_pairs("bottom_up", 3) == [(0, 1), (0, 2), (1, 2)]
    assert losses.resolve_pairs("none", 3) == []
    # With 3 heads the authors' code adds 6 pair terms.
    assert len(losses.resolve_pairs("bidirectional", 3)) == 6


def test_teacher_gets_no_gradient_through_target_role():
    logits = make_logits(2)
    student = tf.Variable(logits[0], dtype=tf.float32)
    teacher = tf.Variable(logits[1], dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss = losses.synergy_loss([student, teacher], pairs=[(0, 1)])
    g_student, g_teacher = tape.gradient(loss, [student, teacher])
    assert g_teacher is None or np.all(g_teacher.numpy() == 0)
    assert np.abs(g_student.numpy()).sum() > 0


def test_custom_pairs_and_weights():
    logits = make_logits(3, seed=3)
    pairs = [(2, 0), (1, 2)]
    value = losses.synergy_loss(
        [tf.constant(z, tf.float32) for z in logits], pairs=pairs, weights=[0.3, 1.7]
    )
    ref, _ = np_synergy(logits, pairs, [0.3, 1.7])
    np.testing.assert_allclose(float(value), ref, rtol=1e-5)


def test_sample_weights_follow_sum_over_batch_size():
    logits = make_logits(2, batch=5)
    w = np.array([1.0, 0.0, 2.0, 0.5, 1.0])
    value = losses.synergy_loss(
        [tf.constant(z, tf.float32) for z in logits], pairs="bidirectional",
        sample_weight=tf.constant(w, tf.float32),
    )
    ref, _ = np_synergy(logits, np_pairs("bidirectional", 2), [1.0, 1.0], w)
    np.testing.assert_allclose(float(value), ref, rtol=1e-5)


def test_summed_over_classes_not_averaged():
    # Uniform target on C classes against a uniform student: H = log(C).
    c = 100
    z = [tf.zeros((4, c)), tf.zeros((4, c))]
    value = losses.synergy_loss(z, pairs=[(0, 1)])
    np.testing.assert_allclose(float(value), np.log(c), rtol=1e-6)


def test_stable_for_huge_logits():
    z = [tf.constant([[1e4, -1e4, 0.0]]), tf.constant([[-1e4, 1e4, 0.0]])]
    value = losses.synergy_loss(z, pairs=[(0, 1)])
    assert np.isfinite(float(value))
    np.testing.assert_allclose(float(value), 2e4, rtol=1e-6)


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(5, 4)) * 4
    y = np.eye(4)[[0, 3, 1, 1, 2]]
    ce = losses.cross_entropy(tf.constant(y), tf.constant(z, tf.float32))
    np.testing.assert_allclose(ce.numpy(), -(y * np_log_softmax(z)).sum(-1), rtol=1e-5)


@pytest.mark.parametrize(
    "pairs, match",
    [
        ([(0, 3)], "does not exist"),
        ([(1, 1)], "itself"),
        ([(0, 1), (0, 1)], "twice"),
        ("sideways", "Unknown pairs"),
        ([(0, 1, 2)], "two entries"),
        (5, "neither"),
    ],
)
def test_bad_pairs(pairs, match):
    with pytest.raises(ValueError, match=match):
        losses.resolve_pairs(pairs, 3)


def test_bad_weights():
    with pytest.raises(ValueError, match="non-negative"):
        losses.resolve_weights(-1.0, 3, "synergy_weight", "pairs")
    with pytest.raises(ValueError, match="exactly 6 values"):
        losses.resolve_weights([1.0, 2.0], 6, "synergy_weight", "pairs")
    with pytest.raises(ValueError, match="non-negative"):
        losses.resolve_weights([1.0, float("nan")], 2, "aux_weight", "heads")


def test_label_targets_int_onehot_and_invalid_rows():
    t = losses.label_targets(np.array([2, 0, 5, -1]), 3, label_smoothing=0.3).numpy()
    np.testing.assert_allclose(t[0], [0.1, 0.1, 0.8], rtol=1e-6)
    np.testing.assert_allclose(t[1], [0.8, 0.1, 0.1], rtol=1e-6)
    assert np.isnan(t[2]).all() and np.isnan(t[3]).all()  # out of range
    frac = losses.label_targets(np.array([1.0, 1.5], "float32"), 3).numpy()
    np.testing.assert_array_equal(frac[0], [0, 1, 0])
    assert np.isnan(frac[1]).all()  # never truncated to 1
    soft = np.array([[0.2, 0.3, 0.5]], "float32")
    np.testing.assert_allclose(losses.label_targets(soft, 3).numpy(), soft)


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.array([0, 3]), "outside that range"),
        (np.array([0.0, 2.5]), "would be truncated"),
        (np.array([[0.5, 0.6, 0.0]]), "sum to 1"),
        (np.array([[-0.5, 1.5, 0.0]]), "non-negative"),
        (np.zeros((2, 2, 2)), "fit neither"),
    ],
)
def test_check_labels_names_the_problem(labels, match):
    with pytest.raises(ValueError, match=match):
        losses.check_labels(labels, 3)


def test_dks_loss_terms_with_a_pair_mask_match_numpy():
    rng = np.random.default_rng(4)
    z = [rng.normal(size=(5, 4)).astype("float32") for _ in range(3)]
    y = rng.integers(0, 4, 5)
    pairs = losses.resolve_pairs("bidirectional", 3)
    betas = [0.5, 1.0, 2.0, 1.5, 0.25, 1.0]
    mask = np.array([1, 0, 1, 1, 0, 1], "float32")
    terms = losses.dks_loss_terms(losses.label_targets(y, 4), z, [1.0, 0.7, 0.3],
                                  pairs, betas, pair_mask=mask)
    ls = [np_log_softmax(v.astype("float64")) for v in z]
    onehot = np.eye(4)[y]
    ce = [-(onehot * l).sum(-1) for l in ls]
    syn = sum(m * b * -(np.exp(ls[t]) * ls[s]).sum(-1)
              for (s, t), b, m in zip(pairs, betas, mask))
    ref = (ce[0] + 0.7 * ce[1] + 0.3 * ce[2] + syn).mean()
    np.testing.assert_allclose(float(terms["loss"]), ref, rtol=1e-5)
    np.testing.assert_allclose(float(terms["synergy"]), syn.mean(), rtol=1e-5)
    np.testing.assert_allclose([float(c) for c in terms["ce"]], [c.mean() for c in ce],
                               rtol=1e-5)


def test_old_draw_names_warn_and_name_the_new_place():
    from keras_dks import draws

    with pytest.warns(DeprecationWarning, match="keras_dks.draws.pair_mask"):
        old = losses.pair_mask
    assert old is draws.pair_mask
    with pytest.warns(DeprecationWarning, match="keras_dks.draws.stateless_uniform"):
        assert losses.stateless_uniform is draws.stateless_uniform


@pytest.mark.parametrize("row, valid", [
    ([0.2, 0.3, 0.5], True),
    ([0.0, 1.0, 0.0], True),
    ([0.5, 0.6, 0.0], False),           # sums to 1.1
    ([-0.1, 0.6, 0.5], False),          # negative entry, sums to 1
    ([float("nan"), 0.5, 0.5], False),
    ([float("inf"), 0.0, 0.0], False),
])
def test_soft_label_rows_that_are_not_distributions_get_nan_targets(row, valid):
    """The graph's rule is check_labels' rule: a row it rejects gets NaN."""
    y = np.array([[1.0, 0.0, 0.0], row], "float32")
    t = losses.label_targets(y, 3).numpy()
    np.testing.assert_array_equal(t[0], [1.0, 0.0, 0.0])  # other rows untouched
    if valid:
        np.testing.assert_array_equal(t[1], np.asarray(row, "float32"))
        losses.check_labels(y, 3)
    else:
        assert np.isnan(t[1]).all()
        with pytest.raises(ValueError, match="row 1"):
            losses.check_labels(y, 3)
