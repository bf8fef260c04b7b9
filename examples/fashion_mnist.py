r"""Baseline vs DKS on real Fashion-MNIST, offline on a CPU (`make demo`).

Trains the same small pre-activation Wide ResNet (`wide_resnet`, 28x28x1
input, the DKS authors' auxiliary-head design) once per method, by default
with exactly the recipe of a committed study: a fixed 1,000-image training
subset (the 1k point of `benchmarks/results/size_sweep/`), 24 epochs, batch
64, SGD momentum 0.9, lr 0.1 x0.2 at 30/60/80 % of the epochs (the CIFAR
60/120/160-of-200 shape), coupled L2 5e-4 on all trainable variables, no
augmentation, seed 0; the full 10k test set at the end. At 1k images the
sweep finds DKS ahead on average (5 paired seeds). `--train_examples 2000`
is the headline study's recipe (8 paired seeds), at twice the time.
The methods train side by side, one process each: the DKS run sets the
time (measured at 2k images: baseline 264 s, DKS 498 s; neither XLA nor a
second intra- or inter-op thread for DKS made it faster: the DKS step costs
about twice the baseline's, work that the two cores already share).

It prints one line per epoch and method (whole lines, labelled with the
method, also when the methods train side by side), then every head's test
accuracy for each method, then the committed paired result of its recipe
and the headline study's beside it: one seed shows the method running, the
seeds of the studies show whether it helps. It writes, under --model_dir:

- `curves.png`: per-head training error (lines) and test error (marked
  points) of all methods, with a panel zoomed on the final test errors,
- `<method>/`: checkpoints, history JSON, curves and model.keras of a run,
- `saved_model/1/`: TF Serving SavedModel of the DKS inference network
  (backbone + main head only; takes raw uint8 28x28x1 images).

Data: the IDX files in --data_dir; by default the folder of Debian's
`dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist) when it
is installed, otherwise `keras.datasets.fashion_mnist` (downloads).

Needs, to run offline: the four Fashion-MNIST IDX files (`apt-get install
dataset-fashion-mnist`, or any folder passed as --data_dir); the packages
tensorflow (or tensorflow-cpu), keras-dks and matplotlib (`make
install-demo`). Progress: one line per epoch and method.

Example:
    python examples/fashion_mnist.py
    python examples/fashion_mnist.py --methods baseline,ds,dks --epochs 30 \
        --train_examples 0 --width 2 --augment --model_dir runs/fmnist_full
"""

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Folder with the four Fashion-MNIST IDX files (.gz or not); "
                    "default: Debian's dataset-fashion-mnist folder, else keras.datasets.")
flags.DEFINE_list("methods", ["baseline", "dks"], "Methods to train, in order: any of "
                  "keras_dks.methods.METHODS (baseline, ds, dks, dhm, srdl).")
flags.DEFINE_integer("depth", 16, "WRN depth, 6n + 4.")
flags.DEFINE_integer("width", 1, "WRN widening factor.")
flags.DEFINE_integer("epochs", 24, "Epochs per method.")
flags.DEFINE_integer("train_examples", 1000, "Fixed random training subset (0: all 60k).")
flags.DEFINE_integer("test_examples", 0, "Test subset (0: all 10k).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("lr", 0.1, "Initial learning rate.")
flags.DEFINE_float("lr_decay", 0.2, "Learning-rate multiplier at each boundary.")
flags.DEFINE_list("lr_boundaries", ["0.3", "0.6", "0.8"],
                  "Decay points as fractions of --epochs (0.3,0.6,0.8: the 60/120/160-of-200 "
                  "CIFAR recipe).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled L2 on all trainable variables.")
flags.DEFINE_integer("seed", 0, "Random seed (same initial backbone weights for every method).")
flags.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch (0: one pass over the subset).")
flags.DEFINE_integer("eval_steps", 0, "Test batches per evaluation (0: all).")
flags.DEFINE_string("model_dir", "runs/fashion_mnist", "Output folder.")
flags.DEFINE_bool("export", True, "Write the SavedModel of the DKS (or last) inference network.")
flags.DEFINE_integer("verbose", 2, "Progress: 0 none, 1 Keras' progress bar, 2 one line per epoch "
                     "(labelled with the method).")
flags.DEFINE_bool("augment", False, "Reflect-pad 4 + random crop + flip on the training images.")
flags.DEFINE_integer("eval_every", 0, "Evaluate on the test set every N epochs (0: at the end only).")
flags.DEFINE_integer("jobs", 0, "Methods trained at once, each in its own process with "
                     "cores/jobs threads (0: one per method, at most one per core; 1: one after "
                     "the other in this process).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(REPO, "benchmarks", "results", "accuracy", "summary.json")
SWEEP = os.path.join(REPO, "benchmarks", "results", "size_sweep", "summary.json")


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
    for name in ("eval_every", "jobs"):
        if getattr(FLAGS, name) < 0:
            errors.append(f"--{name} must be >= 0, got {getattr(FLAGS, name)}.")
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


def load_subsets():
    from keras_dks.data import fashion_mnist

    data_dir = FLAGS.data_dir or fashion_mnist.default_data_dir()
    with _cli.user_errors(OSError, RuntimeError, ValueError):  # missing, offline, unreadable
        (x_train, y_train), (x_test, y_test) = fashion_mnist.load_data(data_dir)
    x_train, y_train = fashion_mnist.subset(x_train, y_train, FLAGS.train_examples)
    x_test, y_test = fashion_mnist.subset(x_test, y_test, FLAGS.test_examples)
    return data_dir, (x_train, y_train), (x_test, y_test)


def train_method(method, train, test):
    """Train one method from seed FLAGS.seed; returns (report dict, model)."""
    import keras
    from keras_dks import backbones, methods, recipes
    from keras_dks.data import fashion_mnist

    (x_train, y_train), (x_test, y_test) = train, test
    steps = FLAGS.steps_per_epoch or -(-len(x_train) // FLAGS.batch_size)
    test_ds = fashion_mnist.make_dataset(x_test, y_test, training=False, batch_size=500)
    if FLAGS.eval_steps:
        test_ds = test_ds.take(FLAGS.eval_steps)

    def backbone_fn():
        return backbones.wide_resnet(FLAGS.depth, FLAGS.width, 10, input_shape=(28, 28, 1))

    def optimizer(stage=1.0):
        # SRDL runs the whole schedule in each half of the epochs (stage=0.5).
        boundaries = [float(b) * FLAGS.epochs * stage for b in FLAGS.lr_boundaries]
        schedule = recipes.step_schedule(FLAGS.lr, steps, boundaries, FLAGS.lr_decay)
        return recipes.sgd(schedule, FLAGS.momentum)

    # Same seed for every method: same data order and initial backbone.
    keras.utils.set_random_seed(FLAGS.seed)
    srdl = method == "srdl"
    train_ds = fashion_mnist.make_dataset(
        x_train, y_train, training=True, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
        repeat=bool(FLAGS.steps_per_epoch), with_index=srdl, augment=FLAGS.augment,
    )
    title = f"Fashion-MNIST WRN-{FLAGS.depth}-{FLAGS.width} {method}"
    run = dict(model_dir=os.path.join(FLAGS.model_dir, method), batch_size=FLAGS.batch_size,
               verbose=FLAGS.verbose, label=method, title=title,
               validation_freq=FLAGS.eval_every or FLAGS.epochs)
    if srdl:
        print(f"{method:<8} two stages of {FLAGS.epochs // 2} epochs")
        extraction_ds = fashion_mnist.make_dataset(
            x_train, y_train, training=False, batch_size=500, with_index=True)
        result = recipes.train_srdl(
            backbone_fn, train_ds, test_ds, extraction_ds, epochs=FLAGS.epochs,
            steps_per_epoch=FLAGS.steps_per_epoch or None,
            optimizer_fn=lambda _: optimizer(stage=0.5), weight_decay=FLAGS.weight_decay,
            **run,
        )
        model = result.pop("model")
    else:
        model = methods.build_model(method, backbone_fn(), weight_decay=FLAGS.weight_decay,
                                    seed=FLAGS.seed)
        model.compile(optimizer=optimizer(), metrics=["accuracy"])
        print(f"{method:<8} heads {', '.join(model.head_names)}; "
              f"{model.count_params():,} parameters")
        result = recipes.train(
            model, train_ds, test_ds, epochs=FLAGS.epochs,
            steps_per_epoch=FLAGS.steps_per_epoch or None, **run,
        )
    keep = ("head_names", "head_errors", "history", "wall_seconds")
    return {k: result[k] for k in keep}, model


def _train_in_child(argv, method, threads):
    """One method in a fresh process (spawned: no TensorFlow state inherited).

    Its output is line-buffered: every line reaches the shared terminal in
    one write, whole, labelled with the method by `recipes.EpochProgress`.
    """
    sys.stdout.reconfigure(line_buffering=True)
    FLAGS(argv)
    _cli.quiet_logs()
    _cli.quiet_tensorflow()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    _, train, test = load_subsets()
    report, _ = train_method(method, train, test)
    return report


def _recipe_matches(config):
    """Whether a committed study's config is this run's recipe."""
    return (config["train_examples"] == FLAGS.train_examples and config["epochs"] == FLAGS.epochs
            and config["batch_size"] == FLAGS.batch_size and config["depth"] == FLAGS.depth
            and config["width"] == FLAGS.width and bool(config["augment"]) == FLAGS.augment
            and config["lr"] == FLAGS.lr and config["weight_decay"] == FLAGS.weight_decay
            and [float(b) for b in FLAGS.lr_boundaries] == [0.3, 0.6, 0.8]
            and not FLAGS.steps_per_epoch and not FLAGS.test_examples)


def committed_studies():
    """(label, config, paired DKS-vs-baseline result) of every committed study:
    the headline (2k images) and each point of the training-set-size sweep."""
    import json

    found = []
    try:
        with open(STUDY) as f:
            study = json.load(f)
        found.append(("headline study, benchmarks/results/accuracy", study["config"],
                      study["paired"]["dks_vs_baseline"]))
    except (OSError, KeyError, ValueError):
        pass
    try:
        with open(SWEEP) as f:
            sweep = json.load(f)
        for size, point in sorted(sweep["points"].items(), key=lambda kv: int(kv[0])):
            if "dks_vs_baseline" in point.get("paired", {}) and point["folder"] != os.path.relpath(
                    os.path.dirname(STUDY), REPO):
                found.append((f"size sweep at {int(size):,} images, benchmarks/results/size_sweep",
                              point["config"], point["paired"]["dks_vs_baseline"]))
    except (OSError, KeyError, ValueError):
        pass
    return found


def study_lines():
    """The committed studies' paired DKS-vs-baseline results, as printable lines:
    the one of this run's recipe (if committed) and the headline."""
    studies = committed_studies()
    if not studies:
        return [f"(No committed accuracy study found at {STUDY} or {SWEEP}.)"]
    # This recipe's study first, then the headline (if it is another one).
    shown = sorted((s for s in studies if _recipe_matches(s[1]) or s[0].startswith("headline")),
                   key=lambda s: not _recipe_matches(s[1]))
    lines = []
    for label, config, c in shown:
        same = _recipe_matches(config)
        lo, hi = c["ci95"]
        lines.append(
            f"Committed {label} ({'this recipe' if same else 'another recipe than this run'}: "
            f"{config['train_examples']:,} images, {config['epochs']} epochs; {c['n']} seeds "
            f"paired by seed): mean gain of DKS over the baseline {100 * c['mean_gain']:+.2f} "
            f"points, 95 % CI [{100 * lo:+.2f}, {100 * hi:+.2f}], one-sided paired t-test "
            f"p = {c['p_one_sided']:.3f}.")
    lines.append(
        f"One seed cannot show this: the per-seed gain varies with sd {100 * shown[0][2]['sd']:.2f} "
        "points, comparable to the mean gain, so a single run can land on either side of zero; it "
        "shows the method training end to end and every head's accuracy, not whether DKS helps.")
    return lines


def main(argv):
    del argv  # children re-parse sys.argv
    validate_flags()
    import keras
    from keras_dks import plots, recipes
    from keras_dks.data import fashion_mnist

    start = time.perf_counter()
    data_dir, train, test = load_subsets()
    steps = FLAGS.steps_per_epoch or -(-len(train[0]) // FLAGS.batch_size)
    print(f"Fashion-MNIST from {data_dir or 'keras.datasets'}: {len(train[0])} training / "
          f"{len(test[0])} test images; WRN-{FLAGS.depth}-{FLAGS.width}, {FLAGS.epochs} epochs "
          f"x {steps} steps")

    methods = list(FLAGS.methods)
    cores = os.cpu_count() or 1
    jobs = min(FLAGS.jobs or min(len(methods), cores), len(methods))
    results, models = {}, {}
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, cores // jobs)
        print(f"Training {', '.join(methods)} side by side: {jobs} processes x {threads} "
              f"thread{'s' if threads > 1 else ''}", flush=True)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {m: pool.submit(_train_in_child, list(sys.argv), m, threads) for m in methods}
            results = {m: f.result() for m, f in futures.items()}
    else:
        for method in methods:
            results[method], models[method] = train_method(method, train, test)

    curves = plots.plot_error_curves(
        {m: r["history"] for m, r in results.items()}, os.path.join(FLAGS.model_dir, "curves.png"),
        title=f"Fashion-MNIST, WRN-{FLAGS.depth}-{FLAGS.width}: error per head",
        heads=max((r["head_names"] for r in results.values()), key=len),
    )
    print(f"\nTest accuracy per head ({len(test[0])} test images, seed {FLAGS.seed}):")
    print(f"{'method':<10}{'head':<14}{'accuracy':>10}{'train time':>12}")
    for method, result in results.items():
        for k, (head, error) in enumerate(result["head_errors"].items()):
            wall = f"{result['wall_seconds']:.0f} s" if k == 0 else ""
            print(f"{method:<10}{head:<14}{100 * (1 - error):>9.2f}%{wall:>12}")
    if "baseline" in results and "dks" in results:
        gain = 100 * (results["baseline"]["head_errors"]["main"] - results["dks"]["head_errors"]["main"])
        print(f"\nThis run (seed {FLAGS.seed}): gain of DKS over the baseline (baseline "
              f"main-head test error - DKS's) {gain:+.2f} points.")
    for line in study_lines():
        print(line)
    print(f"Picture (train and test error per head): {curves}")
    if FLAGS.export:
        method = "dks" if "dks" in results else methods[-1]
        model = models.get(method) or keras.models.load_model(
            os.path.join(FLAGS.model_dir, method, "model.keras"))
        path = recipes.export_inference_model(
            model, os.path.join(FLAGS.model_dir, "saved_model"),
            fashion_mnist.MEAN, fashion_mnist.STD, version=1, overwrite=True,
        )
        print(f"SavedModel of the {method} inference network: {path}")
    print(f"total wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    _cli.run(main)
