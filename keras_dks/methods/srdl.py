"""SRDL (Lan, Zhu & Gong, ACCV 2018): Self-Referenced Deep Learning.

Two stages in the budget of M epochs:

1. train the network with cross-entropy for M/2 epochs, with a *complete*
   learning-rate schedule inside that half;
2. store softmax(z/T) (T = 3) of every training example, restart from fresh
   random weights and train M/2 more epochs, again with a complete
   schedule, on CE + T^2 KL(stored || softmax(z/T)).

`SRDL` drives `keras.Model.fit` twice. The soft targets are looked up by
example index inside the compiled train step (`tf.gather` on an (n, C)
table held in a non-trainable variable), so the training data must carry
each example's index: `with_index` adds it to a `tf.data` pipeline, and
NumPy inputs get it automatically.
"""

import contextlib
import math
import os

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_dks import losses as losses_lib
from keras_dks import utils
from keras_dks.data.pipelines import with_index  # noqa: F401 (re-exported)



def step_decay(initial_lr, stage_steps, drops=(0.5, 0.75), factor=0.1):
    """The SRDL paper's schedule: lr x `factor` at 50 % and 75 % of a stage.

    Args:
        initial_lr: learning rate at the first step of the stage.
        stage_steps: optimizer steps in one stage (epochs/2 x steps/epoch).
        drops: fractions of the stage where the rate drops.
        factor: multiplier at each drop.

    Returns:
        A `keras.optimizers.schedules.PiecewiseConstantDecay`.

    Example:
    ```python
    lr = keras_dks.methods.srdl.step_decay(0.1, stage_steps=1000)
    float(lr(0)), float(lr(600)), float(lr(900))   # 0.1, 0.01, 0.001
    ```
    """
    # The paper's drops take effect after step round(d * stage_steps); in
    # `step_schedule`'s epochs (of `stage_steps` steps) that is one step on.
    steps = sorted({max(int(round(d * stage_steps)), 1) for d in drops})
    return utils.step_schedule(
        initial_lr, stage_steps, [(s + 1) / stage_steps for s in steps], factor
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
    non-trainable variable, read with `tf.gather` inside the compiled step.

    Args:
        model: the classifier (one logits output).
        soft_targets: `(n, C)` array of stored probabilities, or None
            (stage 1: cross-entropy only).
        temperature: T.
        distill_weight: multiplier on the T^2-scaled KL term (1 in the
            paper).
        weight_decay: coupled L2 on the classifier's trainable variables
            (`weight_decay / 2 * sum ||w||^2` added to the loss, PyTorch's
            SGD `weight_decay`), as `DKSModel(weight_decay=...)`.
        table_shape: shape of an empty table to create instead of
            `soft_targets` (used when loading a saved model).

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
        """The stored probabilities of the examples `index`, shape (B, C)."""
        index = tf.cast(tf.reshape(index, [-1]), tf.int32)
        table = tf.convert_to_tensor(self.soft_targets)
        rows = tf.shape(table)[0]
        # On GPU tf.gather returns zeros for an out-of-range index: check.
        message = (
            "SRDL: an example index is outside the stored soft-target table; "
            "extraction_data / num_examples must cover every training example"
        )
        with tf.control_dependencies(
            [
                tf.debugging.assert_non_negative(index, message=message),
                tf.debugging.assert_less(index, rows, message=message),
            ]
        ):
            return tf.gather(table, index)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
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
        # KL(t || q); xlogy makes 0 * log 0 = 0 for exactly-zero targets.
        kl = ops.sum(tf.math.xlogy(targets, targets) - targets * log_q, axis=-1)
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

    Differences from the paper: the default optimizer follows it (SGD,
    Nesterov momentum 0.9, lr 0.1 x0.1 at 50 % and 75 % of each stage);
    weight decay is off by default (the paper uses 2e-4: pass
    `weight_decay=2e-4`, coupled L2 as in PyTorch's SGD). The paper does not say whether the stored
    predictions are made on augmented images; here they are made in
    inference mode on `extraction_data` (default: one pass over the
    training data as given) - pass the un-augmented training set to match
    "per-sample predictions".

    Args:
        model_fn: function returning a new, uncompiled classifier with one
            logits output, or a `keras.Model` (see Restart).
        epochs: the total budget M (even); each stage gets M/2.
        temperature: T of the stored soft targets and of the student.
        distill_weight: multiplier on the T^2 KL term (1 in the paper).
        optimizer_fn: `optimizer_fn(stage_steps) -> optimizer`, called once
            per stage with the number of optimizer steps in a stage, so a
            schedule can span exactly one stage (see `step_decay`).
        loss: supervised loss (default sparse categorical cross-entropy on
            logits).
        metrics: metrics for `compile`.
        restart: re-initialise the network for stage 2.
        weight_decay: coupled L2 on all trainable variables of the
            classifier, in both stages (see `SRDLModel`).
        strategy: optional `tf.distribute` strategy; models, optimizers and
            the table are created in its scope.
        compile_kwargs: extra `compile` arguments (e.g. `jit_compile`).

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

    def __init__(
        self,
        model_fn,
        epochs,
        temperature=3.0,
        distill_weight=1.0,
        optimizer_fn=None,
        loss=None,
        metrics=None,
        restart=True,
        weight_decay=0.0,
        strategy=None,
        compile_kwargs=None,
    ):
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
        """The paper's optimizer for one stage (without weight decay)."""
        return keras.optimizers.SGD(
            step_decay(0.1, stage_steps), momentum=0.9, nesterov=True
        )

    # ------------------------------------------------------------------
    def _scope(self):
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    def _new_model(self, stage, previous=None):
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

    def fit(
        self,
        x,
        y=None,
        batch_size=None,
        validation_data=None,
        steps_per_epoch=None,
        num_examples=None,
        extraction_data=None,
        callbacks=None,
        checkpoint_dir=None,
        verbose="auto",
        **fit_kwargs,
    ):
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
            `[history_stage1, history_stage2]`.
        """
        from keras_dks.callbacks import SafeBackupAndRestore


        user_steps = steps_per_epoch
        if isinstance(x, tf.data.Dataset):
            if y is not None:
                raise ValueError("Pass labels inside the dataset, not as y.")
            train = x
            if steps_per_epoch is None:
                card = int(x.cardinality())
                if card <= 0:
                    raise ValueError(
                        "The dataset's length is unknown or infinite: pass "
                        "steps_per_epoch so each stage's schedule has a known length."
                    )
                steps_per_epoch = card
            if extraction_data is None:
                if int(x.cardinality()) == tf.data.INFINITE_CARDINALITY:
                    raise ValueError(
                        "The training dataset repeats forever; pass "
                        "extraction_data (one finite pass over the examples) "
                        "to compute the stored probabilities."
                    )
                extraction_data = x
            # Batches come as the pipeline orders them (shuffle it there);
            # Keras would otherwise warn that shuffle=True is ignored.
            fit_kwargs.setdefault("shuffle", False)
            fit_data = dict(x=train)
        else:
            if y is None:
                raise ValueError("NumPy inputs need labels: fit(images, labels).")
            images = np.asarray(x)
            n = len(images)
            index = np.arange(n, dtype="int64")
            batch_size = batch_size or 32
            if steps_per_epoch is None:
                steps_per_epoch = math.ceil(n / batch_size)
            num_examples = num_examples or n
            fit_data = dict(x=(images, index), y=np.asarray(y), batch_size=batch_size)
            if extraction_data is None:
                extraction_data = tf.data.Dataset.from_tensor_slices(
                    ((images, index), np.asarray(y))
                ).batch(batch_size)
        self.stage_steps = int(steps_per_epoch) * self.stage_epochs
        stage_callbacks = (
            callbacks if callable(callbacks) else (lambda stage: list(callbacks or []))
        )
        common = dict(
            epochs=self.stage_epochs,
            validation_data=validation_data,
            verbose=verbose,
            **fit_kwargs,
        )
        if user_steps is not None:  # else Keras runs full passes
            common["steps_per_epoch"] = user_steps

        def stage_callbacks_with_backup(stage):
            found = list(stage_callbacks(stage))
            if checkpoint_dir:  # last: it saves what the others logged
                found.append(
                    SafeBackupAndRestore(os.path.join(checkpoint_dir, f"stage{stage}"))
                )
            return found

        if checkpoint_dir:
            os.makedirs(checkpoint_dir, exist_ok=True)
            stage1_weights = os.path.join(checkpoint_dir, "stage1.weights.h5")
            stage1_table = os.path.join(checkpoint_dir, "soft_targets.npy")
        stage1_done = bool(checkpoint_dir) and os.path.exists(stage1_table)

        # Stage 1: cross-entropy, complete schedule.
        with self._scope():
            net1 = self._new_model(1)
            trainer1 = SRDLModel(
                net1, temperature=self.temperature, weight_decay=self.weight_decay,
                name="srdl_stage1",
            )
            self._compile(trainer1, self.stage_steps)
        if stage1_done:
            net1.load_weights(stage1_weights)
            table = np.load(stage1_table)
            history1 = None
        else:
            history1 = trainer1.fit(
                **fit_data, callbacks=stage_callbacks_with_backup(1), **common
            )
            # The stored knowledge: softmax(z / T) of every training example.
            table = self.extract_soft_targets(net1, extraction_data, num_examples)
            if checkpoint_dir:
                # Weights first, the table last: its presence marks stage 1 done.
                utils.atomic_write(stage1_weights, net1.save_weights, ".weights.h5")
                utils.atomic_write(stage1_table, lambda p: np.save(p, table), ".npy")

        # Stage 2: fresh weights, fresh schedule, CE + T^2 KL.
        with self._scope():
            if self.restart:
                net2 = self._new_model(2)
            else:
                net2 = keras.models.clone_model(net1)
                net2.set_weights(net1.get_weights())
            trainer2 = SRDLModel(
                net2,
                soft_targets=table,
                temperature=self.temperature,
                distill_weight=self.distill_weight,
                weight_decay=self.weight_decay,
                name="srdl_stage2",
            )
            self._compile(trainer2, self.stage_steps)
        history2 = trainer2.fit(
            **fit_data, callbacks=stage_callbacks_with_backup(2), **common
        )
        if checkpoint_dir:  # finished: the next run starts afresh, as Keras'
            for path in (stage1_table, stage1_weights):  # BackupAndRestore does
                if os.path.exists(path):
                    os.remove(path)
            if not os.listdir(checkpoint_dir):
                os.rmdir(checkpoint_dir)

        self.stage1_model, self.model = net1, net2
        self.soft_targets = table
        self.trainers = [trainer1, trainer2]
        return [history1, history2]

    def extract_soft_targets(self, model, data, num_examples=None):
        """softmax(model(images) / T) of every example, as an (n, C) array.

        Args:
            model: the classifier (run in inference mode).
            data: finite batched dataset of `((images, index), labels)` (or
                `((images, index),)`); any order.
            num_examples: n; default the largest index + 1.

        Returns:
            `(n, C)` float32 NumPy array; row i belongs to index i.
        """
        temperature = self.temperature

        @tf.function(reduce_retracing=True)
        def soften(images):
            logits = tf.cast(model(images, training=False), "float32")
            return tf.nn.softmax(logits / temperature, axis=-1)

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
            probs = soften(images).numpy()
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
