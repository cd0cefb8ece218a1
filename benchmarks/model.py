"""An analytic performance model of the LM-head log-probs forward+backward, per backend (MODELLED, not measured).

Each backend is a list of kernel phases that run one after another; a phase has FLOPs, HBM bytes and fp32
atomic adds, and lasts max(FLOPs / F, bytes / B, atomics / A). The bound of a backend is the sum of its
phases. Assumptions (all stated, none measured here):

- F: dense bf16 tensor-core rate, the measured cuBLAS 8192^3 GEMM on an H100 (705 TFLOP/s; the nominal
  989 with --nominal). B: HBM bandwidth 3.35 TB/s. A: fp32 atomic adds resolved in L2, 5e11 per second
  (an assumption of the order of the L2 bandwidth over 4-byte operations, not a datasheet figure).
- Every GEMM, cuBLAS or fused, runs at F: a Triton kernel that reaches less is slower than its bound.
- L2 reuse: a fused tile kernel reads hidden and weight once per pass (grouped or row-block-resident
  order keeps the operand tiles in L2); element-wise passes over a [tokens, V] buffer go to HBM (one
  logits row, V x 4 bytes, is read once per pass even when a kernel loops over it twice).
- Atomics: a tile kernel that accumulates d_hidden and d_weight with atomics issues (BLOCK_M + BLOCK_N) x H
  adds per [BLOCK_M, BLOCK_N] tile; gradient filtering skips nothing on these inputs (logits of standard
  deviation 2: ~57 of the 16384 softmax values in a 128 x 128 tile exceed 2^-12).
- FLOPs: 2NHV forward, 2NHV recompute where the backward recomputes, 4NHV for the two gradient GEMMs.
- Extra memory: what the backend allocates beyond the inputs and their bf16 gradients.

Usage: python -m benchmarks.model [--N 16384 --H 4096 --V 128256 --nominal]
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

F_MEASURED, F_NOMINAL = 705e12, 989e12  # bf16 FLOP/s: cuBLAS 8192^3 on the H100 of 2026-11-28; datasheet dense
HBM = 3.35e12  # bytes/s
ATOMICS = 5e11  # fp32 atomic adds/s (assumed)
BF16, FP32 = 2, 4

#: Measured on one H100 (2026-11-28, torch 2.11+cu130, triton 3.6, old kernels), fwd+bwd ms at (N, H, V) bf16:
#: the DRDO loss at N=16384 (its pair loss is negligible next to the head), the log-probs at N=8192.
MEASURED_MS = {
    (16384, 4096, 128256): {"naive": 99.9, "liger_dpo": 100.2, "cce": 313.2, "ours_triton_old": 592.7,
                            "ours_torch_old": 4864.5},
    (8192, 4096, 128256): {"naive": 50.8, "liger_flce": 81.8, "cce": 156.9, "ours_triton_old": 286.0,
                           "ours_torch_old": 2441.6},
}


@dataclass
class Phase:
    """One kernel (or a run of identical kernels): FLOPs, HBM bytes, fp32 atomic adds, launches."""

    name: str
    flops: float = 0.0
    hbm: float = 0.0
    atomics: float = 0.0
    launches: int = 1

    def seconds(self, f: float) -> float:
        return max(self.flops / f, self.hbm / HBM, self.atomics / ATOMICS)


@dataclass
class Backend:
    name: str
    what: str
    phases: list = field(default_factory=list)
    extra_bytes: float = 0.0

    def total(self, key: str) -> float:
        return sum(getattr(p, key) for p in self.phases)

    def seconds(self, f: float) -> float:
        return sum(p.seconds(f) for p in self.phases)


def _gemm(name: str, m: int, n: int, k: int, out_bytes: int, accumulate: bool = False, count: int = 1) -> Phase:
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


def backends(n: int, h: int, v: int) -> list[Backend]:
    """Every modelled backend at hidden [n, h] x weight [v, h] bf16, forward + backward of the log-probs."""
    nv = float(n) * v
    out = []
    # naive: full bf16 logits, fp32 cast, log_softmax, gather; autograd's backward through each
    out.append(Backend("naive", "full logits, fp32 log_softmax, gather (autograd)", [
        _gemm("logits", n, v, h, BF16), _pass("cast fp32", nv, BF16 + FP32), _pass("log_softmax", nv, 2 * FP32),
        _pass("gather bwd: zeros + scatter", nv, FP32), _pass("log_softmax bwd", nv, 3 * FP32),
        _pass("cast bwd", nv, FP32 + BF16), _gemm("d_hidden", n, h, v, BF16), _gemm("d_weight", v, h, n, BF16)],
        extra_bytes=12 * nv))
    # Liger fused linear cross-entropy: gradients in the forward, token chunks of next_pow2(N / ceil(V/H)),
    # bf16 logits chunk, d_weight accumulated in bf16 by addmm per chunk
    c = 2 ** math.ceil(math.log2(max(1, math.ceil(n / math.ceil(v / h)))))
    k = math.ceil(n / c)
    out.append(Backend("liger_flce", f"Liger FLCE: {k} chunks of {c} tokens, grads in forward, no recompute", [
        _gemm("logits", c, v, h, BF16, count=k), _pass("CE kernel (2 reads, 1 write)", nv, 3 * BF16, k),
        _gemm("d_hidden", c, h, v, BF16, count=k), _gemm("d_weight += (addmm)", v, h, c, BF16, True, k)],
        extra_bytes=c * v * BF16 * 2 + v * h * FP32))
    # Liger DPO (chunked_loss): chunks of one pair (2 rows of T=1024), torch.compile'd chunk, fp32 logits
    c2 = min(n, 2048)
    k2 = math.ceil(n / c2)
    out.append(Backend("liger_dpo", f"Liger DPO: {k2} chunks of {c2} tokens (one pair), compiled fp32 log-softmax", [
        _gemm("logits", c2, v, h, BF16, count=k2), _pass("log_softmax + grad (fused)", nv, BF16 + 2 * FP32 + BF16, k2),
        _gemm("d_hidden", c2, h, v, BF16, count=k2), _gemm("d_weight chunk", v, h, c2, BF16, count=k2),
        _pass("d_weight accumulate fp32", float(v) * h * k2, BF16 + 2 * FP32, k2)],
        extra_bytes=c2 * v * (FP32 + BF16) + v * h * FP32))
    # CCE: fused forward; backward recomputes tiles and adds both gradients with atomics (128 x 128 assumed)
    out.append(Backend("cce", "Cut Cross-Entropy: fused fwd; bwd recompute + atomics (128x128 tiles assumed)", [
        _tile_kernel("fwd (online LSE)", n, h, v, 2, 128, 128, False),
        _tile_kernel("bwd (recompute, atomic grads)", n, h, v, 6, 128, 128, True)], extra_bytes=n * FP32))
    out.append(Backend("ours_triton_old", "ours triton (old): bwd tiles 64x128, fp32 atomics for d_hidden/d_weight", [
        _tile_kernel("fwd (online LSE)", n, h, v, 2, 128, 128, False),
        _tile_kernel("bwd (recompute, atomic grads)", n, h, v, 6, 64, 128, True),
        _pass("fp32 grads -> bf16", float(n + v) * h, FP32 + BF16)], extra_bytes=(n + v) * h * FP32))
    out.append(Backend("ours_triton_new", "ours triton (new): BLOCK_M 128, grouped order; atomics assumed kept", [
        _tile_kernel("fwd (online LSE)", n, h, v, 2, 128, 128, False),
        _tile_kernel("bwd (recompute, atomic grads)", n, h, v, 6, 128, 128, True),
        _pass("fp32 grads -> bf16", float(n + v) * h, FP32 + BF16)], extra_bytes=(n + v) * h * FP32))
    # ours chunked: [C, V] fp32 logits <= 1 GiB, Triton fold writes the softmax gradient in place,
    # cast to bf16 for the gradient GEMMs (assumed), d_weight / d_hidden accumulated in fp32 by cuBLAS
    c3 = min(n, 2 ** int(math.log2(2**30 // (v * FP32))))
    k3 = math.ceil(n / c3)
    out.append(Backend("ours_chunked", f"ours chunked (pair-sum losses): {k3} chunks of {c3} tokens, 6NHV, no recompute", [
        _gemm("logits fp32 out", c3, v, h, FP32, count=k3), _pass("fold + grad in place", nv, 2 * FP32, k3),
        _pass("grad -> bf16", nv, FP32 + BF16, k3), _gemm("d_hidden", c3, h, v, FP32, count=k3),
        _gemm("d_weight += (fp32)", v, h, c3, FP32, True, k3), _pass("fp32 grads -> bf16", float(n + v) * h, FP32 + BF16)],
        extra_bytes=c3 * v * (FP32 + BF16) + (n + v) * h * FP32))
    # ours torch (old): 8 MiB fp32 slab -> 2^21 / V rows per chunk; every chunk streams the whole weight
    c4 = max(1, 2**21 // v)
    k4 = math.ceil(n / c4)
    out.append(Backend("ours_torch_old", f"ours torch (old): {k4} chunks of {c4} tokens, recompute in bwd", [
        _gemm("logits (fwd)", c4, v, h, FP32, count=k4), _pass("log_softmax", nv, 3 * FP32, k4),
        _gemm("logits (recompute)", c4, v, h, FP32, count=k4), _pass("softmax grad", nv, 3 * FP32, k4),
        _gemm("d_hidden", c4, h, v, FP32, count=k4), _gemm("d_weight += (fp32)", v, h, c4, FP32, True, k4)],
        extra_bytes=(n + v) * h * FP32 + 2 * 2**21 * FP32))
    # TRL: [4096, 32768] bf16 tiles, Triton fold; backward recomputes, in-place gradient, addmm fp32 out
    tc, vc = min(n, 4096), min(v, 32768)
    tiles = math.ceil(n / tc) * math.ceil(v / vc)
    tc, vc = n / math.ceil(n / tc), v / math.ceil(v / vc)  # the mean tile: the last one is partial
    out.append(Backend("trl_chunked", f"TRL ChunkedLogProbFunction: {tiles} tiles of at most 4096x32768 bf16, recompute in bwd", [
        _gemm("logits tile", tc, vc, h, BF16, count=tiles), _pass("fold", nv, BF16, tiles),
        _gemm("logits tile (recompute)", tc, vc, h, BF16, count=tiles), _pass("grad in place", nv, 2 * BF16, tiles),
        _gemm("d_hidden += (fp32)", tc, h, vc, FP32, True, tiles), _gemm("d_weight += (fp32)", vc, h, tc, FP32, True, tiles),
        _pass("fp32 grads -> bf16", float(n + v) * h, FP32 + BF16)],
        extra_bytes=tc * vc * BF16 + (n + v) * h * FP32))
    return out


def table(n: int, h: int, v: int, nominal: bool = False) -> str:
    """The markdown table of every backend at (n, h, v) bf16, with the measured time where there is one."""
    f = F_NOMINAL if nominal else F_MEASURED
    measured = MEASURED_MS.get((n, h, v), {})
    lines = [f"**Modelled, not measured**: LM-head log-probs forward+backward, N={n} H={h} V={v} bf16, H100 bound with "
             f"F = {f / 1e12:.0f} TFLOP/s ({'nominal dense bf16' if nominal else 'measured cuBLAS GEMM'}), "
             f"HBM 3.35 TB/s, {ATOMICS:.0e} fp32 atomic adds/s (assumed). Phases run one after another; each lasts "
             "max(FLOPs/F, bytes/HBM, atomics/rate).", "",
             "| backend | FLOPs (x NHV) | HBM GB | atomic adds (1e9) | launches | extra memory GB | bound ms "
             "| measured ms (old kernels, 2026-11-28) | bound / measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    nhv = float(n) * h * v
    for b in backends(n, h, v):
        bound = b.seconds(f) * 1e3
        got = measured.get(b.name)
        lines.append(f"| {b.name} | {b.total('flops') / nhv:.1f} | {b.total('hbm') / 1e9:.0f} | "
                     f"{b.total('atomics') / 1e9:.0f} | {b.total('launches')} | {b.extra_bytes / 1e9:.2f} | {bound:.1f} | "
                     f"{'' if got is None else f'{got:g}'} | {'' if got is None else f'{bound / got:.2f}'} |")
    lines += ["", "Backends: " + "; ".join(f"`{b.name}`: {b.what}" for b in backends(n, h, v)) + "."]
    return "\n".join(lines) + "\n"


def markdown(nominal: bool = False) -> str:
    """The section benchmarks.report puts in results.md: the model at the two measured shapes."""
    parts = ["## Performance model (modelled, not measured)", "",
             "From `python -m benchmarks.model` (assumptions in its docstring). A bound below the measured time "
             "means the kernel leaves that much on the table; the measured column is the old kernels' H100 run "
             "(the DRDO loss at N=16384, the log-probs at N=8192).", ""]
    for n, h, v in MEASURED_MS:
        parts += [table(n, h, v, nominal), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=16384)
    p.add_argument("--H", type=int, default=4096)
    p.add_argument("--V", type=int, default=128256)
    p.add_argument("--nominal", action="store_true", help="use the datasheet 989 TFLOP/s instead of the measured 705")
    args = p.parse_args(argv)
    text = table(args.N, args.H, args.V, args.nominal)
    print(text)
    return text


if __name__ == "__main__":
    main()
