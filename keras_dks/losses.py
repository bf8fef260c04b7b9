"""The DKS losses: per-head cross-entropy and the pairwise synergy loss.

For heads with logits z_k and probabilities p_k = softmax(z_k):

    L = sum_k alpha_k CE(y, z_k)
      + sum_{(i, j) in Q} beta_ij H(stop_gradient(p_j), p_i)

with H(t, p) = -sum_c t_c log p_c. Every term is summed over classes and
averaged over the batch (averaging over classes is a known re-implementation
bug that removes the gain). All terms are computed from `log_softmax` in
float32 (float64 for float64 logits), so they are stable for large logits
and under mixed precision.

The authors' code logs KL(p_j || p_i) (with 1e-8 smoothing) instead of H;
they differ by the entropy of the detached target, a constant for the
gradient, so training is identical and only the logged value differs.
"""

import keras
import numpy as np
from keras import ops

PAIR_STRATEGIES = ("bidirectional", "top_down", "bottom_up", "none")


def _wide(x):
    """`x` in float32, or in float64 if it is float64: losses are computed
    in float32 or wider (bfloat16 / float16 logits are upcast, a float64
    model keeps float64)."""
    x = ops.convert_to_tensor(x)
    if keras.backend.standardize_dtype(x.dtype) == "float64":
        return x
    return ops.cast(x, "float32")


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
    """A float or one float per item -> list of `count` non-negative floats.

    Args:
        weights: a float (used for every item) or a sequence of `count`
            floats.
        count: number of items (auxiliary heads, pairs).
        what: the argument's name, for the error message.
        fix: what the items are, for the error message.

    Returns:
        A list of `count` floats.

    Raises:
        ValueError: a sequence of another length, or a negative or NaN
            weight.

    Example:
    ```python
    keras_dks.losses.resolve_weights(0.5, 3, "synergy_weight", "pairs")
    # [0.5, 0.5, 0.5]
    ```
    """
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
    target role. Computed in float32 (float64 for float64 logits).

    Args:
        target_logits: `(B, C)` logits of the teacher.
        logits: `(B, C)` logits of the student.
        temperature: T, dividing both logits (1.0 in DKS).

    Returns:
        A `(B,)` tensor.

    Example:
    ```python
    t = keras.ops.convert_to_tensor([[2.0, 0.0]])
    z = keras.ops.convert_to_tensor([[0.0, 0.0]])
    keras_dks.losses.soft_cross_entropy(t, z)   # [log 2] = [0.6931]
    ```
    """
    t = ops.stop_gradient(_wide(target_logits))
    z = _wide(logits)
    if temperature != 1.0:
        t = t / temperature
        z = z / temperature
    target = ops.softmax(t, axis=-1)
    return -ops.sum(target * ops.log_softmax(z, axis=-1), axis=-1)


def cross_entropy(targets, logits):
    """Per-example CE with a (B, C) target distribution, shape (B,).

    Args:
        targets: `(B, C)` target probabilities (one-hot, smoothed or soft).
        logits: `(B, C)` logits, computed on in float32 (float64 for
            float64 logits).

    Returns:
        A `(B,)` tensor: `-sum(targets * log_softmax(logits), -1)`.

    Example:
    ```python
    y = keras.ops.one_hot(keras.ops.convert_to_tensor([1]), 3)
    keras_dks.losses.cross_entropy(y, keras.ops.zeros((1, 3)))  # [log 3]
    ```
    """
    z = _wide(logits)
    return -ops.sum(ops.cast(targets, z.dtype) * ops.log_softmax(z, axis=-1), axis=-1)


def coupled_weight_decay(variables, weight_decay):
    """`weight_decay / 2 * sum ||w||^2` over `variables`, in float32
    (float64 if the variables are float64).

    Added to the loss, its gradient is `weight_decay * w`: PyTorch's
    `SGD(weight_decay=...)` (coupled L2), which the DKS authors apply to
    every trainable variable, BatchNorm and biases included.

    Args:
        variables: the variables to decay (`DKSModel` passes all its
            trainable variables).
        weight_decay: the coefficient (5e-4 for the CIFAR WRNs of the
            authors' code, 1e-4 elsewhere in the paper); 0 gives 0.

    Returns:
        A scalar tensor.

    Example:
    ```python
    w = keras.Variable([[3.0, 4.0]])
    keras_dks.losses.coupled_weight_decay([w], 0.1)   # 0.05 * 25 = 1.25
    ```
    """
    if not weight_decay or not variables:
        return ops.zeros((), "float32")
    squares = [ops.sum(ops.square(_wide(v))) for v in variables]
    return (float(weight_decay) / 2.0) * ops.sum(ops.stack(squares))


def batch_mean(per_example, sample_weight=None):
    """Keras' "sum_over_batch_size" of a per-example loss, a scalar.

    Weights scale examples; the divisor stays the batch size.

    Example:
    ```python
    batch_mean(ops.convert_to_tensor([1.0, 3.0]), [1.0, 0.0])  # 0.5
    ```
    """
    if sample_weight is not None:
        per_example = per_example * ops.cast(
            ops.reshape(sample_weight, (-1,)), per_example.dtype
        )
    return ops.sum(per_example) / ops.cast(ops.shape(per_example)[0], per_example.dtype)


def scale_for_distribution(value):
    """Divide a loss by the replica count under `tf.distribute`.

    Gradients are SUM all-reduced across replicas, so every loss term is
    divided by the replica count exactly once (`keras.losses.Loss` does the
    same for its own reduction). On JAX and PyTorch, and on TensorFlow
    without a multi-replica strategy, it returns `value` unchanged (JAX's
    `keras.distribution.DataParallel` computes losses on the global batch).

    Example:
    ```python
    loss = scale_for_distribution(batch_mean(per_example))
    ```
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            value = value * (1.0 / replicas)
    return value


def unscale_for_distribution(value):
    """Inverse of `scale_for_distribution` (for logging a replica's loss)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            value = value * float(replicas)
    return value


# --------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------
# A label row of length num_classes must sum to 1 within this: float32 rows
# (softmax outputs, normalised counts) carry <= num_classes * 2**-24 of
# rounding, below 1e-3 up to ~16k classes; a row off by more is not a
# distribution.
ROW_SUM_TOLERANCE = 1e-3


def check_labels(y, num_classes):
    """Reject labels that would train silently wrong, before any step runs.

    Accepted: integer class indices in `[0, num_classes)` of shape `(batch,)`
    or `(batch, 1)` (integral floats such as `2.0` too), or one-hot / soft
    label rows of shape `(batch, num_classes)` that are finite,
    non-negative and sum to 1 (within `ROW_SUM_TOLERANCE`). These are the
    labels `label_targets` turns into targets; any other label gets a NaN
    target row there.

    Args:
        y: NumPy array or eager tensor of labels.
        num_classes: the model's number of classes (`model.num_classes`).

    Raises:
        ValueError: naming the first bad label and the fix.

    Example:
    ```python
    check_labels(np.array([0, 2, 1]), num_classes=3)      # fine
    check_labels(np.array([0.0, 2.5]), num_classes=3)     # ValueError
    ```
    """
    y = np.asarray(y)
    c = int(num_classes)
    if y.ndim == 2 and y.shape[-1] == c and c > 1:
        if not np.issubdtype(y.dtype, np.number):
            raise ValueError(f"Labels must be numbers; got dtype {y.dtype}.")
        rows = y.astype("float64")
        bad = ~np.isfinite(rows).all(-1) | (rows < 0).any(-1)
        bad |= np.abs(rows.sum(-1) - 1.0) > ROW_SUM_TOLERANCE
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"Label rows of shape (batch, {c}) are read as one-hot or soft "
                f"labels, which must be non-negative and sum to 1; row {i} is "
                f"{rows[i].tolist()} (sum {rows[i].sum():g}). Normalise the rows "
                "(y / y.sum(-1, keepdims=True)) or pass integer class indices."
            )
        return
    if y.ndim == 2 and y.shape[-1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"Labels of shape {y.shape} fit neither integer class indices "
            f"(batch,) nor one-hot vectors (batch, {c})."
        )
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
        raise ValueError(f"Labels must be numbers; got dtype {y.dtype}.")
    if np.issubdtype(y.dtype, np.floating):
        frac = ~np.isfinite(y) | (y != np.round(y))
        if frac.any():
            i = int(np.argmax(frac))
            raise ValueError(
                f"Label {y[i]!r} (example {i}) is not a class index: integer "
                f"class indices in [0, {c}) are expected, and a float label "
                "would be truncated. Pass integer labels, or one-hot / soft "
                f"label rows of shape (batch, {c})."
            )
    out = (y < 0) | (y >= c)
    if out.any():
        i = int(np.argmax(out))
        raise ValueError(
            f"Labels must be integer class indices in [0, {c}) or one-hot/"
            f"probability vectors of length {c}; label {y[i]!r} (example {i}) "
            "is outside that range. Fix the labels or build the model with "
            "the right num_classes."
        )


def label_targets(y, num_classes, label_smoothing=0.0):
    """The `(batch, num_classes)` float32 target distribution of labels.

    Integer labels (`(batch,)` or `(batch, 1)`) are one-hot encoded; rows of
    length `num_classes` are used as given (one-hot or soft labels). A label
    that `check_labels` would reject gets a NaN row instead, so the loss of
    its batch is NaN rather than trained on a wrong target (a compiled step
    cannot raise): an index outside `[0, num_classes)` or with a fractional
    part, and a row with a negative or non-finite entry or a sum off 1 by
    more than `ROW_SUM_TOLERANCE`.

    Args:
        y: labels.
        num_classes: number of classes.
        label_smoothing: mixes `label_smoothing / num_classes` into every
            class.

    Example:
    ```python
    label_targets(ops.convert_to_tensor([2, 0]), 3)   # [[0,0,1],[1,0,0]]
    label_targets(ops.convert_to_tensor([[0.5, 0.6, 0.0]]), 3)  # [[nan]*3]
    ```
    """
    c = int(num_classes)
    y = ops.convert_to_tensor(y)
    if len(y.shape) == 2 and y.shape[-1] == c:
        rows = ops.cast(y, "float32")
        valid = ops.logical_and(
            ops.all(ops.logical_and(ops.isfinite(rows), rows >= 0.0), axis=-1),
            ops.abs(ops.sum(rows, axis=-1) - 1.0) <= ROW_SUM_TOLERANCE,
        )
        targets = ops.where(valid[:, None], rows, float("nan"))
    else:
        if len(y.shape) == 2 and y.shape[-1] == 1:
            y = ops.squeeze(y, -1)
        if len(y.shape) != 1:
            raise ValueError(
                f"Labels of shape {tuple(y.shape)} fit neither integer class "
                f"indices (batch,) nor one-hot vectors (batch, {c})."
            )
        yf = ops.cast(y, "float32")
        labels = ops.cast(y, "int32")
        valid = ops.logical_and(
            ops.logical_and(labels >= 0, labels < c),
            ops.equal(ops.cast(labels, "float32"), yf),
        )
        targets = ops.one_hot(ops.where(valid, labels, 0), c, dtype="float32")
        targets = ops.where(valid[:, None], targets, float("nan"))
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / c
    return targets


def __getattr__(name):
    # The draws moved to keras_dks.draws; the old names keep working.
    if name in ("stateless_uniform", "pair_mask"):
        import warnings

        from keras_dks import draws

        warnings.warn(
            f"keras_dks.losses.{name} moved to keras_dks.draws.{name}; the old "
            "name will be removed.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(draws, name)
    raise AttributeError(f"module 'keras_dks.losses' has no attribute {name!r}")


# --------------------------------------------------------------------------
# The DKS loss
# --------------------------------------------------------------------------
def dks_loss_terms(
    targets,
    logits,
    head_weights,
    pairs,
    pair_weights,
    pair_mask=None,
    sample_weight=None,
):
    """Every term of the DKS / DS / DHM loss, each a batch mean.

    Args:
        targets: `(batch, classes)` target distribution (`label_targets`).
        logits: list of `(batch, classes)` logits, main head first.
        head_weights: alpha of every head (main head first).
        pairs: list of `(student, teacher)` index pairs.
        pair_weights: beta of every pair.
        pair_mask: optional 0/1 weight per pair (per-pair dropping, DHM's
            location mask).
        sample_weight: optional `(batch,)` per-example weights.

    Returns:
        dict with `loss` (weighted CE + synergy, without regularisation),
        `ce` (list, one per head) and `synergy`.

    Example:
    ```python
    t = label_targets(y, 10)
    terms = dks_loss_terms(t, [z0, z1], [1.0, 1.0], [(1, 0), (0, 1)], [1.0, 1.0])
    ```
    """
    logits = [_wide(z) for z in logits]
    ce = [cross_entropy(targets, z) for z in logits]
    supervised = ce[0] * head_weights[0]
    for a, c in zip(head_weights[1:], ce[1:]):
        supervised = supervised + a * c
    synergy = synergy_terms(logits, pairs, pair_weights, pair_mask=pair_mask)
    return {
        "loss": batch_mean(supervised + synergy, sample_weight),
        "ce": [batch_mean(c, sample_weight) for c in ce],
        "synergy": batch_mean(synergy, sample_weight),
    }


def synergy_terms(logits, pairs="bidirectional", weights=1.0, pair_mask=None):
    """Per-example weighted synergy loss summed over pairs, shape (B,).

    Args:
        logits: list of logits, main head first.
        pairs: pair strategy or list of `(student, teacher)` pairs.
        weights: beta, a float or one per pair.
        pair_mask: optional 1/0 per pair (dropped pairs add nothing).
    """
    pair_list = resolve_pairs(pairs, len(logits))
    betas = resolve_weights(weights, len(pair_list), "synergy_weight", "pairs")
    total = ops.zeros(ops.shape(logits[0])[:1], _wide(logits[0]).dtype)
    for k, ((s, t), beta) in enumerate(zip(pair_list, betas)):
        if beta == 0.0:
            continue
        term = beta * soft_cross_entropy(logits[t], logits[s])
        if pair_mask is not None:
            term = ops.cast(pair_mask[k], term.dtype) * term
        total = total + term
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
    return batch_mean(synergy_terms(logits, pairs, weights), sample_weight)
