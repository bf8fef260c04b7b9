"""Stateless random draws keyed on `(seed, step)`.

Every training-time draw of the package (per-pair dropping, DHM's branch
mask and dynamic roots) comes from `stateless_uniform`: a function of a
seed and a step counter only, so every replica draws the same values and a
resumed run draws what an uninterrupted one does.
"""

import keras
from keras import ops


def stateless_uniform(shape, seed, step):
    """Uniform float32 draws in [0, 1), a function of `(seed, step)` only.

    TensorFlow: `tf.random.stateless_uniform(shape, seed=[seed, step])`;
    JAX: `jax.random.uniform(fold_in(PRNGKey(seed), step), shape)`;
    PyTorch: `torch.rand` from a generator seeded with
    `seed * 1_000_003 + step`. Reproducible per backend; the backends' streams
    differ.

    Args:
        shape: shape of the draw (`()` for a scalar).
        seed: Python int.
        step: int scalar (Python int, tensor or an int variable).

    Example:
    ```python
    keras_dks.draws.stateless_uniform((3,), seed=1, step=0)  # same 3 numbers
    ```
    """
    shape = tuple(int(d) for d in shape)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        s = tf.stack([tf.constant(int(seed), tf.int64), tf.cast(step, tf.int64)])
        return tf.random.stateless_uniform(list(shape), seed=s)
    if backend == "jax":
        import jax

        key = jax.random.fold_in(
            jax.random.PRNGKey(int(seed)), ops.convert_to_tensor(step)
        )
        return jax.random.uniform(key, shape)
    if backend == "torch":
        import torch

        gen = torch.Generator().manual_seed(
            (int(seed) * 1_000_003 + int(ops.convert_to_numpy(step))) % (2**63)
        )
        return ops.convert_to_tensor(torch.rand(shape, generator=gen).numpy())
    raise RuntimeError(
        f"Stateless draws (pair_keep_prob < 1, DHMModel's branch and root "
        f"sampling) need the TensorFlow, JAX or PyTorch backend; KERAS_BACKEND "
        f"is {backend!r}. Run with one of those, or train without the draws."
    )


def bernoulli_mask(probs, seed, step):
    """A float32 0/1 mask, entry `k` is 1 with probability `probs[k]`.

    `stateless_uniform((len(probs),), seed, step) < probs`: the same mask
    for the same `(seed, step)` on every backend and replica.

    Args:
        probs: a list of probabilities in [0, 1].
        seed: the model's integer seed.
        step: the draw counter (an int or an int tensor).

    Returns:
        A float32 tensor of shape `(len(probs),)`.

    Example:
    ```python
    keras_dks.draws.bernoulli_mask([1.0, 0.0, 0.5], seed=0, step=3)
    # [1., 0., 0. or 1.]
    ```
    """
    u = stateless_uniform((len(probs),), seed, step)
    return ops.cast(u < ops.convert_to_tensor(probs, "float32"), "float32")


def pair_mask(num_pairs, keep_prob, seed, step):
    """Per-pair dropping (`pair_keep_prob`): a 1/0 float32 mask per pair.

    `stateless_uniform((num_pairs,), seed, step) < keep_prob`.

    Example:
    ```python
    keras_dks.draws.pair_mask(6, 0.5, seed=1, step=0)  # e.g. [1, 0, 0, 1, 1, 0]
    ```
    """
    draw = stateless_uniform((num_pairs,), seed, step)
    return ops.cast(draw < keep_prob, "float32")


def categorical(cumulative, seed, step):
    """An int32 index drawn with cumulative probabilities `cumulative`.

    The number of entries of `cumulative[:-1]` that are `<=
    stateless_uniform((), seed, step)`: index `k` has probability
    `cumulative[k] - cumulative[k - 1]`.

    Args:
        cumulative: non-decreasing cumulative probabilities ending at 1.
        seed: the model's integer seed.
        step: the draw counter (an int or an int tensor).

    Returns:
        An int32 scalar tensor in `[0, len(cumulative))`.

    Example:
    ```python
    keras_dks.draws.categorical([0.0, 0.0, 1.0], seed=0, step=0)   # 2
    ```
    """
    u = stateless_uniform((), seed, step)
    bounds = ops.convert_to_tensor(list(cumulative)[:-1], "float32")
    return ops.sum(ops.cast(u >= bounds, "int32"))
