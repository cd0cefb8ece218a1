#!/usr/bin/env bash
# The GPU run in one call of at most 8 minutes on a fresh H200 (no network): five stages in priority order,
# each with its own time budget inside BUDGET_S (default 450 s). Time a stage leaves unused passes on to the
# next; a stage (or a command in it) that would not fit is skipped with a line saying so; a command that
# runs out of time is interrupted and keeps the rows it measured.
#   1. tests    the CUDA tests with TRITON_INTERPRET=0 set explicitly (the kernel and fused-loss test files)
#   2. profile  torch.profiler, kernel by kernel: our chunked and triton DRDO loss fwd+bwd, H=1024 and 4096
#   3. loss     the DRDO loss, N=16384 V=128256 bf16, at H=4096 then 1024 and 2048: ours (auto, chunked,
#               triton), torch.compile(naive), Liger's DPO, TRL's fused head, and the previous kernels with
#               BASELINE; paired alternation at H=4096; per-token log-probs at N=8192 H=4096 (ours, TRL,
#               torch.compile(naive)) with paired alternation
#   4. train    one training step of a 2-layer Llama, V=128256, at H=1024 then 4096: ours (auto, chunked,
#               triton), TRL's DPOTrainer (its fused head, full logits, Liger), full logits, CCE
#   5. padding  padding-free against padded batches
# Peers come from wheels carried in the working tree; flash-attn is recorded as skipped, never built.
#
# Usage: [BASELINE=DIR] [WHEELS=DIR] [BUDGET_S=450] benchmarks/gpu_suite.sh [--dry-run] [OUTPUT_DIR]
#   --dry-run   print the plan (stages, budgets, commands), then run every stage's command with toy shapes on
#               the CPU (one repetition), all in one Python process (benchmarks/dry_run.py: imports once); a
#               stage that needs CUDA is printed as "would run". Exit 1 if a toy command failed.
#   OUTPUT_DIR  default: $OUT when set (then packed into <= 8 files), else benchmarks/results/<date>-gpu
#               (a dry run: a new temporary folder)
#   BASELINE    a folder with an older drdo/ and drdo_kernels/ (`git archive OLD drdo drdo_kernels`): its
#               kernels run as base_chunked / base_triton beside ours, each in a fresh process
#   WHEELS      the peers' wheels (default .whl/ or wheels/): liger-kernel, cut-cross-entropy, trl, datasets
#               and its dependencies, hypothesis (the gradient tests)
#   CUDA_TESTS  the test files of stage 1 (default below, most CUDA-specific first)
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
if (( dry )); then
  dest="${1:-$(mktemp -d)}"
else
  dest="${1:-${OUT:-$repo/benchmarks/results/$(date -u +%F)-gpu}}"
fi
# At most 8 files come back from $OUT: work in a scratch folder, then pack it when writing to $OUT.
if [[ -n "${OUT:-}" && "$dest" == "$OUT"* ]] && (( !dry )); then work="$(mktemp -d)/gpu"; else work="$dest"; fi
mkdir -p "$work" "$dest"
log="$work/gpu_suite.log"
exec 3>&1 4>&2
exec > >(tee -a "$log") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TRITON_INTERPRET=0
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
budget="${BUDGET_S:-450}"
deadline=$(( start + budget ))
SETUP_S=30
STAGE_MIN_S=20  # a stage given less than this is skipped
CMD_MIN_S=10    # a command given less than this is skipped
CUDA_TESTS="${CUDA_TESTS:-tests/test_kernel_logprobs.py tests/test_triton_edge_cases.py tests/test_chunked.py \
tests/test_pair_loss.py tests/test_pair_chunked.py tests/test_fused_losses.py tests/test_kernel_inputs.py \
tests/test_logprobs.py tests/test_gradients.py tests/test_step_gradients.py}"
failed=0
stamp() { echo "[gpu_suite +$(( $(date +%s) - start ))s] $*"; }

settings() {  # settings real|toy: the shapes and flags every stage uses
  if [[ "$1" == real ]]; then
    DEV=cuda; LOSS_HEAD=16384x4096x128256; LOSS_MORE=16384x1024x128256,16384x2048x128256; LP=8192x4096x128256
    LIGER_LP=4096x4096x128256  # the shape of Liger's CuTe DSL figure (18.34 ms fwd+bwd on an H200)
    GRID=(--dtypes bf16 --no-plots --no-isolate)
    PAIRED=(--dtype bf16)
    PROFILE=(--shapes 16384x1024x128256,16384x4096x128256 --dtype bf16)
    TRAIN=(--dtype bf16 --V 128256 --H 1024,4096 --layers 2 --T 1024 --B 4 --no-max-batch)
    PADDING=()
  else
    DEV=cpu; LOSS_HEAD=64x32x256; LOSS_MORE=64x16x256,64x24x256; LP=32x32x256; LIGER_LP=32x32x256
    GRID=(--dtypes bf16 --no-plots --no-isolate --quick --seq-len 16 --reps 1 --min-run-time 0 --threads 1 --gemm-n 64)
    PAIRED=(--dtype bf16 --quick --seq-len 16 --rounds 1 --threads 1)
    PROFILE=(--shapes 64x16x256,64x32x256 --dtype bf16 --seq-len 16 --steps 1 --threads 1)
    TRAIN=(--quick --no-isolate --V 512 --H 32 --heads 2 --T 16 --B 1 --reps 1 --min-run-time 0 --threads 1
           --no-max-batch)
    PADDING=(--quick --steps 1)
  fi
  # in order of importance: a time limit cuts the last ones
  BASE=(); LOSS_METHODS=ours_auto,ours_chunked,naive_compile,trl_chunked,ours_triton,liger_dpo
  OURS_LP=ours_auto,ours_chunked
  if [[ -n "${BASELINE:-}" ]]; then
    BASE=(--baseline "$BASELINE"); OURS_LP="$OURS_LP,base_chunked"
    LOSS_METHODS=ours_auto,ours_chunked,base_chunked,naive_compile,trl_chunked,ours_triton,base_triton,liger_dpo
  fi
}

run() {  # run <seconds> <command...>: in MODE print, show it; in a dry run, queue it for benchmarks/dry_run.py;
  local limit="$1"; shift  # else run it within min(seconds, the stage's time left)
  if [[ "$MODE" == print ]]; then echo "      [${limit}s] $*"; return; fi
  if (( dry )); then echo "      toy: $*"; printf '%q ' "$@" >> "$work/dry_commands.txt"; echo >> "$work/dry_commands.txt"; return; fi
  local rest=$(( stage_end - $(date +%s) ))
  (( rest < limit )) && limit=$rest
  if (( limit < CMD_MIN_S )); then stamp "no time left in this stage (${rest}s) for: $*: skipped"; return; fi
  stamp "$* (limit ${limit}s)"
  timeout --signal=INT --kill-after=20 "$limit" "$@"
  local rc=$?
  (( rc != 0 )) && stamp "exit $rc from $* (124: its time ran out; what it measured before is kept)"
  return 0
}

cuda_only() {  # cuda_only <seconds> <command...>: a command that needs CUDA; a dry run only says it would run
  if [[ "$MODE" == exec && "$DEV" == cpu ]]; then echo "      would run (needs CUDA): $*"; return; fi
  run "$@"
}

stage() {  # stage <k> <name> <budget s>: open stage k until the end of its budget (after setup and the
  local k="$1" name="$2" own="$3"  # budgets before it, or the deadline); returns 1 when it is skipped
  if [[ "$MODE" == print ]]; then echo "  stage $k/5 $name: budget ${own}s"; return 0; fi
  planned_end=$(( planned_end + own ))
  close_stage
  local now; now=$(date +%s)
  stage_end=$(( planned_end < deadline ? planned_end : deadline ))
  stage_name="$k/5 $name"; stage_start=$now; stage_budget=$own
  if (( stage_end - now < STAGE_MIN_S )); then
    stamp "stage $stage_name skipped: $(( stage_end - now ))s left for it (budget ${own}s, BUDGET_S=$budget)"
    echo "| $stage_name | $own | 0 | skipped: no time left |" >> "$work/suite.md"
    stage_name=""
    return 1
  fi
  stamp "stage $stage_name: until +$(( stage_end - start ))s (budget ${own}s)"
}

close_stage() {  # record the stage that ran in suite.md
  if [[ -n "${stage_name:-}" ]]; then
    local status=ran; (( dry )) && status="dry run: toy commands queued"
    echo "| $stage_name | $stage_budget | $(( $(date +%s) - stage_start )) | $status |" >> "$work/suite.md"
  fi
  stage_name=""
}

stages() {  # the five stages, printed or run according to MODE
  if stage 1 tests 70; then
    local ignore=()
    if [[ "$MODE" == exec ]] && ! python3 -c "import hypothesis" 2> /dev/null; then
      stamp "hypothesis is not installed: tests/test_gradients.py left out (carry its wheel)"
      ignore=(--ignore=tests/test_gradients.py)
    fi
    # shellcheck disable=SC2086  # CUDA_TESTS is a list of files
    cuda_only 70 env TRITON_INTERPRET=0 python3 -m pytest -q -x -p no:cacheprovider --junitxml "$work/tests.xml" \
      "${ignore[@]}" $CUDA_TESTS
  fi
  if stage 2 profile 40; then
    run 40 python3 benchmarks/profile_loss.py --device "$DEV" "${PROFILE[@]}" --backends chunked,triton --output "$work"
  fi
  if stage 3 loss 180; then
    run 90 python3 benchmarks/bench_loss.py --device "$DEV" --shapes "$LOSS_HEAD" "${GRID[@]}" "${BASE[@]}" \
      --methods "$LOSS_METHODS" --output "$work"
    run 30 python3 benchmarks/paired.py --bench loss --device "$DEV" --shapes "$LOSS_HEAD" "${PAIRED[@]}" \
      --methods ours_auto,naive_compile,trl_chunked,liger_dpo --output "$work"
    run 25 python3 benchmarks/bench_logprobs.py --device "$DEV" --shapes "$LP" "${GRID[@]}" --modes fwd+bwd \
      "${BASE[@]}" --methods "$OURS_LP,trl_chunked,naive_compile" --output "$work"
    run 15 python3 benchmarks/paired.py --bench logprobs --device "$DEV" --shapes "$LP" "${PAIRED[@]}" \
      --methods ours_auto,trl_chunked,naive_compile --output "$work"
    # Liger's CuTe DSL path in a process of its own (LIGER_KERNEL_IMPL is read once, when liger_kernel is
    # imported), then its Triton path and TRL's Triton log-prob + entropy kernel beside ours
    run 20 env LIGER_KERNEL_IMPL=cutedsl python3 benchmarks/bench_logprobs.py --device "$DEV" --shapes "$LIGER_LP" \
      "${GRID[@]}" --modes fwd+bwd --methods liger_flce_cutedsl --append --output "$work"
    run 25 python3 benchmarks/bench_logprobs.py --device "$DEV" --shapes "$LIGER_LP" "${GRID[@]}" --modes fwd+bwd \
      --methods ours_auto,liger_flce,trl_logprob_entropy --append --output "$work"
    run 60 python3 benchmarks/bench_loss.py --device "$DEV" --shapes "$LOSS_MORE" "${GRID[@]}" "${BASE[@]}" \
      --methods "$LOSS_METHODS" --append --output "$work"
  fi
  if stage 4 train 90; then  # the target pair at both sizes first, then the rest
    run 50 python3 benchmarks/bench_train.py --device "$DEV" "${TRAIN[@]}" --methods ours_auto,trl_dpo_fused \
      --output "$work"
    run 90 python3 benchmarks/bench_train.py --device "$DEV" "${TRAIN[@]}" --append --output "$work" \
      --methods ours_chunked,ours_triton,naive,trl_dpo,trl_dpo_liger,cce
  fi
  if stage 5 padding 40; then
    run 40 python3 benchmarks/bench_padding_free.py --device "$DEV" "${PADDING[@]}" --output "$work"
  fi
  [[ "$MODE" == exec ]] && close_stage
  return 0
}

peer_notes() {  # what the peers added for the CuTe DSL and TRL Triton paths need, and whether they travel here
  echo "  liger_flce_cutedsl: liger-kernel >= 0.8.5 with LIGER_KERNEL_IMPL=cutedsl needs nvidia-cutlass-dsl (its libs-base"
  echo "    and libs-cu12 wheels are CUDA binaries, far over the 64 MiB that travels with the checkout) and"
  echo "    apache-tvm-ffi; $(python3 -c 'import cutlass.cute' 2> /dev/null && echo 'cutlass.cute imports here' \
    || echo 'cutlass.cute does not import here: its rows are recorded as skipped with that reason')"
  echo "  trl_logprob_entropy: trl >= 1.16's Triton kernel (trl.kernels.selective_log_softmax_and_entropy), pure Python on"
  echo "    the machine's Triton; $(python3 -c 'from trl.kernels import selective_log_softmax_and_entropy' 2> /dev/null \
    && echo 'it imports here' || echo 'it does not import here: recorded as skipped with the reason')"
}

install_peers() {  # the peers' wheels into a private site-packages (no network, no dependencies resolved)
  local wheels="${WHEELS:-}" site
  for d in .whl wheels; do [[ -z "$wheels" && -d "$d" ]] && wheels="$d"; done
  if [[ -z "$wheels" ]] || ! compgen -G "$wheels/*.whl" > /dev/null; then
    stamp "no wheels folder: peers that are not installed are recorded as skipped"
    return
  fi
  site="$(mktemp -d)/site-packages"
  stamp "install peers from $wheels: $(ls "$wheels" | tr '\n' ' ')"
  timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$wheels"/*.whl && export PYTHONPATH="$PYTHONPATH:$site"
}

MODE=print
settings real
echo "plan: BUDGET_S=${budget}s (setup ${SETUP_S}s, then the stages; unused time passes on)${BASELINE:+, baseline $BASELINE}"
stages
echo "  flash-attn: skipped, not built (no network; a build takes longer than the whole budget)"
peer_notes
echo "| stage | budget s | used s | status |" > "$work/suite.md"
echo "|---|---|---|---|" >> "$work/suite.md"
MODE=exec
planned_end=$(( start + SETUP_S ))
if (( dry )); then
  stamp "dry run: every stage's command with toy shapes on the CPU, output in $work"
  settings toy
  : > "$work/dry_commands.txt"
else
  nvidia-smi -L || true
  install_peers
  settings real
  python3 - <<'EOF' || true
import importlib, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))
for m in ("liger_kernel", "cutlass", "cut_cross_entropy", "trl", "trl.kernels", "datasets", "transformers", "hypothesis"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m}: {getattr(mod, '__version__', 'ok')}")
    except Exception as exc:  # the benchmarks record each missing peer with its reason
        print(f"  {m}: NOT importable ({type(exc).__name__}: {exc})")
print("  flash_attn: skipped, not built (recorded by the suite)")
EOF
fi
stages
if (( dry )); then
  stamp "dry run: the $(wc -l < "$work/dry_commands.txt") toy commands in one process"
  python3 -m benchmarks.dry_run < "$work/dry_commands.txt" || failed=1
fi
stamp "done in $(( $(date +%s) - start ))s"
exec 1>&3 2>&4 3>&- 4>&-  # close the log (tee ends), then results.md (with the model beside the measurements on
wait "$tee_pid" 2> /dev/null || sleep 1  # CUDA) and every file rewritten without machine paths
python3 -m benchmarks.report "$work" --scrub > /dev/null || { echo "gpu_suite: report failed"; failed=$(( dry )); }
if [[ "$work" != "$dest" ]]; then  # <= 8 files: the archive of everything, the summaries, three CSVs
  tar -czf "$dest/gpu_results.tar.gz" -C "$(dirname "$work")" gpu
  for f in results.md gpu_suite.log suite.md loss.csv logprobs.csv train.csv profile.md; do
    cp "$work/$f" "$dest/" 2> /dev/null || true
  done
fi
exit "$failed"
