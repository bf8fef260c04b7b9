#!/usr/bin/env bash
# The accuracy studies of benchmarks/results/, in the order they are run.
# Resumable: finished (method, seed) runs are skipped, an interrupted run
# resumes at its last finished epoch, so run this again after any stop.
# THREADS=1 leaves the other cores free (default: TensorFlow's own choice).
# Usage: bash benchmarks/run_studies.sh [all|headline|sweep]  (the two parts
# can run side by side, e.g. each with THREADS=1 on a 2-core machine).
set -euo pipefail
part=${1:-all}
cd "$(dirname "$0")/.."
threads=(--threads "${THREADS:-0}")
# Recipe fixed in advance (the committed 2k / 24-epoch / no-augmentation one).
recipe=(--batch_size 64 --epochs 24 --noaugment --eval_every 4)

if [[ $part == all || $part == headline ]]; then
# 1. Headline: baseline, DS, DKS on 2,000 images, 8 seeds paired by seed.
python benchmarks/accuracy.py --train_examples 2000 "${recipe[@]}" \
    --seeds 0,1,2,3,4,5,6,7 --out_dir benchmarks/results/accuracy "${threads[@]}"
fi
if [[ $part == all || $part == sweep ]]; then
# 2. Training-set size sweep (2,000 images: the headline runs above).
python benchmarks/accuracy.py --train_examples 1000 "${recipe[@]}" --methods baseline,dks \
    --seeds 0,1,2,3,4 --out_dir benchmarks/results/size_sweep/n1000 "${threads[@]}"
python benchmarks/accuracy.py --train_examples 5000 "${recipe[@]}" --methods baseline,dks \
    --seeds 0,1,2,3,4 --out_dir benchmarks/results/size_sweep/n5000 "${threads[@]}"
fi
