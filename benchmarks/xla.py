"""Train-step time of a DKSModel with and without XLA (`jit_compile`).

`compile(jit_compile=True)` compiles the whole DKS train step (forward of
every head, per-head cross-entropy, synergy loss, gradients, SGD update)
with XLA. On CPU Keras' `jit_compile="auto"` picks False; this measures what
forcing it gives. For each model, the same initial weights are trained with
`jit_compile=False` and `True` in interleaved rounds (so slow phases of a
shared machine hit both alike; the order alternates between rounds) and the
median step times compared. Every round's median is stored, with the range
of the per-round time ratios: "faster" or "slower" is only concluded when the
two settings' rounds do not overlap, so a busy machine shows up as spread,
not as a result. The first call (tracing + XLA compilation) is reported
separately. The two runs are also checked to stay numerically together.

Usage:
    python benchmarks/xla.py                   # writes benchmarks/results/xla.json
    python benchmarks/xla.py --models wrn --rounds 3 --steps 5
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
flags.DEFINE_list("models", ["wrn", "resnet"], "Models to measure.")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
flags.DEFINE_integer("steps", 5, "Train steps timed per round and setting.")
flags.DEFINE_string("out", "benchmarks/results/xla.json", "Output JSON.")

CONFIGS = {
    # name: (backbone factory, input shape, classes, batch)
    "wrn": (
        lambda: keras_dks.backbones.wide_resnet(16, 1, 10, include_top=False),
        (32, 32, 3), 10, 32,
    ),
    "resnet": (
        lambda: keras_dks.backbones.resnet_cifar(20, 10, include_top=False),
        (32, 32, 3), 10, 32,
    ),
}


def build(config, jit, init=None):
    factory, _, classes, _ = CONFIGS[config]
    keras.utils.set_random_seed(0)
    model = keras_dks.DKSModel(factory(), num_classes=classes, seed=0)
    if init is not None:
        model.set_weights(init)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=jit
    )
    assert model.jit_compile is jit, "Keras refused jit_compile for this model"
    return model


def batch(config, seed=0):
    _, shape, classes, size = CONFIGS[config]
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(size=(size,) + shape).astype("float32"),
        rng.integers(0, classes, size),
    )


def _weight_gap(models):
    return max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(models["no_xla"].get_weights(), models["xla"].get_weights())
    )


def measure(config):
    x, y = batch(config)
    init = build(config, False).get_weights()
    models = {"no_xla": build(config, False, init), "xla": build(config, True, init)}
    first_call, first_loss = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        first_loss[name] = float(model.train_on_batch(x, y, return_dict=True)["loss"])
        first_call[name] = time.perf_counter() - start
    gap_first_step = _weight_gap(models)
    times = {name: [] for name in models}
    print(f"xla: {config}: timed rounds", flush=True)
    bar = keras.utils.Progbar(FLAGS.rounds * len(models), unit_name="timing")
    for r in range(FLAGS.rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            model = models[name]
            t, _ = common.median_time(
                lambda: model.train_on_batch(x, y), FLAGS.steps, warmup=1
            )
            times[name].append(t)
            bar.add(1, values=[("round", r + 1)])
    step = {name: float(np.median(t)) for name, t in times.items()}
    ratios = [a / b for a, b in zip(times["xla"], times["no_xla"])]
    verdict = common.spread_verdict(times["xla"], times["no_xla"])
    verdict = {"a faster": "xla faster", "b faster": "xla slower"}.get(verdict, verdict)
    steps_done = int(models["xla"].optimizer.iterations.numpy())
    return {
        "batch": CONFIGS[config][3],
        "input_shape": list(CONFIGS[config][1]),
        "params": int(models["xla"].count_params()),
        "step_seconds": step,
        "step_seconds_per_round": times,
        "speedup_xla": step["no_xla"] / step["xla"],
        "step_time_ratio_xla_over_no_xla": step["xla"] / step["no_xla"],
        # Per-round ratio (same round, back to back): its range is the spread.
        "step_time_ratio_per_round": ratios,
        "step_time_ratio_range": [min(ratios), max(ratios)],
        "step_seconds_range": {n: [min(t), max(t)] for n, t in times.items()},
        "verdict": verdict,
        "first_call_seconds": first_call,
        "first_step_loss": first_loss,
        "train_steps_each": steps_done,
        # Same step, different float rounding: equal after one step; with
        # BatchNorm and momentum the rounding differences then grow.
        "max_weight_gap_after_first_step": gap_first_step,
        "max_weight_drift_after_all_steps": _weight_gap(models),
    }


def main(argv):
    del argv
    environment = common.environment()
    results = {name: measure(name) for name in FLAGS.models}
    record = {
        "command": common.command_line(),
        "config": {
            "models": list(FLAGS.models),
            "rounds": FLAGS.rounds,
            "steps_per_round": FLAGS.steps,
        },
        "environment": environment,
        "environment_end": {"load_average_1min": common.environment()["load_average_1min"]},
        "results": results,
    }
    common.write_json(FLAGS.out, record)
    for name, r in results.items():
        print(
            f"{name}: step {r['step_seconds']['no_xla'] * 1e3:.1f} ms without XLA, "
            f"{r['step_seconds']['xla'] * 1e3:.1f} ms with XLA "
            f"(speed-up {r['speedup_xla']:.2f}x, per-round ratio "
            f"{r['step_time_ratio_range'][0]:.2f}-{r['step_time_ratio_range'][1]:.2f}: "
            f"{r['verdict']}; first call "
            f"{r['first_call_seconds']['no_xla']:.1f} s vs "
            f"{r['first_call_seconds']['xla']:.1f} s)"
        )
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
