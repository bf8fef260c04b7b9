"""Shared helpers of the benchmarks: environment record, timing, FLOPs."""

import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf

# `git_dirty` has been computed from the repository root since this commit.
# Before it the pathspecs were read relative to benchmarks/, so the flag was
# always false: records of older commits carry no evidence of a clean tree.
GIT_DIRTY_FIXED_AT = "5adc4f5"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True,
                          check=False, cwd=REPO_ROOT)


def is_ancestor(older, newer):
    """True when commit `older` is `newer` or in its history (git needed)."""
    return _git("merge-base", "--is-ancestor", older, newer).returncode == 0


def load_average():
    """1-minute load average (None where the OS has none): above the core
    count, other processes shared the CPU with the measurement."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_provenance(runs):
    """What a summary records about the runs it reads (each a loaded run
    JSON with a `file` key added): every distinct command and commit, the
    machines, and the runs whose `git_dirty` proves nothing (made before
    `GIT_DIRTY_FIXED_AT`)."""
    commits = sorted({r["environment"].get("git_commit", "") for r in runs})
    unverified = sorted(
        r["file"] for r in runs
        if not is_ancestor(GIT_DIRTY_FIXED_AT, r["environment"].get("git_commit", ""))
    )
    return {
        "run_commands": sorted({r["command"] for r in runs}),
        "run_commits": commits,
        "run_machines": sorted({
            f"{r['environment']['cpu']} ({r['environment']['cpu_count']} cores), "
            f"TensorFlow {r['environment']['tensorflow']}, Keras {r['environment']['keras']}"
            for r in runs}),
        "runs_git_dirty_unverified": unverified,
    }


def environment():
    """Versions and machine, stored beside every result."""
    import keras

    import keras_dks

    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
        dirty = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "keras_dks", ":(glob)benchmarks/*.py"],
            capture_output=True, text=True, check=False,
            # Pathspecs are relative to the working directory: run at the root.
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        ).stdout.strip())
    except OSError:
        commit, dirty = "", None
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_dks": keras_dks.__version__,
        "git_commit": commit,
        "git_dirty": dirty,  # uncommitted changes to the code that ran
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "platform": platform.platform(),
        # 1-minute load average when the record was made: above the core
        # count, other processes shared the CPU with the measurement.
        "load_average_1min": load_average(),
    }


def command_line():
    return " ".join(["python"] + sys.argv)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # never leave a half-written result behind


def graph_flops(fn, *specs):
    """Float operations of one call of the tf.function `fn` (static shapes)."""
    concrete = tf.function(fn).get_concrete_function(*specs)
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    prof = tf.compat.v1.profiler.profile(
        graph=concrete.graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op",
        options=opts,
    )
    return int(prof.total_float_ops)


def median_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def spread_verdict(rounds_a, rounds_b):
    """Compares two settings timed in interleaved rounds.

    Returns "a faster" / "b faster" only when the two sets of per-round times
    do not overlap (every round of one is below every round of the other),
    else "overlap: no difference resolved".
    """
    if max(rounds_a) < min(rounds_b):
        return "a faster"
    if max(rounds_b) < min(rounds_a):
        return "b faster"
    return "overlap: no difference resolved"

