#!/usr/bin/env bash
# The accuracy studies of benchmarks/results/, in the order they are run.
# Resumable: finished (method, seed) runs are skipped, an interrupted run
# resumes at its last finished epoch, so run this again after any stop.
# THREADS=1 leaves the other cores free (default: TensorFlow's own choice).
# Usage: bash benchmarks/run_studies.sh [all|headline|sweep|headline_threads1]
# (the parts can run side by side, e.g. each with THREADS=1 on a 2-core machine).
set -euo pipefail
part=${1:-all}
cd "$(dirname "$0")/.."
threads=(--threads "${THREADS:-0}")
# Recipe fixed in advance (the committed 2k / 24-epoch / no-augmentation one).
recipe=(--batch_size 64 --epochs 24 --noaugment --eval_every 4)

if [[ $part == all || $part == headline ]]; then
# 1. Headline: baseline, DS, DKS on 2,000 images, 8 seeds paired by seed
# (its committed seeds mix thread settings, see step 3: the summary says so).
python benchmarks/accuracy.py --train_examples 2000 "${recipe[@]}" \
    --seeds 0,1,2,3,4,5,6,7 --out_dir benchmarks/results/accuracy "${threads[@]}" \
    --allow_mixed_threads
fi
if [[ $part == all || $part == sweep ]]; then
# 2. Training-set size sweep (2,000 images: the headline runs above).
python benchmarks/accuracy.py --train_examples 1000 "${recipe[@]}" --methods baseline,dks \
    --seeds 0,1,2,3,4 --out_dir benchmarks/results/size_sweep/n1000 "${threads[@]}"
python benchmarks/accuracy.py --train_examples 5000 "${recipe[@]}" --methods baseline,dks \
    --seeds 0,1,2,3,4 --out_dir benchmarks/results/size_sweep/n5000 "${threads[@]}"
fi
if [[ $part == headline_threads1 ]]; then
# 3. Queued: the headline's seeds 0-2 ran with TensorFlow's default threads,
# seeds 3-7 with --threads 1 (the summary states the mix, --allow_mixed_threads).
# This removes the default-threads runs (they stay in the git history) and
# re-runs them with --threads 1, so the study is of one configuration; then
# rebuild the summaries without --allow_mixed_threads.
for m in baseline ds dks; do
  for s in 0 1 2; do
    f=benchmarks/results/accuracy/runs/${m}_seed${s}.json
    if [[ -f $f ]] && ! python -c "import json, sys; from benchmarks import accuracy; \
sys.exit(accuracy.stored_config(json.load(open('$f')))['threads'] != 1)"; then
      rm -r "$f" "benchmarks/results/accuracy/work/${m}_seed${s}"
    fi
  done
done
python benchmarks/accuracy.py --train_examples 2000 "${recipe[@]}" \
    --seeds 0,1,2 --out_dir benchmarks/results/accuracy --threads 1
python benchmarks/accuracy.py --summary_only --out_dir benchmarks/results/accuracy
python benchmarks/size_sweep.py
fi
