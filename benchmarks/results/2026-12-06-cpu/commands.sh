#!/usr/bin/env bash
# The commands of this run, in order (from the repository root). PEERS: a folder with liger-kernel 0.8.5 and
# cut-cross-entropy 25.1.1 (pip install --no-deps --target PEERS ...); BASE: drdo/ and drdo_kernels/ of the
# commit before the CPU chunk change (git archive cf17f45 drdo drdo_kernels), measured as base_torch.
set -uo pipefail
R=benchmarks/results/2026-12-06-cpu
export PYTHONPATH="$PWD:${PEERS:?}"
load() { echo "$(date -u +%FT%TZ) $1: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$R/load.txt"; }
shape=2048x512x32000  # 4 pairs (8 rows) x 256 tokens, H=512, V=32000, fp32
load "start paired $shape"
python benchmarks/paired.py --bench loss --shapes $shape --seq-len 256 --dtype fp32 --quick --threads 1 \
  --methods ours_auto,naive,torch_lce --rounds 5 --output "$R"
load "start grid $shape"
python benchmarks/bench_loss.py --device cpu --shapes $shape --seq-len 256 --dtypes fp32 --quick --threads 1 \
  --reps 5 --min-run-time 0 --no-plots --baseline "${BASE:?}" --output "$R" \
  --methods ours_auto,ours_torch,ours_chunked,base_torch,naive,torch_lce,trl_chunked,liger_dpo,liger_flce,cce,naive_compile
load "start paired 8192x512x32000"
mkdir -p "$R/found_case"
python benchmarks/paired.py --bench loss --shapes 8192x512x32000 --seq-len 256 --dtype fp32 --quick --threads 1 \
  --methods ours_auto,naive,torch_lce --rounds 5 --output "$R/found_case"
load "end"
# run beside the N=8192 paired run: the three grid methods that timed out at 180 s under this load
load "start grid rerun (timed out at 180 s)"
python benchmarks/bench_loss.py --device cpu --shapes $shape --seq-len 256 --dtypes fp32 --quick --threads 1 \
  --reps 5 --min-run-time 0 --no-plots --timeout 900 --append --output "$R" \
  --methods ours_chunked,torch_lce,trl_chunked
load "end grid rerun"
python -m benchmarks.report "$R" --scrub > /dev/null
python -m benchmarks.docs_table "$R"
