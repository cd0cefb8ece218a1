"""Timing and peak memory of one benchmark point, optionally in a fresh subprocess.

Timing: at least ``reps`` timed calls (20 by default). On CUDA each call is bracketed by CUDA events
after the L2 cache is flushed (as ``triton.testing.do_bench`` does); on CPU
``torch.utils.benchmark.Timer.blocked_autorange`` (with all of torch's threads), topped up with
single calls. Peak memory: ``torch.cuda.max_memory_allocated``
after a reset on CUDA; on CPU the resident-set high-water mark (VmHWM) of this
process, reset through /proc/self/clear_refs, minus the resident set before the
step, plus the bytes of the inputs (so both devices count inputs + everything the
step allocates). On CPU each method and shape runs in a fresh process by default
so that memory an earlier method left in the heap does not count.

A grid benchmark module (bench_logprobs, bench_loss) provides:
  NAME: str, METHODS: dict[str, Method], make_inputs(ctx) -> Inputs,
  reference(inputs, ctx, method) -> float32 tensor the method's output should equal,
  input_stats(ctx) -> dict of what the inputs at ctx look like (written into every row of the point).
"""
from __future__ import annotations

import ctypes
import importlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from benchmarks.common import DEFAULT_REPS, ROOT, set_threads

__all__ = ["Inputs", "Method", "PeakMemory", "sync", "bench_times", "quantile", "gemm_peak_tflops", "zero_grads",
           "run_backward", "one_line", "measure_point", "run_isolated", "use_kernels_from", "measure_point_payload"]

OURS_PREFIX = "ours_"
ROWS_TAG = "@@ROWS@@"
L2_FLUSH_BYTES = 256 * 2**20  # more than any GPU's L2


@dataclass
class Inputs:
    """Tensors of one point. ``grad`` are the leaves whose gradients the step computes;
    ``upstream`` is the gradient fed to the output's backward (None for a scalar output)."""

    tensors: dict
    grad: list
    upstream: object = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if hasattr(t, "numel"))


@dataclass
class Method:
    """One competitor. ``build(inputs, ctx)`` returns a zero-argument callable that runs the
    forward and returns the output tensor; ``skip(ctx)`` returns a reason not to run, or None.
    kind: "ours" | "base" (an older checkout's kernels) | "naive" | "peer" (a peer's failure on its first call
    is recorded as skipped)."""

    name: str
    kind: str
    build: Callable
    skip: Callable = field(default=lambda ctx: None)
    reference: Callable | None = None  # overrides the bench's reference (a different loss)
    note: str = ""
    baseline: bool = False  # runs the kernels of the --baseline checkout, always in a fresh process


# ---------------------------------------------------------------- device helpers
def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise OSError(f"{key} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """begin() before the measured work, reset() where the peak window opens, peak_mb() after."""

    def __init__(self, device: str, input_bytes: int):
        self.device, self.input_bytes, self.base = device, input_bytes, 0.0

    def begin(self) -> None:
        import torch

        sync(self.device)
        if self.device == "cuda":
            torch.cuda.empty_cache()
        else:
            _malloc_trim()
            self.base = _proc_status_mb("VmRSS")

    def reset(self) -> None:
        import torch

        sync(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif not _reset_hwm():
            raise OSError("cannot reset the peak RSS (/proc/self/clear_refs not writable)")

    def peak_mb(self) -> float:
        import torch

        sync(self.device)
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return self.input_bytes / 2**20 + max(0.0, _proc_status_mb("VmHWM") - self.base)


def bench_times(step: Callable, device: str, min_run_time: float,
                reps: int = DEFAULT_REPS) -> tuple[float, float, float, int]:
    """(median_ms, p20_ms, p80_ms, n_samples) of step(): at least ``reps`` timed calls and at least
    ``min_run_time`` seconds of them."""
    times = sorted(_cuda_times(step, min_run_time, reps) if device == "cuda" else _cpu_times(step, min_run_time, reps))
    return quantile(times, 0.5), quantile(times, 0.2), quantile(times, 0.8), len(times)


def _cuda_times(step: Callable, min_run_time: float, reps: int) -> list[float]:
    """Milliseconds of each timed call, from CUDA events, the L2 cache flushed before every call."""
    import torch

    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    step()  # warm-up, then one call to size the run
    torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    torch.cuda.synchronize()
    n = max(reps, math.ceil(min_run_time / max(time.perf_counter() - started, 1e-6)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for begin, end in events:
        flush.zero_()
        begin.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) for begin, end in events]


def _cpu_times(step: Callable, min_run_time: float, reps: int) -> list[float]:
    """Milliseconds per call of each block of ``blocked_autorange``, topped up with single calls."""
    import torch
    from torch.utils.benchmark import Timer

    timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    times = [t * 1e3 for t in timer.blocked_autorange(min_run_time=min_run_time).times]
    while len(times) < reps:  # a slow call gives one block: add single calls for a spread
        times += [t * 1e3 for t in timer.timeit(1).times]
    return times


def quantile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ascending ``sorted_values``, interpolated linearly between neighbours."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def gemm_peak_tflops(device: str, dtype: str, quick: bool, n: int | None = None) -> float:
    """Measured dense matmul throughput (TFLOP/s) of this machine in ``dtype``: the roofline."""
    import torch

    from benchmarks.common import torch_dtype

    n = n or ((4096 if quick else 8192) if device == "cuda" else (1024 if quick else 2048))
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch_dtype(dtype), generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch_dtype(dtype), generator=gen)
    (a @ b).sum().item()
    med, _, _, _ = bench_times(lambda: a @ b, device, 0.3 if quick else 1.0, reps=3)
    return 2.0 * n**3 / (med * 1e-3) / 1e12


# ---------------------------------------------------------------- one point
def zero_grads(inputs: Inputs) -> None:
    """Drop the gradients of the point's leaves (``inputs.grad``) before the next step."""
    for t in inputs.grad:
        t.grad = None


def run_backward(out, inputs: Inputs, retain_graph: bool = False) -> None:
    """Backward from ``out`` with the point's upstream gradient (``inputs.upstream``)."""
    out.backward(inputs.upstream, retain_graph=retain_graph)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line for a results table: its type and the first ``limit`` characters."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}"


def _peak(mode: str, fn: Callable, inputs: Inputs, device: str) -> float:
    mem = PeakMemory(device, inputs.nbytes)
    zero_grads(inputs)
    mem.begin()
    if mode == "bwd":
        out = fn()
        mem.reset()
        run_backward(out, inputs)
    else:
        mem.reset()
        out = fn()
        if mode == "fwd+bwd":
            run_backward(out, inputs)
    peak = mem.peak_mb()
    del out
    zero_grads(inputs)
    return peak


def _time(mode: str, fn: Callable, inputs: Inputs, device: str, min_run_time: float, reps: int):
    """(median, p20, p80, n, note) in ms for one mode."""
    if mode == "fwd":
        return (*bench_times(fn, device, min_run_time, reps), "")

    def fwd_bwd():
        zero_grads(inputs)
        run_backward(fn(), inputs)

    if mode == "fwd+bwd":
        return (*bench_times(fwd_bwd, device, min_run_time, reps), "")
    out = fn()

    def replay():
        run_backward(out, inputs, retain_graph=True)

    try:  # the replays themselves are the probe: a backward that frees what it saved fails on the second call
        result = bench_times(replay, device, min_run_time, reps)
    except RuntimeError as exc:  # repeated backward unsupported: derive it
        out = None  # drop the retained graph (replay, held by the traceback, sees None)
        fb = bench_times(fwd_bwd, device, min_run_time, reps)
        f = bench_times(fn, device, min_run_time, reps)
        note = f"derived as (fwd+bwd) - fwd: repeated backward unsupported ({one_line(exc, 80)})"
        return fb[0] - f[0], fb[1] - f[1], fb[2] - f[2], fb[3], note
    out = None
    zero_grads(inputs)
    return (*result, "backward replayed with retain_graph=True")


def _max_abs_err(bench, method: Method, fn: Callable, inputs: Inputs, ctx: dict) -> float:
    import torch

    reference = method.reference or bench.reference
    with torch.no_grad():
        expected = reference(inputs, ctx).float()
        got = fn().detach().float()
    return float((got - expected).abs().max().item())


def measure_point(bench, method_name: str, ctx: dict) -> list[dict]:
    """Rows (one per mode) for ``method_name`` of module ``bench`` at the point in ``ctx``."""
    import torch

    method = bench.METHODS[method_name]
    device, modes = ctx["device"], ctx["modes"]
    base = dict(bench=bench.NAME, method=method_name, device=device, dtype=ctx["dtype"],
                N=ctx["N"], H=ctx["H"], V=ctx["V"])
    rows = {m: dict(base, mode=m, status="ok", note=method.note) for m in modes}

    def fail_all(status: str, note: str) -> list[dict]:
        return [dict(r, status=status, note=note) for r in rows.values()]

    reason = method.skip(ctx)
    if reason:
        return fail_all("skipped", reason)
    set_threads(ctx.get("threads"))
    torch.manual_seed(ctx["seed"])
    try:
        inputs = bench.make_inputs(ctx)
        fn = method.build(inputs, ctx)
        run_backward(fn(), inputs)  # warm-up: compiles, autotunes, allocates workspaces
        sync(device)
        zero_grads(inputs)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, never hidden
        status = "oom" if _is_oom(exc) else ("skipped" if method.kind == "peer" else "error")
        return fail_all(status, f"first call raised {one_line(exc)}")
    for mode in modes:
        try:
            rows[mode]["peak_mem_mb"] = _peak(mode, fn, inputs, device)
            med, p20, p80, n, note = _time(mode, fn, inputs, device, ctx["min_run_time"], ctx.get("reps", DEFAULT_REPS))
            rows[mode].update(median_ms=med, p20_ms=p20, p80_ms=p80, n_samples=n)
            rows[mode]["note"] = "; ".join(x for x in (method.note, note) if x)
        except Exception as exc:  # noqa: BLE001
            rows[mode].update(status="oom" if _is_oom(exc) else "error", note=one_line(exc))
        if device == "cuda":
            torch.cuda.empty_cache()
    try:
        err = _max_abs_err(bench, method, fn, inputs, ctx)
    except Exception as exc:  # noqa: BLE001
        err = float("nan")
        for r in rows.values():
            r["note"] = "; ".join(x for x in (r["note"], f"error check failed: {one_line(exc, 100)}") if x)
    for r in rows.values():
        r["max_abs_err"] = err
    return list(rows.values())


# ---------------------------------------------------------------- isolation
def run_isolated(target: str, payload: dict, timeout: float) -> tuple[list[dict] | None, str]:
    """Run ``module:function(payload) -> list[dict]`` in a fresh Python process.

    Returns (rows, "") on success or (None, reason) when the process failed, timed out
    or was killed (SIGKILL usually means the kernel's out-of-memory killer)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "benchmarks.measure", target]
    try:
        proc = subprocess.run(cmd, input=json.dumps(payload), capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(ROWS_TAG):
            return json.loads(line[len(ROWS_TAG):]), ""
    if proc.returncode in (-9, 137):
        return None, "oom: worker killed by SIGKILL (out of memory?)"
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return None, f"worker exited with {proc.returncode}: {tail[0][:300]}"


def use_kernels_from(folder: str) -> str:
    """Make ``import drdo`` / ``import drdo_kernels`` load from ``folder`` (an older checkout) in this
    process; returns the folder the imported drdo_kernels lives in. The benchmarks package itself stays
    this checkout's (it imports drdo only inside functions)."""
    folder = os.path.abspath(folder)
    for name in [m for m in sys.modules if m.split(".")[0] in ("drdo", "drdo_kernels")]:
        del sys.modules[name]
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    kernels = importlib.import_module("drdo_kernels")
    found = os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__)))
    if found != folder:
        raise ImportError(f"drdo_kernels imported from {found}, not from the baseline {folder}")
    return found


def measure_point_payload(payload: dict) -> list[dict]:
    """Subprocess entry for grid benchmarks: payload = {"bench": module name, "method", "ctx"}; a
    baseline method's ctx["baseline"] names the checkout whose kernels it runs."""
    bench = importlib.import_module(payload["bench"])
    method = bench.METHODS[payload["method"]]
    if not (method.baseline and method.skip(payload["ctx"]) is None):
        return measure_point(bench, payload["method"], payload["ctx"])
    folder = use_kernels_from(payload["ctx"]["baseline"])
    rows = measure_point(bench, payload["method"], payload["ctx"])
    where = f"kernels of the baseline checkout {os.path.basename(folder)}"
    if bench.NAME == "loss":
        where += _baseline_filter_note()
    for r in rows:
        r["note"] = "; ".join(x for x in (r.get("note", ""), where) if x)
    return rows


def _baseline_filter_note() -> str:
    """Whether the imported (baseline) kernels' Triton backward filters gradients by default, as
    checkouts up to 2026-11-28 do (``filter_eps=None``: 2**-12 for bf16): their fused losses take no
    filter_eps, so their Triton rows ran filtered."""
    import inspect

    from drdo_kernels import fused_linear_logprobs

    default = inspect.signature(fused_linear_logprobs).parameters.get("filter_eps")
    if default is not None and default.default is None:
        return " (its fused losses' Triton backward filters gradients: filter_eps=None by default there)"
    return ""


def _worker_main(target: str) -> int:
    module_name, _, func_name = target.partition(":")
    payload = json.loads(sys.stdin.read())
    func = getattr(importlib.import_module(module_name), func_name)
    started = time.time()
    rows = func(payload)
    for r in rows:
        r.setdefault("worker_s", round(time.time() - started, 2))
    sys.stdout.write("\n" + ROWS_TAG + json.dumps(rows, default=float) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
