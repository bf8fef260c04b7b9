"""DS vs DKS train step: what separates them, and what it costs.

Deep supervision (DS, `pairs="none"`) and DKS (`pairs="bidirectional"`) build
the same network, heads and optimizer; their losses differ by the synergy
term. This benchmark checks that nothing else separates the two steps and
measures what the difference costs, per network:

- the ops of the compiled train step (the graph of the model's
  `train_step` traced as `fit` traces it), counted by type, DKS minus DS:
  every op type that occurs a different number of times is listed;
- the training-graph FLOPs (forward of every head, the loss, the gradients)
  of both, and their difference;
- the step time, DS and DKS timed in interleaved rounds whose order
  alternates (DS first in even rounds, DKS first in odd ones), each round
  the median of `--steps` steps: the median and range of the per-round
  DKS / DS ratios; a difference is only called one when every round of one
  is faster than every round of the other (`common.spread_verdict`).

Networks: the accuracy studies' WRN-16-1 (28x28x1, batch 64, the studies'
`--threads 1`), and `benchmarks/cost.py`'s WRN-16-2 (32x32x3, batch 64) and
keras.applications ResNet50 (64x64x3, batch 16).

Usage (the committed result comes from exactly this command):
    python benchmarks/ds_vs_dks.py --rounds 6 --steps 2
"""

import collections
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_dks  # noqa: E402
from keras_dks import methods  # noqa: E402
from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("networks", ["wrn16_1", "wrn16_2", "resnet50"], "Networks to measure.")
flags.DEFINE_integer("rounds", 6, "Interleaved timing rounds.")
flags.DEFINE_integer("steps", 2, "Train steps timed per round and method.")
flags.DEFINE_integer("threads", 1, "TF intra- and inter-op threads (0: TensorFlow's default).")
flags.DEFINE_string("out", "benchmarks/results/ds_vs_dks", "Output path prefix (.json, .md).")

NETWORKS = {
    # name: (backbone factory, input shape, classes, batch, label)
    "wrn16_1": (lambda: keras_dks.backbones.wide_resnet(16, 1, 10, input_shape=(28, 28, 1)),
                (28, 28, 1), 10, 64, "WRN-16-1, 28x28x1, batch 64 (the studies' network)"),
    "wrn16_2": (lambda: keras_dks.backbones.wide_resnet(16, 2, 100, include_top=False),
                (32, 32, 3), 100, 64, "WRN-16-2, 32x32x3, batch 64 (cost.py)"),
    "resnet50": (lambda: keras.applications.ResNet50(weights=None, include_top=False,
                                                      input_shape=(64, 64, 3)),
                 (64, 64, 3), 100, 16, "keras.applications ResNet50, 64x64x3, batch 16 (cost.py)"),
}


def build(network, method):
    factory, _, classes, _, _ = NETWORKS[network]
    keras.utils.set_random_seed(0)
    model = methods.build_model(method, factory(), num_classes=classes, weight_decay=5e-4, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), metrics=["accuracy"])
    return model


def batch(network, seed=0):
    _, shape, classes, size, _ = NETWORKS[network]
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=(size,) + shape).astype("float32"),
            rng.integers(0, classes, size))


def step_op_counts(model, x, y):
    """Op types of the model's train step (`train_step`, traced as `fit`
    traces it, with the functions it calls), with their counts."""
    model.train_on_batch(x[:2], y[:2])  # builds the optimizer and metrics
    concrete = tf.function(model.train_step).get_concrete_function(
        (tf.TensorSpec(x.shape, tf.float32), tf.TensorSpec(y.shape, tf.int64)))
    counts = collections.Counter(op.type for op in concrete.graph.get_operations())
    for f in concrete.graph.as_graph_def().library.function:
        counts.update(node.op for node in f.node_def)
    return counts


def train_flops(model, network):
    _, shape, _, size, _ = NETWORKS[network]

    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = model.compute_dks_loss(y, logits, training=True)["loss"]
        return tape.gradient(loss, model.trainable_variables)

    return common.graph_flops(step, tf.TensorSpec((size,) + shape),
                              tf.TensorSpec((size,), tf.int32))


def measure(network, progress):
    x, y = batch(network)
    models = {m: build(network, m) for m in ("ds", "dks")}
    ops = {m: step_op_counts(model, x, y) for m, model in models.items()}
    diff = {op: ops["dks"][op] - ops["ds"][op]
            for op in sorted(set(ops["dks"]) | set(ops["ds"])) if ops["dks"][op] != ops["ds"][op]}
    flops = {m: train_flops(model, network) for m, model in models.items()}
    for model in models.values():  # warm up the full-batch step
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
    times = {m: [] for m in models}
    for r in range(FLAGS.rounds):
        order = ["ds", "dks"] if r % 2 == 0 else ["dks", "ds"]
        for m in order:
            t, _ = common.median_time(lambda: models[m].train_on_batch(x, y), FLAGS.steps,
                                      warmup=1)
            times[m].append(t)
            progress.add(1)
    ratios = [b / a for a, b in zip(times["ds"], times["dks"])]
    verdict = common.spread_verdict(times["dks"], times["ds"])
    return {
        "label": NETWORKS[network][4],
        "heads": len(models["dks"].head_names),
        "pairs": len(models["dks"].pair_list),
        "step_op_counts": {m: dict(sorted(c.items())) for m, c in ops.items()},
        "step_ops_total": {m: sum(c.values()) for m, c in ops.items()},
        "step_op_difference_dks_minus_ds": diff,
        "train_graph_flops": flops,
        "flops_difference_share": (flops["dks"] - flops["ds"]) / flops["dks"],
        "step_seconds_per_round": times,
        "step_seconds_median": {m: float(np.median(t)) for m, t in times.items()},
        "dks_over_ds_per_round": ratios,
        "dks_over_ds_median": float(np.median(ratios)),
        "dks_over_ds_range": [min(ratios), max(ratios)],
        "verdict": {"a faster": "dks faster", "b faster": "ds faster"}.get(
            verdict, "overlap: no difference resolved"),
    }


def markdown(record):
    env = record["environment"]
    lines = [
        "# DS vs DKS train step: what separates them, and its cost",
        "",
        f"Command: `{record['command']}` at {env['git_commit']}  ",
        f"Machine: {env['cpu']} ({env['cpu_count']} cores), TensorFlow {env['tensorflow']}, "
        f"Keras {env['keras']}; threads {record['config']['threads'] or 'TensorFlow default'}; "
        f"1-minute load average {env['load_average_1min']:.1f} at the start, "
        f"{record['load_average_1min_end']:.1f} at the end  ",
        f"{record['config']['rounds']} interleaved rounds (order alternating) of "
        f"{record['config']['steps_per_round']} steps per method; ratio = DKS / DS step time, "
        "median of the per-round ratios [range].",
        "",
        "| network | heads / pairs | DKS / DS step time | verdict | step ops DS -> DKS | "
        "ops only in DKS (count) | FLOPs share of the synergy loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["results"].values():
        lo, hi = r["dks_over_ds_range"]
        diff = ", ".join(f"{op} {n:+d}" for op, n in r["step_op_difference_dks_minus_ds"].items())
        lines.append(
            f"| {r['label']} | {r['heads']} / {r['pairs']} | {r['dks_over_ds_median']:.3f} "
            f"[{lo:.3f}-{hi:.3f}] | {r['verdict']} | {r['step_ops_total']['ds']} -> "
            f"{r['step_ops_total']['dks']} | {diff or 'none'} | "
            f"{100 * r['flops_difference_share']:.3f} % |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    env = common.environment()
    results = {}
    for network in FLAGS.networks:
        print(f"ds_vs_dks: {NETWORKS[network][4]}", flush=True)
        bar = keras.utils.Progbar(2 * FLAGS.rounds, unit_name="timing")
        results[network] = measure(network, bar)
    record = {
        "command": common.command_line(),
        "config": {"networks": list(FLAGS.networks), "rounds": FLAGS.rounds,
                   "steps_per_round": FLAGS.steps, "threads": FLAGS.threads},
        "environment": env,
        "load_average_1min_end": common.load_average(),
        "results": results,
    }
    common.write_json(FLAGS.out + ".json", record)
    text = markdown(record)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
