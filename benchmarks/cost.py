"""What DKS costs, as ratios measured in one run on one machine.

For a small pre-activation WRN (CIFAR size) and keras.applications ResNet50
at a small input size:

- train-step time of DS and DKS relative to the baseline (the same backbone
  with the main head only), and the share of the DKS step spent in the
  synergy loss ((t_DKS - t_DS) / t_DKS: the two differ only by that loss);
- the FLOPs ratio of the training graph (forward + loss + gradients) to the
  baseline's, next to the time ratio;
- `inference_model()` latency and parameter count relative to the plain
  backbone + classifier built independently, and the exported SavedModel's
  latency;
- peak memory (max RSS of a fresh process) of DKS and DS training relative to
  the baseline.

Variants are timed in interleaved rounds and the medians compared, so slow
phases of the machine hit all of them alike. Every ratio of times comes with
the range of its per-round values; a difference is only called one when the
rounds of the two settings do not overlap (`verdict_*`).

Usage:
    python benchmarks/cost.py                      # writes benchmarks/results/cost.{json,md}
    python benchmarks/cost.py --models wrn --rounds 3
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_dks  # noqa: E402
from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["wrn", "resnet50"], "Backbones to measure.")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
flags.DEFINE_integer("steps", 5, "Train steps timed per round and variant.")
flags.DEFINE_string("out", "benchmarks/results/cost", "Output path prefix.")
flags.DEFINE_string("memory_child", None, "Internal: measure one variant's peak RSS.")

VARIANTS = {"baseline": dict(taps=[]), "ds": dict(pairs="none"), "dks": dict(pairs="bidirectional")}
CONFIGS = {
    # name: (backbone factory, input shape, classes, batch)
    "wrn": (lambda: keras_dks.backbones.wide_resnet(16, 2, 100, include_top=False), (32, 32, 3), 100, 64),
    "resnet50": (
        lambda: keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3)),
        (64, 64, 3), 100, 16,
    ),
}


def build(config, variant):
    factory, shape, classes, _ = CONFIGS[config]
    model = keras_dks.DKSModel(factory(), num_classes=classes, **VARIANTS[variant])
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    return model


def batch(config, seed=0):
    _, shape, classes, size = CONFIGS[config]
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(size,) + shape).astype("float32")
    y = rng.integers(0, classes, size)
    return x, y


def train_graph_flops(model, config):
    _, shape, _, size = CONFIGS[config]

    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = model.compute_dks_loss(y, logits, training=True)["loss"]
        return tape.gradient(loss, model.trainable_variables)

    return common.graph_flops(
        step, tf.TensorSpec((size,) + shape), tf.TensorSpec((size,), tf.int32)
    )


def plain_network(model):
    """Backbone + pool + Dense built independently of DKSModel, same weights."""
    features = model.backbone.output
    x = keras.layers.GlobalAveragePooling2D()(features)
    out = keras.layers.Dense(model.num_classes)(x)
    plain = keras.Model(model.backbone.input, out)
    plain.layers[-1].set_weights(model.get_layer("main").get_weights())
    return plain


def synergy_seconds(config, repeats=50):
    """Time of the synergy loss alone (value and gradients w.r.t. the heads'
    logits) for the batch and classes of `config`, 3 heads, 6 pairs."""
    _, _, classes, size = CONFIGS[config]
    logits = [tf.random.normal((size, classes), seed=k) for k in range(3)]

    @tf.function
    def step(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = keras_dks.losses.synergy_loss(z, pairs="bidirectional")
        return loss, tape.gradient(loss, z)

    step(logits)
    return common.median_time(lambda: step(logits), repeats)[0]


def pipeline_vs_training(step_seconds, batch_size, examples=10000, steps=100):
    """Images/s of the CIFAR training pipeline alone (in-memory uint8 images,
    the authors' augmentation) next to the DKS training speed."""
    from keras_dks.data import cifar, pipelines

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (examples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, examples)
    raw = tf.data.Dataset.from_tensor_slices((images, labels))
    ds = cifar.make_dataset(raw, training=True, batch_size=batch_size, repeat=True)
    alone = pipelines.measure_throughput(ds, steps=steps)["images_per_second"]
    with_model = batch_size / step_seconds
    return {
        "pipeline_images_per_second": alone,
        "training_images_per_second": with_model,
        "pipeline_over_training": alone / with_model,
    }


def _rotated(names, r):
    # Each round starts with another variant, so a load drift within rounds
    # does not always favour the same one.
    k = r % len(names)
    return names[k:] + names[:k]


def latencies(fns, x, rounds, repeats=10):
    """Median latency of each fn per interleaved round: {name: [per round]}."""
    for fn in fns.values():
        fn(x)
    out = {name: [] for name in fns}
    for r in range(rounds):
        for name in _rotated(list(fns), r):
            out[name].append(common.median_time(lambda: fns[name](x), repeats)[0])
    return out


def ratio_spread(rounds_a, rounds_b):
    """Per-round ratios a/b (same round): [min, max]."""
    ratios = [a / b for a, b in zip(rounds_a, rounds_b)]
    return [min(ratios), max(ratios)]


def verdict(name_a, rounds_a, name_b, rounds_b):
    v = common.spread_verdict(rounds_a, rounds_b)
    return {"a faster": f"{name_a} faster", "b faster": f"{name_b} faster"}.get(v, v)


def measure_memory_child(spec):
    config, variant = spec.split(":")
    model = build(config, variant)
    x, y = batch(config)
    for _ in range(3):
        model.train_on_batch(x, y)
    # VmHWM, not getrusage: Linux's ru_maxrss survives fork+exec and reports
    # the parent's peak when the parent is bigger.
    with open("/proc/self/status") as f:
        hwm_kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    print(json.dumps({"max_rss_mb": hwm_kb / 1024}))


def peak_memory(config, variant):
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--memory_child={config}:{variant}"],
        capture_output=True, text=True, check=True, timeout=1800,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["max_rss_mb"]


def measure(config):
    models = {v: build(config, v) for v in VARIANTS}
    x, y = batch(config)
    for m in models.values():  # trace and warm up
        m.train_on_batch(x, y)
        m.train_on_batch(x, y)
    times = {v: [] for v in models}
    print(f"cost: {config}: train-step rounds", flush=True)
    bar = keras.utils.Progbar(FLAGS.rounds * len(models), unit_name="timing")
    for r in range(FLAGS.rounds):
        for v in _rotated(list(models), r):
            t, _ = common.median_time(lambda: models[v].train_on_batch(x, y), FLAGS.steps, warmup=1)
            times[v].append(t)
            bar.add(1, values=[("round", r + 1)])
    step = {v: float(np.median(t)) for v, t in times.items()}
    flops = {v: train_graph_flops(m, config) for v, m in models.items()}

    dks = models["dks"]
    serving = dks.inference_model()
    plain = plain_network(dks)
    xs = x[:8]
    np.testing.assert_allclose(plain(xs).numpy(), serving(xs).numpy(), atol=1e-4)
    serve_fn = tf.function(lambda t: serving(t, training=False))
    plain_fn = tf.function(lambda t: plain(t, training=False))
    with tempfile.TemporaryDirectory() as tmp:
        path = keras_dks.export_saved_model(dks, tmp, input_dtype="float32")
        saved_fn = tf.saved_model.load(path).signatures["serving_default"]
        lat = latencies(
            {"plain": plain_fn, "inference_model": serve_fn,
             "saved_model": lambda t: saved_fn(images=t)},
            tf.constant(xs), FLAGS.rounds,
        )
    t_plain, t_serving, t_saved = (
        float(np.median(lat[k])) for k in ("plain", "inference_model", "saved_model")
    )
    print(f"cost: {config}: peak memory, a fresh process per variant", flush=True)
    rss = {}
    bar = keras.utils.Progbar(len(VARIANTS), unit_name="variant")
    for v in VARIANTS:
        rss[v] = peak_memory(config, v)
        bar.add(1)
    t_synergy = synergy_seconds(config)
    extra = {}
    if CONFIGS[config][1] == (32, 32, 3):  # the CIFAR pipeline feeds this one
        extra["input_pipeline"] = pipeline_vs_training(step["dks"], CONFIGS[config][3])
    return {
        **extra,
        "batch": CONFIGS[config][3],
        "input_shape": list(CONFIGS[config][1]),
        "step_seconds": step,
        "step_seconds_per_round": times,
        "step_time_ratio": {v: step[v] / step["baseline"] for v in step},
        "step_time_ratio_range": {v: ratio_spread(times[v], times["baseline"]) for v in step},
        "dks_over_ds_step_ratio_range": ratio_spread(times["dks"], times["ds"]),
        "verdict_dks_vs_ds": verdict("dks", times["dks"], "ds", times["ds"]),
        # Two estimates: the synergy loss timed alone, and DKS minus DS
        # (they differ only by that loss; noisy, can be negative).
        "synergy_seconds_alone": t_synergy,
        "synergy_share_of_dks_step": t_synergy / step["dks"],
        "dks_minus_ds_share_of_dks_step": (step["dks"] - step["ds"]) / step["dks"],
        "train_graph_flops": flops,
        "train_flops_ratio": {v: flops[v] / flops["baseline"] for v in flops},
        "time_over_flops_ratio": {
            v: (step[v] / step["baseline"]) / (flops[v] / flops["baseline"]) for v in step
        },
        "inference": {
            "params_inference_model": int(serving.count_params()),
            "params_plain_network": int(plain.count_params()),
            "params_training_model": int(dks.count_params()),
            "latency_ratio_inference_vs_plain": t_serving / t_plain,
            "latency_ratio_savedmodel_vs_plain": t_saved / t_plain,
            "latency_seconds_batch8": {"inference_model": t_serving, "plain": t_plain, "saved_model": t_saved},
            "latency_seconds_batch8_per_round": lat,
            "latency_ratio_inference_vs_plain_range": ratio_spread(lat["inference_model"], lat["plain"]),
            "latency_ratio_savedmodel_vs_plain_range": ratio_spread(lat["saved_model"], lat["plain"]),
            "verdict_inference_vs_plain": verdict(
                "inference_model", lat["inference_model"], "plain", lat["plain"]
            ),
            "verdict_savedmodel_vs_plain": verdict(
                "saved_model", lat["saved_model"], "plain", lat["plain"]
            ),
        },
        "peak_rss_mb": rss,
        "peak_rss_ratio": {v: rss[v] / rss["baseline"] for v in rss},
    }


def _with_range(value, spread):
    return f"{value:.2f} [{spread[0]:.2f}-{spread[1]:.2f}]"


def markdown(results, env, command):
    lines = [
        "# Cost of DS and DKS (ratios to the baseline, one run, one machine)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {env['cpu']} ({env['cpu_count']} cores, 1-min load average "
        f"{env['load_average_1min']:.1f} at start), TensorFlow {env['tensorflow']}, "
        f"Keras {env['keras']}, keras-dks {env['keras_dks']} ({env['git_commit']})  ",
        "Time ratios: median of the rounds [range of the per-round ratios].",
        "",
        "| backbone | input x batch | DS / base step time | DKS / base step time | DKS / base train FLOPs | "
        "time ratio / FLOPs ratio (DKS) | synergy share of DKS step (alone; DKS-DS) | "
        "inference params ratio | inference latency ratio | SavedModel latency ratio | "
        "DKS / base peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        inf = r["inference"]
        lines.append(
            f"| {name} | {'x'.join(map(str, r['input_shape']))} x {r['batch']} "
            f"| {_with_range(r['step_time_ratio']['ds'], r['step_time_ratio_range']['ds'])} "
            f"| {_with_range(r['step_time_ratio']['dks'], r['step_time_ratio_range']['dks'])} "
            f"| {r['train_flops_ratio']['dks']:.2f} | {r['time_over_flops_ratio']['dks']:.2f} "
            f"| {100 * r['synergy_share_of_dks_step']:.2f} %; "
            f"{100 * r['dks_minus_ds_share_of_dks_step']:.1f} % "
            f"| {inf['params_inference_model'] / inf['params_plain_network']:.2f} "
            f"| {_with_range(inf['latency_ratio_inference_vs_plain'], inf['latency_ratio_inference_vs_plain_range'])} "
            f"| {_with_range(inf['latency_ratio_savedmodel_vs_plain'], inf['latency_ratio_savedmodel_vs_plain_range'])} "
            f"| {r['peak_rss_ratio']['dks']:.2f} |"
        )
    lines.append("")
    for name, r in results.items():
        inf = r["inference"]
        lines.append(
            f"- {name}: DKS vs DS step: {r['verdict_dks_vs_ds']}; inference_model vs plain: "
            f"{inf['verdict_inference_vs_plain']}; SavedModel vs plain: "
            f"{inf['verdict_savedmodel_vs_plain']} (per-round times overlap = no difference resolved)."
        )
    for name, r in results.items():
        if "input_pipeline" in r:
            p = r["input_pipeline"]
            lines += ["", f"Input pipeline ({name}, CIFAR augmentation, batch {r['batch']}): "
                      f"{p['pipeline_images_per_second']:.0f} images/s alone vs "
                      f"{p['training_images_per_second']:.0f} images/s DKS training "
                      f"({p['pipeline_over_training']:.1f}x headroom)."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.memory_child:
        measure_memory_child(FLAGS.memory_child)
        return
    env, command = common.environment(), common.command_line()
    results = {name: measure(name) for name in FLAGS.models}
    config = {"models": list(FLAGS.models), "rounds": FLAGS.rounds, "steps_per_round": FLAGS.steps}
    common.write_json(FLAGS.out + ".json", {
        "command": command, "config": config, "environment": env,
        "environment_end": {"load_average_1min": common.environment()["load_average_1min"]},
        "results": results,
    })
    with open(FLAGS.out + ".md", "w") as f:
        f.write(markdown(results, env, command))
    print(markdown(results, env, command))


if __name__ == "__main__":
    app.run(main)
