"""SRDL (Lan, Zhu & Gong, ACCV 2018): Self-Referenced Deep Learning.

Two stages in the budget of M epochs:

1. train the network with cross-entropy for M/2 epochs, with a *complete*
   learning-rate schedule inside that half;
2. store softmax(z/T) (T = 3) of every training example, restart from fresh
   random weights and train M/2 more epochs, again with a complete
   schedule, on CE + T^2 KL(stored || softmax(z/T)).

`SRDL` drives `keras.Model.fit` twice, on TensorFlow, JAX or PyTorch. The
soft targets are looked up by example index inside the compiled train step
(`keras.ops.take` on an (n, C) table held in a non-trainable variable), so
the training data must carry each example's index: NumPy inputs get it
automatically, and `with_index` adds it to a `tf.data` pipeline.

The paper's recipe (SRDL paper, section 4, "Implementation Details"): SGD
with Nesterov momentum 0.9, lr 0.1 multiplied by 0.1 at 50 % and 75 % of
each stage (the stage-complete schedule of its Eq. 4), weight decay 2e-4,
batch 128, T = 3, budget M = 200 epochs for CIFAR ResNets and WRNs.
`PAPER_RECIPE` holds these numbers; `SRDL()` without `optimizer_fn` and
`examples/cifar100_wrn.py --method srdl` use them.
"""

import collections
import contextlib
import math
import os
import sys

import keras
import numpy as np
from keras import ops

from keras_dks import adapt
from keras_dks import losses as losses_lib
from keras_dks import utils


# The SRDL paper's training recipe (section 4, Implementation Details).
PAPER_RECIPE = {
    "learning_rate": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "drops": (0.5, 0.75),  # fractions of each stage
    "decay": 0.1,
    "weight_decay": 2e-4,
    "batch_size": 128,
    "temperature": 3.0,
}

_LABEL_ERROR = (
    "keras_dks SRDL: a label is outside [0, num_classes), the output width "
    "of the classifier; fix the labels or the classifier"
)


def _check_logits_model(model):
    kind = adapt.output_activation(model)
    if kind:
        raise ValueError(
            f"SRDL needs a classifier that outputs logits, but {model.name!r} "
            f"ends with a {kind} (its stored soft targets softmax(p / T) would "
            "be nearly uniform and the cross-entropy would take probabilities "
            "for logits). Remove the final activation, e.g. "
            "`Dense(num_classes)` instead of `Dense(num_classes, "
            "activation='softmax')`; SRDL applies softmax(z / T) itself."
        )


def _num_classes(model):
    outputs = getattr(model, "outputs", None)
    if outputs and len(outputs) == 1 and outputs[0].shape[-1] is not None:
        return int(outputs[0].shape[-1])
    return None


def _checked(value, condition, message):
    """`value`, computed after checking `condition` (a boolean tensor) on
    TensorFlow: a step where it is not all true fails with `message`. Other
    backends cannot raise inside a compiled step; the callers poison the
    loss with NaN there instead."""
    if keras.backend.backend() != "tensorflow":
        return value
    import tensorflow as tf

    with tf.control_dependencies([tf.debugging.Assert(tf.reduce_all(condition), [message])]):
        return tf.identity(value)


def _checked_labels(y, num_classes):
    """`(y, penalty)`: the labels, checked before the loss reads them (see
    `_checked`), and 0, or NaN when an integer label lies outside
    `[0, num_classes)`. One-hot targets of a custom loss have no range."""
    y = ops.convert_to_tensor(y)
    if "int" not in keras.backend.standardize_dtype(y.dtype):
        return y, 0.0
    in_range = ops.logical_and(y >= 0, y < ops.cast(num_classes, y.dtype))
    valid = ops.all(in_range)
    return _checked(y, valid, _LABEL_ERROR), ops.where(valid, 0.0, float("nan"))


@contextlib.contextmanager
def _label_errors_as_value_error(num_classes):
    """Turn the in-step label check of `SRDLModel` (TensorFlow fails the
    first bad batch of a dataset with `_LABEL_ERROR`) into a ValueError
    naming the fix."""
    try:
        yield
    except Exception as e:
        if _LABEL_ERROR not in str(e):
            raise
        raise ValueError(
            f"SRDL labels must be integer class indices in [0, {num_classes}), "
            "the classifier's output width; the data contains a label outside "
            "that range. Fix the labels or build the classifier with the right "
            "number of classes."
        ) from None


def _is_tf_dataset(x):
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, tf.data.Dataset)


def with_index(dataset):
    """`keras_dks.data.pipelines.with_index`: `(image, label)` examples ->
    `((image, index), label)`, index = position in `dataset` (apply before
    shuffling). Needs TensorFlow (tf.data), on any Keras backend.

    Args:
        dataset: an *unbatched* `tf.data.Dataset` of `(image, label)`.

    Returns:
        A `tf.data.Dataset` of `((image, index), label)`, `index` an int64
        in `[0, n)`: the training data `SRDL.fit` needs.

    Example:
    ```python
    import numpy as np, tensorflow as tf, keras_dks
    images = np.random.rand(64, 8, 8, 3).astype("float32")
    labels = np.random.randint(0, 10, 64)
    ds = keras_dks.methods.with_index(
        tf.data.Dataset.from_tensor_slices((images, labels))
    ).shuffle(64).batch(32)
    (x, index), y = next(iter(ds))
    print(x.shape, index.shape)  # (32, 8, 8, 3) (32,)
    ```
    """
    from keras_dks.data.pipelines import with_index as add_index

    return add_index(dataset)


def step_decay(initial_lr, stage_steps, drops=(0.5, 0.75), factor=0.1):
    """The SRDL paper's schedule: lr x `factor` at 50 % and 75 % of a stage.

    Args:
        initial_lr: learning rate at the first step of the stage.
        stage_steps: optimizer steps in one stage (epochs/2 x steps/epoch).
        drops: fractions of the stage where the rate drops. Defaults to
            `(0.5, 0.75)` (the SRDL paper's).
        factor: multiplier at each drop. Defaults to `0.1` (the SRDL
            paper's).

    Returns:
        A `keras.optimizers.schedules.PiecewiseConstantDecay`.

    The optimizer step `round(d * stage_steps)` (0-based, the first step of
    the epoch at fraction `d` when it falls on an epoch start) is the first
    at the lower rate, as with PyTorch's `MultiStepLR` and
    `keras_dks.recipes.step_schedule`; Keras' `PiecewiseConstantDecay`
    switches after its boundary, hence the boundary one step earlier.

    Example:
    ```python
    from keras_dks.methods import step_decay
    lr = step_decay(0.1, stage_steps=1000)
    print([round(float(lr(s)), 6) for s in (499, 500, 750)])
    # [0.1, 0.01, 0.001]
    ```
    """
    # `step_schedule` counts in "epochs" of `stage_steps` steps: a drop at
    # fraction d makes step round(d * stage_steps) the first at the new rate.
    steps = sorted({max(int(round(d * stage_steps)), 1) for d in drops})
    return utils.step_schedule(
        initial_lr, stage_steps, [s / stage_steps for s in steps], factor
    )


def _split_inputs(inputs):
    """(images, index or None) from `(images, index)`, a dict or images."""
    if isinstance(inputs, dict):
        images = inputs.get("images", inputs.get("image"))
        if images is None:
            raise ValueError(
                "SRDL dict inputs need an 'images' key (and 'index' for "
                f"training); got keys {sorted(inputs)}."
            )
        return images, inputs.get("index")
    if isinstance(inputs, (list, tuple)):
        if len(inputs) != 2:
            raise ValueError(
                "SRDL inputs are (images, index); got a sequence of "
                f"{len(inputs)} items."
            )
        return inputs[0], inputs[1]
    return inputs, None


@keras.saving.register_keras_serializable(package="keras_dks")
class SRDLModel(keras.Model):
    """One SRDL stage: wraps a classifier that outputs logits.

    Inputs are `(images, index)` (or `{"images": ..., "index": ...}`);
    plain images also work where no soft target is needed (evaluation,
    prediction). The loss is the compiled loss (cross-entropy), plus, when
    `soft_targets` is given and in training only,
    `distill_weight * T^2 * KL(soft_targets[index] || softmax(z / T))`,
    summed over classes and averaged over the batch. The table is a
    non-trainable variable, read with `keras.ops.take` inside the compiled
    step. An integer label outside `[0, C)` or an index outside the table
    fails the step on TensorFlow and makes the batch's loss NaN on JAX and
    PyTorch (which cannot raise inside a compiled step).

    Args:
        model: the classifier (one logits output; a model ending with a
            softmax or sigmoid raises a ValueError: SRDL needs logits).
        soft_targets: `(n, C)` array of stored probabilities, or None
            (default; stage 1: cross-entropy only).
        temperature: T, positive. Defaults to `3.0` (the SRDL paper's).
        distill_weight: non-negative multiplier on the T^2-scaled KL term.
            Defaults to `1.0` (the paper's).
        weight_decay: non-negative coupled L2 on the classifier's trainable
            variables (`weight_decay / 2 * sum ||w||^2` added to the loss,
            PyTorch's SGD `weight_decay`), as `DKSModel(weight_decay=...)`.
            Defaults to `0.0`.
        table_shape: shape of an empty table to create instead of
            `soft_targets` (used when loading a saved model). Defaults to
            `None`.
        **kwargs: passed on to `keras.Model` (e.g. `name`).

    Raises:
        ValueError: a negative `weight_decay` or `distill_weight`, a
            non-positive `temperature`, a `model` ending in softmax or
            sigmoid, or `soft_targets` that is not 2-D; in training, stage-2
            inputs without the example index.

    Example:
    ```python
    import numpy as np, keras, keras_dks
    net = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                            keras.layers.Dense(5)])
    images = np.random.rand(32, 8, 8, 3).astype("float32")
    labels = np.random.randint(0, 5, 32)
    table = np.full((32, 5), 0.2, "float32")   # stored soft targets
    trainer = keras_dks.methods.SRDLModel(net, soft_targets=table)
    trainer.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    trainer.fit((images, np.arange(32)), labels, epochs=1, verbose=0)
    ```
    """

    def __init__(
        self,
        model,
        soft_targets=None,
        temperature=3.0,
        distill_weight=1.0,
        weight_decay=0.0,
        table_shape=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if not distill_weight >= 0:
            raise ValueError(
                f"distill_weight must be non-negative, got {distill_weight}."
            )
        _check_logits_model(model)
        self.model = model
        self.temperature = float(temperature)
        self.distill_weight = float(distill_weight)
        self.weight_decay = float(weight_decay)
        self.soft_targets = None
        self.distill_loss_tracker = None
        if soft_targets is None and table_shape is not None:
            # from_config: an empty table of the saved shape; load_weights fills it.
            soft_targets = np.zeros(table_shape, "float32")
        if soft_targets is not None:
            table = np.asarray(soft_targets, dtype="float32")
            if table.ndim != 2:
                raise ValueError(
                    f"soft_targets must be (num_examples, classes); got {table.shape}."
                )
            self.soft_targets = keras.Variable(
                table, trainable=False, name="soft_targets"
            )
            self.distill_loss_tracker = keras.metrics.Mean(name="distill_loss")
        # Built with the wrapped classifier (it owns no layer of its own), so
        # BackupAndRestore can load weights before the first step.
        self.built = bool(getattr(model, "built", False))

    def call(self, inputs, training=None):
        images, _ = _split_inputs(inputs)
        return self.model(images, training=training)

    def distillation_targets(self, index):
        """The stored probabilities of the examples `index`, shape (B, C).

        An index outside the table gets a NaN row (the loss of its batch is
        NaN, never trained on another example's target); on TensorFlow the
        step fails instead with an error naming the fix.

        Args:
            index: integer tensor of example indices (any shape; flattened
                to `(B,)`).

        Returns:
            A float32 tensor `(B, C)`, the rows of `soft_targets`.
        """
        index = ops.reshape(ops.cast(index, "int32"), (-1,))
        rows = ops.shape(self.soft_targets)[0]
        valid = ops.logical_and(index >= 0, index < rows)
        index = _checked(
            index,
            valid,
            "SRDL: an example index is outside the stored soft-target table; "
            "extraction_data / num_examples must cover every training example",
        )
        targets = ops.take(self.soft_targets, ops.clip(index, 0, rows - 1), axis=0)
        return ops.where(ops.expand_dims(valid, -1), targets, float("nan"))

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        penalty = 0.0
        if y is not None:
            y, penalty = _checked_labels(y, ops.shape(y_pred)[-1])
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        ) + penalty
        extra = losses_lib.coupled_weight_decay(
            self.model.trainable_variables, self.weight_decay
        )
        if self.soft_targets is None or not training or not self.distill_weight:
            # Raw sums are not scaled for tf.distribute as Keras losses are.
            return loss + losses_lib.scale_for_distribution(extra) if self.weight_decay else loss
        _, index = _split_inputs(x)
        if index is None:
            raise ValueError(
                "SRDL stage 2 needs each example's index: feed "
                "((images, index), labels), e.g. with keras_dks.methods.with_index."
            )
        targets = self.distillation_targets(index)
        log_q = ops.log_softmax(ops.cast(y_pred, "float32") / self.temperature, axis=-1)
        # KL(t || q), with 0 * log 0 = 0 for exactly-zero targets.
        positive = targets > 0
        t_log_t = ops.where(positive, targets * ops.log(ops.where(positive, targets, 1.0)), 0.0)
        kl = ops.sum(t_log_t - targets * log_q, axis=-1)
        distill = (
            self.distill_weight
            * self.temperature**2
            * losses_lib.batch_mean(kl, sample_weight)
        )
        self.distill_loss_tracker.update_state(distill)
        return loss + losses_lib.scale_for_distribution(distill + extra)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "soft_targets": None,  # the table is a weight, saved with them
                "table_shape": (
                    None
                    if self.soft_targets is None
                    else list(self.soft_targets.shape)
                ),
                "temperature": self.temperature,
                "distill_weight": self.distill_weight,
                "weight_decay": self.weight_decay,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


class SRDL:
    """Self-Referenced Deep Learning: two `fit` runs of M/2 epochs each.

    Stage 1 trains `model_fn()` on cross-entropy with a complete schedule
    (`optimizer_fn(stage_steps)`); the softened predictions softmax(z/T) of
    every training example are then stored in an `(n, C)` table; stage 2
    trains a freshly initialised network (`model_fn()` again) on
    CE + T^2 KL(table[index] || softmax(z/T)) with a new optimizer from
    `optimizer_fn`, so the schedule restarts from its first value.

    Data: the training data yields `((images, index), labels)`, or a dict
    `{"images", "index"}` in place of the tuple, with `index` in `[0, n)`
    identifying the example (use `with_index` before shuffling). NumPy
    `x, y` get `index = arange(len(x))` automatically. Validation data may
    be plain `(images, labels)`.

    Restart: each stage calls `model_fn()`, so stage 2 starts from new
    random weights as long as the initialisers are unseeded (Keras'
    default); a `model_fn` that seeds (`keras.utils.set_random_seed`, or
    initialisers with `seed=`) restarts from the *same* initial weights as
    stage 1. A `keras.Model` instead of a function is trained in stage 1 and
    re-initialised for stage 2 with `keras.models.clone_model` (same caveat
    for seeded initialisers). `restart=False` continues from the stage-1
    weights (the paper's ablation, worse).

    Defaults follow the paper (`PAPER_RECIPE`): without `optimizer_fn`,
    SGD with Nesterov momentum 0.9, lr 0.1 x0.1 at 50 % and 75 % of each
    stage, and weight decay 2e-4 (coupled L2 as in PyTorch's SGD). With your
    own `optimizer_fn` the weight decay defaults to 0, since the optimizer
    may decay weights itself (pass `weight_decay=2e-4` for the paper's).

    Checks before training: the classifier must output logits (a final
    softmax or sigmoid raises a ValueError naming the fix), and integer
    labels of NumPy inputs must lie in [0, num_classes); labels of a
    `tf.data` pipeline are checked in the train step: on TensorFlow a
    ValueError at the first bad batch, on JAX / PyTorch a NaN loss.

    The paper does not say whether the stored
    predictions are made on augmented images; here they are made in
    inference mode on `extraction_data` (default: one pass over the
    training data as given) - pass the un-augmented training set to match
    "per-sample predictions".

    Args:
        model_fn: function returning a new, uncompiled classifier with one
            logits output, or a `keras.Model` (see Restart).
        epochs: the total budget M (even, >= 2); each stage gets M/2.
        temperature: T of the stored soft targets and of the student,
            positive. Defaults to `3.0` (the SRDL paper's).
        distill_weight: multiplier on the T^2 KL term. Defaults to `1.0`
            (the paper's).
        optimizer_fn: `optimizer_fn(stage_steps) -> optimizer`, called once
            per stage with the number of optimizer steps in a stage, so a
            schedule can span exactly one stage (see `step_decay`).
            Defaults to `None`, meaning `SRDL.default_optimizer`.
        loss: supervised loss. Defaults to `None`, meaning sparse
            categorical cross-entropy on logits.
        metrics: metrics for `compile`. Defaults to `None`.
        restart: re-initialise the network for stage 2. Defaults to `True`
            (the paper's method).
        weight_decay: coupled L2 on all trainable variables of the
            classifier, in both stages (see `SRDLModel`). None (default):
            the paper's 2e-4 with the default optimizer, 0 with your own
            `optimizer_fn`.
        strategy: optional `tf.distribute` strategy; models, optimizers and
            the table are created in its scope. Defaults to `None`.
        compile_kwargs: extra `compile` arguments (e.g. `jit_compile`).
            Defaults to `None`.

    Raises:
        ValueError: `model_fn` is neither callable nor a `keras.Model`,
            `epochs` is odd or below 2, or `temperature` is not positive.

    Attributes (after `fit`):
        model: the final (stage-2) classifier.
        stage1_model: the stage-1 classifier (the paper ensembles the two).
        soft_targets: the `(n, C)` NumPy table of stored probabilities.
        trainers: the two `SRDLModel` wrappers that were fitted.
        stage_epochs, stage_steps: epochs and optimizer steps per stage.

    Example:
    ```python
    import numpy as np, keras, keras_dks
    def build():
        return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                                 keras.layers.Dense(10)])
    x = np.random.rand(64, 8, 8, 3).astype("float32")
    y = np.random.randint(0, 10, 64)
    srdl = keras_dks.methods.SRDL(build, epochs=4, metrics=["accuracy"])
    history1, history2 = srdl.fit(x, y, batch_size=16, verbose=0)
    srdl.model.predict(x[:2], verbose=0)
    ```
    """

    def __init__(self, model_fn, epochs, temperature=3.0, distill_weight=1.0,
                 optimizer_fn=None, loss=None, metrics=None, restart=True,
                 weight_decay=None, strategy=None, compile_kwargs=None):
        if not (callable(model_fn) or isinstance(model_fn, keras.Model)):
            raise ValueError("model_fn must be a function returning a keras.Model.")
        epochs = int(epochs)
        if epochs < 2 or epochs % 2:
            raise ValueError(
                f"epochs is SRDL's total budget M, split into two equal stages; "
                f"it must be even and >= 2, got {epochs}."
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.model_fn = model_fn
        self.epochs = epochs
        self.stage_epochs = epochs // 2
        self.temperature = float(temperature)
        self.distill_weight = float(distill_weight)
        self.optimizer_fn = optimizer_fn or self.default_optimizer
        self.loss = loss
        self.metrics = metrics
        self.restart = bool(restart)
        if weight_decay is None:
            weight_decay = (
                PAPER_RECIPE["weight_decay"] if optimizer_fn is None else 0.0
            )
        self.weight_decay = float(weight_decay)
        self.strategy = strategy
        self.compile_kwargs = dict(compile_kwargs or {})
        self.model = None
        self.stage1_model = None
        self.soft_targets = None
        self.trainers = []
        self.stage_steps = None

    @staticmethod
    def default_optimizer(stage_steps):
        """The paper's optimizer for one stage: SGD, Nesterov momentum 0.9,
        lr 0.1 x0.1 at 50 % and 75 % of the stage (weight decay is the
        model's `weight_decay`), from `PAPER_RECIPE`.

        Args:
            stage_steps: optimizer steps in one stage.

        Returns:
            A `keras.optimizers.SGD` with a `step_decay` schedule.

        Example:
        ```python
        from keras_dks.methods import SRDL
        optimizer = SRDL.default_optimizer(stage_steps=1000)
        print(optimizer.nesterov, round(float(optimizer.learning_rate), 6))
        # True 0.1
        ```
        """
        r = PAPER_RECIPE
        return keras.optimizers.SGD(
            step_decay(r["learning_rate"], stage_steps, r["drops"], r["decay"]),
            momentum=r["momentum"],
            nesterov=r["nesterov"],
        )

    # ------------------------------------------------------------------
    def _scope(self):
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    def _new_model(self, stage):
        if isinstance(self.model_fn, keras.Model):
            if stage == 1:
                model = self.model_fn
            else:
                model = keras.models.clone_model(self.model_fn)  # re-initialised
        else:
            model = self.model_fn()
        if not isinstance(model, keras.Model):
            raise ValueError(f"model_fn returned {type(model)}, not a keras.Model.")
        if len(model.outputs or [None]) != 1:
            raise ValueError(
                "SRDL needs a classifier with one logits output; got "
                f"{len(model.outputs)} outputs. For a DKSModel use its "
                "inference_model() architecture."
            )
        return model

    def _compile(self, trainer, stage_steps):
        loss = self.loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        trainer.compile(
            optimizer=self.optimizer_fn(stage_steps),
            loss=loss,
            metrics=self.metrics,
            **self.compile_kwargs,
        )

    def fit(self, x, y=None, batch_size=None, validation_data=None,
            steps_per_epoch=None, num_examples=None, extraction_data=None,
            callbacks=None, checkpoint_dir=None, verbose="auto", **fit_kwargs):
        """Run both stages.

        Args:
            x: a `tf.data.Dataset` of batches `((images, index), labels)`
                (or `({"images", "index"}, labels)`), or a NumPy array of
                images (then `y` holds the labels and indices are added).
            y: labels for NumPy `x`.
            batch_size: batch size for NumPy `x` (default 32).
            validation_data: passed to both `fit` calls.
            steps_per_epoch: steps per epoch; needed when the dataset's
                length is unknown (it sizes the schedule).
            num_examples: n, the table's rows (default: `len(x)` or the
                largest index seen + 1).
            extraction_data: finite batched dataset of
                `((images, index), labels)` to compute the stored
                probabilities on (default: one pass over `x`).
            callbacks: a list used in both stages, or `callbacks(stage)`
                returning the list for stage 1 or 2.
            checkpoint_dir: makes the procedure resumable. Each stage is
                backed up after every epoch
                (`keras_dks.callbacks.SafeBackupAndRestore` in
                `checkpoint_dir/stage1`, `.../stage2`), and the outcome of
                stage 1 (`stage1.weights.h5`, `soft_targets.npy`) is kept:
                running the same `fit` again after a crash skips a finished
                stage 1 (its history is then None) and resumes the
                interrupted stage at its last finished epoch. Everything
                there is deleted once stage 2 completes. Under
                `MultiWorkerMirroredStrategy` give each worker its own.
            verbose, **fit_kwargs: passed to `keras.Model.fit`.

        Returns:
            `[history_stage1, history_stage2]` (`keras.callbacks.History`;
            the first is None when a finished stage 1 was restored from
            `checkpoint_dir`).

        Raises:
            ValueError: NumPy `x` without `y`, a dataset with `y`, a dataset
                of unknown or infinite length without `steps_per_epoch`, an
                infinite dataset without `extraction_data`, a `model_fn`
                result that is not a one-output `keras.Model`, integer labels
                outside `[0, num_classes)`, or `extraction_data` that misses
                an example (see `extract_soft_targets`).
        """
        inputs = self._training_inputs(
            x, y, batch_size, steps_per_epoch, num_examples, extraction_data, fit_kwargs
        )
        self.stage_steps = inputs.steps_per_epoch * self.stage_epochs
        fit_kwargs = dict(
            inputs.fit_data,
            epochs=self.stage_epochs,
            validation_data=validation_data,
            verbose=verbose,
            **fit_kwargs,
        )
        if steps_per_epoch is not None:  # else Keras runs full passes
            fit_kwargs["steps_per_epoch"] = steps_per_epoch
        checkpoint = _Stage1Checkpoint(checkpoint_dir)

        net1, trainer1 = self._stage_trainer(1)
        if self.loss is None and inputs.labels is not None:
            losses_lib.check_labels(inputs.labels, _num_classes(net1))
        if checkpoint.done():
            table = checkpoint.load(net1)
            history1 = None
        else:
            history1 = self._fit_stage(
                trainer1, 1, callbacks, checkpoint_dir, fit_kwargs
            )
            # The stored knowledge: softmax(z / T) of every training example.
            table = self.extract_soft_targets(
                net1, inputs.extraction_data, inputs.num_examples
            )
            checkpoint.save(net1, table)

        net2, trainer2 = self._stage_trainer(2, stage1_net=net1, table=table)
        history2 = self._fit_stage(trainer2, 2, callbacks, checkpoint_dir, fit_kwargs)
        checkpoint.clear()

        self.stage1_model, self.model = net1, net2
        self.soft_targets = table
        self.trainers = [trainer1, trainer2]
        return [history1, history2]

    def _training_inputs(
        self, x, y, batch_size, steps_per_epoch, num_examples, extraction_data, fit_kwargs
    ):
        """What both stages train on, from a dataset or NumPy arrays.

        Returns a `_TrainingInputs`: the `fit` data arguments, steps per
        epoch (sizes the schedule), the table's rows, the extraction data
        and the NumPy labels (None for a dataset).
        """
        if _is_tf_dataset(x):
            if y is not None:
                raise ValueError("Pass labels inside the dataset, not as y.")
            cardinality = int(x.cardinality())
            if steps_per_epoch is None:
                if cardinality <= 0:
                    raise ValueError(
                        "The dataset's length is unknown or infinite: pass "
                        "steps_per_epoch so each stage's schedule has a known length."
                    )
                steps_per_epoch = cardinality
            if extraction_data is None:
                if cardinality == -1:  # tf.data.INFINITE_CARDINALITY
                    raise ValueError(
                        "The training dataset repeats forever; pass "
                        "extraction_data (one finite pass over the examples) "
                        "to compute the stored probabilities."
                    )
                extraction_data = x
            # Batches come as the pipeline orders them (shuffle it there);
            # Keras would otherwise warn that shuffle=True is ignored.
            fit_kwargs.setdefault("shuffle", False)
            return _TrainingInputs(
                {"x": x}, int(steps_per_epoch), num_examples, extraction_data, None
            )
        if y is None:
            raise ValueError("NumPy inputs need labels: fit(images, labels).")
        images, labels = np.asarray(x), np.asarray(y)
        index = np.arange(len(images), dtype="int64")
        batch_size = batch_size or 32
        if extraction_data is None:
            extraction_data = [
                ((images[i : i + batch_size], index[i : i + batch_size]),)
                for i in range(0, len(images), batch_size)
            ]
        return _TrainingInputs(
            {"x": (images, index), "y": labels, "batch_size": batch_size},
            int(steps_per_epoch or math.ceil(len(images) / batch_size)),
            num_examples or len(images),
            extraction_data,
            labels,
        )

    def _stage_trainer(self, stage, stage1_net=None, table=None):
        """The classifier of `stage` and its compiled `SRDLModel`: stage 1
        on cross-entropy; stage 2 on fresh weights (or stage 1's without
        `restart`) with the soft-target `table`."""
        with self._scope():
            if stage == 1 or self.restart:
                net = self._new_model(stage)
            else:
                net = keras.models.clone_model(stage1_net)
                net.set_weights(stage1_net.get_weights())
            trainer = SRDLModel(
                net,
                soft_targets=table,
                temperature=self.temperature,
                distill_weight=self.distill_weight,
                weight_decay=self.weight_decay,
                name=f"srdl_stage{stage}",
            )
            self._compile(trainer, self.stage_steps)
        return net, trainer

    def _fit_stage(self, trainer, stage, callbacks, checkpoint_dir, fit_kwargs):
        """`trainer.fit` with the stage's callbacks (and, with a
        `checkpoint_dir`, a backup of every epoch, last so it saves what
        the others logged)."""
        from keras_dks.callbacks import SafeBackupAndRestore

        found = list(callbacks(stage) if callable(callbacks) else callbacks or [])
        if checkpoint_dir:
            found.append(
                SafeBackupAndRestore(os.path.join(checkpoint_dir, f"stage{stage}"))
            )
        with _label_errors_as_value_error(_num_classes(trainer.model)):
            return trainer.fit(callbacks=found, **fit_kwargs)

    def extract_soft_targets(self, model, data, num_examples=None):
        """softmax(model(images) / T) of every example, as an (n, C) array.

        Args:
            model: the classifier (run in inference mode).
            data: finite batched dataset of `((images, index), labels)` (or
                `((images, index),)`); any order.
            num_examples: n; default the largest index + 1.

        Returns:
            `(n, C)` float32 NumPy array; row i belongs to index i.

        Raises:
            ValueError: `data` is empty, carries no index, has an index
                outside `[0, num_examples)`, or misses an example.
        """
        def soften(images):
            logits = np.asarray(model.predict_on_batch(images), "float32")
            z = logits / self.temperature
            z = np.exp(z - z.max(axis=-1, keepdims=True))
            return z / z.sum(axis=-1, keepdims=True)

        table = None
        seen = None
        for batch in data:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            images, index = _split_inputs(inputs)
            if index is None:
                raise ValueError(
                    "extraction_data must carry example indices: "
                    "((images, index), labels)."
                )
            probs = soften(images)
            index = np.asarray(index).reshape(-1).astype("int64")
            if table is None:
                rows = num_examples or int(index.max()) + 1
                table = np.zeros((rows, probs.shape[-1]), "float32")
                seen = np.zeros(rows, bool)
            if index.min() < 0 or (num_examples and index.max() >= num_examples):
                raise ValueError(
                    f"Example index out of range [0, {num_examples}): "
                    f"{index.min()}..{index.max()}."
                )
            if index.max() >= len(table):  # n unknown: grow
                grow = int(index.max()) + 1 - len(table)
                table = np.concatenate([table, np.zeros((grow, table.shape[1]), "float32")])
                seen = np.concatenate([seen, np.zeros(grow, bool)])
            table[index] = probs
            seen[index] = True
        if table is None:
            raise ValueError("extraction_data is empty.")
        if not seen.all():
            missing = np.flatnonzero(~seen)
            raise ValueError(
                f"extraction_data covered {int(seen.sum())} of {len(seen)} examples "
                f"(missing indices {missing[:10].tolist()}...). Pass a dataset "
                "with every training example once."
            )
        return table


_TrainingInputs = collections.namedtuple(
    "_TrainingInputs",
    ["fit_data", "steps_per_epoch", "num_examples", "extraction_data", "labels"],
)


class _Stage1Checkpoint:
    """The outcome of stage 1 in `checkpoint_dir` (`stage1.weights.h5`,
    then `soft_targets.npy`, whose presence marks stage 1 done); does
    nothing without a `checkpoint_dir`."""

    def __init__(self, checkpoint_dir):
        self.dir = checkpoint_dir
        if checkpoint_dir:
            os.makedirs(checkpoint_dir, exist_ok=True)
            self.weights = os.path.join(checkpoint_dir, "stage1.weights.h5")
            self.table = os.path.join(checkpoint_dir, "soft_targets.npy")

    def done(self):
        return bool(self.dir) and os.path.exists(self.table)

    def load(self, net):
        net.load_weights(self.weights)
        return np.load(self.table)

    def save(self, net, table):
        if self.dir:  # weights first, the table last
            utils.atomic_write(self.weights, net.save_weights, ".weights.h5")
            utils.atomic_write(self.table, lambda p: np.save(p, table), ".npy")

    def clear(self):
        """Finished: the next run starts afresh, as Keras' BackupAndRestore
        does."""
        if not self.dir:
            return
        for path in (self.table, self.weights):
            if os.path.exists(path):
                os.remove(path)
        if not os.listdir(self.dir):
            os.rmdir(self.dir)
