#!/usr/bin/env bash
# The committed CPU results: the three benchmarks into one dated folder.
# Usage: benchmarks/run_cpu.sh [OUTPUT_DIR]
#   GRID_FLAGS   extra flags for bench_logprobs.py and bench_loss.py (e.g. "--sweep N")
#   TRAIN_FLAGS  extra flags for bench_train.py
#   COMMON_FLAGS extra flags for all three (e.g. "--threads 1")
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/$(date -u +%F)-cpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2086  # the *_FLAGS variables are word lists
python benchmarks/bench_loss.py --device cpu --output "$out" ${COMMON_FLAGS:-} ${GRID_FLAGS:-} 2>&1 | tee "$out/loss.log"
# shellcheck disable=SC2086
python benchmarks/bench_logprobs.py --device cpu --output "$out" ${COMMON_FLAGS:-} ${GRID_FLAGS:-} 2>&1 | tee "$out/logprobs.log"
# shellcheck disable=SC2086
python benchmarks/bench_train.py --device cpu --output "$out" ${COMMON_FLAGS:-} ${TRAIN_FLAGS:-} 2>&1 | tee "$out/train.log"
python -m benchmarks.report "$out"
