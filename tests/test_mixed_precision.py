"""DKSModel under mixed precision (bfloat16, float16 + loss scaling) and XLA."""

import numpy as np
import pytest
import keras
import tensorflow as tf

import helpers
import keras_dks
from keras_dks import DKSModel

# Its module-scoped fixtures run once: keep its tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("mixed_precision")


def data(n=16, seed=0, classes=5):
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(size=(n, 8, 8, 3)).astype("float32"),
        rng.integers(0, classes, n),
    )


@pytest.fixture
def global_policy():
    """Sets the global dtype policy for one test and always restores it."""
    original = keras.mixed_precision.global_policy()
    try:
        yield keras.mixed_precision.set_global_policy
    finally:
        keras.mixed_precision.set_global_policy(original)


def make_model(bn=True, **kwargs):
    # stem (8x8), s1 (4x4), s2 (2x2): taps stem, s1 -> 3 heads.
    kwargs.setdefault("head_depth", 1)
    return DKSModel(
        helpers.tiny_backbone(bn, size=8, widths=(4, 8), stem="block"),
        num_classes=5, taps=["stem", "s1"], seed=0, **kwargs
    )


def _train(model, x, y, steps=2, **compile_kwargs):
    compile_kwargs.setdefault("optimizer", keras.optimizers.SGD(0.05, momentum=0.9))
    model.compile(metrics=["accuracy"], **compile_kwargs)
    history = model.fit(
        x, y, batch_size=len(x) // steps, epochs=1, shuffle=False, verbose=0
    )
    return history.history


# --------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float32_reference():
    """(initial weights, weights, History and logits on the first batch after
    2 float32 steps, weights after the same 2 steps with the synergy loss at
    half strength)."""
    x, y = data()
    keras.utils.set_random_seed(0)
    reference = make_model()
    init = reference.get_weights()
    history = _train(reference, x, y)
    logits = [np.asarray(z) for z in reference(x[:8], training=False)]
    # The update check below must see a synergy gradient at half strength.
    half_synergy = make_model(synergy_weight=0.5)
    half_synergy.set_weights(init)
    _train(half_synergy, x, y)
    return init, reference.get_weights(), history, logits, half_synergy.get_weights()


def median_update_error(init, ref, other):
    """Median over variables of |dw - dw_ref| / |dw_ref|, dw = w - w0 (the
    update of the 2 steps). The median: a few variables' gradients are sums
    with heavy cancellation (BatchNormalization's scale and offset), whose
    relative error is not bounded by the rounding of their terms.
    Variables the reference leaves still (conv biases before
    BatchNormalization, whose gradient is zero) are skipped."""
    errors = []
    for w0, r, o in zip(init, ref, other):
        d = np.linalg.norm(r - w0)
        if d > 1e-4:
            errors.append(np.linalg.norm(o - r) / d)
    return float(np.median(errors))


# Relative rounding of one cast to the low precision (machine epsilon:
# bfloat16 keeps 8 significant bits, float16 11).
EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-10}
# Casts in series on the longest path to a head: 5 convolutions (stem, then an
# auxiliary head's 2 stages of 2), each rounding its input and its output.
CASTS = 10
# Loss terms in `loss`: 3 heads' CE and 6 synergy pairs.
TERMS = {"loss": 9, "ce_loss": 1, "aux_stem_ce_loss": 1, "synergy_loss": 6}


@pytest.mark.parametrize(
    "policy, low", [("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")]
)
def test_mixed_precision_trains_with_float32_losses(
    float32_reference, global_policy, policy, low
):
    x, y = data()
    init, ref_weights, ref_history, ref_logits, half_synergy_weights = float32_reference
    global_policy(policy)
    model = make_model()  # must be built under the policy
    model.set_weights(init)
    assert model.dtype_policy.name == policy
    # Convolutions compute in the low precision, variables stay float32.
    conv = model.get_layer("aux_stem_stage0_block0_conv0")
    assert conv.compute_dtype == low and conv.variable_dtype == "float32"
    assert model.get_layer("s1_conv").compute_dtype == low
    # Every head's Dense (and so every output) is float32.
    assert [o.dtype for o in model.outputs] == ["float32"] * 3
    for name in model.head_names:
        assert model.get_layer(name).compute_dtype == "float32"
    outputs = model(x[:2], training=False)
    assert [o.dtype for o in outputs] == [tf.float32] * 3
    terms = model.compute_dks_loss(y[:2], outputs)
    assert all(t.dtype == tf.float32 for t in [terms["loss"], terms["synergy"]] + terms["ce"])

    history = _train(model, x, y)
    # Loss scaling is on for float16 only (compile(auto_scale_loss=True)).
    is_scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert is_scaled == (policy == "mixed_float16")
    assert int(model.optimizer.iterations.numpy()) == 2
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    # Logits carry <= EPS * CASTS of relative rounding; a CE or synergy term
    # moves by at most 2 |dz| (its gradient in z has L1 norm <= 2).
    dz = EPS[low] * CASTS * max(np.abs(z).max() for z in ref_logits)
    for key, terms in TERMS.items():
        assert np.isfinite(history[key]).all()
        np.testing.assert_allclose(history[key], ref_history[key], rtol=0,
                                   atol=terms * 2 * dz, err_msg=key)
    # The mixed run takes the float32 run's update (loss scale undone, every
    # term's gradient present): a gradient is a forward and a backward pass,
    # 2 * EPS * CASTS of relative rounding (bfloat16 0.078, float16 0.020).
    bound = 2 * EPS[low] * CASTS
    error = median_update_error(init, ref_weights, model.get_weights())
    assert error < bound, (
        f"{policy} update differs from float32 by {error:.3f} (median over "
        f"variables), bound {bound:.3f}"
    )
    # The check can fail: a synergy gradient at half strength exceeds it.
    assert median_update_error(init, ref_weights, half_synergy_weights) > bound


def test_float16_loss_scale_is_applied_inside_the_tape(global_policy):
    """An overflowing loss scale skips the step and halves the scale: proof
    that train_step scales the loss before the float16 backward pass."""
    global_policy("mixed_float16")
    x, y = data(8)
    model = make_model()
    before = [w.copy() for w in model.get_weights()]
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.05), initial_scale=2.0**40
    )
    model.compile(optimizer=optimizer)
    assert model.optimizer is optimizer  # not wrapped twice
    model.train_on_batch(x, y)
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**39
    trainable = {id(v) for v in model.trainable_variables}
    for v, w in zip(model.weights, before):
        if id(v) in trainable:
            np.testing.assert_array_equal(v.numpy(), w, err_msg=v.path)
    # Without auto scaling nothing wraps the optimizer.
    model2 = make_model()
    model2.compile(optimizer="sgd", auto_scale_loss=False)
    assert not isinstance(model2.optimizer, keras.optimizers.LossScaleOptimizer)


# --------------------------------------------------------------------------
# XLA
# --------------------------------------------------------------------------
def test_xla_train_step_matches_graph_mode():
    x, y = data()
    keras.utils.set_random_seed(0)
    init = make_model(bn=False, head="simple").get_weights()
    results = {}
    for jit in (False, True):
        model = make_model(bn=False, head="simple")
        model.set_weights(init)
        history = _train(model, x, y, jit_compile=jit)
        assert model.jit_compile is jit
        results[jit] = (model.get_weights(), history, model.evaluate(x, y, verbose=0))
    assert int(model.optimizer.iterations.numpy()) == 2
    for a, b in zip(results[False][0], results[True][0]):
        np.testing.assert_allclose(b, a, atol=1e-4)
    for key, values in results[False][1].items():
        np.testing.assert_allclose(results[True][1][key], values, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(results[True][2], results[False][2], atol=1e-4)


def test_xla_out_of_range_labels_stop_training():
    """XLA ignores the label-range assertion; the bad label's target is NaN
    instead, so the run stops at that batch rather than training silently."""
    x, y = data(24)
    y[13] = 7  # batch 2 of 3 (batch size 8)
    stop = keras_dks.callbacks.StopOnNonFiniteLoss()
    model = make_model(bn=False, head="simple")
    model.compile(keras.optimizers.SGD(0.05), jit_compile=True)
    # A dataset (array labels: losses.check_labels gives the ValueError below).
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model.fit(ds, epochs=2, verbose=0, callbacks=[stop])
    assert (stop.epoch, stop.batch) == (0, 1)
    assert "labels outside [0, num_classes)" in stop.message
    # The explicit check of array labels is a clear ValueError before any update.
    with pytest.raises(ValueError, match="outside that range"):
        keras_dks.losses.check_labels(y, model.num_classes)
