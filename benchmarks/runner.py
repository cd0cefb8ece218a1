"""Drive a grid benchmark: every point x every method, then TFLOP/s, ratios, plots, markdown."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchmarks import report
from benchmarks.common import add_common_args, build_grid, default_output, interpret_mode, resolve_device, set_threads
from benchmarks.common import write_csv
from benchmarks.measure import FLOP_FACTOR, gemm_peak_tflops, measure_point, run_isolated


def _min_run_time(args, device: str) -> float:
    if args.min_run_time is not None:
        return args.min_run_time
    if device == "cuda":
        return 0.1 if args.quick else 0.2
    return 0.1 if args.quick else 0.5


def _timeout(args, device: str) -> float:
    if args.timeout is not None:
        return args.timeout
    return 180.0 if args.quick else 900.0


def add_flops(rows: list[dict], gemm: dict[str, float]) -> None:
    """Fill tflops (nominal FLOPs / median time), gemm_tflops and peak_frac in place."""
    for r in rows:
        peak = gemm.get(r["dtype"], float("nan"))
        r["gemm_tflops"] = peak
        med = r.get("median_ms")
        if r.get("status") != "ok" or not isinstance(med, (int, float)) or med <= 0:
            r.setdefault("tflops", float("nan"))
            r.setdefault("peak_frac", float("nan"))
            continue
        flops = FLOP_FACTOR[r["mode"]] * r["N"] * r["H"] * r["V"]
        r["tflops"] = flops / (med * 1e-3) / 1e12
        r["peak_frac"] = r["tflops"] / peak if peak == peak and peak > 0 else float("nan")


def run_grid(bench, argv: list[str] | None, description: str, default_modes: tuple[str, ...]) -> Path:
    """Parse argv, measure the grid of module ``bench``, write its outputs; returns the output dir."""
    parser = argparse.ArgumentParser(description=description)
    add_common_args(parser, default_modes)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    points = build_grid(args, device)
    methods = args.methods or list(bench.METHODS)
    unknown = [m for m in methods if m not in bench.METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(bench.METHODS)}")
    out_dir = Path(args.output) if args.output else default_output(device)
    isolate = args.isolate and device == "cpu"
    started = time.time()
    if args.threads is None and args.quick and device == "cpu":
        args.threads = 1  # tiny shapes gain nothing from more threads, and a loaded machine stalls them
    set_threads(args.threads)
    gemm = {d: gemm_peak_tflops(device, d, args.quick, args.gemm_n) for d in sorted({p.dtype for p in points})}
    print(f"[{bench.NAME}] device={device} points={len(points)} methods={methods} gemm TFLOP/s={gemm}", flush=True)
    rows: list[dict] = []
    failed_first_call: dict[tuple[str, str], str] = {}  # (peer, dtype) -> why its first call failed
    for p in points:
        for name in methods:
            ctx = dict(device=device, N=p.N, H=p.H, V=p.V, dtype=p.dtype, modes=list(args.modes), quick=args.quick,
                       seed=args.seed, ignore_frac=args.ignore_frac, min_run_time=_min_run_time(args, device),
                       interpret=interpret_mode(), threads=args.threads, seq_len=args.seq_len,
                       baseline=os.path.abspath(args.baseline) if args.baseline else None)
            known = failed_first_call.get((name, p.dtype))
            if known:
                new = _not_retried(bench, name, ctx, known)
            else:
                new = _measure(bench, name, ctx, isolate, _timeout(args, device))
                if bench.METHODS[name].kind == "peer" and str(new[0].get("note", "")).startswith("first call raised"):
                    failed_first_call[(name, p.dtype)] = new[0]["note"]
            rows += new
            _print_rows(new)
            write_csv(rows, out_dir / f"{bench.NAME}.csv")  # partial results survive a time limit
    add_flops(rows, gemm)
    meta = report.environment(device, gemm, started, isolate)
    report.write_bench(rows, out_dir, bench.NAME, meta, plots=args.plots)
    report.write_results_md(out_dir)
    print(f"[{bench.NAME}] wrote {out_dir} in {time.time() - started:.0f} s", flush=True)
    return out_dir


def _measure(bench, name: str, ctx: dict, isolate: bool, timeout: float) -> list[dict]:
    method = bench.METHODS[name]
    reason = method.skip(ctx)
    if reason or not (isolate or method.baseline):  # the baseline's kernels need a process of their own
        return measure_point(bench, name, ctx)
    rows, failure = run_isolated("benchmarks.measure:measure_point_payload",
                                 {"bench": bench.__name__, "method": name, "ctx": ctx}, timeout)
    if rows is not None:
        return rows
    status = "oom" if failure.startswith("oom") else "error"
    return [dict(bench=bench.NAME, method=name, device=ctx["device"], dtype=ctx["dtype"], N=ctx["N"], H=ctx["H"],
                 V=ctx["V"], mode=m, status=status, note=failure) for m in ctx["modes"]]


def _not_retried(bench, name: str, ctx: dict, note: str) -> list[dict]:
    """A peer whose first call failed at an earlier point of the same dtype is not retried (each try costs a
    fresh process); the row repeats the verbatim reason and says so."""
    return [dict(bench=bench.NAME, method=name, device=ctx["device"], dtype=ctx["dtype"], N=ctx["N"], H=ctx["H"],
                 V=ctx["V"], mode=m, status="skipped", note=f"{note} (at an earlier shape; not retried)")
            for m in ctx["modes"]]


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        if r.get("status") == "ok":
            print(f"  {r['method']:<18} {r['dtype']} N={r['N']} H={r['H']} V={r['V']} {r['mode']:<8} "
                  f"{r['median_ms']:9.2f} ms {r['peak_mem_mb']:9.1f} MB", flush=True)
        else:
            print(f"  {r['method']:<18} {r['dtype']} N={r['N']} H={r['H']} V={r['V']} {r['mode']:<8} "
                  f"{r['status']}: {str(r.get('note', ''))[:120]}", flush=True)
