r"""Baseline vs DKS on real Fashion-MNIST, offline on a CPU (`make demo`).

Trains the same small pre-activation Wide ResNet (`wide_resnet`, 28x28x1
input, the DKS authors' auxiliary-head design) once per method with the
CIFAR recipe scaled down: SGD momentum 0.9, lr 0.1 x0.2 at 50 % and 75 %
of the epochs (--lr_boundaries 0.3,0.6,0.8 for the exact 60/120/160-of-200
shape), coupled L2 5e-4 on all trainable variables,
reflect-pad 4 + random crop + flip, batch 128. The defaults (a fixed
10k-image training subset, 3 epochs, the full 10k test set) take a few
minutes on 2 CPU cores. It prints every head's test accuracy for each
method and writes, under --model_dir:

- `curves.png`: per-head train/test error of all methods (paper Figure 1),
- `<method>/`: checkpoints, history JSON, curves and model.keras of a run,
- `saved_model/1/`: TF Serving SavedModel of the DKS inference network
  (backbone + main head only; takes raw uint8 28x28x1 images).

A short run on a small net is a demo, not a replication: the paper's gain
needs a wider net and the full schedule (see benchmarks/accuracy.py).

Data: the IDX files in --data_dir; by default the folder of Debian's
`dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist) when it
is installed, otherwise `keras.datasets.fashion_mnist` (downloads).

Example:
    python examples/fashion_mnist.py
    python examples/fashion_mnist.py --methods baseline,ds,dks --epochs 30 \
        --train_examples 0 --width 2 --model_dir runs/fmnist_full
"""

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Folder with the four Fashion-MNIST IDX files (.gz or not); "
                    "default: Debian's dataset-fashion-mnist folder, else keras.datasets.")
flags.DEFINE_list("methods", ["baseline", "dks"], "Methods to train, in order: any of "
                  "keras_dks.methods.METHODS (baseline, ds, dks, dhm, srdl).")
flags.DEFINE_integer("depth", 16, "WRN depth, 6n + 4.")
flags.DEFINE_integer("width", 1, "WRN widening factor.")
flags.DEFINE_integer("epochs", 3, "Epochs per method.")
flags.DEFINE_integer("train_examples", 10000, "Fixed random training subset (0: all 60k).")
flags.DEFINE_integer("test_examples", 0, "Test subset (0: all 10k).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("lr", 0.1, "Initial learning rate.")
flags.DEFINE_float("lr_decay", 0.2, "Learning-rate multiplier at each boundary.")
flags.DEFINE_list("lr_boundaries", ["0.5", "0.75"],
                  "Decay points as fractions of --epochs (0.3,0.6,0.8 is the 60/120/160-of-200 CIFAR "
                  "recipe; a 3-epoch demo learns more with later decays).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled L2 on all trainable variables.")
flags.DEFINE_integer("seed", 0, "Random seed (same initial backbone weights for every method).")
flags.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch (0: one pass over the subset).")
flags.DEFINE_integer("eval_steps", 0, "Test batches per evaluation (0: all).")
flags.DEFINE_string("model_dir", "runs/fashion_mnist", "Output folder.")
flags.DEFINE_bool("export", True, "Write the SavedModel of the DKS (or last) inference network.")
flags.DEFINE_integer("verbose", 2, "fit verbosity.")


def validate_flags():
    """Check every flag before any data is read or any model built.

    Raises:
        app.UsageError: listing each bad flag and what it accepts.
    """
    from keras_dks.methods import METHODS

    errors = []
    methods = FLAGS.methods
    unknown = [m for m in methods if m not in METHODS]
    if not methods:
        errors.append(f"--methods is empty: pass one or more of {', '.join(METHODS)}.")
    elif unknown:
        errors.append(f"--methods: unknown {', '.join(map(repr, unknown))}; the methods are "
                      f"{', '.join(METHODS)}.")
    if len(set(methods)) != len(methods):
        errors.append(f"--methods lists a method twice ({','.join(methods)}): each writes "
                      "<model_dir>/<method>, so list each once.")
    if FLAGS.depth < 10 or (FLAGS.depth - 4) % 6:
        errors.append(f"--depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {FLAGS.depth}.")
    for name in ("width", "epochs", "batch_size"):
        if getattr(FLAGS, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(FLAGS, name)}.")
    if "srdl" in methods and FLAGS.epochs % 2:
        errors.append(f"--epochs must be even with srdl (two stages of epochs/2), got {FLAGS.epochs}.")
    for name in ("train_examples", "test_examples", "steps_per_epoch", "eval_steps"):
        if getattr(FLAGS, name) < 0:
            errors.append(f"--{name} must be >= 0 (0: all), got {getattr(FLAGS, name)}.")
    if not FLAGS.lr > 0 or not FLAGS.lr_decay > 0:
        errors.append(f"--lr and --lr_decay must be > 0, got {FLAGS.lr} and {FLAGS.lr_decay}.")
    try:
        boundaries = [float(b) for b in FLAGS.lr_boundaries]
    except ValueError:
        errors.append(f"--lr_boundaries must be numbers, got {','.join(FLAGS.lr_boundaries)}.")
    else:
        if any(not 0 <= b <= 1 for b in boundaries) or boundaries != sorted(boundaries):
            errors.append(f"--lr_boundaries are increasing fractions of --epochs in [0, 1], got "
                          f"{','.join(FLAGS.lr_boundaries)} (e.g. 0.5,0.75).")
    if not 0 <= FLAGS.momentum < 1:
        errors.append(f"--momentum must be in [0, 1), got {FLAGS.momentum}.")
    if FLAGS.weight_decay < 0:
        errors.append(f"--weight_decay must be >= 0, got {FLAGS.weight_decay}.")
    if FLAGS.verbose not in (0, 1, 2):
        errors.append(f"--verbose must be 0, 1 or 2, got {FLAGS.verbose}.")
    if FLAGS.data_dir and not os.path.isdir(FLAGS.data_dir):
        errors.append(f"--data_dir {FLAGS.data_dir} is not a folder: pass the folder holding the "
                      "four Fashion-MNIST IDX files (Debian/Ubuntu: apt-get install "
                      "dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist).")
    if os.path.isfile(FLAGS.model_dir):
        errors.append(f"--model_dir {FLAGS.model_dir} is a file: pass a folder.")
    if errors:
        raise app.UsageError("\n".join(errors))


def main(argv):
    del argv
    validate_flags()
    import keras
    from keras_dks import backbones, plots, recipes
    from keras_dks.data import fashion_mnist

    start = time.perf_counter()
    data_dir = FLAGS.data_dir or fashion_mnist.default_data_dir()
    (x_train, y_train), (x_test, y_test) = fashion_mnist.load_data(data_dir)
    x_train, y_train = fashion_mnist.subset(x_train, y_train, FLAGS.train_examples)
    x_test, y_test = fashion_mnist.subset(x_test, y_test, FLAGS.test_examples)
    steps = FLAGS.steps_per_epoch or -(-len(x_train) // FLAGS.batch_size)
    print(f"Fashion-MNIST from {data_dir or 'keras.datasets'}: {len(x_train)} training / "
          f"{len(x_test)} test images; WRN-{FLAGS.depth}-{FLAGS.width}, {FLAGS.epochs} epochs "
          f"x {steps} steps")
    test_ds = fashion_mnist.make_dataset(x_test, y_test, training=False, batch_size=500)
    if FLAGS.eval_steps:
        test_ds = test_ds.take(FLAGS.eval_steps)

    results, models = {}, {}
    def backbone_fn():
        return backbones.wide_resnet(FLAGS.depth, FLAGS.width, 10, input_shape=(28, 28, 1))

    def optimizer(stage=1.0):
        # SRDL runs the whole schedule in each half of the epochs (stage=0.5).
        boundaries = [float(b) * FLAGS.epochs * stage for b in FLAGS.lr_boundaries]
        schedule = recipes.step_schedule(FLAGS.lr, steps, boundaries, FLAGS.lr_decay)
        return recipes.sgd(schedule, FLAGS.momentum)

    for method in FLAGS.methods:
        keras.utils.set_random_seed(FLAGS.seed)
        srdl = method == "srdl"
        train_ds = fashion_mnist.make_dataset(
            x_train, y_train, training=True, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
            repeat=bool(FLAGS.steps_per_epoch), with_index=srdl,
        )
        title = f"Fashion-MNIST WRN-{FLAGS.depth}-{FLAGS.width} {method}"
        run = dict(model_dir=os.path.join(FLAGS.model_dir, method), batch_size=FLAGS.batch_size,
                   verbose=FLAGS.verbose, title=title)
        if srdl:
            print(f"\n== srdl: two stages of {FLAGS.epochs // 2} epochs")
            extraction_ds = fashion_mnist.make_dataset(
                x_train, y_train, training=False, batch_size=500, with_index=True)
            results[method] = recipes.train_srdl(
                backbone_fn, train_ds, test_ds, extraction_ds, epochs=FLAGS.epochs,
                steps_per_epoch=FLAGS.steps_per_epoch or None,
                optimizer_fn=lambda _: optimizer(stage=0.5), weight_decay=FLAGS.weight_decay,
                **run,
            )
            models[method] = results[method].pop("model")
            continue
        model = recipes.build_model(method, backbone_fn(), weight_decay=FLAGS.weight_decay,
                                    seed=FLAGS.seed)
        model.compile(optimizer=optimizer(), metrics=["accuracy"])
        print(f"\n== {method}: heads {model.head_names}, {model.count_params():,} parameters")
        results[method] = recipes.train(
            model, train_ds, test_ds, epochs=FLAGS.epochs,
            steps_per_epoch=FLAGS.steps_per_epoch or None, **run,
        )
        models[method] = model

    curves = plots.plot_error_curves(
        {m: r["history"] for m, r in results.items()}, os.path.join(FLAGS.model_dir, "curves.png"),
        title=f"Fashion-MNIST, WRN-{FLAGS.depth}-{FLAGS.width}: error per head",
        heads=max((r["head_names"] for r in results.values()), key=len),
    )
    print(f"\nTest accuracy per head ({len(x_test)} test images):")
    print(f"{'method':<10}{'head':<14}{'accuracy':>10}{'train time':>12}")
    for method, result in results.items():
        for k, (head, error) in enumerate(result["head_errors"].items()):
            wall = f"{result['wall_seconds']:.0f} s" if k == 0 else ""
            print(f"{method:<10}{head:<14}{100 * (1 - error):>9.2f}%{wall:>12}")
    print("(A few epochs of a small net show the method running, not the paper's gain: "
          "see benchmarks/accuracy.py for longer multi-seed runs.)")
    print(f"curves: {curves}")
    if FLAGS.export:
        method = "dks" if "dks" in models else FLAGS.methods[-1]
        path = recipes.export_inference_model(
            models[method], os.path.join(FLAGS.model_dir, "saved_model"),
            fashion_mnist.MEAN, fashion_mnist.STD, version=1, overwrite=True,
        )
        print(f"SavedModel of the {method} inference network: {path}")
    print(f"total wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
