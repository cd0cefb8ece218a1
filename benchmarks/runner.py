"""Drive a grid benchmark: every point x every method, then TFLOP/s, ratios, plots, markdown.

Interrupted (Ctrl-C, or ``timeout --signal=INT``), it stops after the rows measured so far and still
writes every output, saying where it stopped."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks import report, work
from benchmarks.common import (
    add_common_args,
    build_grid,
    default_output,
    interpret_mode,
    read_csv,
    resolve_device,
    set_threads,
    write_csv,
)
from benchmarks.measure import gemm_peak_tflops, measure_point, one_line, run_isolated
from drdo.atomic import write_text


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


def add_work(rows: list[dict], bench_name: str, ctx: dict) -> None:
    """Fill work_nhv and work_path (:mod:`benchmarks.work`) of one method's rows at one point in place."""
    for r in rows:
        try:
            r["work_nhv"], r["work_path"] = work.nhv(bench_name, r["method"], r["mode"], ctx)
        except Exception as exc:  # noqa: BLE001 - a kernel API the model no longer matches: said in the row
            r["work_nhv"], r["work_path"] = float("nan"), f"unknown ({one_line(exc, 120)})"


def add_flops(rows: list[dict], gemm: dict[str, float]) -> None:
    """Fill tflops (the work the method does, work_nhv x N·H·V FLOPs, over its median time),
    gemm_tflops and peak_frac in place."""
    for r in rows:
        peak = gemm.get(r["dtype"], float("nan"))
        r["gemm_tflops"] = peak
        med, factor = r.get("median_ms"), r.get("work_nhv", float("nan"))
        if r.get("status") != "ok" or not isinstance(med, (int, float)) or med <= 0 or not factor > 0:
            r.setdefault("tflops", float("nan"))
            r.setdefault("peak_frac", float("nan"))
            continue
        r["tflops"] = factor * r["N"] * r["H"] * r["V"] / (med * 1e-3) / 1e12
        r["peak_frac"] = r["tflops"] / peak if peak == peak and peak > 0 else float("nan")


def earlier_rows(path: Path, meta_path: Path) -> tuple[list[dict], list[str]]:
    """(rows, commands) an earlier call left in ``path`` and its metadata (--append); none if absent."""
    if not path.exists():
        return [], []
    rows = [{k: (int(v) if k in ("N", "H", "V") else v) for k, v in r.items()} for r in read_csv(path)]
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    return rows, meta.get("commands", [meta["command"]] if "command" in meta else [])


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
    csv_path, meta_path = out_dir / f"{bench.NAME}.csv", out_dir / f"{bench.NAME}_meta.json"
    kept, commands = earlier_rows(csv_path, meta_path) if args.append else ([], [])
    remeasured = {(m, p.N, p.H, p.V, p.dtype) for m in methods for p in points}  # their earlier rows are replaced
    kept = [r for r in kept if (r["method"], int(r["N"]), int(r["H"]), int(r["V"]), r["dtype"]) not in remeasured]
    isolate = args.isolate and device == "cpu"
    started = time.time()
    if args.threads is None and args.quick and device == "cpu":
        args.threads = 1  # tiny shapes gain nothing from more threads, and a loaded machine stalls them
    set_threads(args.threads)
    gemm = {d: gemm_peak_tflops(device, d, args.quick, args.gemm_n) for d in sorted({p.dtype for p in points})}
    write_text(meta_path,
               json.dumps(_meta(bench, device, gemm, started, isolate, args, commands), indent=2, default=str))
    print(f"[{bench.NAME}] device={device} points={len(points)} methods={methods} gemm TFLOP/s={gemm}", flush=True)
    rows: list[dict] = []
    stopped = ""
    try:
        _measure_grid(bench, args, device, points, methods, isolate, rows, kept, csv_path)
    except KeyboardInterrupt:
        stopped = f"interrupted after {len(rows)} rows (time limit or Ctrl-C): the rest was not measured"
        print(f"[{bench.NAME}] {stopped}", flush=True)
    add_flops(rows, gemm)
    meta = _meta(bench, device, gemm, started, isolate, args, commands)
    if stopped:
        meta["stopped"] = stopped
    report.write_bench(kept + rows, out_dir, bench.NAME, meta, plots=args.plots)
    report.write_results_md(out_dir)
    print(f"[{bench.NAME}] wrote {out_dir} in {time.time() - started:.0f} s", flush=True)
    return out_dir


def _meta(bench, device: str, gemm: dict, started: float, isolate: bool, args, commands: list[str]) -> dict:
    """The run's metadata with the input regime and every command that wrote into the CSV."""
    meta = report.environment(device, gemm, started, isolate)
    meta.update(logits=args.logits, filter_eps=args.filter_eps, reps=args.reps, commands=commands + [meta["command"]])
    if bench.NAME == "loss":  # chosen and rejected rows
        meta["margins"] = args.margins
    return meta


def _measure_grid(bench, args, device: str, points, methods: list[str], isolate: bool, rows: list[dict],
                  kept: list[dict], csv_path: Path) -> None:
    """Measure every point x method into ``rows`` (the CSV, with ``kept`` first, rewritten after each)."""
    failed_first_call: dict[tuple[str, str], str] = {}  # (peer, dtype) -> why its first call failed
    for p in points:
        ctx = dict(device=device, N=p.N, H=p.H, V=p.V, dtype=p.dtype, modes=list(args.modes), quick=args.quick,
                   seed=args.seed, ignore_frac=args.ignore_frac, min_run_time=_min_run_time(args, device),
                   interpret=interpret_mode(), threads=args.threads, seq_len=args.seq_len, reps=args.reps,
                   logits=args.logits, margins=args.margins, filter_eps=args.filter_eps,
                   baseline=os.path.abspath(args.baseline) if args.baseline else None)
        regime = dict(logits=args.logits, filter_eps=args.filter_eps, **bench.input_stats(ctx))
        for name in methods:
            known = failed_first_call.get((name, p.dtype))
            if known:
                new = _not_retried(bench, name, ctx, known)
            else:
                new = _measure(bench, name, ctx, isolate, _timeout(args, device))
                if bench.METHODS[name].kind == "peer" and str(new[0].get("note", "")).startswith("first call raised"):
                    failed_first_call[(name, p.dtype)] = new[0]["note"]
            add_work(new, bench.NAME, ctx)
            rows += [dict(r, **regime) for r in new]
            _print_rows(new)
            write_csv(kept + rows, csv_path)  # partial results survive a time limit


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
