"""keras_dks.draws: the (seed, step) draws behind every training-time mask."""

import numpy as np
import pytest
import tensorflow as tf

from keras_dks import draws


def test_stateless_uniform_is_tensorflows_stateless_draw():
    # The documented TensorFlow stream: tf.random.stateless_uniform(seed=[seed, step]).
    got = draws.stateless_uniform((5,), seed=7, step=3).numpy()
    want = tf.random.stateless_uniform([5], seed=tf.constant([7, 3], tf.int64)).numpy()
    np.testing.assert_array_equal(got, want)
    assert draws.stateless_uniform((), 7, tf.Variable(3, dtype=tf.int64)).numpy() == (
        tf.random.stateless_uniform([], seed=tf.constant([7, 3], tf.int64)).numpy())


def test_pair_mask_is_a_function_of_seed_and_step():
    a = draws.pair_mask(200, 0.5, seed=7, step=3).numpy()
    b = draws.pair_mask(200, 0.5, seed=7, step=3).numpy()
    c = draws.pair_mask(200, 0.5, seed=7, step=4).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    u = draws.stateless_uniform((200,), 7, 3).numpy()
    np.testing.assert_array_equal(a, (u < 0.5).astype("float32"))


def test_bernoulli_mask_and_categorical_follow_the_uniform_draw():
    u = draws.stateless_uniform((3,), 5, 9).numpy()
    probs = [0.2, 0.5, 0.9]
    np.testing.assert_array_equal(draws.bernoulli_mask(probs, 5, 9).numpy(),
                                  (u < np.float32(probs)).astype("float32"))
    cumulative = np.cumsum([0.2, 0.5, 0.3])
    for step in range(20):
        v = draws.stateless_uniform((), 5, step).numpy()
        want = int(np.sum(v >= cumulative[:-1].astype("float32")))
        assert int(draws.categorical(cumulative, 5, step)) == want


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate(p):
    # 20 000 Bernoulli draws: 4.9 standard deviations is a 1e-6 two-sided bound.
    n = 20_000
    rate = float(np.mean([draws.pair_mask(100, p, seed=1, step=s).numpy()
                          for s in range(n // 100)]))
    assert abs(rate - p) < 4.9 * np.sqrt(p * (1 - p) / n), rate
