"""When is DKS worth it? Test error vs training-set size, paired by seed.

Reads the runs of `benchmarks/accuracy.py` at several training-set sizes
(the same recipe otherwise: WRN-16-1, 24 epochs, batch 64, no augmentation,
see `benchmarks/run_studies.sh`), and writes to `--out_dir`:

- `summary.json` / `summary.md`: per size and method the main-head test
  error (mean, sd, 95 % CI over seeds); per size the paired gain of DKS (and
  DS) over the baseline with its 95 % CI and one-sided paired t-test p-value;
  the cost ratio DKS / baseline in training time per image (between each
  method's fastest run: load and pauses only ever slow a run);
- `error_vs_size.png`: test error vs training-set size, mean with 95 % CI.

The runs themselves are made by `bash benchmarks/run_studies.sh` (the
2,000-image point is the headline study's folder). This script only reads.

Usage (the committed summary comes from exactly this command; the 2,000-image
point mixes thread settings, see `benchmarks/results/accuracy/summary.md`, and
without `--allow_mixed_threads` the sweep refuses it):
    python benchmarks/size_sweep.py --allow_mixed_threads
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import accuracy  # noqa: E402  (defines its flags too; unused here)
from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "folders",
    ["1000:benchmarks/results/size_sweep/n1000", "2000:benchmarks/results/accuracy",
     "5000:benchmarks/results/size_sweep/n5000"],
    "size:folder of accuracy.py runs, one per training-set size.",
)
flags.DEFINE_string("sweep_dir", "benchmarks/results/size_sweep", "Where the summary goes.")

COMPARED = (("baseline", "dks"), ("baseline", "ds"))


def ci95(values):
    from scipy import stats

    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return None
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return [float(v.mean() - half), float(v.mean() + half)]


def sweep(folders):
    """`{size: folder}` -> per-size statistics (see the module docstring)."""
    points = {}
    for size, folder in sorted(folders.items()):
        runs = accuracy.load_runs(folder, FLAGS.allow_mixed_threads)
        if not runs:
            continue
        if runs[0]["config"]["train_examples"] != size:
            raise ValueError(f"{folder} holds runs on {runs[0]['config']['train_examples']} "
                             f"examples, not {size}")
        by_method, _, _ = accuracy.summarise_runs(runs)
        methods = {}
        for method, rs in by_method.items():
            errors = [r["test_error"]["main"] for r in rs]
            methods[method] = {
                "seeds": sorted(r["seed"] for r in rs),
                "mean": float(np.mean(errors)),
                "sd": float(np.std(errors, ddof=1)) if len(errors) > 1 else None,
                "ci95": ci95(errors),
                "images_per_second": {r["seed"]: r["train_images_per_second"] for r in rs},
            }
        paired = {}
        for a, b in COMPARED:
            if a in by_method and b in by_method:
                paired[f"{b}_vs_{a}"] = accuracy.paired_comparison(
                    {r["seed"]: r["test_error"]["main"] for r in by_method[a]},
                    {r["seed"]: r["test_error"]["main"] for r in by_method[b]},
                )
        cost = None
        if ("baseline" in methods and "dks" in methods
                and min(len(methods[m]["images_per_second"]) for m in ("baseline", "dks")) >= 3):
            base, dks = methods["baseline"]["images_per_second"], methods["dks"]["images_per_second"]
            # Runs shared the machine and were paused at times, which only
            # ever slows a run: the fastest run of each method is the least
            # disturbed, so the ratio is taken between those.
            cost = {"fastest_runs": float(max(base.values()) / max(dks.values())),
                    "n_baseline": len(base), "n_dks": len(dks)}
        config = accuracy.common_config(runs)
        points[size] = {"folder": folder, "config": config, "methods": methods,
                        "paired": paired, "dks_over_baseline_time_per_image": cost,
                        "mixed_threads": (accuracy.threads_of(runs)
                                          if isinstance(config["threads"], list) else None),
                        **common.run_provenance(runs)}
    return points


def write(points, out_dir):
    commits = sorted({c for p in points.values() for c in p["run_commits"]})
    env = common.environment()
    common.write_json(os.path.join(out_dir, "summary.json"),
                      {"command": common.command_line(), "environment": env,
                       "config": {"folders": {str(k): v["folder"] for k, v in points.items()},
                                  "allow_mixed_threads": FLAGS.allow_mixed_threads},
                       "run_commits": commits,
                       "points": {str(k): v for k, v in points.items()}})
    lines = [
        "# DKS vs training-set size (Fashion-MNIST, WRN-16-1, main-head test error %)",
        "",
        "Same recipe at every size (24 epochs, batch 64, SGD 0.1 x0.2 at 30/60/80 %, coupled "
        "L2 5e-4, no augmentation, full 10k test set); runs from `bash benchmarks/run_studies.sh` "
        f"at commits {', '.join(commits)}, summary from `{common.command_line()}` at {env['git_commit']}.",
        "",
        "| train images | baseline | DS | DKS | DKS gain (paired) | 95 % CI | p (one-sided) | "
        "DS gain | p | DKS / baseline time per image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def err(p, m):
        s = p["methods"].get(m)
        if not s:
            return "-"
        return f"{100 * s['mean']:.2f}" + (f" ± {100 * s['sd']:.2f}" if s["sd"] is not None else "") + f" (n={len(s['seeds'])})"

    def gain(p, name):
        c = p["paired"].get(name)
        if not c or c["mean_gain"] is None:
            return ["-", "-", "-"]
        return [f"{100 * c['mean_gain']:+.2f}", f"[{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}]",
                f"{c['p_one_sided']:.4f}"]

    for size, p in points.items():
        dks, ds = gain(p, "dks_vs_baseline"), gain(p, "ds_vs_baseline")
        c = p["dks_over_baseline_time_per_image"]
        cost = f"{c['fastest_runs']:.2f}" if c else "-"
        lines.append(f"| {size} | {err(p, 'baseline')} | {err(p, 'ds')} | {err(p, 'dks')} | "
                     f"{' | '.join(dks)} | {ds[0]} | {ds[2]} | {cost} |")
    for size, p in points.items():
        if p["mixed_threads"]:
            lines += ["", f"**{size} images mixes thread settings** (`--allow_mixed_threads`): "
                      + "; ".join(f"{'TensorFlow default threads' if t == '0' else f'--threads {t}'}: {len(f)} runs"
                                  for t, f in p["mixed_threads"].items())
                      + f" (see `{p['folder']}/summary.md`)."]
    unverified = sum(len(p["runs_git_dirty_unverified"]) for p in points.values())
    if unverified:
        lines += ["", f"{unverified} runs were recorded before commit {common.GIT_DIRTY_FIXED_AT}: "
                  "their `git_dirty: false` proves nothing (the check could not see changes)."]
    lines += ["", "Gain = baseline error − method error (points), paired by seed; cost = baseline / DKS "
              "training throughput of each method's fastest run, once each has 3 runs (the runs shared the machine and "
              "were paused at times, which only slows a run; the interleaved measurement of "
              "`benchmarks/cost.py` is the precise one)."]
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(points, os.path.join(out_dir, "error_vs_size.png"))


def plot(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k, method in enumerate(("baseline", "ds", "dks")):
        xs = [s for s, p in points.items() if method in p["methods"]]
        if not xs:
            continue
        stats_ = [points[s]["methods"][method] for s in xs]
        means = np.array([100 * s["mean"] for s in stats_])
        lo = np.array([100 * (s["ci95"] or [s["mean"]] * 2)[0] for s in stats_])
        hi = np.array([100 * (s["ci95"] or [s["mean"]] * 2)[1] for s in stats_])
        x = np.array(xs) * (1 + 0.03 * (k - 1))  # offset so error bars do not hide each other
        ax.errorbar(x, means, yerr=[means - lo, hi - means], fmt="o-", capsize=4, label=method)
    ax.set_xscale("log")
    ax.set_xticks(list(points))
    ax.set_xticklabels([str(s) for s in points])
    ax.set_xlabel("training images")
    ax.set_ylabel("main-head test error (%), mean and 95 % CI")
    ax.set_title("Fashion-MNIST, WRN-16-1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    folders = {int(s.split(":", 1)[0]): s.split(":", 1)[1] for s in FLAGS.folders}
    os.makedirs(FLAGS.sweep_dir, exist_ok=True)
    write(sweep(folders), FLAGS.sweep_dir)


if __name__ == "__main__":
    app.run(main)
