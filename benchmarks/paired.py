"""Paired timing: ours vs each peer, interleaved call by call in one process.

On a shared machine the load drifts during a benchmark, so two medians taken minutes apart can
differ by more than the methods do. Here every round times one fwd+bwd (or the chosen mode) of each
method back to back, in alternating order, and the statistic is the median of the per-round ratios
ours / peer — robust to drift. Memory is not measured here (the grid benchmarks do that in fresh
processes).

Use it for any gap under 5%: a median taken alone cannot separate such methods on a drifting machine, or
on a GPU whose clocks move with its temperature. The inputs follow the same --logits / --margins /
--filter-eps flags as the grid benchmarks.

Usage: python benchmarks/paired.py --bench loss --shapes 1024x128x32000 --methods ours_torch,naive,cce_torch_compile
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402  # noqa: E402
    DEFAULT_REPS,
    add_input_args,
    default_output,
    parse_shape,
    resolve_device,
    set_threads,
    write_csv,
)
from benchmarks.measure import one_line, quantile, run_backward, sync, zero_grads  # noqa: E402
from benchmarks.report import write_portable  # noqa: E402

COLUMNS = ["bench", "ours", "peer", "device", "dtype", "N", "H", "V", "mode", "rounds",
           "ratio_median", "ratio_p20", "ratio_p80", "ours_ms_median", "peer_ms_median", "note"]


def _one_call(fn, inputs, mode: str, device: str) -> float:
    """Seconds of one call of ``mode`` ("fwd" | "fwd+bwd")."""
    zero_grads(inputs)
    sync(device)
    start = time.perf_counter()
    out = fn()
    if mode == "fwd+bwd":
        run_backward(out, inputs)
    sync(device)
    return time.perf_counter() - start


def paired(bench, methods: list[str], ctx: dict, rounds: int) -> list[dict]:
    """Rows of per-round ratio statistics for methods[0] (ours) against each of methods[1:]."""
    fns, inputs, failed = {}, {}, {}
    for name in methods:
        try:  # each method gets its own (identical, seeded) inputs: compilers mark tensors dynamic
            inputs[name] = bench.make_inputs(ctx)
            fn = bench.METHODS[name].build(inputs[name], ctx)
            for _ in range(2):  # warm-up: compile, page in
                _one_call(fn, inputs[name], ctx["mode"], ctx["device"])
            fns[name] = fn
        except Exception as exc:  # noqa: BLE001 - recorded as the reason
            if name == methods[0]:
                raise
            failed[name] = f"skipped: first call raised {one_line(exc)}"
    methods = [m for m in methods if m in fns]
    times = {name: [] for name in methods}
    for r in range(rounds):
        order = methods if r % 2 == 0 else methods[::-1]
        for name in order:
            times[name].append(_one_call(fns[name], inputs[name], ctx["mode"], ctx["device"]))
    ours, rows = methods[0], []
    for peer in methods[1:]:
        ratios = sorted(a / b for a, b in zip(times[ours], times[peer]))
        rows.append(dict(bench=bench.NAME, ours=ours, peer=peer, device=ctx["device"], dtype=ctx["dtype"], N=ctx["N"],
                         H=ctx["H"], V=ctx["V"], mode=ctx["mode"], rounds=rounds,
                         ratio_median=quantile(ratios, 0.5), ratio_p20=quantile(ratios, 0.2),
                         ratio_p80=quantile(ratios, 0.8),
                         ours_ms_median=quantile(sorted(times[ours]), 0.5) * 1e3,
                         peer_ms_median=quantile(sorted(times[peer]), 0.5) * 1e3,
                         note="median of per-round ratios, calls interleaved in one process"))
    for peer, note in failed.items():
        rows.append(dict(bench=bench.NAME, ours=ours, peer=peer, device=ctx["device"], dtype=ctx["dtype"], N=ctx["N"],
                         H=ctx["H"], V=ctx["V"], mode=ctx["mode"], rounds=0, note=note))
    return rows


def _markdown(rows: list[dict], bench: str, argv: list[str], args) -> str:
    margins = f", pair margins `{args.margins}`" if bench == "loss" else ""
    lines = [f"## paired timing ({bench})", "",
             f"command: `python benchmarks/paired.py {' '.join(argv)}`; each round times one call of every method "
             "back to back (order alternating); ratio = ours / peer per round. Inputs: logits "
             f"`{args.logits}`{margins}, Triton gradient filter_eps {args.filter_eps:g}.", "",
             "| ours | peer | dtype | N | H | V | mode | rounds | ratio median [p20, p80] | ours ms | peer ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["rounds"]:
            lines.append(f"| {r['ours']} | {r['peer']} | {r['dtype']} | {r['N']} | {r['H']} | {r['V']} | {r['mode']} | "
                         f"{r['rounds']} | {r['ratio_median']:.3f} [{r['ratio_p20']:.3f}, {r['ratio_p80']:.3f}] | "
                         f"{r['ours_ms_median']:.1f} | {r['peer_ms_median']:.1f} |")
        else:
            lines.append(f"| {r['ours']} | {r['peer']} | {r['dtype']} | {r['N']} | {r['H']} | {r['V']} | {r['mode']} | "
                         f"0 | {r['note']} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", choices=["logprobs", "loss"], default="loss")
    p.add_argument("--shapes", required=True, help="comma list of NxHxV or presets[:N]")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd+bwd")
    p.add_argument("--methods", required=True, help="ours first, then the peers, e.g. ours_torch,naive")
    p.add_argument("--rounds", type=int, default=DEFAULT_REPS)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="as the grid benchmarks' --quick: no torch.compile on CPU")
    p.add_argument("--output", default=None)
    add_input_args(p)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    set_threads(args.threads)
    bench = importlib.import_module(f"benchmarks.bench_{args.bench}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if len(methods) < 2 or any(m not in bench.METHODS for m in methods):
        raise SystemExit(f"--methods needs ours then >= 1 peer from {list(bench.METHODS)}")
    rows = []
    for shape in args.shapes.split(","):
        n, h, v = parse_shape(shape, 1024)
        ctx = dict(device=device, N=n, H=h, V=v, dtype=args.dtype, mode=args.mode, seed=args.seed, ignore_frac=0.0,
                   quick=args.quick, seq_len=args.seq_len, interpret=False, logits=args.logits, margins=args.margins,
                   filter_eps=args.filter_eps)
        skipped = {m: bench.METHODS[m].skip(ctx) for m in methods}
        runnable = [m for m in methods if not skipped[m]]
        if methods[0] not in runnable or len(runnable) < 2:
            raise SystemExit(f"cannot pair at {shape}: {skipped}")
        rows += paired(bench, runnable, ctx, args.rounds)
        rows += [dict(bench=bench.NAME, ours=methods[0], peer=m, device=device, dtype=args.dtype, N=n, H=h, V=v,
                      mode=args.mode, rounds=0, note=f"skipped: {skipped[m]}") for m in methods if skipped[m]]
        for r in rows:
            if r["N"] == n and r["H"] == h and r["V"] == v:
                print(f"  {r['ours']} / {r['peer']} {r['dtype']} {n}x{h}x{v} {r['mode']}: "
                      + (f"{r['ratio_median']:.3f} [{r['ratio_p20']:.3f}, {r['ratio_p80']:.3f}]" if r["rounds"]
                         else r["note"]), flush=True)
    out_dir = Path(args.output) if args.output else default_output(device)
    path = write_csv(rows, out_dir / f"paired_{args.bench}.csv", COLUMNS)
    command = sys.argv[1:] if argv is None else argv
    write_portable(out_dir / f"paired_{args.bench}.md", _markdown(rows, args.bench, command, args))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
