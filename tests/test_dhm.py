"""DHM: defaults of the paper / released code, the location mask, per-pair
dropping, dynamic roots, and the draws under fit, resume and MirroredStrategy.

References are computed here, independently of the model: NumPy losses from
the heads' logits, and the documented stateless draws recomputed with
`tf.random.stateless_uniform`. Rates are checked on the draws the model
itself uses (`head_mask`, `pair_mask`, `RootSelector.current_index` at each
step of `step_counter()`), with two-sided 1e-6 binomial / chi-square bounds: a right probability
fails once in a million runs; 1 - p or p / 2 instead of p fails (tried).
"""

import math

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers
from helpers import np_log_softmax, np_softmax, stage_backbone
from keras_dks import DKSModel
from keras_dks import methods
from keras_dks.methods import DHMModel, RootResampler


def chain_backbone(size=8):
    """Three equally shaped layers a1 -> a2 -> a3 (4x4x4): candidate roots."""
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inp)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="a1")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="a2")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="a3")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="b")(x)
    return keras.Model(inp, x, name="chain")


def data(n=16, size=8, classes=5, seed=0):
    return helpers.data(n, size, classes, seed)


def np_ce(z, y):
    return float(-np_log_softmax(z)[np.arange(len(y)), y].mean())


def np_h(target, student):
    """H(softmax(target), softmax(student)), summed over classes, batch mean."""
    return float(-(np_softmax(target) * np_log_softmax(student)).sum(-1).mean())


def np_dhm_loss(logits, y):
    """The released DHM code's loss over the given heads: every head's CE
    plus H for every ordered pair (the code logs KL; H = KL + entropy of the
    detached target, the same gradient), weights 1, T = 1."""
    ce = sum(np_ce(z, y) for z in logits)
    syn = sum(
        np_h(logits[t], logits[s])
        for s in range(len(logits))
        for t in range(len(logits))
        if s != t
    )
    return ce + syn, syn


@tf.function(reduce_retracing=True)
def _stateless_uniform(seed, size):
    return tf.random.stateless_uniform(tf.reshape(size, [-1]), seed=seed)


def ref_uniform(seed, counter, shape=()):
    """`tf.random.stateless_uniform(shape, seed=[seed, counter])`."""
    size = tf.constant(list(shape) or [1], tf.int32)
    u = _stateless_uniform(tf.constant([seed, counter], tf.int64), size).numpy()
    return u.reshape(shape)


def ref_branch_mask(seed, counter, probs):
    return (ref_uniform(seed, counter, [len(probs)]) < np.asarray(probs)).astype(
        "float32"
    )


def ref_root(seed, counter, probs):
    u = ref_uniform(seed, counter)
    return int(np.sum(u >= np.cumsum(probs)[:-1]))


def binomial_bounds(n, p, alpha=1e-6):
    """(lo, hi): a Binomial(n, p) count falls outside [lo, hi] with
    probability <= alpha (alpha / 2 per tail), from the exact pmf."""
    log_pmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
               + k * math.log(p) + (n - k) * math.log1p(-p) for k in range(n + 1)]
    cdf = np.cumsum(np.exp(log_pmf))
    return int(np.searchsorted(cdf, alpha / 2, side="right")), int(
        np.searchsorted(cdf, 1 - alpha / 2))


def assert_binomial(count, n, p):
    lo, hi = binomial_bounds(n, p)
    assert lo <= count <= hi, (count, n, p, (lo, hi))


# Chi-square with 2 degrees of freedom: P(X > x) = exp(-x / 2), so the
# 1e-6 critical value is -2 ln(1e-6).
CHI2_2DOF_1E6 = -2 * math.log(1e-6)


def library_draws(model, steps, draw):
    """`draw(model)` at every step 0..steps-1 of the model's step counter:
    what a training step at that step uses."""
    out = []
    for s in range(steps):
        model.step_counter().assign(s)
        out.append(np.asarray(keras.ops.convert_to_numpy(draw(model))))
    return np.stack(out)


def chi_square(counts, probs):
    expected = np.asarray(probs) * np.sum(counts)
    return float(np.sum((np.asarray(counts) - expected) ** 2 / expected))


def dhm_model(**kwargs):
    kwargs.setdefault("head", "simple")
    kwargs.setdefault("seed", 3)
    return DHMModel(chain_backbone(), num_classes=5, **kwargs)


# --------------------------------------------------------------------------
# Defaults: the paper's main setting = the released code
# --------------------------------------------------------------------------
def test_defaults_are_the_released_code_every_ce_and_every_pair():
    # Paper Sec. 3.2: main experiments use fixed branches (probabilities 0
    # or 1); d-li14/DHM cifar.py: every CE + every ordered pair, alpha 1, T 1.
    assert methods.dks_kwargs("dhm") == {"pairs": "bidirectional"}
    model = methods.build_model("dhm", stage_backbone(), num_classes=5, head="simple")
    assert isinstance(model, DHMModel)
    assert model.pair_keep_prob == 1.0 and model.branch_keep_prob == 1.0
    assert not model.samples_branches
    assert not model.non_trainable_weights  # no mask variable
    assert model.pair_list == [(i, j) for i in range(3) for j in range(3) if i != j]

    x, y = data(8)
    logits = [z.numpy() for z in model(x, training=True)]
    want, want_syn = np_dhm_loss(logits, y)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    # Several training steps (lr 0): the loss is the full loss every step,
    # nothing is dropped at random.
    for _ in range(4):
        logs = model.train_on_batch(x, y, return_dict=True)
        np.testing.assert_allclose(logs["loss"], want, rtol=1e-5)
        np.testing.assert_allclose(logs["synergy_loss"], want_syn, rtol=1e-5)


# --------------------------------------------------------------------------
# The paper's location mask (Eq. 6-9)
# --------------------------------------------------------------------------
def test_location_mask_removes_a_branch_ce_and_all_its_pairs():
    p = 0.5
    model = dhm_model(roots=["a3", "a1"], branch_keep_prob=p, branch_sampling="step")
    assert model.head_names == ["main", "aux_a3", "aux_a1"]
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    seed = model.branch_mask_seed

    # The mask a training step uses is the documented stateless draw, and
    # keeps each branch at rate p, independently (both off at p^2).
    steps = 600
    heads = library_draws(model, steps, lambda m: m.head_mask(training=True))
    assert np.all(heads[:, 0] == 1.0)  # the main head is always on
    masks = heads[:, 1:]
    for s in (0, 1, 5, 77):
        np.testing.assert_array_equal(model.draw_branch_mask(s).numpy(), masks[s])
    for branch in range(2):
        assert_binomial(int(masks[:, branch].sum()), steps, p)
    assert_binomial(int(np.sum(masks.sum(1) == 0)), steps, p * p)
    for s in (0, 1, 17, 599):
        np.testing.assert_array_equal(masks[s], ref_branch_mask(seed, s, [p, p]))

    x, y = data(8)
    variable = model.trainable_variables
    for off in ([1], [2], [1, 2]):  # aux_a3 off, aux_a1 off, both off
        step = next(
            s for s in range(steps)
            if [k + 1 for k in np.flatnonzero(masks[s] == 0)] == off
        )
        model.step_counter().assign(step)
        logits = [z.numpy() for z in model(x, training=True)]
        kept = [z for k, z in enumerate(logits) if k not in off]
        want, want_syn = np_dhm_loss(kept, y)  # the branch removed
        terms = model.compute_dks_loss(y, logits, training=True)
        np.testing.assert_allclose(float(terms["loss"]), want, rtol=1e-5)
        np.testing.assert_allclose(float(terms["synergy"]), want_syn, rtol=1e-5, atol=1e-7)
        # The compiled step logs the same (lr 0: weights unchanged). The
        # metrics are reset first: Keras 3.10's train_on_batch does not, and
        # its logs would be the mean over the earlier calls too.
        model.reset_metrics()
        logs = model.train_on_batch(x, y, return_dict=True)
        np.testing.assert_allclose(logs["loss"], want, rtol=1e-5)
        # An off branch gets no gradient at all from the loss.
        model.step_counter().assign(step)
        with tf.GradientTape() as tape:
            loss = model.compute_dks_loss(y, model(x, training=True), training=True)["loss"]
        grads = dict(zip([v.path for v in variable], tape.gradient(loss, variable)))
        for k in (1, 2):
            head_grads = [
                0.0 if g is None else float(tf.reduce_sum(tf.abs(g)))
                for path, g in grads.items()
                if path.startswith(model.head_names[k] + "/")
            ]
            assert head_grads, model.head_names[k]
            if k in off:
                assert max(head_grads) == 0.0, (off, k)
            else:
                assert min(head_grads) > 0.0, (off, k)

    # Evaluation uses every branch, whatever the step.
    logits = [z.numpy() for z in model(x, training=False)]
    full, _ = np_dhm_loss(logits, y)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["loss"], full, rtol=1e-5)


def test_branch_keep_prob_validation():
    with pytest.raises(ValueError, match=r"branch_keep_prob must be in \(0, 1\]"):
        dhm_model(roots=["a3", "a1"], branch_keep_prob=0.0)
    with pytest.raises(ValueError, match="one per branch"):
        dhm_model(roots=["a3", "a1"], branch_keep_prob=[0.5])
    with pytest.raises(ValueError, match="branch_sampling must be one of"):
        dhm_model(roots=["a3"], branch_sampling="batch")
    # Per-branch probabilities, in head order; 1.0 = always on.
    model = dhm_model(roots=["a3", "a1"], branch_keep_prob=[1.0, 0.3], branch_sampling="step")
    masks = library_draws(model, 400, lambda m: m.head_mask(training=True))[:, 1:]
    assert masks[:, 0].min() == 1.0
    assert_binomial(int(masks[:, 1].sum()), 400, 0.3)


def test_branch_mask_per_epoch_continues_across_fit_calls(tmp_path):
    # Sec. 3.2: locations are drawn at each training epoch. The draw is keyed
    # on the step counter at the epoch's start, so a second fit goes on with
    # the sequence (Keras restarts its epoch numbers at 0).
    p = 0.5
    model = dhm_model(roots=["a3", "a1"], branch_keep_prob=p, seed=4)
    seed = model.branch_mask_seed
    x, y = data(16)
    heads = model.head_names[1:]
    ref = {s: ref_branch_mask(seed, s, [p, p]) for s in (0, 2, 4, 6)}
    active = {s: [h for h, m in zip(heads, ref[s]) if m] for s in ref}
    # Precondition: a restarted sequence would draw differently.
    assert [active[0], active[2]] != [active[4], active[6]], active

    model.compile(optimizer=keras.optimizers.SGD(0.0))
    logits = [z.numpy() for z in model(x, training=True)]
    first, second = RootResampler(), RootResampler()
    h1 = model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0, callbacks=[first])
    h2 = model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0, callbacks=[second])
    assert first.active == [(0, active[0]), (1, active[2])]
    assert second.active == [(0, active[4]), (1, active[6])]
    # The mask drawn at an epoch's start is the one the train step uses: the
    # loss of one step (lr 0) is NumPy's loss without the off branches.
    for s in (0, 2, 4, 6):
        second.resample(s)
        model.reset_metrics()  # the logs of this step only (Keras 3.10 too)
        logs = model.train_on_batch(x, y, return_dict=True)
        kept = [logits[0]] + [z for z, m in zip(logits[1:], ref[s]) if m]
        np.testing.assert_allclose(logs["loss"], np_dhm_loss(kept, y)[0], rtol=1e-5)
    second.resample(6)

    # Saved and reloaded, the mask and the config come back.
    path = str(tmp_path / "mask.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.branch_mask.numpy(), ref[6])
    assert loaded.get_config()["branch_keep_prob"] == p
    assert loaded.get_config()["branch_sampling"] == "epoch"


# --------------------------------------------------------------------------
# Per-pair dropping: a library option, only when asked for
# --------------------------------------------------------------------------
def reference_pair_mask(seed, step, num_pairs, p):
    return (ref_uniform(seed, step, [num_pairs]) < p).astype("float32")


def reference_synergy(logits, pair_list, mask=None):
    total = 0.0
    for k, (s, t) in enumerate(pair_list):
        total += (1.0 if mask is None else mask[k]) * np_h(logits[t], logits[s])
    return total


def test_per_pair_dropping_keep_rate_and_masked_loss():
    p = 0.3
    model = DKSModel(
        stage_backbone(), num_classes=5, taps=["s1", "s2"], head="simple",
        pair_keep_prob=p, seed=11,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    num_pairs = len(model.pair_list)
    assert num_pairs == 6

    # The masks training steps use: the documented draw, each pair kept at
    # rate p.
    steps = 1000
    masks = library_draws(model, steps, lambda m: m.pair_mask(training=True))
    for k in range(num_pairs):
        assert_binomial(int(masks[:, k].sum()), steps, p)
    for s in (0, 5, 999):
        np.testing.assert_array_equal(masks[s], reference_pair_mask(11, s, num_pairs, p))

    # A step with both kept and dropped pairs: dropped terms add nothing.
    step = next(s for s in range(steps) if 0 < masks[s].sum() < num_pairs)
    x, y = data()
    model.step_counter().assign(step)
    logits = [z.numpy() for z in model(x, training=True)]
    want = reference_synergy(logits, model.pair_list, masks[step])
    assert abs(want - reference_synergy(logits, model.pair_list)) > 1e-3
    terms = model.compute_dks_loss(y, logits, training=True)
    np.testing.assert_allclose(float(terms["synergy"]), want, rtol=1e-5)
    # The compiled train step logs exactly this (lr 0: weights unchanged).
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["synergy_loss"], want, rtol=1e-5)

    # Evaluation keeps every pair and is deterministic.
    full = reference_synergy(logits, model.pair_list)
    first = model.evaluate(x, y, verbose=0, return_dict=True)
    second = model.evaluate(x, y, verbose=0, return_dict=True)
    assert first == second
    np.testing.assert_allclose(first["synergy_loss"], full, rtol=1e-5)


def test_pair_and_branch_masks_combine():
    model = dhm_model(
        roots=["a3", "a1"], branch_keep_prob=0.5, branch_sampling="step",
        pair_keep_prob=0.5, seed=8,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    x, y = data(8)
    logits = [z.numpy() for z in model(x, training=True)]
    checked = 0
    for step in range(40):
        branches = ref_branch_mask(model.branch_mask_seed, step, [0.5, 0.5])
        pairs = reference_pair_mask(model.seed, step, 6, 0.5)
        on = np.concatenate([[1.0], branches])
        live = [pairs[k] for k, (s, t) in enumerate(model.pair_list) if on[s] * on[t]]
        if on.sum() != 2 or len(set(live)) != 2:
            continue  # want a branch off, and kept and dropped pairs among the rest
        model.step_counter().assign(step)
        terms = model.compute_dks_loss(y, logits, training=True)
        want_syn = sum(
            on[s] * on[t] * pairs[k] * np_h(logits[t], logits[s])
            for k, (s, t) in enumerate(model.pair_list)
        )
        want = sum(on[k] * np_ce(z, y) for k, z in enumerate(logits)) + want_syn
        np.testing.assert_allclose(float(terms["loss"]), want, rtol=1e-5)
        checked += 1
    assert checked >= 3


# --------------------------------------------------------------------------
# Dynamic roots
# --------------------------------------------------------------------------
def test_root_choice_frequencies_match_distribution():
    probs = [0.2, 0.5, 0.3]
    model = dhm_model(roots=[["a1", "a2", "a3"]], root_probs=[probs])
    (sel,) = model.root_selectors
    assert sel.candidates == ["a1", "a2", "a3"] and sel.eval_index == 1
    draws = {k: ref_root(sel.seed, k, probs) for k in (0, 3, 7, 19, 250)}
    for k in (0, 3, 250):
        assert int(sel.draw(k)) == draws[k]

    # The per-epoch callback assigns the draw of the step counter at the
    # epoch's start.
    model.compile(optimizer="sgd")
    resampler = RootResampler()
    resampler.set_model(model)
    for epoch, step in enumerate((0, 7, 19)):
        model.step_counter().assign(step)
        resampler.on_epoch_begin(epoch)
        assert int(sel.index.numpy()) == draws[step]
    assert resampler.choices[1] == (1, {"aux_a1_a2_a3": sel.candidates[draws[7]]})

    # Per step: the index the training forward pass uses is the draw of the
    # model's step counter; over 2000 steps its frequencies are `probs`.
    model = dhm_model(roots=[["a1", "a2", "a3"]], root_probs=[probs], root_sampling="step")
    model.compile(optimizer="sgd")
    (sel,) = model.root_selectors
    chosen = library_draws(model, 2000, lambda m: sel.current_index(training=True))
    counts = np.bincount(chosen, minlength=3)
    assert chi_square(counts, probs) < CHI2_2DOF_1E6, counts
    for step in (0, 1, 17, 400):
        assert chosen[step] == ref_root(sel.seed, step, probs)
    assert int(sel.current_index(training=False)) == sel.eval_index


def test_gradient_reaches_only_the_chosen_root():
    model = dhm_model(roots=[["a2", "a3"]])
    (sel,) = model.root_selectors
    x, _ = data(4)
    aux = model.head_names.index("aux_a2_a3")
    a2_kernel = model.get_layer("a2").kernel
    a3_kernel = model.get_layer("a3").kernel  # feeds a3 only, not a2

    def grads(index, head):
        sel.index.assign(index)
        with tf.GradientTape() as tape:
            out = model(x, training=True)[head]
            loss = tf.reduce_sum(out * out)
        g = tape.gradient(loss, [a2_kernel, a3_kernel])
        return [0.0 if v is None else float(tf.reduce_sum(tf.abs(v))) for v in g]

    g_a2_root = grads(0, aux)
    assert g_a2_root[0] > 0 and g_a2_root[1] == 0.0  # a3 unchosen: nothing
    g_a3_root = grads(1, aux)
    assert g_a3_root[0] > 0 and g_a3_root[1] > 0
    assert grads(0, 0)[1] > 0  # the main head still trains a3

    # Training-mode aux logits follow the chosen root; evaluation uses the
    # eval root (here the first, ties -> first) whatever the variable holds.
    sel.index.assign(1)
    train_a3 = model(x, training=True)[aux].numpy()
    eval_a = model(x, training=False)[aux].numpy()
    sel.index.assign(0)
    train_a2 = model(x, training=True)[aux].numpy()
    np.testing.assert_allclose(train_a2, eval_a, rtol=1e-6)
    assert not np.allclose(train_a3, eval_a)
    sel.index.assign(1)
    np.testing.assert_array_equal(model.predict(x, verbose=0)[aux], eval_a)


def test_dhm_fit_evaluate_save_load(tmp_path):
    probs = [0.25, 0.75]
    model = dhm_model(
        roots=[["a2", "a3"], "a1"], root_probs=[probs, None],
        eval_roots=["a2", None], head="conv", seed=12,
    )
    assert model.head_names == ["main", "aux_a2_a3", "aux_a1"]
    assert len(model.pair_list) == 6 and model.pair_keep_prob == 1.0
    sel = model.root_selectors[0]
    # Epochs of 2 steps: the roots of fit 1 are the draws of steps 0, 2, 4;
    # fit 2 goes on at step 6 (not at 0: the sequence continues).
    ref = {s: ref_root(sel.seed, s, probs) for s in (0, 2, 4, 6)}
    assert ref[6] != ref[0], ref  # precondition: a restart would show
    x, y = data(16)
    model.compile(optimizer=keras.optimizers.SGD(0.05), metrics=["accuracy"])
    resampler = RootResampler()
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[resampler])
    assert resampler.choices == [
        (e, {"aux_a2_a3": sel.candidates[ref[s]]}) for e, s in enumerate((0, 2, 4))
    ]
    assert "aux_a2_a3_accuracy" in history.history
    # fit adds a resampler itself when none is given, and goes on at step 6.
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert int(sel.index.numpy()) == ref[6]

    # Evaluation is deterministic (eval root, no dropping).
    e1 = model.evaluate(x, y, verbose=0, return_dict=True)
    sel.index.assign(1 - int(sel.index.numpy()))
    e2 = model.evaluate(x, y, verbose=0, return_dict=True)
    assert e1 == e2

    path = str(tmp_path / "dhm.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DHMModel)
    for key in ("roots", "root_probs", "root_sampling", "eval_roots", "seed",
                "branch_keep_prob", "branch_sampling", "pair_keep_prob"):
        assert loaded.get_config()[key] == model.get_config()[key], key
    assert loaded.roots == [["a2", "a3"], "a1"]
    assert int(loaded.root_selectors[0].index.numpy()) == int(sel.index.numpy())
    for a, b in zip(model.predict(x, verbose=0), loaded.predict(x, verbose=0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)  # resumes training
    # The inference model is the plain network: no selector in it.
    serving = model.inference_model()
    assert not methods.dhm.root_selectors(serving)


def test_dhm_rejects_bad_roots():
    with pytest.raises(ValueError, match="same output shape"):
        dhm_model(roots=[["stem", "a1"]])
    with pytest.raises(ValueError, match="probabilities"):
        dhm_model(roots=[["a1", "a2"]], root_probs=[[1.0]])
    with pytest.raises(ValueError, match="names a layer twice"):
        dhm_model(roots=[["a1", "a2"], "a2"])
    with pytest.raises(ValueError, match="not a candidate"):
        dhm_model(roots=[["a1", "a2"]], eval_roots=["a3"])
    with pytest.raises(ValueError, match="Unknown tap"):
        dhm_model(roots=[["a1", "nope"]])


# --------------------------------------------------------------------------
# MirroredStrategy: every replica uses the reference draw of each step
# --------------------------------------------------------------------------
_MIRRORED = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    sys.path.insert(0, {tests!r})
    from test_dhm import chain_backbone, data
    from keras_dks.methods import DHMModel, RootResampler
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    x, y = data(16)
    out = {{}}
    for sampling in ("step", "epoch"):
        with strategy.scope():
            model = DHMModel(
                chain_backbone(), num_classes=5, roots=[["a1", "a2"], "a3"],
                root_sampling=sampling, branch_keep_prob=0.5,
                branch_sampling=sampling, head="simple", seed=2)
            model.compile(optimizer=keras.optimizers.SGD(0.0))
        model.save_weights({weights!r}.format(sampling))
        # One step of the global batch per epoch, 8 examples per replica.
        resampler = RootResampler()
        history = model.fit(x, y, epochs=4, batch_size=16, shuffle=False,
                            verbose=0, callbacks=[resampler])
        sel = model.root_selectors[0]
        out[sampling] = {{
            "loss": history.history["loss"],
            "root_seed": sel.seed,
            "mask_seed": model.branch_mask_seed,
            "index_per_replica": [int(v.numpy()) for v in sel.index.value.values],
            "mask_per_replica": [
                v.numpy().tolist() for v in model.branch_mask.value.values]
            if sampling == "epoch" else None,
            "steps": int(model.optimizer.iterations.numpy()),
        }}
    print("RESULT" + json.dumps(out))
    """
)


def test_draws_under_mirrored_strategy_match_reference_per_step(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(tests)
    weights = str(tmp_path / "{}.weights.h5")
    code = _MIRRORED.format(tests=tests, weights=weights)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env,
        timeout=300, cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])

    x, y = data(16)
    probs = [0.5, 0.5]
    for sampling in ("step", "epoch"):
        r = result[sampling]
        assert r["steps"] == 4
        # The same model on one device, weights of the distributed run; one
        # forward per root. Reference loss of step s: the independent draws
        # of step s (root, branch mask) applied in NumPy.
        # (Roots drawn per epoch: the root is the variable set below.)
        ref_model = dhm_model(
            roots=[["a1", "a2"], "a3"], branch_keep_prob=0.5,
            branch_sampling=sampling, seed=2,
        )
        ref_model.load_weights(weights.format(sampling))
        sel = ref_model.root_selectors[0]
        assert sel.seed == r["root_seed"] and ref_model.branch_mask_seed == r["mask_seed"]
        by_root = {}
        for index in (0, 1):
            sel.index.assign(index)
            by_root[index] = [z.numpy() for z in ref_model(x, training=True)]
        roots, masks, want = [], [], []
        for step in range(4):
            root = ref_root(r["root_seed"], step, probs)
            mask = ref_branch_mask(r["mask_seed"], step, [0.5, 0.5])
            logits = by_root[root]
            kept = [logits[0]] + [z for z, m in zip(logits[1:], mask) if m]
            roots.append(root)
            masks.append(tuple(mask))
            want.append(np_dhm_loss(kept, y)[0])
        # Preconditions: the sequence varies, so a constant or per-replica
        # choice would not match by chance.
        assert len(set(roots)) == 2 and len(set(masks)) >= 2, (roots, masks)
        np.testing.assert_allclose(r["loss"], want, rtol=1e-5)
        if sampling == "epoch":
            # The variables are the same on both replicas and hold the draw
            # of the last epoch's start (step 3).
            assert r["index_per_replica"] == [roots[3]] * 2
            assert r["mask_per_replica"] == [list(masks[3])] * 2
