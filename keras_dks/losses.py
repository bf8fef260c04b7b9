"""The DKS losses: per-head cross-entropy and the pairwise synergy loss.

For heads with logits z_k and probabilities p_k = softmax(z_k):

    L = sum_k alpha_k CE(y, z_k)
      + sum_{(i, j) in Q} beta_ij H(stop_gradient(p_j), p_i)

with H(t, p) = -sum_c t_c log p_c. Every term is summed over classes and
averaged over the batch (averaging over classes is a known re-implementation
bug that removes the gain). All terms are computed from `log_softmax` in
float32, so they are stable for large logits and under mixed precision.

The authors' code logs KL(p_j || p_i) (with 1e-8 smoothing) instead of H;
they differ by the entropy of the detached target, a constant for the
gradient, so training is identical and only the logged value differs.
"""

import keras
from keras import ops

PAIR_STRATEGIES = ("bidirectional", "top_down", "bottom_up", "none")


def resolve_pairs(pairs, num_heads):
    """The (student, teacher) index pairs of a pair strategy.

    Heads are ordered by depth: 0 is the main (deepest) head, then the
    auxiliary heads from the deepest tap to the shallowest. In a pair
    `(student, teacher)` the student mimics the teacher.

    Args:
        pairs: `"bidirectional"` (every ordered pair, the paper's default),
            `"top_down"` (deeper heads teach shallower ones: teacher index
            smaller than student index), `"bottom_up"` (the reverse),
            `"none"` (deep supervision without synergy), or a list of
            `(student, teacher)` index pairs.
        num_heads: number of heads.

    Returns:
        A list of `(student, teacher)` tuples of ints.

    Example:
    >>> resolve_pairs("top_down", 3)
    [(1, 0), (2, 0), (2, 1)]
    """
    if isinstance(pairs, str):
        if pairs not in PAIR_STRATEGIES:
            raise ValueError(
                f"Unknown pairs={pairs!r}. Use one of {list(PAIR_STRATEGIES)} "
                "or a list of (student, teacher) head indices."
            )
        heads = range(num_heads)
        if pairs == "bidirectional":
            return [(i, j) for i in heads for j in heads if i != j]
        if pairs == "top_down":
            return [(i, j) for i in heads for j in heads if j < i]
        if pairs == "bottom_up":
            return [(i, j) for i in heads for j in heads if j > i]
        return []
    try:
        resolved = [tuple(int(v) for v in p) for p in pairs]
    except (TypeError, ValueError):
        raise ValueError(
            f"pairs={pairs!r} is neither a strategy name nor a list of "
            "(student, teacher) index pairs, e.g. [(1, 0), (2, 0)]."
        ) from None
    for p in resolved:
        if len(p) != 2:
            raise ValueError(
                f"Pair {p} must have two entries: (student, teacher)."
            )
        s, t = p
        if not (0 <= s < num_heads and 0 <= t < num_heads):
            raise ValueError(
                f"Pair {p} names a head that does not exist: there are "
                f"{num_heads} heads, indices 0..{num_heads - 1} (0 is the main "
                "head, then the auxiliary heads from deepest to shallowest). "
                "Add taps or fix the indices."
            )
        if s == t:
            raise ValueError(
                f"Pair {p} pairs head {s} with itself; a head cannot be its "
                "own teacher. Remove it."
            )
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"pairs={resolved} lists a pair twice; remove it.")
    return resolved


def resolve_weights(weights, count, what, fix):
    """A float or one float per item -> list of `count` non-negative floats."""
    if isinstance(weights, (int, float)):
        values = [float(weights)] * count
    else:
        values = [float(w) for w in weights]
        if len(values) != count:
            raise ValueError(
                f"{what} has {len(values)} entries but there are {count} "
                f"{fix}. Pass a single float or exactly {count} values."
            )
    for w in values:
        if not w >= 0.0:  # also rejects NaN
            raise ValueError(
                f"{what} must be non-negative, got {w}. Use 0 to switch a "
                "term off."
            )
    return values


def soft_cross_entropy(target_logits, logits, temperature=1.0):
    """Per-example H(stop_gradient(softmax(t/T)), softmax(z/T)), shape (B,).

    The target is detached: no gradient reaches the teacher through its
    target role.
    """
    t = ops.stop_gradient(ops.cast(target_logits, "float32"))
    z = ops.cast(logits, "float32")
    if temperature != 1.0:
        t = t / temperature
        z = z / temperature
    target = ops.softmax(t, axis=-1)
    return -ops.sum(target * ops.log_softmax(z, axis=-1), axis=-1)


def cross_entropy(targets, logits):
    """Per-example CE with a (B, C) target distribution, shape (B,)."""
    z = ops.cast(logits, "float32")
    return -ops.sum(
        ops.cast(targets, "float32") * ops.log_softmax(z, axis=-1), axis=-1
    )


def coupled_weight_decay(variables, weight_decay):
    """`weight_decay / 2 * sum ||w||^2` over `variables`, in float32.

    Added to the loss, its gradient is `weight_decay * w`: PyTorch's
    `SGD(weight_decay=...)` (coupled L2), which the DKS authors apply to
    every trainable variable, BatchNorm and biases included.
    """
    if not weight_decay or not variables:
        return ops.zeros((), "float32")
    squares = [ops.sum(ops.square(ops.cast(v, "float32"))) for v in variables]
    return (float(weight_decay) / 2.0) * ops.sum(ops.stack(squares))


def _batch_mean(per_example, sample_weight):
    if sample_weight is not None:
        per_example = per_example * ops.cast(
            ops.reshape(sample_weight, (-1,)), "float32"
        )
    # Keras' "sum_over_batch_size": weights scale examples, the divisor
    # stays the batch size.
    return ops.sum(per_example) / ops.cast(ops.shape(per_example)[0], "float32")


def synergy_terms(logits, pairs="bidirectional", weights=1.0):
    """Per-example weighted synergy loss summed over pairs, shape (B,)."""
    pair_list = resolve_pairs(pairs, len(logits))
    betas = resolve_weights(weights, len(pair_list), "synergy_weight", "pairs")
    total = None
    for (s, t), beta in zip(pair_list, betas):
        if beta == 0.0:
            continue
        term = beta * soft_cross_entropy(logits[t], logits[s])
        total = term if total is None else total + term
    if total is None:
        total = ops.zeros(ops.shape(logits[0])[:1], "float32")
    return total


def synergy_loss(logits, pairs="bidirectional", weights=1.0, sample_weight=None):
    """The DKS synergy loss of a list of heads' logits (a scalar).

    sum over pairs (i, j) of beta_ij * mean_batch H(stop_gradient(p_j), p_i).

    Args:
        logits: list of `(batch, classes)` logits, ordered by depth (main
            head first).
        pairs: pair strategy or list of `(student, teacher)` pairs, see
            `resolve_pairs`.
        weights: beta, a float or one float per pair.
        sample_weight: optional `(batch,)` per-example weights.

    Example:
    ```python
    z = [keras.random.normal((8, 10)) for _ in range(3)]
    loss = keras_dks.losses.synergy_loss(z, pairs="bidirectional")
    ```
    """
    return _batch_mean(synergy_terms(logits, pairs, weights), sample_weight)
