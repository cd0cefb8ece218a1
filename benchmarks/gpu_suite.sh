#!/usr/bin/env bash
# The key GPU comparisons in one command, no network, under 8 minutes on one H100/H200:
#   1. the whole DRDO loss, fwd+bwd, N=16384 H=4096 V=128256 bf16 (Llama-3-8B head): ours (triton, torch)
#      vs Cut Cross-Entropy, Liger's chunked DPO loss, naive PyTorch, torch.compile(naive), torch's
#      linear_cross_entropy (when the installed torch has it);
#   2. per-token log-probs (fwd, bwd, fwd+bwd) over N = 4k..32k at H=4096 V=128256 bf16, and over V;
#   3. one training step of a 2-layer Llama with a 128k vocabulary: tokens/s, peak memory, largest batch.
# Usage: benchmarks/gpu_suite.sh [OUTPUT_DIR]      (default: $OUT when set, else benchmarks/results/<date>-gpu)
# Peers travel as wheels in $WHEELS (default .whl or wheels/ in the repo root); see benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
dest="${1:-${OUT:-$repo/benchmarks/results/$(date -u +%F)-gpu}}"
# The device tool returns at most 8 files from $OUT: work in a scratch folder, then pack it when writing to $OUT.
if [[ -n "${OUT:-}" && "$dest" == "$OUT"* ]]; then work="$(mktemp -d)/gpu"; else work="$dest"; fi
mkdir -p "$work" "$dest"
log="$work/gpu_suite.log"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET
start=$(date +%s)
stamp() { echo "[gpu_suite +$(( $(date +%s) - start ))s] $*"; }

stamp "install the project (no deps, no network)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || stamp "pip -e . failed; using PYTHONPATH"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
wheels="${WHEELS:-}"
for d in .whl wheels; do [[ -z "$wheels" && -d "$d" ]] && wheels="$d"; done
if [[ -n "$wheels" ]] && compgen -G "$wheels/*.whl" > /dev/null; then
  stamp "install peers from $wheels: $(ls "$wheels" | tr '\n' ' ')"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
else
  stamp "no wheels folder: Liger-Kernel / Cut Cross-Entropy are recorded as skipped unless already installed"
fi
nvidia-smi -L || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"

run() {  # run <seconds> <script> <args...>: one benchmark with a hard time limit
  local limit="$1"; shift
  stamp "$* (limit ${limit}s)"
  timeout --signal=INT --kill-after=20 "$limit" python3 "$@" --device cuda --output "$work" \
    || stamp "exit $? from $1 (the CSV holds every method measured before that)"
}

run 150 benchmarks/bench_loss.py --shapes 16384x4096x128256 --dtypes bf16 --modes fwd+bwd \
  --methods ours_triton,ours_torch,cce,naive,torch_lce,liger_dpo,naive_compile
run 150 benchmarks/bench_logprobs.py --sweep N,V --N 4096,8192,16384,32768 --V 32000,128256,256000 \
  --base 8192x4096x128256 --dtypes bf16 --modes fwd,bwd,fwd+bwd \
  --methods ours_triton,ours_torch,naive,liger_flce,cce,torch_lce
run 120 benchmarks/bench_train.py --dtype bf16 --V 128256 --H 1024 --layers 2 --heads 8 --T 1024 --B 8 \
  --mem-budget-mb 16384 --max-batch 64 --methods ours_triton,ours_torch,full_logits,cce,liger_dpo
run 90 benchmarks/bench_padding_free.py
python3 -m benchmarks.report "$work" || true
stamp "done"
if [[ "$work" != "$dest" ]]; then
  tar -czf "$dest/gpu_results.tar.gz" -C "$(dirname "$work")" gpu
  cp "$work/results.md" "$dest/" 2>/dev/null || true
  cp "$log" "$dest/" 2>/dev/null || true
  for f in loss.csv logprobs.csv train.csv; do cp "$work/$f" "$dest/" 2>/dev/null || true; done
fi
