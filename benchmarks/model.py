"""An analytic performance model of the LM-head benchmarks, per method (MODELLED, not measured).

Each method is a list of kernel phases that run one after another; a phase has FLOPs, HBM bytes and fp32
atomic adds, and lasts max(FLOPs / F, bytes / B, atomics / A). The bound of a method is the sum of its
phases. It follows the code of this checkout:

- Chunks: our chunked backends take ``drdo_kernels.logprobs_chunked.chunk_rows`` tokens per chunk
  (called here, never copied). Pair losses (``bench_loss``) chunk whole pairs (chosen and rejected rows of
  T tokens), 6 NHV; a pair longer than a chunk takes two passes, log-sum-exps then recomputed logits and
  gradients, 8 NHV (``benchmarks.work.pair_path``). Plain log-probs (``bench_logprobs``) recompute the
  logits in the backward, 8 NHV. ``ours_auto`` is modelled as the backend ``auto_backend`` picks.
- The FLOPs of every method are those of ``benchmarks.work`` (the work its TFLOP/s are computed from).
- The Triton tiles are ``drdo_kernels.logprobs_triton.CONFIGS`` (bf16): a tile kernel reads hidden and
  weight once per pass (grouped program order keeps the operand tiles in L2) and its backward adds
  (BLOCK_M + BLOCK_N) x H fp32 atomics into d_hidden and d_weight per [BLOCK_M, BLOCK_N] tile; no tile
  is skipped (the gradient filter is off by default).

Assumptions (stated, none measured here):

- F: dense bf16 tensor-core rate, the measured cuBLAS 8192^3 GEMM of the card (H100 705 TFLOP/s, H200
  699 TFLOP/s, both 2026-11-28; the datasheet's 989 with --nominal). B: HBM bandwidth (H100 3.35 TB/s,
  H200 4.8 TB/s). A: fp32 atomic adds resolved in L2, 1.25e12 per second: about the least rate the 2026-11-28
  H200 run implies (our Triton backward issued 134.5e9 adds in at most 110 ms), not a datasheet figure.
- Every GEMM, cuBLAS or fused, runs at F: a kernel that reaches less is slower than its bound.
- Element-wise passes over a [tokens, V] buffer go to HBM (one logits row, V x 4 bytes, is read once per
  pass even when a kernel loops over it twice).
- Extra memory: what a method allocates beyond the inputs and their gradients.

Usage: python -m benchmarks.model [--bench loss|logprobs] [--N 16384 --H 4096 --V 128256 --T 1024]
       [--gpu h100|h200] [--nominal] [--results DIR]
With --results, the modelled bound beside every measured bf16 fwd+bwd row of DIR/loss.csv and
DIR/logprobs.csv (the card from DIR's metadata unless --gpu says).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import work

BF16, FP32 = 2, 4
ATOMICS = 1.25e12  # fp32 atomic adds/s (calibrated, see the docstring)


@dataclass(frozen=True)
class GPU:
    """A card's rates: measured and datasheet bf16 FLOP/s, HBM bytes/s."""

    name: str
    flops: float
    nominal_flops: float
    hbm: float


GPUS = {
    "h100": GPU("H100 SXM", 705e12, 989e12, 3.35e12),
    "h200": GPU("H200", 699e12, 989e12, 4.8e12),
}


@dataclass
class Phase:
    """One kernel (or a run of identical kernels): FLOPs, HBM bytes, fp32 atomic adds, launches."""

    name: str
    flops: float = 0.0
    hbm: float = 0.0
    atomics: float = 0.0
    launches: int = 1

    def seconds(self, f: float, hbm: float) -> float:
        return max(self.flops / f, self.hbm / hbm, self.atomics / ATOMICS)


@dataclass
class Method:
    """A benchmarked method as phases; ``name`` is its name in the CSVs."""

    name: str
    what: str
    phases: list = field(default_factory=list)
    extra_bytes: float = 0.0

    def total(self, key: str) -> float:
        return sum(getattr(p, key) for p in self.phases)

    def seconds(self, f: float, hbm: float) -> float:
        return sum(p.seconds(f, hbm) for p in self.phases)


def _gemm(name: str, m: float, n: float, k: float, out_bytes: int, accumulate: bool = False, count: int = 1) -> Phase:
    """``count`` GEMMs [m, k] x [k, n] with bf16 operands read once; the output written (and read too when
    accumulating into it)."""
    io = (m * k + k * n) * BF16 + m * n * out_bytes * (2 if accumulate else 1)
    return Phase(name, 2.0 * m * n * k * count, io * count, 0, count)


def _pass(name: str, elements: float, bytes_per_element: float, launches: int = 1) -> Phase:
    """An element-wise pass over ``elements`` values moving ``bytes_per_element`` each through HBM."""
    return Phase(name, 0.0, elements * bytes_per_element, 0, launches)


def _tile_kernel(name: str, n: int, h: int, v: int, flops_factor: int, bm: int, bn: int, atomic: bool) -> Phase:
    """A fused Triton kernel over [bm, bn] logits tiles (``flops_factor`` x NHV): operands read once per
    pass; with ``atomic``, d_hidden and d_weight accumulated by (bm + bn) x H fp32 atomic adds per tile."""
    tiles = math.ceil(n / bm) * math.ceil(v / bn)
    adds = tiles * (bm + bn) * h if atomic else 0
    reads = (n * h + v * h) * BF16 * (flops_factor // 2)
    return Phase(name, flops_factor * float(n) * h * v, reads, adds, 1)


def _ctx(n: int, h: int, v: int, t: int) -> dict:
    """The benchmark context of a bf16 CUDA point (what benchmarks.work reads)."""
    return dict(device="cuda", dtype="bf16", N=n, H=h, V=v, seq_len=t)


def _naive(n: int, h: int, v: int) -> Method:
    nv = float(n) * v
    return Method("naive", "full bf16 logits, fp32 cast, log_softmax, gather (autograd)", [
        _gemm("logits", n, v, h, BF16), _pass("cast fp32", nv, BF16 + FP32), _pass("log_softmax", nv, 2 * FP32),
        _pass("gather bwd: zeros + scatter", nv, FP32), _pass("log_softmax bwd", nv, 3 * FP32),
        _pass("cast bwd", nv, FP32 + BF16), _gemm("d_hidden", n, h, v, BF16), _gemm("d_weight", v, h, n, BF16)],
        extra_bytes=12 * nv)


def _naive_compile(n: int, h: int, v: int) -> Method:
    nv = float(n) * v
    return Method("naive_compile", "torch.compile(naive): bf16 logits kept, element-wise work fused into one "
                  "forward and one backward pass (assumed)", [
                      _gemm("logits", n, v, h, BF16), _pass("fused log_softmax + gather", nv, BF16),
                      _pass("fused backward (read logits, write bf16 grad)", nv, 2 * BF16),
                      _gemm("d_hidden", n, h, v, BF16), _gemm("d_weight", v, h, n, BF16)],
                  extra_bytes=2 * BF16 * nv)


def _liger_flce(n: int, h: int, v: int) -> Method:
    """Liger fused linear cross-entropy: grads in forward, token chunks of next_pow2(N / ceil(V/H)),
    bf16 logits chunk, d_weight accumulated in bf16 by addmm per chunk."""
    nv = float(n) * v
    c = 2 ** math.ceil(math.log2(max(1, math.ceil(n / math.ceil(v / h)))))
    k = math.ceil(n / c)
    return Method("liger_flce", f"Liger FLCE: {k} chunks of {c} tokens, grads in forward, no recompute", [
        _gemm("logits", c, v, h, BF16, count=k), _pass("CE kernel (2 reads, 1 write)", nv, 3 * BF16, k),
        _gemm("d_hidden", c, h, v, BF16, count=k), _gemm("d_weight += (addmm)", v, h, c, BF16, True, k)],
        extra_bytes=c * v * BF16 * 2 + v * h * FP32)


def _liger_dpo(n: int, h: int, v: int, t: int) -> Method:
    """Liger DPO (chunked_loss): chunks of one pair (2T tokens), torch.compile'd chunk, fp32 logits."""
    nv = float(n) * v
    c = min(n, 2 * t)
    k = math.ceil(n / c)
    return Method("liger_dpo", f"Liger DPO: {k} chunks of {c} tokens (one pair), compiled fp32 log-softmax", [
        _gemm("logits", c, v, h, BF16, count=k), _pass("log_softmax + grad (fused)", nv, BF16 + 2 * FP32 + BF16, k),
        _gemm("d_hidden", c, h, v, BF16, count=k), _gemm("d_weight chunk", v, h, c, BF16, count=k),
        _pass("d_weight accumulate fp32", float(v) * h * k, BF16 + 2 * FP32, k)],
        extra_bytes=c * v * (FP32 + BF16) + v * h * FP32)


def _cce(n: int, h: int, v: int) -> Method:
    return Method("cce", "Cut Cross-Entropy: fused fwd; bwd recompute + atomics (128x128 tiles assumed)", [
        _tile_kernel("fwd (online LSE)", n, h, v, 2, 128, 128, False),
        _tile_kernel("bwd (recompute, atomic grads)", n, h, v, 6, 128, 128, True)], extra_bytes=n * FP32)


def _trl(n: int, h: int, v: int) -> Method:
    """TRL: [4096, 32768] bf16 tiles, Triton fold; backward recomputes, in-place gradient, addmm fp32 out."""
    nv = float(n) * v
    tc, vc = min(n, 4096), min(v, 32768)
    tiles = math.ceil(n / tc) * math.ceil(v / vc)
    tc, vc = n / math.ceil(n / tc), v / math.ceil(v / vc)  # the mean tile: the last one is partial
    return Method("trl_chunked", f"TRL ChunkedLogProbFunction: {tiles} tiles of at most 4096x32768 bf16, recompute "
                  "in bwd", [
                      _gemm("logits tile", tc, vc, h, BF16, count=tiles), _pass("fold", nv, BF16, tiles),
                      _gemm("logits tile (recompute)", tc, vc, h, BF16, count=tiles),
                      _pass("grad in place", nv, 2 * BF16, tiles),
                      _gemm("d_hidden += (fp32)", tc, h, vc, FP32, True, tiles),
                      _gemm("d_weight += (fp32)", vc, h, tc, FP32, True, tiles),
                      _pass("fp32 grads -> bf16", float(n + v) * h, FP32 + BF16)],
                  extra_bytes=tc * vc * BF16 + (n + v) * h * FP32)


def _chunk_phases(tokens: float, chunks: int, h: int, v: int, recompute: bool) -> list[Phase]:
    """The chunked backend over ``tokens`` tokens in ``chunks`` chunks of [c, V] fp32 logits: logits GEMM,
    Triton row stats (one read), [recomputed logits,] softmax gradient into a bf16 copy (read fp32, write
    bf16), d_hidden GEMM (fp32 out), d_weight addmm into the fp32 accumulator (read and written per chunk)."""
    c = tokens / chunks
    phases = [_gemm("logits (fp32 out)", c, v, h, FP32, count=chunks), _pass("row stats", tokens * v, FP32, chunks)]
    if recompute:
        phases.append(_gemm("logits recomputed (fp32 out)", c, v, h, FP32, count=chunks))
    return phases + [_pass("softmax grad -> bf16", tokens * v, FP32 + BF16, chunks),
                     _gemm("d_hidden (fp32 out)", c, h, v, FP32, count=chunks),
                     _gemm("d_weight += (fp32)", v, h, c, FP32, True, chunks)]


def _ours_chunked(bench: str, n: int, h: int, v: int, t: int) -> Method:
    ctx = _ctx(n, h, v, t)
    rows = work.chunk_tokens(ctx)
    finish = [_pass("zero d_weight", float(v) * h, FP32), _pass("fp32 grads -> bf16", float(n + v) * h, FP32 + BF16)]
    extra = rows * v * (FP32 + BF16) + (n + v) * h * FP32
    if bench == "logprobs":
        k = math.ceil(n / rows)
        return Method("ours_chunked", f"ours chunked, plain log-probs: {k} chunks of {rows} tokens, recompute in "
                      "bwd", _chunk_phases(n, k, h, v, True) + finish, extra)
    pair = 2 * t
    if work.pair_path(ctx) == "grads_in_forward":
        per_chunk = max(1, rows // pair) * pair
        k = math.ceil(n / per_chunk)
        return Method("ours_chunked", f"ours chunked pair loss: {k} chunks of {per_chunk} tokens (whole pairs), "
                      "grads in forward", _chunk_phases(n, k, h, v, False) + finish, extra)
    k = (n // pair) * math.ceil(pair / rows)
    return Method("ours_chunked", f"ours chunked pair loss, pairs of {pair} tokens > {rows}-token chunks: two "
                  f"passes over {k} chunks (log-sum-exps, then recomputed logits and grads), all in forward",
                  _chunk_phases(n, k, h, v, True) + finish, extra)


def _ours_triton(n: int, h: int, v: int) -> Method:
    import torch

    from drdo_kernels.logprobs_triton import CONFIGS

    fwd, bwd = CONFIGS[torch.bfloat16]
    return Method("ours_triton", f"ours triton: fwd tiles {fwd.block_m}x{fwd.block_n}, bwd tiles "
                  f"{bwd.block_m}x{bwd.block_n} recomputed with fp32 atomics for d_hidden / d_weight", [
                      _tile_kernel("fwd (online LSE)", n, h, v, 2, fwd.block_m, fwd.block_n, False),
                      _tile_kernel("bwd (recompute, atomic grads)", n, h, v, 6, bwd.block_m, bwd.block_n, True),
                      _pass("fp32 grads -> bf16", float(n + v) * h, FP32 + BF16)],
                  extra_bytes=(n + v) * h * FP32)


def methods(bench: str, n: int, h: int, v: int, t: int = 1024) -> list[Method]:
    """Every modelled method of ``bench`` ("loss" | "logprobs") at hidden [n, h] x weight [v, h] bf16,
    forward + backward; loss rows of ``t`` tokens."""
    ours = {"ours_chunked": _ours_chunked(bench, n, h, v, t), "ours_triton": _ours_triton(n, h, v)}
    out = [_naive(n, h, v), _naive_compile(n, h, v), _cce(n, h, v), _trl(n, h, v), *ours.values()]
    out.append(_liger_dpo(n, h, v, t) if bench == "loss" else _liger_flce(n, h, v))
    auto = ours.get(f"ours_{work.auto_choice(_ctx(n, h, v, t))}")
    if auto is not None:  # "torch" (not on CUDA today) is not modelled
        out.append(Method("ours_auto", f"auto -> {auto.name}: {auto.what}", auto.phases, auto.extra_bytes))
    return out


def bound_ms(bench: str, method: str, n: int, h: int, v: int, t: int, gpu: GPU, nominal: bool = False) -> float | None:
    """The modelled bound of one method in ms, or None when it is not modelled."""
    by_name = {m.name: m for m in methods(bench, n, h, v, t)}
    f = gpu.nominal_flops if nominal else gpu.flops
    return by_name[method].seconds(f, gpu.hbm) * 1e3 if method in by_name else None


def table(bench: str, n: int, h: int, v: int, t: int = 1024, gpu: GPU = GPUS["h200"], nominal: bool = False) -> str:
    """The markdown table of every modelled method of ``bench`` at (n, h, v) bf16."""
    f = gpu.nominal_flops if nominal else gpu.flops
    what = "DRDO loss (pairs of rows of T tokens)" if bench == "loss" else "per-token log-probs"
    lines = [f"**Modelled, not measured**: {what} forward+backward, N={n} H={h} V={v}"
             + (f" T={t}" if bench == "loss" else "") + f" bf16, {gpu.name} bound with F = {f / 1e12:.0f} TFLOP/s "
             f"({'datasheet dense bf16' if nominal else 'measured cuBLAS GEMM'}), HBM {gpu.hbm / 1e12:.2f} TB/s, "
             f"{ATOMICS:.1e} fp32 atomic adds/s (calibrated). Phases run one after another; each lasts "
             "max(FLOPs/F, bytes/HBM, atomics/rate).", "",
             "| method | FLOPs (x NHV) | HBM GB | atomic adds (1e9) | launches | extra memory GB | bound ms |",
             "|---|---|---|---|---|---|---|"]
    nhv = float(n) * h * v
    found = methods(bench, n, h, v, t)
    for m in found:
        lines.append(f"| {m.name} | {m.total('flops') / nhv:.1f} | {m.total('hbm') / 1e9:.0f} | "
                     f"{m.total('atomics') / 1e9:.0f} | {m.total('launches')} | {m.extra_bytes / 1e9:.2f} | "
                     f"{m.seconds(f, gpu.hbm) * 1e3:.1f} |")
    lines += ["", "Methods: " + "; ".join(f"`{m.name}`: {m.what}" for m in found) + "."]
    return "\n".join(lines) + "\n"


def _card(out_dir: Path) -> str:
    """"h200" when a run's metadata names an H200, else "h100"."""
    for meta in sorted(out_dir.glob("*_meta.json")):
        if "H200" in json.loads(meta.read_text(encoding="utf-8")).get("gpu", ""):
            return "h200"
    return "h100"


def compare_md(out_dir: Path, gpu_name: str | None = None, nominal: bool = False) -> str:
    """The modelled bound beside every measured CUDA bf16 fwd+bwd row of out_dir's loss.csv and logprobs.csv."""
    from benchmarks.common import read_csv

    gpu = GPUS[gpu_name or _card(out_dir)]
    lines = ["## Performance model beside the measurements (modelled, not measured)", "",
             f"`python -m benchmarks.model --results DIR` ({gpu.name} constants; assumptions in its docstring). "
             "modelled / measured below 1 is time the kernel leaves on the table.", "",
             "| bench | method | N | H | V | measured ms | modelled ms | modelled / measured |",
             "|---|---|---|---|---|---|---|---|"]
    for bench in ("loss", "logprobs"):
        path = out_dir / f"{bench}.csv"
        for r in read_csv(path) if path.exists() else []:
            if (r["status"], r["device"], r["dtype"], r["mode"]) != ("ok", "cuda", "bf16", "fwd+bwd"):
                continue
            n, h, v, t = int(r["N"]), int(r["H"]), int(r["V"]), int(r.get("seq_len") or 1024)
            got = float(r["median_ms"])
            bound = bound_ms(bench, r["method"], n, h, v, t, gpu, nominal)
            model = "not modelled" if bound is None else f"{bound:.1f} | {bound / got:.2f}"
            lines.append(f"| {bench} | {r['method']} | {n} | {h} | {v} | {got:.1f} | {model} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", choices=["loss", "logprobs"], default=None, help="default: both")
    p.add_argument("--N", type=int, default=16384)
    p.add_argument("--H", type=int, default=4096)
    p.add_argument("--V", type=int, default=128256)
    p.add_argument("--T", type=int, default=1024, help="tokens per row of the loss")
    p.add_argument("--gpu", choices=sorted(GPUS), default=None, help="default: h200 (with --results: the run's card)")
    p.add_argument("--nominal", action="store_true", help="the datasheet 989 TFLOP/s instead of the measured GEMM")
    p.add_argument("--results", default=None, help="a results folder: modelled beside measured")
    args = p.parse_args(argv)
    if args.results:
        text = compare_md(Path(args.results), args.gpu, args.nominal)
    else:
        text = "\n".join(table(b, args.N, args.H, args.V, args.T, GPUS[args.gpu or "h200"], args.nominal)
                         for b in ([args.bench] if args.bench else ["loss", "logprobs"]))
    print(text)
    return text


if __name__ == "__main__":
    main()
