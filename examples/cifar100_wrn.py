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

`--method srdl` runs the SRDL paper's own recipe instead (Lan et al. 2018,
section 4): two stages of epochs/2, each with its complete schedule (lr 0.1
x0.1 at 50 % and 75 % of the stage), SGD with Nesterov momentum 0.9, coupled
L2 2e-4, T = 3; every one of these flags that is given on the command line
overrides the paper's value (--lr_boundaries are then epochs of the whole
budget, halved into each stage, so the DKS boundaries 60,120,160 become
30,60,80 of every 100-epoch stage).

Needs, to run offline: the dataset prepared by TFDS under --data_dir
(`<data_dir>/cifar100/3.0.2/`, e.g. prepared on a machine with network and
copied; otherwise the first run downloads the 161 MB archive from
www.cs.toronto.edu, and without network stops within seconds saying so);
the packages tensorflow (or tensorflow-cpu), tensorflow-datasets and
keras-dks, and matplotlib for `curves.png`. Progress: one line per epoch
(`--verbose 1`: Keras' progress bar).

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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

FLAGS = flags.FLAGS
# Network.
flags.DEFINE_integer("depth", 28, "WRN depth, 6n + 4.")
flags.DEFINE_integer("width", 10, "WRN widening factor k.")
flags.DEFINE_float("dropout", 0.0, "Dropout between the two convs of a block (0.3 in the paper's dropout variant).")
flags.DEFINE_enum("method", "dks", ["baseline", "ds", "dks", "dhm", "srdl"],
                  "baseline: main head only; ds: auxiliary heads, no synergy; dks: heads + synergy; "
                  "dhm: DHMModel, by default the released DHM code (the DKS loss); srdl: two stages "
                  "of epochs/2 with the SRDL paper's recipe (a complete schedule in each), the second "
                  "from fresh weights learning from the first's stored T=3 soft labels.")
flags.DEFINE_enum("pairs", "bidirectional", ["bidirectional", "top_down", "bottom_up"],
                  "Synergy pair strategy of dks/dhm.")
flags.DEFINE_bool("sync_batchnorm", False, "Synchronized BatchNorm across replicas (backbone and heads).")
# Recipe.
# (--method srdl: the SRDL paper's values for lr, lr_decay, lr_boundaries,
# momentum, nesterov and weight_decay unless the flag is given.)
flags.DEFINE_integer("epochs", 200, "Training epochs.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_float("lr", 0.1, "Initial learning rate.")
flags.DEFINE_float("lr_decay", 0.2, "Learning-rate multiplier at each boundary (srdl default: 0.1).")
flags.DEFINE_list("lr_boundaries", ["60", "120", "160"],
                  "Epochs at which the learning rate decays (srdl default: 50 % and 75 % of each stage; "
                  "given, they are epochs of the whole budget, halved into each stage).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_bool("nesterov", None, "Nesterov momentum (default: off, as in the DKS authors' code; on for srdl, "
                  "as in the SRDL paper).")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled L2 on all trainable variables (PyTorch SGD weight_decay; "
                   "srdl default: 2e-4).")
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
flags.DEFINE_integer("verbose", 2, "Progress: 0 none, 1 Keras' progress bar, 2 one line per epoch.")


def load_data():
    """(train_ds, test_ds, extraction_ds, steps_per_epoch, input_shape, num_classes, mean, std)."""
    from keras_dks.data import cifar, pipelines

    split = FLAGS.train_split + (f"[:{FLAGS.train_examples}]" if FLAGS.train_examples else "")
    srdl = FLAGS.method == "srdl"
    # SRDL numbers the examples: read them in the same order every time.
    with _cli.user_errors(RuntimeError, FileNotFoundError):  # no data, no network
        raw_train, info = pipelines.load_tfds(
            FLAGS.dataset, split, FLAGS.data_dir, shuffle_files=not srdl, seed=FLAGS.seed,
            download=FLAGS.download,
        )
        raw_test, _ = pipelines.load_tfds(FLAGS.dataset, FLAGS.eval_split, FLAGS.data_dir,
                                          download=False)
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


def validate_flags():
    """Check every flag, and the dataset's name and image spec, before any work.

    Reads only the TFDS builder's metadata (no download, no TensorFlow
    work, so a multi-worker strategy can still start afterwards).

    Raises:
        app.UsageError: listing each bad flag and what it accepts.
    """
    from keras_dks.data import pipelines
    from keras_dks.methods import METHODS

    errors = []
    if FLAGS.method not in METHODS:
        errors.append(f"--method {FLAGS.method!r} is unknown; the methods are {', '.join(METHODS)}.")
    if FLAGS.depth < 10 or (FLAGS.depth - 4) % 6:
        errors.append(f"--depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {FLAGS.depth}.")
    for name in ("width", "epochs", "batch_size", "validation_freq"):
        if getattr(FLAGS, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(FLAGS, name)}.")
    if FLAGS.method == "srdl" and FLAGS.epochs % 2:
        errors.append(f"--epochs must be even with srdl (two stages of epochs/2), got {FLAGS.epochs}.")
    for name in ("train_examples", "image_size", "steps_per_epoch", "eval_steps", "benchmark_steps"):
        if getattr(FLAGS, name) < 0:
            errors.append(f"--{name} must be >= 0 (0: off), got {getattr(FLAGS, name)}.")
    if not 0 <= FLAGS.dropout < 1:
        errors.append(f"--dropout must be in [0, 1), got {FLAGS.dropout}.")
    if not FLAGS.lr > 0 or not FLAGS.lr_decay > 0:
        errors.append(f"--lr and --lr_decay must be > 0, got {FLAGS.lr} and {FLAGS.lr_decay}.")
    if not 0 <= FLAGS.momentum < 1:
        errors.append(f"--momentum must be in [0, 1), got {FLAGS.momentum}.")
    if FLAGS.weight_decay < 0:
        errors.append(f"--weight_decay must be >= 0, got {FLAGS.weight_decay}.")
    if FLAGS.verbose not in (0, 1, 2):
        errors.append(f"--verbose must be 0, 1 or 2, got {FLAGS.verbose}.")
    try:
        boundaries = [float(b) for b in FLAGS.lr_boundaries]
    except ValueError:
        errors.append(f"--lr_boundaries must be epochs (numbers), got {','.join(FLAGS.lr_boundaries)}.")
    else:
        if any(b < 0 for b in boundaries) or boundaries != sorted(boundaries):
            errors.append(f"--lr_boundaries must be increasing epochs >= 0, got "
                          f"{','.join(FLAGS.lr_boundaries)}.")
        elif boundaries and boundaries[-1] >= FLAGS.epochs:
            print(f"Warning: --lr_boundaries {','.join(FLAGS.lr_boundaries)} reach --epochs "
                  f"{FLAGS.epochs}: the later decays never happen (scale them with --epochs).")
    stats = {}
    for name in ("mean", "std"):
        try:
            stats[name] = [float(v) for v in getattr(FLAGS, name)]
        except ValueError:
            errors.append(f"--{name} must be numbers, got {','.join(getattr(FLAGS, name))}.")
    if "std" in stats and any(not v > 0 for v in stats["std"]):
        errors.append(f"--std must be > 0, got {','.join(FLAGS.std)}.")
    if len(stats) == 2 and max(stats["mean"] + stats["std"]) <= 1:
        errors.append(f"--mean {','.join(FLAGS.mean)} / --std {','.join(FLAGS.std)} look like [0, 1] "
                      "statistics; these flags take the 0-255 scale (e.g. 125.3 / 63.0): "
                      "multiply by 255.")
    if FLAGS.train_examples and "[" in FLAGS.train_split:
        errors.append(f"--train_split {FLAGS.train_split} is already a slice: drop --train_examples "
                      "or the slice.")
    for name in ("model_dir", "export_dir"):
        if getattr(FLAGS, name) and os.path.isfile(getattr(FLAGS, name)):
            errors.append(f"--{name} {getattr(FLAGS, name)} is a file: pass a folder.")
    try:
        builder = pipelines.tfds_builder(FLAGS.dataset, FLAGS.data_dir)
    except ValueError as e:
        errors.append(f"--dataset: {e}")
    else:
        errors += _dataset_errors(builder, stats)
    if errors:
        raise app.UsageError("\n".join(errors))


def _dataset_errors(builder, stats):
    """What the dataset's metadata rules out: no labels, varying sizes, channels."""
    info = builder.info
    keys = info.supervised_keys
    if not keys or len(keys) != 2:
        return [f"--dataset {FLAGS.dataset} has no (image, label) supervised keys: pass an image "
                "classification dataset."]
    image, label = info.features[keys[0]], info.features[keys[1]]
    shape = tuple(getattr(image, "shape", ()) or ())
    if len(shape) != 3 or not hasattr(label, "num_classes"):
        return [f"--dataset {FLAGS.dataset} is not an image classification dataset (image "
                f"{shape}, label {type(label).__name__})."]
    errors = []
    if None in shape[:2] and not FLAGS.image_size:
        errors.append(f"--dataset {FLAGS.dataset} has images of varying size {shape}: pass "
                      "--image_size.")
    channels = shape[-1]
    for name, values in stats.items():
        if channels and len(values) not in (1, channels):
            errors.append(f"--{name} has {len(values)} values; {FLAGS.dataset} images have "
                          f"{channels} channel(s): pass " + ("1." if channels == 1 else
                                                             f"1 or {channels}."))
    return errors


def main(argv):
    del argv
    validate_flags()
    import keras
    from keras_dks import backbones, distribute, recipes

    # First: a multi-worker strategy must start before any other TF work.
    strategy = distribute.get_strategy(FLAGS.strategy)
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
        recipe = srdl_recipe()
        print(f"SRDL recipe: {recipe}")
        result = recipes.train_srdl(
            backbone_fn, train_ds, test_ds, extraction_ds, epochs=FLAGS.epochs,
            steps_per_epoch=FLAGS.steps_per_epoch or None,
            optimizer_fn=srdl_optimizer_fn(recipe, steps),
            weight_decay=recipe["weight_decay"], model_dir=model_dir, batch_size=FLAGS.batch_size,
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


def srdl_recipe():
    """The SRDL recipe of this run: the SRDL paper's values
    (`keras_dks.methods.srdl.PAPER_RECIPE`), each replaced by its flag when
    the flag is given on the command line."""
    from keras_dks.methods import srdl

    paper = srdl.PAPER_RECIPE

    def pick(flag, value):
        return getattr(FLAGS, flag) if FLAGS[flag].present else value

    return {
        "lr": pick("lr", paper["learning_rate"]),
        "decay": pick("lr_decay", paper["decay"]),
        # None: drops at paper["drops"] of each stage.
        "boundaries": [float(b) for b in FLAGS.lr_boundaries] if FLAGS["lr_boundaries"].present else None,
        "momentum": pick("momentum", paper["momentum"]),
        "nesterov": paper["nesterov"] if FLAGS.nesterov is None else FLAGS.nesterov,
        "weight_decay": pick("weight_decay", paper["weight_decay"]),
    }


def srdl_optimizer_fn(recipe, steps_per_epoch):
    """`optimizer_fn(stage_steps)` of `recipe`: a fresh SGD with the whole
    schedule inside one stage."""
    from keras_dks import recipes
    from keras_dks.methods import srdl

    def optimizer_fn(stage_steps):
        if recipe["boundaries"] is None:
            schedule = srdl.step_decay(recipe["lr"], stage_steps, srdl.PAPER_RECIPE["drops"], recipe["decay"])
        else:  # epochs of the whole budget, halved into each stage
            schedule = recipes.step_schedule(
                recipe["lr"], steps_per_epoch, [0.5 * b for b in recipe["boundaries"]], recipe["decay"]
            )
        return recipes.sgd(schedule, recipe["momentum"], nesterov=recipe["nesterov"])

    return optimizer_fn


def build_and_train(strategy, backbone_fn, steps, boundaries, name, model_dir, policy, train_ds,
                    test_ds):
    """Baseline / DS / DKS / DHM: one DKSModel, one fit."""
    from keras_dks import methods, recipes

    with strategy.scope():
        backbone = backbone_fn()
        model = methods.build_model(
            FLAGS.method, backbone, pairs=FLAGS.pairs if FLAGS.method in ("dks", "dhm") else None,
            weight_decay=FLAGS.weight_decay,
            sync_batchnorm=FLAGS.sync_batchnorm, seed=FLAGS.seed,
        )
        schedule = recipes.step_schedule(FLAGS.lr, steps, boundaries, FLAGS.lr_decay)
        model.compile(
            optimizer=recipes.sgd(schedule, FLAGS.momentum, nesterov=bool(FLAGS.nesterov)),
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
    _cli.run(main)
