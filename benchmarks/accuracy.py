"""Baseline vs DS vs DKS (and the family) on real Fashion-MNIST, paired seeds.

Every method gets the same network, budget and recipe, fixed before the
study: a pre-activation WRN-16-1 (`keras_dks.backbones.wide_resnet`) with the
authors' auxiliary-head design, a fixed 2,000-image training subset (the same
examples for every run), the full 10k test set, 24 epochs, batch 64, SGD
with momentum 0.9, lr 0.1 x0.2 at 30 %, 60 % and 80 % of the epochs (the
60/120/160-of-200 CIFAR recipe, rescaled), coupled L2 5e-4 on all trainable
variables, no augmentation (with augmentation this small net underfits
within a CPU budget). Runs are paired by seed: for one seed every method
sees the same data order and starts from the same backbone and main
classifier weights. Per epoch it records every head's train and test error.

Resumable: each finished (method, seed) is stored as
`<out_dir>/runs/<method>_seed<k>.json` (method, seed, config, command,
environment with the git commit, per-head test error, history) and not run
again; a finished run of another configuration in the same folder is an
error. An interrupted run resumes from its last finished epoch. The summary
(`summary.json`, `summary.md`: per-method mean ± sd, and for DKS − baseline,
DS − baseline, DKS − DS the paired mean gain, its 95 % CI and the one-sided
paired t-test p-value; `curves.png`, `final_error.png`) is rebuilt from the
finished runs, also with `--summary_only`.

Every run records its configuration (`CONFIG_FLAGS`, `--threads` included:
the thread count changes float rounding) and a folder never mixes
configurations, except that `--allow_mixed_threads` summarises runs that
differ only in `--threads` and says so in the summary (the headline study's
seeds 0-2 ran with TensorFlow's default threads, 3-7 with `--threads 1`).

Usage (the committed studies come from exactly this script):
    bash benchmarks/run_studies.sh            # headline (8 seeds) and size sweep
    python benchmarks/accuracy.py --summary_only --allow_mixed_threads   # headline summary
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_dks  # noqa: E402
from keras_dks import methods  # noqa: E402
from keras_dks import recipes  # noqa: E402
from keras_dks.data import fashion_mnist  # noqa: E402
from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", ["baseline", "ds", "dks"], "Methods to compare (baseline, ds, dks, dhm, srdl).")
flags.DEFINE_list("seeds", [str(k) for k in range(8)], "Seeds (one run per method and seed).")
flags.DEFINE_integer("depth", 16, "WRN depth (6n+4).")
flags.DEFINE_integer("width", 1, "WRN width multiplier.")
flags.DEFINE_integer("epochs", 24, "Epochs per run.")
flags.DEFINE_integer("train_examples", 2000, "Fixed training subset size.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("lr", 0.1, "Initial learning rate.")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled L2 on all trainable variables.")
flags.DEFINE_bool("augment", False, "Pad-4 random crop + horizontal flip on the training images.")
flags.DEFINE_integer("eval_every", 4, "Evaluate on the test set every N epochs (and at the end).")
flags.DEFINE_string("data_dir", None, "Fashion-MNIST IDX folder (default: Debian's).")
flags.DEFINE_string("out_dir", "benchmarks/results/accuracy", "Where results go.")
flags.DEFINE_bool("summary_only", False, "Only rebuild the summary from finished runs.")
flags.DEFINE_integer("threads", 0, "TF intra-op threads (0: TensorFlow's default).")
flags.DEFINE_bool(
    "allow_mixed_threads", False,
    "Summarise runs that differ only in --threads (recorded in the summary and shown in "
    "summary.md); any other difference is still refused.")


def datasets(seed, with_index=False):
    """Augmented train, test, un-augmented train (for the train error) and,
    for SRDL, the un-augmented train with example indices."""
    fm = fashion_mnist
    (x, y), (x_test, y_test) = fm.load_data(FLAGS.data_dir)
    # The subset is fixed (seed 1234), the same for every method and seed.
    x, y = fm.subset(x, y, FLAGS.train_examples, seed=1234)
    return (
        fm.make_dataset(x, y, training=True, batch_size=FLAGS.batch_size, seed=seed,
                        with_index=with_index, augment=FLAGS.augment),
        fm.make_dataset(x_test, y_test, training=False, batch_size=500),
        fm.make_dataset(x, y, training=False, batch_size=500),
        fm.make_dataset(x, y, training=False, batch_size=500, with_index=True),
        len(x),
    )


class TrainErrorOfFixedModel(keras.callbacks.Callback):
    """Per-head train accuracy without augmentation, every `every` epochs and
    at the last one (the paper's Figure 1 plots the train error of the
    model, not running means over an epoch)."""

    def __init__(self, data, every=1):
        super().__init__()
        self.data = data
        self.every = every

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every and epoch + 1 != self.params.get("epochs"):
            return
        logs = logs if logs is not None else {}
        result = self.model.evaluate(self.data, verbose=0, return_dict=True)
        for key, value in result.items():
            if key.endswith("accuracy"):
                logs["clean_train_" + key] = value


def run(method, seed, model_kwargs=None):
    """One (method, seed) run into `--out_dir`; `model_kwargs` (e.g. a head
    design, recorded in the config) go to the model's constructor."""
    model_kwargs = dict(model_kwargs or {})
    path = os.path.join(FLAGS.out_dir, "runs", f"{method}_seed{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            stored = stored_config(json.load(f))
        if stored != run_config(model_kwargs):
            raise app.UsageError(
                f"{path} was run with config {stored}, not this command's "
                f"{run_config(model_kwargs)}: use another --out_dir for this configuration."
            )
        print(f"{label(method, seed, model_kwargs)}: done already ({path})")
        return
    load_start = common.load_average()
    # Keras' own per-epoch lines (fit verbose=2) follow this header.
    print(f"== {label(method, seed, model_kwargs)}: {FLAGS.epochs} epochs, "
          f"{FLAGS.train_examples} images -> {path}", flush=True)
    keras.utils.set_random_seed(seed)
    srdl = method == "srdl"
    train_ds, test_ds, clean_train_ds, indexed_ds, n_train = datasets(seed, with_index=srdl)
    steps = int(np.ceil(n_train / FLAGS.batch_size))

    def backbone_fn():
        return keras_dks.backbones.wide_resnet(
            FLAGS.depth, FLAGS.width, 10, input_shape=(28, 28, 1)
        )

    def optimizer(span=1.0):  # SRDL: the whole schedule in each half (span 0.5)
        boundaries = [f * FLAGS.epochs * span for f in (0.3, 0.6, 0.8)]
        return recipes.sgd(recipes.step_schedule(FLAGS.lr, steps, boundaries, 0.2), 0.9)

    # Resumable: an interrupted run restarts from its last finished epoch.
    common_args = dict(
        epochs=FLAGS.epochs,
        model_dir=os.path.join(FLAGS.out_dir, "work", f"{method}_seed{seed}"),
        batch_size=FLAGS.batch_size, validation_freq=FLAGS.eval_every,
        callbacks=[TrainErrorOfFixedModel(clean_train_ds, FLAGS.eval_every)],
        save_model=False, plot=False,
    )
    if srdl:
        result = recipes.train_srdl(
            backbone_fn, train_ds, test_ds, indexed_ds, steps_per_epoch=None,
            optimizer_fn=lambda _: optimizer(0.5), weight_decay=FLAGS.weight_decay,
            **common_args,
        )
        model = result.pop("model")
        heads, params = ["main"], int(model.count_params())
    else:
        model = methods.build_model(
            method, backbone_fn(), weight_decay=FLAGS.weight_decay, seed=seed,
            **model_kwargs,
        )
        model.compile(optimizer=optimizer(), metrics=["accuracy"])
        result = recipes.train(model, train_ds, test_ds, tensorboard=False, **common_args)
        heads, params = model.head_names, int(model.count_params())
        model = model.inference_model()
    env = common.environment()
    env["load_average_1min_start"] = load_start  # of this session
    common.write_json(path, {
        "method": method,
        "seed": seed,
        "config": run_config(model_kwargs),
        "command": common.command_line(),
        "environment": env,
        "heads": heads,
        "test_error": result["head_errors"],
        "history": result["history"],
        "wall_seconds_last_session": result["wall_seconds"],
        "train_images_per_second": result["train_images_per_second"],
        "params_training": params,
        "params_inference": int(model.count_params()),
    })
    print(f"== {label(method, seed, model_kwargs)}: main-head test error "
          f"{100 * result['head_errors']['main']:.2f} %, {result['wall_seconds']:.0f} s", flush=True)


def label(method, seed, model_kwargs=None):
    """How progress lines name a run, e.g. `dks seed 3 (head_width=0.5)`."""
    extra = ", ".join(f"{k}={v}" for k, v in sorted((model_kwargs or {}).items()))
    return f"{method} seed {seed}" + (f" ({extra})" if extra else "")


# Every flag that can change a result; `threads` changes the rounding of
# reductions (and so, over many steps, the trajectory).
CONFIG_FLAGS = ("depth", "width", "epochs", "train_examples", "batch_size", "lr",
                "weight_decay", "eval_every", "augment", "threads")


def run_config(model_kwargs=None):
    """The configuration recorded with a run: `CONFIG_FLAGS` and, when given,
    the extra model constructor arguments (`model_kwargs`)."""
    config = {k: FLAGS[k].value for k in CONFIG_FLAGS}
    if model_kwargs:
        config["model_kwargs"] = dict(model_kwargs)
    return config


def stored_config(record):
    """A stored run's configuration. Runs recorded before `threads` joined
    the configuration get it from their recorded command line (the flag's
    value there, else its default 0)."""
    config = dict(record.get("config") or {})
    if "threads" not in config:
        words = record.get("command", "").split()
        value = 0
        for k, word in enumerate(words):
            if word == "--threads" and k + 1 < len(words):
                value = int(words[k + 1])
            elif word.startswith("--threads="):
                value = int(word.split("=", 1)[1])
        config["threads"] = value
    return config


def paired_comparison(errors_a, errors_b):
    """How much lower method b's error is than method a's, paired by seed.

    Args:
        errors_a, errors_b: `{seed: test error}` of two methods; only seeds
            run by both count (each pair shares data order and backbone
            initialisation).

    Returns:
        dict with `seeds`, `n`, `gains` (error_a - error_b per seed),
        `mean_gain`, `sd`, the 95 % confidence interval `ci95` of the mean
        gain (Student t, n - 1 degrees of freedom), the paired t statistic
        `t` and the one-sided p-value `p_one_sided` of H1: mean gain > 0
        (b better than a). Statistics are None with fewer than 2 pairs.

    Example:
    >>> r = paired_comparison({0: 0.16, 1: 0.15, 2: 0.17}, {0: 0.15, 1: 0.14, 2: 0.17})
    >>> round(r["mean_gain"], 4), r["n"]
    (0.0067, 3)
    """
    from scipy import stats

    seeds = sorted(set(errors_a) & set(errors_b))
    gains = np.array([errors_a[s] - errors_b[s] for s in seeds], dtype=np.float64)
    out = {"seeds": seeds, "n": len(seeds), "gains": gains.tolist(), "mean_gain": None,
           "sd": None, "ci95": None, "t": None, "p_one_sided": None}
    if len(seeds) < 2:
        return out
    n, mean, sd = len(gains), float(gains.mean()), float(gains.std(ddof=1))
    se = sd / np.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1) * se)
    t = mean / se if se > 0 else float("inf") * np.sign(mean)
    out.update(mean_gain=mean, sd=sd, ci95=[mean - half, mean + half], t=float(t),
               p_one_sided=float(stats.t.sf(t, n - 1)))
    return out


COMPARISONS = (("baseline", "dks"), ("baseline", "ds"), ("ds", "dks"))


def load_runs(out_dir, allow_mixed_threads=False):
    """The finished runs of one results folder, refusing mixed configurations.

    Each run gets `file` (its path) and `config` (`stored_config`). With
    `allow_mixed_threads`, runs may differ in `threads` (and nothing else).
    """
    runs_dir = os.path.join(out_dir, "runs")
    runs = []
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        if name.endswith(".json"):
            with open(os.path.join(runs_dir, name)) as f:
                runs.append(json.load(f))
            runs[-1]["file"] = os.path.join(runs_dir, name)
    for r in runs:
        r["config"] = stored_config(r)

    def key(r, ignore=()):
        return json.dumps({k: v for k, v in r["config"].items() if k not in ignore},
                          sort_keys=True)

    configs = {key(r) for r in runs}
    if len(configs) > 1:
        if not (allow_mixed_threads and len({key(r, ("threads",)) for r in runs}) == 1):
            raise ValueError(
                f"{runs_dir} holds runs of different configurations {sorted(configs)}: "
                "use one --out_dir per configuration"
                + (" (runs that differ only in threads: --allow_mixed_threads states the "
                   "mix in the summary)." if len({key(r, ("threads",)) for r in runs}) == 1
                   else ".")
            )
    return runs


def threads_of(runs):
    """`{threads: [run file names]}` of loaded runs."""
    out = {}
    for r in runs:
        out.setdefault(str(r["config"]["threads"]), []).append(os.path.basename(r["file"]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def common_config(runs):
    """The runs' shared config; `threads` becomes the sorted list of its
    values when the runs mix them (see `load_runs`)."""
    config = dict(runs[0]["config"])
    values = sorted({r["config"]["threads"] for r in runs})
    if len(values) > 1:
        config["threads"] = values
    return config


def summarise_runs(runs):
    """Per-method mean/sd of every head's test error and paired comparisons."""
    by_method = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    summary = {}
    for method, rs in by_method.items():
        heads = rs[0]["heads"]
        errors = {h: [r["test_error"][h] for r in rs] for h in heads}
        summary[method] = {
            "seeds": sorted(r["seed"] for r in rs),
            "test_error_mean": {h: float(np.mean(e)) for h, e in errors.items()},
            "test_error_std": {h: float(np.std(e, ddof=1)) if len(e) > 1 else None
                               for h, e in errors.items()},
            "wall_seconds_median": float(np.median([r["wall_seconds_last_session"] for r in rs])),
        }
    comparisons = {}
    for a, b in COMPARISONS:
        if a in by_method and b in by_method:
            comparisons[f"{b}_vs_{a}"] = paired_comparison(
                {r["seed"]: r["test_error"]["main"] for r in by_method[a]},
                {r["seed"]: r["test_error"]["main"] for r in by_method[b]},
            )
    return by_method, summary, comparisons


def format_comparison(name, c):
    b, a = name.split("_vs_")
    if c["mean_gain"] is None:
        return f"| {b} better than {a} | {c['n']} | - | - | - |"
    lo, hi = c["ci95"]
    return (f"| {b} better than {a} | {c['n']} | {100 * c['mean_gain']:+.2f} | "
            f"[{100 * lo:+.2f}, {100 * hi:+.2f}] | {c['p_one_sided']:.4f} |")


def summarise():
    try:
        runs = load_runs(FLAGS.out_dir, FLAGS.allow_mixed_threads)
    except ValueError as e:
        raise app.UsageError(str(e))
    if not runs:
        print("No finished runs yet.")
        return
    by_method, summary, comparisons = summarise_runs(runs)
    # The summary's own command and environment (the commit of the code that
    # wrote it); the runs' commands, commits and machines separately.
    config, env = common_config(runs), common.environment()
    provenance = common.run_provenance(runs)
    run_commands, commits = provenance["run_commands"], provenance["run_commits"]
    mixed = threads_of(runs) if isinstance(config["threads"], list) else None
    common.write_json(
        os.path.join(FLAGS.out_dir, "summary.json"),
        {"command": common.command_line(), "config": config, "environment": env,
         "allow_mixed_threads": FLAGS.allow_mixed_threads, "mixed_threads": mixed,
         **provenance, "summary": summary, "paired": comparisons},
    )
    order = [m for m in ("baseline", "ds", "dks", "dhm", "srdl") if m in summary]
    lines = [
        "# Test error (%) on Fashion-MNIST, mean ± sd over seeds",
        "",
        f"WRN-{config['depth']}-{config['width']}, {config['train_examples']} training examples, "
        f"full 10k test set, {config['epochs']} epochs, batch {config['batch_size']}, "
        f"SGD lr {config['lr']} x0.2 at 30/60/80 %, momentum 0.9, coupled L2 {config['weight_decay']}, "
        + ("pad-4 crop + flip." if config.get("augment", True) else "no augmentation."),
        "",
        "Runs: " + "; ".join(f"`{c}`" for c in run_commands) + "  ",
        f"Run commits: {', '.join(commits)}; summary: `{common.command_line()}` at "
        f"{env['git_commit']}  ",
        "Machine of the runs: " + "; ".join(provenance["run_machines"]),
        "",
    ]
    if mixed:
        lines += [
            "**Mixed thread settings** (`--allow_mixed_threads`): "
            + "; ".join(f"{'TensorFlow default threads' if t == '0' else f'`--threads {t}`'}: "
                        f"{len(files)} runs ({', '.join(f.replace('.json', '') for f in files)})"
                        for t, files in mixed.items())
            + ". Thread count changes float rounding, so these seeds are not all of one "
            "configuration; `bash benchmarks/run_studies.sh headline_threads1` re-runs the "
            "odd ones.",
            "",
        ]
    if provenance["runs_git_dirty_unverified"]:
        lines += [
            f"{len(provenance['runs_git_dirty_unverified'])} of {len(runs)} runs were recorded "
            f"before commit {common.GIT_DIRTY_FIXED_AT}, whose `git_dirty` check could not see "
            "changes: their `git_dirty: false` proves nothing about a clean tree.",
            "",
        ]
    lines += [
        "| method | seeds | main head | auxiliary heads |",
        "|---|---|---|---|",
    ]
    for m in order:
        s = summary[m]
        def fmt(h):
            std = s["test_error_std"][h]
            return f"{100 * s['test_error_mean'][h]:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
        aux = ", ".join(f"{h}: {fmt(h)}" for h in s["test_error_mean"] if h != "main") or "-"
        lines.append(f"| {m} | {len(s['seeds'])} | {fmt('main')} | {aux} |")
    if comparisons:
        lines += [
            "",
            "Paired by seed (same data order and backbone initialisation), main head. "
            "Gain of X over Y = Y's test error − X's, in points; p: one-sided paired "
            "t-test of gain > 0 (computed by benchmarks/accuracy.py).",
            "",
            "| comparison | pairs | mean gain | 95 % CI | p |",
            "|---|---|---|---|---|",
        ] + [format_comparison(name, c) for name, c in comparisons.items()]
    with open(os.path.join(FLAGS.out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(by_method, summary, order)


def plot(by_method, summary, order):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(order), figsize=(5 * len(order), 4), squeeze=False)
    for ax, method in zip(axes[0], order):
        rs = by_method[method]
        for h in rs[0]["heads"]:
            key = "accuracy" if h == "main" else f"{h}_accuracy"
            train = np.mean([1 - np.array(r["history"]["clean_train_" + key]) for r in rs], 0)
            test = np.mean([1 - np.array(r["history"]["val_" + key]) for r in rs], 0)
            evaluated = ~np.isnan(test)  # test error every --eval_every epochs
            line = ax.plot(np.flatnonzero(evaluated), 100 * test[evaluated], "o-", ms=3,
                           label=f"{h} test")[0]
            measured = ~np.isnan(train)
            ax.plot(np.flatnonzero(measured), 100 * train[measured], "--",
                    color=line.get_color(), label=f"{h} train")
        ax.set_title(method)
        ax.set_xlabel("epoch")
        ax.set_ylabel("error (%)")
        ax.set_ylim(0, 30)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.out_dir, "curves.png"), dpi=110)
    fig, ax = plt.subplots(figsize=(5, 4))
    means = [100 * summary[m]["test_error_mean"]["main"] for m in order]
    stds = [100 * (summary[m]["test_error_std"]["main"] or 0) for m in order]
    ax.bar(order, means, yerr=stds, capsize=4)  # error bars: sd over seeds
    ax.set_ylim(min(means) - 1.5, max(means) + 1.0)
    ax.set_ylabel("main-head test error (%)")
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.out_dir, "final_error.png"), dpi=110)


def set_threads():
    if FLAGS.threads:  # e.g. 1: leave the other cores to other work
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)


def main(argv):
    del argv
    set_threads()
    if not FLAGS.summary_only:
        for seed in FLAGS.seeds:
            for method in FLAGS.methods:
                run(method, int(seed))
    summarise()


if __name__ == "__main__":
    app.run(main)
