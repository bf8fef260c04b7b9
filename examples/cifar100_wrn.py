r"""WRN-28-10 on CIFAR-100 with DKS: the paper's main CIFAR recipe.

The DKS authors' recipe (their `wrn_DKS` code): pre-activation WRN with
their two auxiliary branches, SGD lr 0.1 (momentum 0.9, no Nesterov),
batch 128, 200 epochs, lr x0.2 at epochs 60, 120 and 160, coupled L2 5e-4 on
all trainable variables, reflect-pad 4 + random crop + flip. Paper
(Table 1, test error %): baseline 18.72, DS 18.32, DKS 17.24.

Writes to --model_dir: `backup/` (resumable checkpoints: re-run the same
command after a crash), `logs/` (TensorBoard), `history.json`,
`curves.png` (per-head train/test error, like the paper's Figure 1) and
`model.keras`; --export_dir gets a TF Serving SavedModel of the inference
network (raw uint8 pixels in, normalisation built in). The last line is a
one-line summary: test error of every head, wall time, images/s.

Example:
    python examples/cifar100_wrn.py --model_dir runs/wrn28_10_dks
    python examples/cifar100_wrn.py --method baseline --model_dir runs/wrn28_10_base
    # Two GPUs, synchronized BN, XLA, mixed precision:
    python examples/cifar100_wrn.py --strategy mirrored --sync_batchnorm \
        --jit_compile --mixed_precision --model_dir runs/wrn_mirrored
    # Several machines (MultiWorkerMirroredStrategy): the same command once
    # per worker, each with TF_CONFIG naming every worker and its own index
    # (worker 0 is the chief and writes --model_dir/--export_dir; the others
    # write below --model_dir/workers/). Two workers on one machine:
    CLUSTER='{"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]}'
    TF_CONFIG="{\"cluster\": $CLUSTER, \"task\": {\"type\": \"worker\", \"index\": 0}}" \
        python examples/cifar100_wrn.py --strategy multi_worker --model_dir runs/mw &
    TF_CONFIG="{\"cluster\": $CLUSTER, \"task\": {\"type\": \"worker\", \"index\": 1}}" \
        python examples/cifar100_wrn.py --strategy multi_worker --model_dir runs/mw
    # (--batch_size is the global batch; see keras_dks.distribute.)
    # Any TFDS image classification dataset (prepared under --data_dir):
    python examples/cifar100_wrn.py --dataset cifar10 --depth 16 --width 4
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
# Network.
flags.DEFINE_integer("depth", 28, "WRN depth, 6n + 4.")
flags.DEFINE_integer("width", 10, "WRN widening factor k.")
flags.DEFINE_float("dropout", 0.0, "Dropout between the two convs of a block (0.3 in the paper's dropout variant).")
flags.DEFINE_enum("method", "dks", ["baseline", "ds", "dks", "dhm", "srdl"],
                  "baseline: main head only; ds: auxiliary heads, no synergy; dks: heads + synergy; "
                  "dhm: DHMModel, by default the released DHM code (the DKS loss); srdl: two stages of epochs/2, each with the whole "
                  "schedule compressed into it, the second from fresh weights learning from the "
                  "first's stored T=3 soft labels.")
flags.DEFINE_enum("pairs", "bidirectional", ["bidirectional", "top_down", "bottom_up"],
                  "Synergy pair strategy of dks/dhm.")
flags.DEFINE_bool("sync_batchnorm", False, "Synchronized BatchNorm across replicas (backbone and heads).")
# Recipe.
flags.DEFINE_integer("epochs", 200, "Training epochs.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_float("lr", 0.1, "Initial learning rate.")
flags.DEFINE_float("lr_decay", 0.2, "Learning-rate multiplier at each boundary.")
flags.DEFINE_list("lr_boundaries", ["60", "120", "160"], "Epochs at which the learning rate decays.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum (no Nesterov).")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled L2 on all trainable variables (PyTorch SGD weight_decay).")
flags.DEFINE_integer("seed", 0, "Random seed (weights, shuffling, augmentation).")
# Data.
flags.DEFINE_string("dataset", "cifar100", "TFDS image classification dataset.")
flags.DEFINE_string("data_dir", None, "TFDS data folder (prepared data, or where to prepare it).")
flags.DEFINE_bool("download", True, "Let TFDS download and prepare the dataset if needed.")
flags.DEFINE_string("train_split", "train", "TFDS training split.")
flags.DEFINE_string("eval_split", "test", "TFDS test split.")
flags.DEFINE_integer("train_examples", 0, "Use only the first N training examples (0: all).")
flags.DEFINE_integer("image_size", 0, "Resize images to this size first (0: keep; needed for variable-size datasets).")
flags.DEFINE_list("mean", ["125.3", "123.0", "113.9"], "Per-channel mean, 0-255 scale.")
flags.DEFINE_list("std", ["63.0", "62.1", "66.7"], "Per-channel std, 0-255 scale.")
# Execution.
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy; multi_worker reads TF_CONFIG (launch: see the module docstring).")
flags.DEFINE_bool("mixed_precision", False, "mixed_float16 on GPU, mixed_bfloat16 on CPU.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_string("model_dir", "runs/cifar100_wrn", "Checkpoints, TensorBoard, history, curves, model.keras.")
flags.DEFINE_string("export_dir", None, "If set, TF Serving SavedModel of the inference network (versioned).")
flags.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch (0: one pass over the training data).")
flags.DEFINE_integer("eval_steps", 0, "Test batches per evaluation (0: the whole test split).")
flags.DEFINE_integer("validation_freq", 1, "Evaluate on the test split every N epochs.")
flags.DEFINE_integer("benchmark_steps", 50, "Batches to time the input pipeline alone (0: skip).")
flags.DEFINE_bool("save_model", True, "Save the trained model as model_dir/model.keras.")
flags.DEFINE_integer("verbose", 2, "fit verbosity.")


def load_data():
    """(train_ds, test_ds, extraction_ds, steps_per_epoch, input_shape, num_classes, mean, std)."""
    from keras_dks.data import cifar, pipelines

    split = FLAGS.train_split + (f"[:{FLAGS.train_examples}]" if FLAGS.train_examples else "")
    srdl = FLAGS.method == "srdl"
    # SRDL numbers the examples: read them in the same order every time.
    raw_train, info = pipelines.load_tfds(
        FLAGS.dataset, split, FLAGS.data_dir, shuffle_files=not srdl, seed=FLAGS.seed,
        download=FLAGS.download,
    )
    raw_test, _ = pipelines.load_tfds(FLAGS.dataset, FLAGS.eval_split, FLAGS.data_dir, download=False)
    shape, num_classes = pipelines.image_spec(info)
    if FLAGS.image_size:
        shape = (FLAGS.image_size, FLAGS.image_size, shape[-1])
    if None in shape:
        raise app.UsageError(f"{FLAGS.dataset} has images of varying size {shape}: pass --image_size.")
    mean = [float(m) / 255 for m in FLAGS.mean]
    std = [float(s) / 255 for s in FLAGS.std]
    if len(mean) not in (1, shape[-1]) or len(std) not in (1, shape[-1]):
        raise app.UsageError(f"--mean/--std need 1 or {shape[-1]} values for {FLAGS.dataset}.")
    n_train = pipelines.num_examples(info, split, raw_train)
    steps = FLAGS.steps_per_epoch or pipelines.steps_per_epoch(n_train, FLAGS.batch_size)
    common = dict(batch_size=FLAGS.batch_size, mean=mean, std=std, image_size=FLAGS.image_size or None)
    train_ds = cifar.make_dataset(
        raw_train, training=True, seed=FLAGS.seed, repeat=bool(FLAGS.steps_per_epoch),
        with_index=srdl, **common
    )
    # SRDL's soft labels are computed on one un-augmented pass.
    extraction_ds = (
        cifar.make_dataset(raw_train, training=False, with_index=True, **common) if srdl else None
    )
    if FLAGS.eval_steps:  # before the cache, which must be read to the end
        raw_test = raw_test.take(FLAGS.eval_steps * FLAGS.batch_size)
    test_ds = cifar.make_dataset(raw_test, training=False, **common)
    print(f"{FLAGS.dataset}: {n_train} training images, {num_classes} classes, input {shape}, "
          f"{steps} steps/epoch")
    return train_ds, test_ds, extraction_ds, steps, shape, num_classes, mean, std


def main(argv):
    del argv
    import keras
    from keras_dks import backbones, recipes

    # First: a multi-worker strategy must start before any other TF work.
    strategy = recipes.get_strategy(FLAGS.strategy)
    policy = recipes.set_precision(FLAGS.mixed_precision)
    keras.utils.set_random_seed(FLAGS.seed)
    train_ds, test_ds, extraction_ds, steps, shape, num_classes, mean, std = load_data()
    boundaries = [float(b) for b in FLAGS.lr_boundaries]
    name = f"{FLAGS.dataset} WRN-{FLAGS.depth}-{FLAGS.width} {FLAGS.method}"
    model_dir = recipes.worker_dir(FLAGS.model_dir)

    def backbone_fn():
        return backbones.wide_resnet(
            FLAGS.depth, FLAGS.width, num_classes, dropout=FLAGS.dropout,
            input_shape=shape, sync_batchnorm=FLAGS.sync_batchnorm,
        )

    if FLAGS.method == "srdl":
        # Each stage gets the whole recipe in epochs/2: boundaries halved.
        stage = 0.5
        result = recipes.train_srdl(
            backbone_fn, train_ds, test_ds, extraction_ds, epochs=FLAGS.epochs,
            steps_per_epoch=FLAGS.steps_per_epoch or None,
            optimizer_fn=lambda _: recipes.sgd(
                recipes.step_schedule(FLAGS.lr, steps, [stage * b for b in boundaries], FLAGS.lr_decay),
                FLAGS.momentum,
            ),
            weight_decay=FLAGS.weight_decay, model_dir=model_dir, batch_size=FLAGS.batch_size,
            strategy=strategy, jit_compile=FLAGS.jit_compile,
            validation_freq=FLAGS.validation_freq, verbose=FLAGS.verbose,
            save_model=FLAGS.save_model, title=name,
        )
        model = result["model"]
        print(f"{name}: {model.count_params():,} parameters; {strategy.num_replicas_in_sync} "
              f"replica(s), policy {policy}")
    else:
        model, result = build_and_train(strategy, backbone_fn, steps, boundaries, name, model_dir,
                                        policy, train_ds, test_ds)
    finish(model, result, train_ds, model_dir, mean, std, name)


def build_and_train(strategy, backbone_fn, steps, boundaries, name, model_dir, policy, train_ds,
                    test_ds):
    """Baseline / DS / DKS / DHM: one DKSModel, one fit."""
    from keras_dks import recipes

    with strategy.scope():
        backbone = backbone_fn()
        model = recipes.build_model(
            FLAGS.method, backbone, pairs=FLAGS.pairs, weight_decay=FLAGS.weight_decay,
            sync_batchnorm=FLAGS.sync_batchnorm, seed=FLAGS.seed,
        )
        schedule = recipes.step_schedule(FLAGS.lr, steps, boundaries, FLAGS.lr_decay)
        model.compile(
            optimizer=recipes.sgd(schedule, FLAGS.momentum),
            metrics=["accuracy"],
            jit_compile=FLAGS.jit_compile,
        )
    print(f"{name}: heads {model.head_names}, {model.count_params():,} parameters in training, "
          f"{model.inference_model().count_params():,} at inference; {strategy.num_replicas_in_sync} "
          f"replica(s), policy {policy}")

    result = recipes.train(
        model, train_ds, test_ds, epochs=FLAGS.epochs,
        steps_per_epoch=FLAGS.steps_per_epoch or None, model_dir=model_dir,
        batch_size=FLAGS.batch_size, validation_freq=FLAGS.validation_freq,
        verbose=FLAGS.verbose, title=name, save_model=FLAGS.save_model,
    )
    return model, result


def finish(model, result, train_ds, model_dir, mean, std, name):
    """Input-pipeline speed, export, paths and the one-line summary."""
    from keras_dks import recipes
    from keras_dks.data import pipelines

    pipeline = None
    if FLAGS.benchmark_steps:
        pipeline = pipelines.measure_throughput(train_ds, steps=FLAGS.benchmark_steps)
    print(recipes.steps_summary(result["train_steps_per_second"], pipeline))
    if FLAGS.export_dir:
        export_dir = FLAGS.export_dir if recipes.is_chief() else os.path.join(model_dir, "export")
        print("SavedModel:", recipes.export_inference_model(model, export_dir, mean, std))
    for key, path in result["paths"].items():
        print(f"{key}: {path}")
    print(recipes.summary_line(
        name, result["head_errors"], result["wall_seconds"], result["train_images_per_second"],
        pipeline["images_per_second"] if pipeline else None,
    ))


if __name__ == "__main__":
    app.run(main)
