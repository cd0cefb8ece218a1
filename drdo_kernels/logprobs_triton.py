"""Triton kernels of ``fused_linear_logprobs`` (on COMPACTED tokens: every label valid).

Forward (:func:`_logprobs_fwd_kernel`), grid (row blocks, vocab splits):
    each program owns BLOCK_M tokens and a contiguous range of vocab tiles; for each
    [BLOCK_M, BLOCK_N] logits tile (a K-loop of ``tl.dot`` over H in BLOCK_K chunks, so
    H is never held whole) it updates an online (running max, running sum) log-sum-exp
    and picks up the target logit when the label falls in the tile. It writes one
    partial LSE and one partial target logit per (split, token); a [splits, M] torch
    merge gives lse [M] fp32 and logp = min(target - lse, 0). Splitting the vocab keeps
    the GPU busy when M is small (few row blocks).
Backward (:func:`_logprobs_bwd_kernel`), grid (row blocks, vocab tiles):
    each program recomputes its logits tile, forms
    d_logits = g * (onehot - exp(logits - lse)) in fp32 (cast to the input dtype for
    the tensor-core dots, as the same-dtype PyTorch autograd path does), then over H in
    BLOCK_K chunks adds d_logits @ W_tile into d_hidden and d_logits^T @ h_tile into
    d_weight with relaxed fp32 atomics (pure accumulation, no ordering needed), and the
    column sums into d_bias. No [M, V] buffer
    exists; the extra memory is the fp32 accumulators dH [M, H], dW [V, H], db [V]
    (cast to the input dtypes at the end) and O(M * splits) forward statistics.
    Atomic accumulation makes d_hidden / d_weight non-deterministic in the last bits.

Under ``TRITON_INTERPRET=1`` (CPU tests) bf16 ``tl.dot`` is broken in the Triton 3.9
interpreter (it multiplies the raw uint16 bit patterns), so there, and only there, bf16
operands are upcast to fp32 before each dot (``UPCAST_DOT``); bf16 x bf16 products are exact
in fp32, so this matches the tensor-core bf16 dot with fp32 accumulation that runs on GPUs.

Block configurations per dtype are in :data:`CONFIGS`; :func:`aot_specs` lists
exactly the variants :func:`logprobs_forward` / :func:`logprobs_backward` launch.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class KernelConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


#: dtype -> (forward config, backward config): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
#: Chosen with `python -m drdo_kernels.aot`: every kernel compiles without register spills
#: for both sm_90 and sm_80, with 12-36 KiB of shared memory (far below 163 / 227 KiB).
#: H is looped over in BLOCK_K chunks, so any H fits (no H-sized register tile).
CONFIGS = {
    torch.bfloat16: (KernelConfig(128, 128, 32, 8, 3), KernelConfig(64, 128, 32, 8, 2)),
    torch.float16: (KernelConfig(128, 128, 32, 8, 3), KernelConfig(64, 128, 32, 8, 2)),
    torch.float32: (KernelConfig(64, 64, 32, 8, 2), KernelConfig(32, 64, 32, 4, 2)),
}
#: fp32 inputs use exact fp32 products (no TF32 rounding); 16-bit inputs use tensor cores.
DOT_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32", torch.float32: "ieee"}
_TL_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b in fp32; UPCAST_DOT: fp32 operands (the interpreter's bf16 workaround)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, row0, col0, M, V, H,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 tile of hidden[row0:] @ weight[col0:].T (+ bias), K-loop over H.

    Row/column bases are 64-bit scalars (V * H may exceed 2**31); in-tile offsets are 32-bit.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < M - row0
    col_mask = offs_n < V - col0
    a_ptrs = h_ptr + tl.cast(row0, tl.int64) * H + (offs_m[:, None] * H + offs_k[None, :])
    b_ptrs = w_ptr + tl.cast(col0, tl.int64) * H + (offs_n[:, None] * H + offs_k[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = offs_k < H - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, DOT_PRECISION, UPCAST_DOT)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + col0 + offs_n, mask=col_mask, other=0.0)[None, :]
    return acc


@triton.jit
def _logprobs_fwd_kernel(h_ptr, w_ptr, b_ptr, lab_ptr, part_lse_ptr, part_tgt_ptr,
                         M, V, H, TILES_PER_SPLIT,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Partial LSE / target logit of BLOCK_M tokens over one vocab split -> [splits, M]."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    labels = tl.load(lab_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tile_start = pid_s * TILES_PER_SPLIT
    tile_stop = tl.minimum(tile_start + TILES_PER_SPLIT, tl.cdiv(V, BLOCK_N))
    for tile in range(tile_start, tile_stop):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < V
        logits = _logits_tile(h_ptr, w_ptr, b_ptr, pid_m * BLOCK_M, tile * BLOCK_N, M, V, H,
                              HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
        t_i += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
    out = pid_s * M + rows
    tl.store(part_lse_ptr + out, m_i + tl.log(s_i), mask=row_mask)
    tl.store(part_tgt_ptr + out, t_i, mask=row_mask)


@triton.jit
def _logprobs_bwd_kernel(h_ptr, w_ptr, b_ptr, lab_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
                         M, V, H, COMPUTE_DW,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         UPCAST_DOT: tl.constexpr):
    """Recompute one logits tile, add its d_hidden / d_weight / d_bias share (fp32 atomics)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    logits = _logits_tile(h_ptr, w_ptr, b_ptr, row0, col0, M, V, H,
                          HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < M - row0
    col_mask = offs_n < V - col0
    labels = tl.load(lab_ptr + row0 + offs_m, mask=row_mask, other=-1).to(tl.int32)
    lse = tl.load(lse_ptr + row0 + offs_m, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + row0 + offs_m, mask=row_mask, other=0.0)
    onehot = tl.where((col0 + offs_n)[None, :] == labels[:, None], 1.0, 0.0)
    d_logits = (onehot - tl.exp(logits - lse[:, None])) * g[:, None]
    d_logits = tl.where(col_mask[None, :], d_logits, 0.0)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + col0 + offs_n, tl.sum(d_logits, axis=0), mask=col_mask, sem="relaxed")
    d_in = d_logits.to(h_ptr.dtype.element_ty)
    h_off = tl.cast(row0, tl.int64) * H + (offs_m[:, None] * H + offs_k[None, :])  # [BLOCK_M, BLOCK_K]
    w_off = tl.cast(col0, tl.int64) * H + (offs_n[:, None] * H + offs_k[None, :])  # [BLOCK_N, BLOCK_K]
    for k0 in range(0, H, BLOCK_K):
        k_mask = offs_k < H - k0
        h_mask = row_mask[:, None] & k_mask[None, :]
        w_mask = col_mask[:, None] & k_mask[None, :]
        w_tile = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
        tl.atomic_add(dh_ptr + h_off, _dot(d_in, w_tile, None, DOT_PRECISION, UPCAST_DOT), mask=h_mask,
                      sem="relaxed")
        if COMPUTE_DW != 0:  # runtime flag: 0 when the weight is frozen
            h_tile = tl.load(h_ptr + h_off, mask=h_mask, other=0.0)
            tl.atomic_add(dw_ptr + w_off, _dot(tl.trans(d_in), h_tile, None, DOT_PRECISION, UPCAST_DOT),
                          mask=w_mask, sem="relaxed")
        h_off += BLOCK_K
        w_off += BLOCK_K


def _config(dtype: torch.dtype) -> tuple[KernelConfig, KernelConfig]:
    if dtype not in CONFIGS:
        raise TypeError(f"Triton log-prob kernels support {list(CONFIGS)}, got {dtype}")
    return CONFIGS[dtype]


def _upcast_dot(hidden: torch.Tensor) -> bool:
    """True only for bf16 under the Triton interpreter (see the module docstring)."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return hidden.dtype == torch.bfloat16 and (interpreting or hidden.device.type != "cuda")


def _target_programs(device: torch.device) -> int:
    """About two waves of programs on the device (8 under the CPU interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _vocab_splits(n_rows: int, n_vocab: int, cfg: KernelConfig, device: torch.device) -> tuple[int, int]:
    """(splits, tiles_per_split): split the vocab loop when there are few row blocks."""
    n_tiles = triton.cdiv(n_vocab, cfg.block_n)
    row_blocks = triton.cdiv(n_rows, cfg.block_m)
    splits = min(n_tiles, max(1, triton.cdiv(_target_programs(device), row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def _bias_arg(bias: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """Bias as a contiguous fp32 [V]; without bias an unused fp32 `dummy` (same *fp32 signature)."""
    return dummy if bias is None else bias.detach().float().contiguous()


def logprobs_forward(hidden, weight, bias, labels):
    """hidden: [M, H] bf16/fp16/fp32 contiguous; weight: [V, H] same dtype; bias: [V] | None;
    labels: [M] int64 in [0, V). Returns (logp [M] fp32 <= 0, lse [M] fp32)."""
    fwd, _ = _config(hidden.dtype)
    (m, h), v = hidden.shape, weight.shape[0]
    if m == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone()
    splits, tiles_per_split = _vocab_splits(m, v, fwd, hidden.device)
    part_lse = torch.empty((splits, m), dtype=torch.float32, device=hidden.device)
    part_tgt = torch.empty((splits, m), dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(m, fwd.block_m), splits)
    _logprobs_fwd_kernel[grid](
        hidden, weight, _bias_arg(bias, part_lse), labels, part_lse, part_tgt, m, v, h, tiles_per_split,
        HAS_BIAS=bias is not None, BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, BLOCK_K=fwd.block_k,
        DOT_PRECISION=DOT_PRECISION[hidden.dtype], UPCAST_DOT=_upcast_dot(hidden), num_warps=fwd.num_warps, num_stages=fwd.num_stages,
    )
    lse = torch.logsumexp(part_lse, dim=0)
    logp = (part_tgt.sum(0) - lse).clamp_max(0.0)
    return logp, lse


def logprobs_backward(grad, hidden, weight, bias, labels, lse, need_weight_grad=True):
    """grad: [M] upstream gradient; other args as saved by :func:`logprobs_forward`.

    Returns (d_hidden [M, H] hidden.dtype, d_weight [V, H] weight.dtype | None, d_bias [V] | None).
    """
    _, bwd = _config(hidden.dtype)
    (m, h), v = hidden.shape, weight.shape[0]
    d_hidden = torch.zeros((m, h), dtype=torch.float32, device=hidden.device)
    d_weight = torch.zeros((v, h), dtype=torch.float32, device=hidden.device) if need_weight_grad else d_hidden
    d_bias = torch.zeros(v, dtype=torch.float32, device=hidden.device) if bias is not None else d_hidden
    grid = (triton.cdiv(m, bwd.block_m), triton.cdiv(v, bwd.block_n))
    _logprobs_bwd_kernel[grid](
        hidden, weight, _bias_arg(bias, lse), labels, lse, grad.float().contiguous(),
        d_hidden, d_weight, d_bias, m, v, h, int(need_weight_grad),
        HAS_BIAS=bias is not None, BLOCK_M=bwd.block_m, BLOCK_N=bwd.block_n,
        BLOCK_K=bwd.block_k, DOT_PRECISION=DOT_PRECISION[hidden.dtype], UPCAST_DOT=_upcast_dot(hidden),
        num_warps=bwd.num_warps, num_stages=bwd.num_stages,
    )
    return (
        d_hidden.to(hidden.dtype),
        d_weight.to(weight.dtype) if need_weight_grad else None,
        d_bias.to(bias.dtype) if bias is not None else None,
    )


def _fwd_signature(dt: str) -> dict:
    return {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": "*fp32", "lab_ptr": "*i64",
            "part_lse_ptr": "*fp32", "part_tgt_ptr": "*fp32",
            "M": "i32", "V": "i32", "H": "i32", "TILES_PER_SPLIT": "i32"}


def _bwd_signature(dt: str) -> dict:
    return {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": "*fp32", "lab_ptr": "*i64", "lse_ptr": "*fp32",
            "g_ptr": "*fp32", "dh_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32",
            "M": "i32", "V": "i32", "H": "i32", "COMPUTE_DW": "i32"}


def aot_specs() -> list[tuple]:
    """Every variant the launchers above can launch, for ``python -m drdo_kernels.aot``.

    Returns a list of (name, jit_fn, signature, constexprs, num_warps, num_stages).
    """
    specs = []
    for dtype, (fwd, bwd) in CONFIGS.items():
        dt, prec = _TL_DTYPE[dtype], DOT_PRECISION[dtype]
        for has_bias in (False, True):
            tag = f"{dt}_bias{int(has_bias)}"
            specs.append((f"logprobs_fwd_{tag}", _logprobs_fwd_kernel, _fwd_signature(dt),
                          dict(HAS_BIAS=has_bias, BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n,
                               BLOCK_K=fwd.block_k, DOT_PRECISION=prec, UPCAST_DOT=False), fwd.num_warps, fwd.num_stages))
            specs.append((f"logprobs_bwd_{tag}", _logprobs_bwd_kernel, _bwd_signature(dt),
                          dict(HAS_BIAS=has_bias, BLOCK_M=bwd.block_m, BLOCK_N=bwd.block_n,
                               BLOCK_K=bwd.block_k, DOT_PRECISION=prec, UPCAST_DOT=False), bwd.num_warps, bwd.num_stages))
    return specs
