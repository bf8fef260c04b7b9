"""DKSModel: graph, bad arguments, the loss against NumPy, gradients, inference
model, saving. Its training loop, logs and label checks: test_trainer.py."""

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_dks
from keras_dks import DKSModel
from helpers import data, learnable_data, np_dks_loss, np_log_softmax, tiny_backbone


def weight_count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


# --------------------------------------------------------------------------
# Graph
# --------------------------------------------------------------------------
def test_outputs_ordered_by_depth_and_named():
    model = DKSModel(tiny_backbone(), num_classes=5, taps=["s1", "s2"])
    assert model.head_names == ["main", "aux_s2", "aux_s1"]
    assert model.taps == ["s2", "s1"]  # deepest first, whatever the input order
    outs = model(np.zeros((2, 16, 16, 3), "float32"))
    assert [tuple(o.shape) for o in outs] == [(2, 5)] * 3


@pytest.mark.parametrize(
    "factory, expected",
    [
        # The places the paper uses on ImageNet ResNets (conv3_x, conv4_x).
        (keras.applications.ResNet50, ["conv4_block6_out", "conv3_block4_out"]),
        # Ends of the 28x28 and 14x14 stages (residual adds of the last block).
        (keras.applications.MobileNetV2, ["block_12_add", "block_5_add"]),
        # End of dense blocks 3 and 2 (their last concatenation).
        (keras.applications.DenseNet121, ["conv4_block24_concat", "conv3_block12_concat"]),
    ],
)
def test_auto_taps_on_applications(factory, expected):
    backbone = factory(weights=None, include_top=False, input_shape=(32, 32, 3))
    assert keras_dks.taps.auto_taps(backbone) == expected
    model = DKSModel(backbone, num_classes=3, head="simple")
    assert model.taps == expected


def test_residual_heads_follow_the_backbone():
    backbone = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    model = DKSModel(backbone, num_classes=3)
    final = backbone.output.shape[1:]
    for head in model.head_names[1:]:
        pool = model.get_layer(f"{head}_pool")
        # Same number of stride-2 steps: the head ends at the final resolution.
        assert tuple(pool.input.shape[1:3]) == tuple(final[:2]), head
        # Made of bottleneck blocks like ResNet50.
        assert any(l.name.startswith(f"{head}_stage0_block0_conv2") for l in model.layers)
    # conv4 head: one conv5-like stage at double width (4096); conv3 head:
    # conv4-like stage (6 blocks, 1024) + conv5-like stage of 2 blocks (2048).
    assert model.get_layer("aux_conv4_block6_out_pool").input.shape[-1] == 4096
    assert model.get_layer("aux_conv3_block4_out_pool").input.shape[-1] == 2048
    names = {l.name for l in model.layers}
    assert "aux_conv3_block4_out_stage0_block5_add" in names
    assert "aux_conv3_block4_out_stage0_block6_add" not in names
    assert "aux_conv3_block4_out_stage1_block1_add" in names
    assert "aux_conv3_block4_out_stage1_block2_add" not in names


def test_head_kinds_and_callable():
    calls = []

    def head(features, num_downsamples, num_classes, name):
        calls.append((features.shape[1], num_downsamples, name))
        x = keras.layers.GlobalMaxPooling2D(name=f"{name}_gmp")(features)
        return keras.layers.Dense(num_classes, name=name)(x)

    model = DKSModel(tiny_backbone(), num_classes=4, taps=["s1", "s2"], head=head)
    assert calls == [(4, 1, "aux_s2"), (8, 2, "aux_s1")]
    assert model.get_layer("aux_s1_gmp") is not None
    for kind in ("simple", "conv", "residual"):
        m = DKSModel(tiny_backbone(), num_classes=4, head=kind)
        assert len(m.outputs) == 3


def test_backbone_with_logits_top():
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, name="c1")(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(6, name="logits")(x)
    model = DKSModel(keras.Model(inp, logits), taps=["c1"], head="simple")
    assert model.num_classes == 6
    assert model.outputs[0] is logits


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------
def test_unknown_tap_lists_candidates():
    with pytest.raises(ValueError, match=r"Unknown tap 'nope'.*\['stem', 's1', 's2', 's3'\].*'s1_conv'"):
        DKSModel(tiny_backbone(), num_classes=3, taps=["nope"])


def test_tap_not_a_feature_map():
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, name="c1")(inp)
    flat = keras.layers.GlobalAveragePooling2D(name="gap1")(x)
    x2 = keras.layers.Conv2D(8, 3, strides=2, name="c2")(x)
    out = keras.layers.Add()([keras.layers.GlobalAveragePooling2D()(x2), keras.layers.Dense(8)(flat)])
    with pytest.raises(ValueError, match="not a 4-D feature map"):
        DKSModel(keras.Model(inp, out), num_classes=3, taps=["gap1"])


@pytest.mark.parametrize("tap", ["s3", "s3_conv"])
def test_tap_at_or_after_final_map(tap):
    match = "at or after" if tap == "s3" else None
    if tap == "s3_conv":
        # Same resolution as the final map but before it: allowed (0 steps).
        model = DKSModel(tiny_backbone(), num_classes=3, taps=[tap])
        assert model.taps == ["s3_conv"]
        return
    with pytest.raises(ValueError, match=match):
        DKSModel(tiny_backbone(), num_classes=3, taps=[tap])


def test_softmax_backbone_rejected():
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, strides=2)(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    with pytest.raises(ValueError, match="softmax.*include_top=False"):
        DKSModel(keras.Model(inp, out), taps=[])
    out2 = keras.layers.Softmax()(keras.layers.Dense(3)(x))
    with pytest.raises(ValueError, match="softmax"):
        DKSModel(keras.Model(inp, out2), taps=[])


def test_non_image_input_rank():
    inp = keras.Input((20,))
    out = keras.layers.Dense(3)(inp)
    with pytest.raises(ValueError, match="rank 4"):
        DKSModel(keras.Model(inp, out))


def test_auto_finds_no_stage():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    with pytest.raises(ValueError, match='taps="auto" found no down-sampling stage'):
        DKSModel(keras.Model(inp, x), num_classes=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pairs=[(0, 5)]), "does not exist"),
        (dict(pairs=[(2, 2)]), "itself"),
        (dict(aux_weight=-0.1), "non-negative"),
        (dict(aux_weight=float("nan")), "non-negative"),
        (dict(synergy_weight=[1.0, float("nan"), 1, 1, 1, 1]), "non-negative"),
        (dict(synergy_weight=[1.0, -1.0, 1, 1, 1, 1]), "non-negative"),
        (dict(aux_weight=[1.0, 1.0, 1.0]), "2 auxiliary heads"),
        (dict(synergy_weight=[1.0] * 5), "exactly 6 values"),
        (dict(head="fancy"), "Unknown head"),
        (dict(taps="s1"), "Did you mean"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(pair_keep_prob=0.0), "pair_keep_prob"),
        (dict(num_classes=None), "Pass num_classes"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(num_classes=3, head="simple")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DKSModel(tiny_backbone(), **args)


# --------------------------------------------------------------------------
# Loss value against NumPy
# --------------------------------------------------------------------------
@pytest.mark.parametrize("onehot", [False, True])
def test_loss_terms_match_numpy(onehot):
    model = DKSModel(
        tiny_backbone(), num_classes=5, head="conv", pairs="top_down",
        aux_weight=[0.7, 0.4], synergy_weight=[1.0, 0.5, 2.0], label_smoothing=0.1,
    )
    x, y = data(6)
    w = np.array([1.0, 0.5, 0.0, 2.0, 1.0, 1.0], "float32")
    logits = [z.numpy().astype("float64") for z in model(x, training=False)]
    yy = np.eye(5)[y]
    terms = model.compute_dks_loss(
        yy.astype("float32") if onehot else y, logits=[tf.constant(z, tf.float32) for z in logits],
        sample_weight=w,
    )
    ref = np_dks_loss(logits, yy, [1.0, 0.7, 0.4], [(1, 0), (2, 0), (2, 1)], [1.0, 0.5, 2.0], 0.1, w)
    np.testing.assert_allclose(float(terms["loss"]), ref, rtol=1e-5)


def test_weight_decay_is_coupled_l2_on_all_variables():
    model = DKSModel(tiny_backbone(bn=True), num_classes=3, head="simple", weight_decay=5e-4)
    x, y = data(4, classes=3)
    logits = model(x)
    terms = model.compute_dks_loss(y, logits)
    ref = 5e-4 / 2 * sum(float(np.sum(v.numpy() ** 2)) for v in model.trainable_variables)
    np.testing.assert_allclose(float(terms["regularization"]), ref, rtol=1e-5)
    # BN gammas and Dense biases are among them (authors' code decays all).
    names = [v.path for v in model.trainable_variables]
    assert any("gamma" in n for n in names) and any("bias" in n for n in names)


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------


def test_one_sgd_step_matches_numpy_gradient_of_heads():
    """Plain SGD on the Dense layers of simple heads: dL/dW from NumPy."""
    model = DKSModel(tiny_backbone(), num_classes=4, head="simple", pairs="bidirectional")
    x, y = data(8, classes=4)
    feats = keras.Model(model.inputs, [model.get_layer(f"{h}_pool").output for h in model.head_names])
    f = [v.numpy().astype("float64") for v in feats(x)]
    dense = [model.get_layer(h) for h in model.head_names]
    w0 = [(d.kernel.numpy().astype("float64"), d.bias.numpy().astype("float64")) for d in dense]
    logits = [fi @ k + b for fi, (k, b) in zip(f, w0)]
    onehot = np.eye(4)[y]
    p = [np.exp(np_log_softmax(z)) for z in logits]
    dz = [(pk - onehot) / 8 for pk in p]
    for s, t in model.pair_list:
        dz[s] += (p[s] - p[t]) / 8
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    model.train_on_batch(x, y)
    for d, fi, dzi, (k, b) in zip(dense, f, dz, w0):
        np.testing.assert_allclose(d.kernel.numpy(), k - 0.5 * fi.T @ dzi, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d.bias.numpy(), b - 0.5 * dzi.sum(0), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# Inference model, saving
# --------------------------------------------------------------------------
def test_inference_model_is_the_plain_network():
    backbone = tiny_backbone(bn=True)
    model = DKSModel(backbone, num_classes=5)
    serving = model.inference_model()
    # Backbone + main Dense (16 * 5 + 5), counted independently.
    plain = weight_count(backbone.trainable_weights) + 16 * 5 + 5
    assert weight_count(serving.trainable_weights) == plain
    assert weight_count(model.trainable_weights) > plain
    aux_vars = {id(v) for h in model.head_names[1:] for l in model.layers
                if l.name.startswith(h) for v in l.weights}
    assert aux_vars and not aux_vars & {id(v) for v in serving.weights}
    assert all(not l.name.startswith("aux_") for l in serving.layers)
    x, _ = data(4)
    np.testing.assert_allclose(serving.predict(x, verbose=0), model.predict(x, verbose=0)[0], atol=1e-6)
    probs = model.inference_model(softmax=True).predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_save_load_round_trip_and_resume(tmp_path):
    model = DKSModel(tiny_backbone(bn=True), num_classes=3, head="residual",
                     pairs=[(1, 0), (2, 1)], synergy_weight=[0.5, 2.0], weight_decay=1e-4)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), metrics=["accuracy"])
    x, y = learnable_data(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DKSModel)
    assert loaded.get_config()["pairs"] == [[1, 0], [2, 1]]
    assert loaded.head_names == model.head_names
    for a, b in zip(model.predict(x, verbose=0), loaded.predict(x, verbose=0)):
        np.testing.assert_array_equal(a, b)
    # Optimizer state (step count, momentum) survives, so training resumes.
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 2
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    h = loaded.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert "aux_s2_accuracy" in h.history
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_baseline_has_no_aux_heads():
    model = DKSModel(tiny_backbone(), num_classes=3, taps=[])
    assert model.head_names == ["main"] and model.pair_list == []
    model.compile(optimizer="sgd", metrics=["accuracy"])
    x, y = data(8, classes=3)
    h = model.fit(x, y, verbose=0)
    assert set(h.history) == {"loss", "ce_loss", "synergy_loss", "accuracy"}
    assert h.history["synergy_loss"] == [0.0]


def test_keras_hub_pyramid_backbone_taps(tmp_path):
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 32, 64, 64], stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(32, 32, 3),
    )
    model = DKSModel(backbone, num_classes=4)
    assert model.taps == ["P4", "P3"]
    # Basic blocks, like the backbone: the head from P3 has two stride-2 steps.
    assert model.get_layer("aux_P3_stage1_block0_conv0").strides == (2, 2)
    assert tuple(model.get_layer("aux_P3_pool").input.shape[1:3]) == (1, 1)
    with pytest.raises(ValueError, match=r"Pyramid keys: \['P2', 'P3', 'P4', 'P5'\]"):
        DKSModel(backbone, num_classes=4, taps=["P7"])
    path = str(tmp_path / "hub.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype("float32")
    for a, b in zip(model.predict(x, verbose=0), loaded.predict(x, verbose=0)):
        np.testing.assert_array_equal(a, b)


def test_auto_taps_on_a_preactivation_network():
    from keras_dks import blocks

    config = blocks.BlockConfig()
    inp = keras.Input((16, 16, 3))
    x = blocks.conv(inp, 4, 3, 1, "stem", config)
    for g, (width, stride) in enumerate([(4, 1), (8, 2), (16, 2)]):
        x = blocks.residual_stage(x, width, 2, stride, "preact_basic", f"g{g}", config)
    x = blocks.bn_relu(x, "final", config)
    model = DKSModel(keras.Model(inp, x), num_classes=3)
    # The stage ends are the last additions, not the next block's BN-ReLU.
    assert model.taps == ["g1_block1_add", "g0_block1_add"]
    # Heads use the same pre-activation basic blocks (no 1x1 bottleneck conv).
    assert "aux_g0_block1_add_stage0_block0_preact_bn" in {l.name for l in model.layers}
    assert model.get_layer("aux_g0_block1_add_stage0_block0_conv0").kernel_size == (3, 3)


def test_head_layers_of_equal_shape_start_from_different_weights():
    model = DKSModel(tiny_backbone(bn=True), num_classes=3, head_depth=2)
    kernels = [l.kernel.numpy() for l in model.layers
               if l.name.startswith("aux_") and isinstance(l, keras.layers.Conv2D)]
    by_shape = {}
    for k in kernels:
        by_shape.setdefault(k.shape, []).append(k)
    pairs = [(a, b) for ks in by_shape.values() for i, a in enumerate(ks) for b in ks[i + 1:]]
    assert pairs, "the test needs two head convs of the same shape"
    assert all(not np.allclose(a, b) for a, b in pairs)


def test_own_backbone_other_taps_fall_back_to_the_generic_heads():
    backbone = keras_dks.backbones.wide_resnet(10, 1, 10, input_shape=(16, 16, 3))
    model = DKSModel(backbone, taps=["group0_block0_add"])
    assert model.taps == ["group0_block0_add"]
    pool = model.get_layer("aux_group0_block0_add_pool")
    assert tuple(pool.input.shape[1:3]) == (4, 4)


# --------------------------------------------------------------------------
# Metrics as on a plain Keras model, per head
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Named inputs
# --------------------------------------------------------------------------
def _named_backbone():
    inp = keras.Input((16, 16, 3), name="img")
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="s1")(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="s2")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="s3")(x)
    return keras.Model(inp, x)


def test_dict_inputs_work_as_for_the_plain_backbone():
    model = DKSModel(_named_backbone(), num_classes=3, taps=["s1"], head="simple")
    model.compile(optimizer=keras.optimizers.SGD(0.0), metrics=["accuracy"])
    x, y = data(8, classes=3)
    h = model.fit({"img": x}, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    ds = tf.data.Dataset.from_tensor_slices(({"img": x}, y)).batch(4)
    ev = model.evaluate(ds, verbose=0, return_dict=True)
    pred = model.predict({"img": x}, verbose=0)
    np.testing.assert_allclose(pred[0], model(x)[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ev["loss"], h.history["loss"][0], rtol=1e-5)


# --------------------------------------------------------------------------
# Non-finite gradients
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Bad input (each names the fix)
# --------------------------------------------------------------------------


def test_non_integer_num_classes():
    with pytest.raises(ValueError, match="whole number"):
        DKSModel(tiny_backbone(), num_classes=2.5, head="simple")


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_backbone_ending_in_a_non_linear_dense(activation):
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, name="c1")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation=activation, name="top")(x)
    with pytest.raises(ValueError, match=f"activation='{activation}'.*include_top=False"):
        DKSModel(keras.Model(inp, out), num_classes=3, taps=[])


def test_subclassed_backbone_is_rejected():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="subclassed model 'Sub'.*functionally"):
        DKSModel(Sub(), num_classes=3)


def test_sequential_backbone_error_names_the_fix_and_the_fix_works():
    layers = [keras.Input((16, 16, 3)),
              keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="s1"),
              keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="s2"),
              keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="s3")]
    seq = keras.Sequential(layers, name="seq")
    with pytest.raises(ValueError, match=r"keras.Sequential model 'seq'.*"
                                         r"keras.Model\(model.inputs, model.outputs\)"):
        DKSModel(seq, num_classes=3)
    # The named fix: the same layers and weights, tappable.
    model = DKSModel(keras.Model(seq.inputs, seq.outputs), num_classes=3,
                     taps=["s1", "s2"], head="simple")
    x = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_array_equal(  # the same ops on the same weights
        keras.ops.convert_to_numpy(seq(x)),
        keras.ops.convert_to_numpy(keras.Model(model.inputs, model.get_layer("s3").output)(x)))
    assert len(model(x)) == 3


def test_a_file_without_the_draw_step_counter_loads_with_a_warning():
    """Models saved before `draw_step` existed (per-step draws keyed on the
    optimizer) load: the other own variables in order, the counter at 0."""
    from keras_dks.methods import DHMModel

    model = DKSModel(tiny_backbone(), num_classes=3, head="simple", pair_keep_prob=0.5)
    model.draw_step.assign(7)
    with pytest.warns(UserWarning, match="no draw_step counter"):
        model.load_own_variables({})
    assert int(model.draw_step.numpy()) == 0
    model.draw_step.assign(5)
    model.load_own_variables({"0": np.array(3, "int32")})  # a current file
    assert int(model.draw_step.numpy()) == 3

    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="a")(inp)
    out = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="b")(a)
    dhm = DHMModel(keras.Model(inp, out), num_classes=3, roots=["a"], head="simple",
                   pair_keep_prob=0.5, branch_keep_prob=0.5)
    with pytest.warns(UserWarning, match="no draw_step counter"):
        dhm.load_own_variables({"0": np.array([0.0], "float32")})  # branch_mask only
    np.testing.assert_array_equal(dhm.branch_mask.numpy(), [0.0])
    assert int(dhm.draw_step.numpy()) == 0
