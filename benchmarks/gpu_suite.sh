#!/usr/bin/env bash
# The GPU comparisons in one command, no network, under 8 minutes on one H100 (installs included):
#   1. the whole DRDO loss, fwd+bwd, N=16384 H=4096 V=128256 bf16 (Llama-3-8B head): ours (chunked, triton,
#      torch), the old kernels (base_triton, base_torch, with BASELINE), Liger's DPO loss, CCE, TRL's fused
#      head, naive PyTorch, torch's linear_cross_entropy, torch.compile(naive);
#   2. per-token log-probs (fwd, bwd, fwd+bwd) at N=8192 and 16384, H=4096 V=128256 bf16, the same methods
#      (Liger's fused linear cross-entropy instead of its DPO loss; the torch backends left out: seconds per call);
#   3. one training step of a 2-layer Llama with a 128k vocabulary: ours, full logits, CCE, Liger, and TRL's
#      DPOTrainer with its fused head, with full logits, with Liger: tokens/s and peak memory;
#   4. padding-free batches: benchmarks/bench_padding_free.py when it exists (the place is kept below).
# Usage: [BASELINE=DIR] [WHEELS=DIR] benchmarks/gpu_suite.sh [OUTPUT_DIR]
#   OUTPUT_DIR  default: $OUT when set (then packed into <= 8 files), else benchmarks/results/<date>-gpu
#   BASELINE    a folder with an older drdo/ and drdo_kernels/ (e.g. .baseline/ from `git archive`): its
#               kernels run as base_triton / base_torch beside ours, each in a fresh process
#   WHEELS      peer wheels (default .whl/ or wheels/): liger-kernel, cut-cross-entropy, trl
#   BUDGET_S    seconds for the whole suite (default 450); each stage gets min(its limit, what is left)
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
dest="${1:-${OUT:-$repo/benchmarks/results/$(date -u +%F)-gpu}}"
# At most 8 files come back from $OUT: work in a scratch folder, then pack it when writing to $OUT.
if [[ -n "${OUT:-}" && "$dest" == "$OUT"* ]]; then work="$(mktemp -d)/gpu"; else work="$dest"; fi
mkdir -p "$work" "$dest"
log="$work/gpu_suite.log"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
unset TRITON_INTERPRET
start=$(date +%s)
budget="${BUDGET_S:-450}"
stamp() { echo "[gpu_suite +$(( $(date +%s) - start ))s] $*"; }
left() { echo $(( budget - ($(date +%s) - start) )); }

stamp "install the project (no deps, no network)"
timeout 60 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || stamp "pip -e . failed; using PYTHONPATH"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
wheels="${WHEELS:-}"
for d in .whl wheels; do [[ -z "$wheels" && -d "$d" ]] && wheels="$d"; done
if [[ -n "$wheels" ]] && compgen -G "$wheels/*.whl" > /dev/null; then
  stamp "install peers from $wheels: $(ls "$wheels" | tr '\n' ' ')"
  timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
else
  stamp "no wheels folder: peers that are not installed are recorded as skipped"
fi
baseline=()
if [[ -n "${BASELINE:-}" ]]; then
  baseline=(--baseline "$(cd "$BASELINE" && pwd)")
  stamp "baseline kernels from $BASELINE"
fi
nvidia-smi -L || true
python3 - <<'EOF' || true
import importlib, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))
for m in ("liger_kernel", "cut_cross_entropy", "trl", "trl.kernels", "datasets", "transformers"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m}: {getattr(mod, '__version__', 'ok')}")
    except Exception as exc:  # the benchmarks record each missing peer with its reason
        print(f"  {m}: NOT importable ({type(exc).__name__}: {exc})")
EOF

run() {  # run <seconds> <script> <args...>: one benchmark, limited to min(seconds, what is left)
  local limit="$1"; shift
  local rest; rest=$(left)
  (( rest < limit )) && limit=$rest
  if (( limit < 20 )); then stamp "no time left for $1: skipped"; return; fi
  stamp "$* (limit ${limit}s)"
  timeout --signal=INT --kill-after=15 "$limit" python3 "$@" --device cuda --output "$work" \
    || stamp "exit $? from $1 (its CSV holds every method measured before that)"
}

ours=ours_chunked,ours_triton,base_triton
peers=naive,cce,trl_chunked,torch_lce,naive_compile
run 170 benchmarks/bench_loss.py --shapes 16384x4096x128256 --dtypes bf16 --modes fwd+bwd --no-plots "${baseline[@]}" \
  --methods "$ours,liger_dpo,$peers,ours_torch,base_torch"
run 130 benchmarks/bench_logprobs.py --shapes 8192x4096x128256,16384x4096x128256 --dtypes bf16 --modes fwd,bwd,fwd+bwd \
  --no-plots "${baseline[@]}" --methods "$ours,liger_flce,$peers"
run 90 benchmarks/bench_train.py --dtype bf16 --V 128256 --H 1024 --layers 2 --heads 8 --T 1024 --B 4 --no-max-batch \
  --methods ours_chunked,ours_triton,full_logits,cce,liger_dpo,trl_dpo_fused,trl_dpo,trl_dpo_liger
# Padding-free batches (packed sequences, no pad tokens): a benchmark of its own, run here when it exists.
if [[ -f benchmarks/bench_padding_free.py ]]; then
  run 60 benchmarks/bench_padding_free.py
fi
python3 -m benchmarks.report "$work" > /dev/null || true
stamp "done"
if [[ "$work" != "$dest" ]]; then  # <= 8 files: the archive of everything, results.md, the log, three CSVs
  tar -czf "$dest/gpu_results.tar.gz" -C "$(dirname "$work")" gpu
  cp "$work/results.md" "$dest/" 2>/dev/null || true
  cp "$log" "$dest/" 2>/dev/null || true
  for f in loss.csv logprobs.csv train.csv; do cp "$work/$f" "$dest/" 2>/dev/null || true; done
fi
