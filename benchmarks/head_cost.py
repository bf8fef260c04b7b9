"""What DKS costs, and DKS for less: gain versus training cost over head designs.

The study, fixed before any of its runs: the size sweep's 5,000-image point
(WRN-16-1 on real Fashion-MNIST, 24 epochs, batch 64, no augmentation,
`--threads 1`, exactly `benchmarks/run_studies.sh`'s recipe), seeds 0-4,
every design trained with the DKS loss (bidirectional pairs, alpha = beta = 1)
and paired by seed with the sweep's baseline runs (same data order, same
backbone and main-classifier initial weights). The grid (`DESIGNS`):

- `authors`: the authors' heads (`DKSModel` defaults): the size sweep's own
  DKS runs, `benchmarks/results/size_sweep/n5000`, not run again;
- `width_0.5`, `width_0.25`: the same heads at half and a quarter of the
  width (`head_width`), two narrower designs;
- `depth_1`: one block per head stage (`head_depth=1`), a shallower design;
- `depth_1_width_0.5`: both at once, the residual design whose FLOPs are
  nearest the 1.3x-time target (forward FLOPs 1.22x the baseline);
- `conv`: one conv-BN-ReLU + pool + Dense per tap, the paper's Table 3
  "AP+1Conv" ablation head (the paper reports it hurting ResNet-32).

(A single-tap design was left out for the fifth slot: it changes the number
of pairs as well as the cost, so its gain could not be read as a head-cost
effect; `depth_1_width_0.5` answers the question users ask, whether a
residual head near 1.2x the FLOPs keeps the gain.)

Runs go to `benchmarks/results/head_cost/<design>/runs/dks_seed<k>.json`,
resumable like `accuracy.py`'s (an interrupted run restarts from its last
finished epoch). Run order is seed-major, so an unfinished study always
holds whole seeds of every design.

Usage (the committed runs come from exactly this command):
    python benchmarks/head_cost.py --threads 1
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import accuracy  # noqa: E402  (its flags: the recipe)

FLAGS = flags.FLAGS
flags.DEFINE_list("designs", None, "Designs to run (default: all of DESIGNS but authors).")
flags.DEFINE_string("study_dir", "benchmarks/results/head_cost", "Where the designs' runs go.")
flags.DEFINE_string("baseline_dir", "benchmarks/results/size_sweep/n5000",
                    "Folder of the baseline and authors'-heads runs (the size sweep's 5k point).")

# name: DKSModel constructor arguments beyond the method's (None: existing runs).
DESIGNS = {
    "authors": None,
    "width_0.5": {"head_width": 0.5},
    "width_0.25": {"head_width": 0.25},
    "depth_1": {"head_depth": 1},
    "depth_1_width_0.5": {"head_depth": 1, "head_width": 0.5},
    "conv": {"head": "conv"},
}
SEEDS = (0, 1, 2, 3, 4)
# The recipe, fixed: accuracy.py's flags as benchmarks/run_studies.sh sets them.
RECIPE = {"train_examples": 5000, "batch_size": 64, "epochs": 24, "augment": False,
          "eval_every": 4, "threads": 1}


def check_recipe():
    wrong = {k: FLAGS[k].value for k, v in RECIPE.items() if FLAGS[k].value != v}
    if wrong:
        raise app.UsageError(
            f"The study's recipe is fixed ({RECIPE}); these flags differ: {wrong}. "
            "Pass --threads 1 and leave the rest at their defaults."
        )


def main(argv):
    del argv
    for k, v in RECIPE.items():  # the recipe's values unless given (checked below)
        if not FLAGS[k].present:
            FLAGS[k].value = v
    if not FLAGS["seeds"].present:
        FLAGS.seeds = [str(s) for s in SEEDS]
    check_recipe()
    accuracy.set_threads()
    designs = FLAGS.designs or [d for d in DESIGNS if DESIGNS[d] is not None]
    unknown = [d for d in designs if d not in DESIGNS or DESIGNS[d] is None]
    if unknown:
        raise app.UsageError(f"Unknown or not-run designs {unknown}; use some of "
                             f"{[d for d in DESIGNS if DESIGNS[d] is not None]}.")
    for seed in FLAGS.seeds:
        for design in designs:
            FLAGS.out_dir = os.path.join(FLAGS.study_dir, design)
            print(f"head_cost: {design} seed {seed}", flush=True)
            accuracy.run("dks", int(seed), model_kwargs=DESIGNS[design])


if __name__ == "__main__":
    app.run(main)
