"""Benchmark: one DRDO training step of a small Hugging Face causal LM, fused head vs full logits.

The model is a LlamaForCausalLM built locally (drdo.models.build_tiny_causal_lm: no download) with a
large vocabulary so that the LM head matters; every method starts from a copy of the same weights. A
step = backbone forward, reward head on the last token, DRDO loss, backward, AdamW step; the batch is
B pairs (2B rows) of T tokens, the second half of each row is the response. --H takes a list (one
model per hidden size, --heads or H / head dim heads). Methods (names of benchmarks.methods.REGISTRY):
  ours_auto / ours_chunked  drdo_kernels.FusedLinearDRDOLoss on the last hidden state (no logits), backend
  ours_triton / ours_torch  "auto" (the default users get), "chunked", "triton", "torch"
  naive                     lm_head -> logits [2B, T, V] -> drdo.losses.sequence_logprobs -> drdo_loss
  cce                       Cut Cross-Entropy per-token NLL on the flattened [2B*T, H] hidden states -> drdo_loss
                            ("cce" on CUDA, "torch_compile" on CPU)
  liger_dpo                 Liger-Kernel LigerFusedLinearDPOLoss(use_ref_model=False) (a DPO loss: the head work
                            TRL's use_liger_kernel=True path does)
  trl_dpo_fused             TRL's DPOTrainer as it ships (its fused LM head), a DPO loss (benchmarks/trl_train.py)
  trl_dpo                   the same trainer with full logits instead of the fused head
  trl_dpo_liger             the trainer with use_liger_kernel=True (Triton only)
Outputs: train.csv (tokens/s, peak memory; rewritten after every method, so a time limit keeps what was
measured), train_max_batch.csv (largest B whose step fits --mem-budget-mb).

Usage: python benchmarks/bench_train.py --quick --device cpu --output DIR
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers, report, trl_train  # noqa: E402
from benchmarks.common import (  # noqa: E402  # noqa: E402
    DEFAULT_REPS,
    default_output,
    interpret_mode,
    read_csv,
    resolve_device,
    set_threads,
    torch_dtype,
    write_csv,
)
from benchmarks.heads import IGNORE_INDEX  # noqa: E402
from benchmarks.measure import PeakMemory, bench_times, run_isolated, sync  # noqa: E402
from benchmarks.methods import names  # noqa: E402
from benchmarks.runner import earlier_rows  # noqa: E402

NAME = "train"
#: The methods of the registry (benchmarks.methods) that run here: ours_auto first, then the rest in its order.
METHODS = ["ours_auto", *(name for name in names(NAME) if name != "ours_auto")]
DEFAULTS = {  # per device: model, batch and memory budget
    "cpu": dict(dtype="fp32", V=32000, H=[256], layers=2, head_dim=64, T=128, B=2, budget=768.0, max_batch=16),
    "cuda": dict(dtype="bf16", V=128256, H=[2048], layers=2, head_dim=128, T=1024, B=8, budget=16384.0,
                 max_batch=256),
}
QUICK = {
    "cpu": dict(V=8000, H=[64], T=64, B=2, budget=256.0, max_batch=8),
    "cuda": dict(B=4, max_batch=64),
}
MAX_BATCH_COLUMNS = ["bench", "method", "device", "dtype", "H", "V", "seq_len", "mem_budget_mb", "max_batch_pairs",
                     "peak_mem_mb_at_max", "next_batch_pairs", "next_peak_mem_mb", "status", "note"]


def skip_reason(method: str, ctx: dict) -> str | None:
    """Why ``method`` cannot run here, or None."""
    if method.startswith("ours_"):
        return peers.ours_reason(ctx, method[len("ours_"):])
    if method == "cce":
        return peers.import_reason("cut_cross_entropy", "cut-cross-entropy") or (
            peers.compile_reason(ctx) if ctx["device"] == "cpu" else None)
    if method == "liger_dpo":
        return peers.import_reason("liger_kernel.chunked_loss", "liger-kernel")
    if method in trl_train.METHODS:
        return trl_train.skip_reason(method, ctx)
    return None


# ---------------------------------------------------------------- the step
_MODELS: dict = {}  # the untrained model of one configuration per process: every method copies it


def _model(ctx: dict):
    """(LlamaForCausalLM, reward head nn.Linear(H, 1)) on ctx's device and dtype: a copy of the model built
    once per configuration and process, so that every method (and every batch-size probe) starts from the
    same weights, and a trainer that patches its model patches a copy."""
    key = tuple(ctx[k] for k in ("V", "H", "layers", "heads", "seed", "device", "dtype"))
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = _build_model(ctx)
    return copy.deepcopy(_MODELS[key])


def _build_model(ctx: dict):
    import torch

    from drdo.models import build_tiny_causal_lm

    lm = build_tiny_causal_lm(vocab_size=ctx["V"], hidden_size=ctx["H"], num_layers=ctx["layers"],
                              num_heads=ctx["heads"], seed=ctx["seed"])
    head = torch.nn.Linear(ctx["H"], 1)
    dtype = torch_dtype(ctx["dtype"])
    return lm.to(ctx["device"], dtype), head.to(ctx["device"], dtype)


def _batch(ctx: dict, pairs: int):
    """input_ids [2B, T], aligned labels [2B, T] (prompt half and last column ignored), oracle rewards [2B]."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(ctx["seed"] + pairs)
    rows, t = 2 * pairs, ctx["T"]
    ids = torch.randint(0, ctx["V"], (rows, t), generator=gen)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, t // 2: t - 1] = ids[:, t // 2 + 1:]
    oracle = torch.randn(rows, generator=gen)
    dev = ctx["device"]
    return ids.to(dev), labels.to(dev), oracle.to(dev)


def _loss_fn(method: str, ctx: dict, lm, head):
    """(hidden [2B,T,H], labels, oracle, policy_rewards [2B]) -> scalar loss for ``method``."""
    from drdo.losses import drdo_loss, sequence_logprobs

    def drdo_from(logps, oracle, rewards):
        b = logps.shape[0] // 2
        return drdo_loss(logps[:b], logps[b:], rewards[:b], rewards[b:], oracle[:b], oracle[b:])[0]

    if method.startswith("ours_"):
        from drdo_kernels import FusedLinearDRDOLoss

        fused = FusedLinearDRDOLoss(backend=method[len("ours_"):], ignore_index=IGNORE_INDEX)
        return lambda h, y, o, r: fused(lm.lm_head.weight, h, y, o, r)[0]
    if method == "naive":
        return lambda h, y, o, r: drdo_from(sequence_logprobs(lm.lm_head(h), y, IGNORE_INDEX)[0], o, r)
    if method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if ctx["device"] == "cuda" else "torch_compile"

        def cce(h, y, o, r):  # 2-D hidden states: CCE views its input flat, which a strided 3-D one refuses
            nll = linear_cross_entropy(h.reshape(-1, h.shape[-1]), lm.lm_head.weight, y.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="none", impl=impl)
            return drdo_from(-nll.float().reshape(y.shape).sum(-1), o, r)

        return cce
    if method == "liger_dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, use_ref_model=False,
                                        compiled=not (ctx["device"] == "cpu" and ctx.get("quick")))
        return lambda h, y, o, r: liger(lm.lm_head.weight, h, y)[0] + 0.0 * r.sum()
    raise ValueError(f"unknown method {method!r}")


def _make_step(method: str, ctx: dict, pairs: int):
    """A zero-argument training step and the bytes it keeps resident (parameters, optimizer state, batch)."""
    import torch

    if method in trl_train.METHODS:
        step, resident = trl_train.make_trl_step(method, ctx, _model(ctx)[0], pairs)
        sync(ctx["device"])
        return step, resident
    lm, head = _model(ctx)
    params = list(lm.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids, labels, oracle = _batch(ctx, pairs)
    loss_fn = _loss_fn(method, ctx, lm, head)
    mask = torch.ones_like(ids)

    def step():
        opt.zero_grad(set_to_none=True)
        hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rewards = head(hidden[:, -1]).squeeze(-1).float()
        loss_fn(hidden, labels, oracle, rewards).backward()
        opt.step()

    step()  # warm-up: optimizer state, compile, autotune
    sync(ctx["device"])
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    resident = sum(t.numel() * t.element_size() for t in params + state + [ids, labels, oracle, mask])
    return step, resident


def _peak_of(step, resident: int, device: str) -> float:
    mem = PeakMemory(device, resident)
    mem.begin()
    mem.reset()
    step()
    return mem.peak_mb()


def measure_payload(ctx: dict) -> list[dict]:
    """Worker: ctx["what"] == "step" -> one row with time and memory; "probe" -> one row with memory only."""
    import torch

    set_threads(ctx.get("threads"))
    gc.collect()
    if ctx["device"] == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(ctx["seed"])
    pairs = ctx["pairs"]
    row = dict(bench=NAME, method=ctx["method"], device=ctx["device"], dtype=ctx["dtype"], N=2 * pairs * ctx["T"],
               H=ctx["H"], V=ctx["V"], mode="train_step", batch_pairs=pairs, seq_len=ctx["T"], status="ok", note="")
    try:
        step, resident = _make_step(ctx["method"], ctx, pairs)
        row["peak_mem_mb"] = _peak_of(step, resident, ctx["device"])
        if ctx["what"] == "step":
            med, p20, p80, n = bench_times(step, ctx["device"], ctx["min_run_time"], ctx.get("reps", DEFAULT_REPS))
            row.update(median_ms=med, p20_ms=p20, p80_ms=p80, n_samples=n,
                       tokens_per_s=row["N"] / (med * 1e-3))
    except Exception as exc:  # noqa: BLE001 - recorded, never hidden
        oom = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
        row.update(status="oom" if oom else "error", note=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    return [row]


# ---------------------------------------------------------------- driver
def _run(ctx: dict, isolate: bool, timeout: float) -> dict:
    if not isolate:
        return measure_payload(ctx)[0]
    rows, failure = run_isolated("benchmarks.bench_train:measure_payload", ctx, timeout)
    if rows is not None:
        return rows[0]
    return dict(bench=NAME, method=ctx["method"], device=ctx["device"], dtype=ctx["dtype"],
                N=2 * ctx["pairs"] * ctx["T"],
                H=ctx["H"], V=ctx["V"], mode="train_step", batch_pairs=ctx["pairs"], seq_len=ctx["T"],
                status="oom" if failure.startswith("oom") else "error", note=failure)


def max_batch(ctx: dict, budget_mb: float, limit: int, isolate: bool, timeout: float) -> dict:
    """Largest B in 1, 2, 4, ... <= limit whose step's peak memory stays within budget_mb."""
    best, best_peak, nxt, nxt_peak, note, pairs = 0, float("nan"), "", "", "", 1
    while pairs <= limit:
        r = _run(dict(ctx, what="probe", pairs=pairs), isolate, timeout)
        if r["status"] == "oom" or (r["status"] == "ok" and r["peak_mem_mb"] > budget_mb):
            nxt, nxt_peak = pairs, r.get("peak_mem_mb", "")
            note = r.get("note", "") or f"B={pairs} needs {r['peak_mem_mb']:.0f} MB"
            break
        if r["status"] != "ok":
            note = r.get("note", "")
            break
        best, best_peak, pairs = pairs, r["peak_mem_mb"], pairs * 2
    else:
        note = f"every B up to --max-batch {limit} fits"
    status = "ok" if best else ("oom" if nxt else "error")
    return dict(bench=NAME, method=ctx["method"], device=ctx["device"], dtype=ctx["dtype"], H=ctx["H"], V=ctx["V"],
                seq_len=ctx["T"], mem_budget_mb=budget_mb, max_batch_pairs=best, peak_mem_mb_at_max=best_peak,
                next_batch_pairs=nxt, next_peak_mem_mb=nxt_peak, status=status, note=note)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--output", default=None)
    p.add_argument("--methods", default=None, help=f"comma list from {METHODS}")
    p.add_argument("--H", type=_int_list, default=None, help="hidden sizes, comma list (one model each, in order)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: H / 64 on CPU, H / 128 on CUDA)")
    for flag, kind in (("dtype", str), ("V", int), ("layers", int), ("T", int),
                       ("B", int), ("mem-budget-mb", float), ("max-batch", int)):
        p.add_argument(f"--{flag}", type=kind, default=None)
    p.add_argument("--no-max-batch", dest="find_max_batch", action="store_false",
                   help="skip the search for the largest batch within --mem-budget-mb")
    p.add_argument("--min-run-time", type=float, default=None)
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help="timed steps per method, at least")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--no-isolate", dest="isolate", action="store_false")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --output's train CSVs (an earlier call) and add these")
    return p.parse_args(argv)


def _spec(args, device: str) -> dict:
    """The model, batch and memory budget: the device's defaults, then --quick, then the flags."""
    spec = dict(DEFAULTS[device], **(QUICK[device] if args.quick else {}))
    for key, flag in (("dtype", "dtype"), ("V", "V"), ("H", "H"), ("layers", "layers"), ("T", "T"), ("B", "B"),
                      ("budget", "mem_budget_mb"), ("max_batch", "max_batch")):
        if getattr(args, flag) is not None:
            spec[key] = getattr(args, flag)
    return spec


def _skipped(ctx: dict, spec: dict, reason: str) -> tuple[dict, dict]:
    """The step row and the max-batch row of a method that cannot run, with the reason."""
    where = dict(bench=NAME, method=ctx["method"], device=ctx["device"], dtype=ctx["dtype"], H=ctx["H"], V=ctx["V"],
                 seq_len=ctx["T"], status="skipped", note=reason)
    return (dict(where, N=2 * spec["B"] * ctx["T"], mode="train_step", batch_pairs=spec["B"]),
            dict(where, mem_budget_mb=spec["budget"]))


def _measure_method(ctx: dict, spec: dict, args, isolate: bool, timeout: float) -> tuple[dict, dict | None]:
    """(step row, max-batch row or None) of one method at one hidden size."""
    reason = skip_reason(ctx["method"], ctx)
    if reason:
        print(f"  {ctx['method']:<14} H={ctx['H']} skipped: {reason[:120]}", flush=True)
        return _skipped(ctx, spec, reason)
    r = _run(dict(ctx, what="step", pairs=spec["B"]), isolate, timeout)
    if ctx["device"] == "cpu" and not isolate:
        r["note"] = "; ".join(x for x in (r.get("note", ""), "measured in-process: peak RSS may include heap "
                                          "left by earlier methods") if x)
    print(f"  {ctx['method']:<14} H={ctx['H']} {r['status']} {r.get('median_ms', '')} ms {r.get('peak_mem_mb', '')} MB "
          f"{r.get('tokens_per_s', '')} tok/s {str(r.get('note', ''))[:100]}", flush=True)
    if not args.find_max_batch:
        return r, None
    if ctx["device"] == "cpu" and not isolate:
        return r, _skipped(ctx, spec, "the largest-batch search needs a fresh process per probe for a true peak RSS "
                                      "(--quick and --no-isolate measure in-process); run without them")[1]
    found = max_batch(ctx, spec["budget"], spec["max_batch"], isolate, timeout)
    print(f"  {ctx['method']:<14} max batch in {spec['budget']} MB: "
          f"{found.get('max_batch_pairs', found['status'])} pairs", flush=True)
    return r, found


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    device = resolve_device(args.device)
    spec = _spec(args, device)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    out_dir = Path(args.output) if args.output else default_output(device)
    # --quick on CPU measures in this process: a fresh process per method costs ~10 s of imports here
    isolate = args.isolate and device == "cpu" and not args.quick
    timeout = args.timeout or (180.0 if args.quick else 900.0)
    min_run_time = args.min_run_time if args.min_run_time is not None else (
        (0.1 if args.quick else 0.5) if device == "cpu" else 0.3)
    started = time.time()
    if args.threads is None and args.quick and device == "cpu":
        args.threads = 1  # as in the grid benchmarks: steadier on a loaded machine
    set_threads(args.threads)
    csv_path, batch_path = out_dir / f"{NAME}.csv", out_dir / "train_max_batch.csv"
    kept, commands = earlier_rows(csv_path, out_dir / f"{NAME}_meta.json") if args.append else ([], [])
    kept_batch = read_csv(batch_path) if args.append and batch_path.exists() else []
    meta = report.environment(device, {}, started, isolate)
    meta.update(model={k: spec[k] for k in ("dtype", "V", "H", "layers", "T", "B")}, reps=args.reps,
                commands=commands + [meta["command"]])
    rows, batch_rows = [], []
    try:
        for h in spec["H"]:
            for method in methods:
                ctx = dict(method=method, device=device, dtype=spec["dtype"], V=spec["V"], H=h, layers=spec["layers"],
                           heads=args.heads or max(1, h // spec["head_dim"]), T=spec["T"], seed=args.seed,
                           quick=args.quick, threads=args.threads, min_run_time=min_run_time, reps=args.reps,
                           interpret=interpret_mode())
                step_row, batch_row = _measure_method(ctx, spec, args, isolate, timeout)
                rows.append(step_row)
                batch_rows += [batch_row] if batch_row else []
                write_csv(kept + rows, csv_path)  # partial results survive a time limit
    except KeyboardInterrupt:
        meta["stopped"] = f"interrupted after {len(rows)} rows (time limit or Ctrl-C): the rest was not measured"
        print(f"[{NAME}] {meta['stopped']}", flush=True)
    report.write_bench(kept + rows, out_dir, NAME, meta, plots=False)
    if batch_rows or kept_batch:
        write_csv(kept_batch + batch_rows, batch_path, MAX_BATCH_COLUMNS)
    _append_train_md(out_dir, kept + rows, kept_batch + batch_rows)
    report.write_results_md(out_dir)
    print(f"[{NAME}] wrote {out_dir} in {time.time() - started:.0f} s", flush=True)
    return out_dir


def _append_train_md(out_dir: Path, rows: list[dict], batch_rows: list[dict]) -> None:
    """Add the throughput and largest-batch tables to <out_dir>/train.md (rows read back from a CSV hold text)."""
    num = report.num
    lines = ["", "Throughput of one training step (same batch and starting weights for every method):", "",
             "| method | H | B pairs | T | tokens/s | median ms | n | peak MB | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") == "ok":
            lines.append(f"| {r['method']} | {r['H']} | {r['batch_pairs']} | {r['seq_len']} | "
                         f"{num(r['tokens_per_s']):.0f} | "
                         f"{num(r['median_ms']):.1f} | {r['n_samples']} | {num(r['peak_mem_mb']):.0f} | ok |")
    lines += ["", "Largest batch (pairs of T tokens) whose training step fits the memory budget:", "",
              "| method | H | budget MB | max B | peak MB at max B | status | note |", "|---|---|---|---|---|---|---|"]
    for r in batch_rows:
        peak = num(r.get("peak_mem_mb_at_max", ""))
        lines.append(f"| {r['method']} | {r['H']} | {num(r['mem_budget_mb']):.0f} | {r.get('max_batch_pairs', '')} | "
                     f"{'' if peak != peak else f'{peak:.0f}'} | {r['status']} | {str(r.get('note', ''))[:160]} |")
    path = out_dir / f"{NAME}.md"
    report.write_portable(path, path.read_text(encoding="utf-8") + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
