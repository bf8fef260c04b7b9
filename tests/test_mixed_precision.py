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
    """(initial weights, weights and History after 2 float32 steps, weights
    after the same 2 steps without the synergy loss)."""
    x, y = data()
    keras.utils.set_random_seed(0)
    reference = make_model()
    init = reference.get_weights()
    history = _train(reference, x, y)
    # The synergy term's share of the update, to show the weight check below
    # can see it go missing.
    no_synergy = make_model(synergy_weight=0.0)
    no_synergy.set_weights(init)
    _train(no_synergy, x, y)
    return init, reference.get_weights(), history, no_synergy.get_weights()


def update_errors(init, ref, other):
    """Relative error of `other`'s weight update against `ref`'s:
    (median over variables of |dw - dw_ref| / |dw_ref|, the same over all
    variables together). Variables the reference leaves still (conv biases
    before BatchNorm, whose gradient is zero) are skipped."""
    num, den = [], []
    for w0, r, o in zip(init, ref, other):
        d = np.linalg.norm(r - w0)
        if d > 1e-4:
            num.append(np.linalg.norm(o - r))
            den.append(d)
    num, den = np.array(num), np.array(den)
    return float(np.median(num / den)), float(np.linalg.norm(num) / np.linalg.norm(den))


@pytest.mark.parametrize(
    "policy, low, tolerance, update_tolerance",
    [
        # Measured: bf16 (8-bit mantissa) 0.03 / 0.16, fp16 0.001 / 0.03;
        # dropping the synergy loss gives 0.38 / 0.42.
        ("mixed_bfloat16", "bfloat16", 0.05, (0.1, 0.25)),
        ("mixed_float16", "float16", 0.01, (0.01, 0.06)),
    ],
)
def test_mixed_precision_trains_with_float32_losses(
    float32_reference, global_policy, policy, low, tolerance, update_tolerance
):
    x, y = data()
    init, ref_weights, ref_history, no_synergy_weights = float32_reference
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
    for key in ("loss", "ce_loss", "synergy_loss", "aux_stem_ce_loss"):
        assert np.isfinite(history[key]).all()
        np.testing.assert_allclose(history[key], ref_history[key], rtol=tolerance)
    # The mixed run takes the float32 run's update (loss scale undone, every
    # term's gradient present), measured relative to the update itself: an
    # absolute tolerance would pass a lost synergy gradient, which changes
    # two steps' weights by less than 0.05.
    median_err, total_err = update_errors(init, ref_weights, model.get_weights())
    assert median_err < update_tolerance[0] and total_err < update_tolerance[1], (
        f"{policy} update differs from float32 by {median_err:.3f} (median over "
        f"variables) / {total_err:.3f} (all), limits {update_tolerance}"
    )
    # The check can fail: without the synergy loss the update misses it.
    miss_median, miss_total = update_errors(init, ref_weights, no_synergy_weights)
    assert miss_median > 3 * update_tolerance[0] and miss_total > update_tolerance[1]
    for a, b, v in zip(ref_weights, model.get_weights(), model.weights):
        np.testing.assert_allclose(b, a, atol=tolerance, err_msg=v.path)


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
