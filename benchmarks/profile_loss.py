"""Profile: where the time of our DRDO loss forward+backward goes, kernel by kernel (torch.profiler).

For every shape and backend (``FusedLinearDRDOLoss``, the inputs of ``bench_loss``), one warm-up step
and then --steps profiled steps; the top --top kernels by device time (CUDA kernels on a GPU, operators'
own CPU time on a CPU), each with its calls and time per step and its share of the step's total, and the
number of kernel launches per step. Writes profile.csv (every kernel) and profile.md (the top ones).

Usage: python benchmarks/profile_loss.py --device cuda --shapes 16384x1024x128256,16384x4096x128256
       [--backends chunked,triton] [--dtype bf16] [--steps 3] [--top 12] [--output DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_loss, peers  # noqa: E402
from benchmarks.common import (  # noqa: E402  # noqa: E402
    add_input_args,
    default_output,
    interpret_mode,
    parse_shape,
    resolve_device,
    set_threads,
    write_csv,
)
from benchmarks.measure import one_line, run_backward, sync, zero_grads  # noqa: E402
from benchmarks.report import write_portable  # noqa: E402

COLUMNS = ["backend", "device", "dtype", "N", "H", "V", "kernel", "calls_per_step", "ms_per_step", "share",
           "launches_per_step", "steps", "status", "note"]


def _events(prof, device: str) -> list:
    """The profiler's per-kernel averages: CUDA kernels on a GPU, operators (own CPU time) on a CPU."""
    from torch.autograd import DeviceType

    rows = prof.key_averages()
    if device == "cuda":
        return [e for e in rows if e.device_type == DeviceType.CUDA]
    return [e for e in rows if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0]


def _time_us(event, device: str) -> float:
    return event.self_device_time_total if device == "cuda" else event.self_cpu_time_total


def profile_one(ctx: dict, backend: str, steps: int) -> list[dict]:
    """Rows, one per kernel (largest first), of ``steps`` profiled fwd+bwd steps of ours_<backend> at ctx."""
    from torch.profiler import ProfilerActivity, profile

    base = dict(backend=backend, device=ctx["device"], dtype=ctx["dtype"], N=ctx["N"], H=ctx["H"], V=ctx["V"],
                steps=steps)
    reason = peers.ours_reason(ctx, backend)
    if reason:
        return [dict(base, status="skipped", note=reason)]
    inputs = bench_loss.make_inputs(ctx)
    fn = bench_loss.METHODS[f"ours_{backend}"].build(inputs, ctx)

    def step():
        zero_grads(inputs)
        run_backward(fn(), inputs)

    step()  # warm-up: compiles, allocates
    sync(ctx["device"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx["device"] == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(ctx["device"])
    events = sorted(_events(prof, ctx["device"]), key=lambda e: _time_us(e, ctx["device"]), reverse=True)
    total = sum(_time_us(e, ctx["device"]) for e in events) or 1.0
    launches = sum(e.count for e in events) / steps
    return [dict(base, kernel=e.key, calls_per_step=e.count / steps,
                 ms_per_step=_time_us(e, ctx["device"]) / 1e3 / steps, share=_time_us(e, ctx["device"]) / total,
                 launches_per_step=launches, status="ok", note="")
            for e in events]


def markdown(rows: list[dict], top: int, command: str) -> str:
    """The top ``top`` kernels of every (backend, shape), with the step's total and launch count."""
    lines = ["## profile: DRDO loss forward + backward, kernel by kernel", "",
             f"command: `{command}`; torch.profiler, time per step (device time of CUDA kernels on a GPU, operators' "
             "own CPU time on a CPU).", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backend"], r["dtype"], r["N"], r["H"], r["V"]), []).append(r)
    for (backend, dtype, n, h, v), group in groups.items():
        if group[0]["status"] != "ok":
            lines += [f"**{backend}** {dtype} {n}x{h}x{v}: {group[0]['status']}: {group[0]['note']}", ""]
            continue
        total = sum(r["ms_per_step"] for r in group)
        calls = "kernel launches" if group[0]["device"] == "cuda" else "operator calls"
        lines += [f"**{backend}** {dtype} N={n} H={h} V={v}: {total:.2f} ms per step in "
                  f"{group[0]['launches_per_step']:.0f} {calls}", "", "| kernel | calls / step | ms / step | share |",
                  "|---|---|---|---|"]
        lines += [f"| `{r['kernel'][:90]}` | {r['calls_per_step']:g} | {r['ms_per_step']:.3f} | {r['share']:.1%} |"
                  for r in group[:top]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--shapes", default="16384x1024x128256,16384x4096x128256", help="comma list of NxHxV")
    p.add_argument("--backends", default="chunked,triton")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 1024 on CUDA, 256 on CPU)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None)
    add_input_args(p)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    set_threads(args.threads)
    out_dir = Path(args.output) if args.output else default_output(device)
    rows: list[dict] = []
    for shape in args.shapes.split(","):
        n, h, v = parse_shape(shape, 1024)
        ctx = dict(device=device, N=n, H=h, V=v, dtype=args.dtype, seed=args.seed, ignore_frac=0.0,
                   seq_len=args.seq_len, interpret=interpret_mode(), logits=args.logits, margins=args.margins)
        for backend in args.backends.split(","):
            try:
                new = profile_one(ctx, backend, args.steps)
            except Exception as exc:  # noqa: BLE001 - recorded, and the other backends still run
                new = [dict(backend=backend, device=device, dtype=args.dtype, N=n, H=h, V=v, steps=args.steps,
                            status="error", note=one_line(exc))]
            rows += new
            ok = [r for r in new if r["status"] == "ok"]
            print(f"  {backend:<8} {args.dtype} {n}x{h}x{v}: " + (
                f"{sum(r['ms_per_step'] for r in ok):.2f} ms/step, {ok[0]['launches_per_step']:.0f} launches; top: "
                f"{ok[0]['kernel'][:60]} {ok[0]['share']:.0%}"
                if ok else f"{new[0]['status']}: {new[0]['note'][:120]}"),
                flush=True)
            write_csv(rows, out_dir / "profile.csv", COLUMNS)
    command = " ".join(["benchmarks/profile_loss.py"] + (sys.argv[1:] if argv is None else list(argv)))
    write_portable(out_dir / "profile.md", markdown(rows, args.top, command))
    print(f"[profile] wrote {out_dir / 'profile.md'}", flush=True)
    return out_dir


if __name__ == "__main__":
    main()
