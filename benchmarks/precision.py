"""Training throughput in float32 vs `mixed_bfloat16`, measured in one run.

The DKS train step (forward and backward through every head, the synergy
loss, SGD) of two WRNs is timed under both dtype policies in interleaved
rounds: `rounds` times, `steps` steps of the float32 model, then `steps` of
the bfloat16 one. Each round gives one speed-up (bf16 images/s over f32
images/s); the summary reports their median and range, and calls bfloat16
faster (slower) only when every bf16 round beats (trails) every f32 round. CPUs with
AVX512-BF16 or AMX-BF16 (and GPUs/TPUs) run bfloat16 matmuls natively; without
them, bfloat16 is emulated and slow, so the summary records which of these
CPU flags the machine advertises.

Usage (the committed results come from exactly this command):
    python benchmarks/precision.py
"""

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import keras  # noqa: E402

import keras_dks  # noqa: E402
from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")
flags.DEFINE_integer("steps", 2, "Train steps per round and precision.")
flags.DEFINE_string("out_dir", "benchmarks/results/precision", "Where results go.")

CONFIGS = {
    # name: (depth, width, input shape, classes, batch)
    "WRN-16-4 DKS, 32x32x3, batch 64": (16, 4, (32, 32, 3), 100, 64),
    "WRN-16-1 DKS, 28x28x1, batch 64 (the accuracy study's network)": (16, 1, (28, 28, 1), 10, 64),
}


def build(config, policy):
    depth, width, shape, classes, _ = config
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        backbone = keras_dks.backbones.wide_resnet(depth, width, classes, input_shape=shape)
        model = keras_dks.DKSModel(backbone, weight_decay=5e-4)
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    return model


def cpu_bf16_flags():
    """The native-bfloat16 CPU flags this machine advertises (Linux only)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags_line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return sorted({"avx512_bf16", "amx_bf16"} & set(flags_line.split(":", 1)[1].split()))


def measure(config):
    *_, shape, classes, batch = config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + shape).astype("float32")
    y = rng.integers(0, classes, batch)
    models = {p: build(config, p) for p in ("float32", "mixed_bfloat16")}
    for model in models.values():  # trace and warm up
        for _ in range(2):
            model.train_on_batch(x, y)
    rates = {p: [] for p in models}
    bar = keras.utils.Progbar(FLAGS.rounds * len(models), unit_name="timing")
    for r in range(FLAGS.rounds):
        for policy, model in models.items():
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                loss = model.train_on_batch(x, y)
            float(np.asarray(loss).ravel()[0])  # wait for the last step
            rates[policy].append(FLAGS.steps * batch / (time.perf_counter() - start))
            bar.add(1, values=[("round", r + 1)])
    speedups = [b / f for f, b in zip(rates["float32"], rates["mixed_bfloat16"])]
    return {
        "images_per_second": rates,
        "speedup_per_round": speedups,
        "speedup_median": float(np.median(speedups)),
        "speedup_range": [float(min(speedups)), float(max(speedups))],
        # Seconds per image, so the lower set of rounds is the faster one.
        "verdict": {"a faster": "bf16 faster", "b faster": "bf16 slower"}.get(
            common.spread_verdict([1 / r for r in rates["mixed_bfloat16"]],
                                  [1 / r for r in rates["float32"]]),
            "within noise (rounds overlap)"),
    }


def main(argv):
    del argv
    load_start = common.load_average()
    results = {}
    for name, config in CONFIGS.items():
        print(f"precision: {name}", flush=True)
        results[name] = measure(config)
    env, command = common.environment(), common.command_line()
    env["load_average_1min_start"] = load_start
    env["cpu_bf16_flags"] = cpu_bf16_flags()
    common.write_json(os.path.join(FLAGS.out_dir, "summary.json"), {
        "command": command, "environment": env,
        "config": {"rounds": FLAGS.rounds, "steps": FLAGS.steps}, "results": results,
    })
    lines = [
        "# DKS train step: float32 vs mixed_bfloat16 throughput",
        "",
        f"Command: `{command}` at commit {env['git_commit']}  ",
        f"Machine: {env['cpu']} ({env['cpu_count']} cores), TensorFlow {env['tensorflow']}, "
        f"Keras {env['keras']}; {FLAGS.rounds} interleaved rounds of {FLAGS.steps} steps; "
        f"native bfloat16 CPU flags: {', '.join(env['cpu_bf16_flags'] or []) or 'none'}; "
        f"1-minute load average {env['load_average_1min_start']:.1f} at the start, "
        f"{env['load_average_1min']:.1f} at the end.",
        "",
        "| network | float32 img/s (median) | bf16 img/s (median) | speed-up median (range over rounds) | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        f32, bf16 = (np.median(r["images_per_second"][p]) for p in ("float32", "mixed_bfloat16"))
        lo, hi = r["speedup_range"]
        lines.append(f"| {name} | {f32:.1f} | {bf16:.1f} | {r['speedup_median']:.2f}x "
                     f"({lo:.2f}–{hi:.2f}) | {r['verdict']} |")
    with open(os.path.join(FLAGS.out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
