"""Triton kernels of ``fused_linear_logprobs`` (on COMPACTED tokens: every label valid).

Forward (:func:`_logprobs_fwd_kernel`), 1-D grid over (row block, vocab split) pairs:
    each program owns BLOCK_M tokens and a contiguous range of vocab tiles; for each
    [BLOCK_M, BLOCK_N] logits tile (a K-loop of ``tl.dot`` over H in BLOCK_K chunks, so
    H is never held whole) it updates an online (running max, running sum) log-sum-exp
    and picks up the target logit when the label falls in the tile. It writes one
    partial LSE and one partial target logit per (split, token); a [splits, M] torch
    merge gives lse [M] fp32 and logp = min(target - lse, 0). A tile that is entirely
    -inf (a -inf bias) leaves the running state unchanged instead of producing NaN.
Backward (:func:`_logprobs_bwd_kernel`), 1-D grid over (row block, vocab tile) pairs:
    each program recomputes its logits tile, forms
    d_logits = g * (onehot - exp(logits - lse)) in fp32 (cast to the compute dtype for
    the tensor-core dots, as the same-dtype PyTorch autograd path does), adds its column
    sums into d_bias, then, unless the tile is filtered (below), loops over H twice in
    BLOCK_K chunks, adding (W_chunk^T @ d_logits^T)^T into d_hidden and
    (h_chunk^T @ d_logits)^T into d_weight with relaxed fp32 atomics. Both products are
    computed transposed so that d_logits, cast and stored in shared memory once per tile,
    is the shared-memory operand of every gradient dot and the streamed W / h chunk
    (pipelined copies) the other: no per-step transpose or register shuffle. No [M, V] buffer
    exists; the extra memory is the fp32 accumulators dH [M, H], dW [V, H], db [V]
    (cast to the output dtypes at the end) and O(M * splits) forward statistics.
    Atomic accumulation makes d_hidden / d_weight non-deterministic in the last bits.
    Padded rows load lse = +inf, so they contribute exactly 0 whatever the bias.

Entropy (``ENTROPY`` constexpr, ``return_entropy=True``; off, the kernels are those of plain
log-probs): the forward also keeps, per token, the online sum of exp(l - m) * (l - m), rescaled
as the sum of exponentials is when the running max m moves, and writes each split's own entropy
log s - u / s; :func:`merge_split_entropy` merges the splits. The backward subtracts
``ge * p * (log p + H)`` (the entropy's gradient times its upstream gradient ge) from d_logits
before the transform's derivative; with ``filter_eps`` a tile is skipped only if that term is
below it too (rows with ge = 0 ignored).

Program order: both grids are walked in groups of GROUP_M row blocks (as in the Triton
matmul tutorial), so the ~one program per SM that are resident at a time share a few
row blocks and a few vocab tiles in L2: in the backward they add into the same d_hidden
rows and few d_weight slices instead of sweeping all of d_hidden per vocab tile.

Gradient filtering (backward, as Cut Cross-Entropy does; OFF by default, ``filter_eps > 0``
turns it on): a tile whose entries all have
|softmax - onehot| < filter_eps (rows with g = 0 ignored) skips its two gradient loops.
The test is on |softmax - onehot|, not on |g| times it, so that the scale of the upstream
gradient (e.g. 1 / number of tokens) cannot silently zero the whole gradient. A skipped
entry is a non-target token whose probability is below filter_eps (or a target whose
probability is above 1 - filter_eps); with e_ij = |p_ij - onehot_ij| over the skipped
entries, the error this adds is at most sum_j |g_i| e_ij |W_j| in d_hidden[i] and
sum_i |g_i| e_ij |h_i| in d_weight[j] (elementwise). The bound is relative to nothing: a
gradient whose exact value is small (e.g. when adding one vector to every LM-head row leaves
the log-probs unchanged and the d_hidden contributions cancel) can be far off in relative
terms, which is why an exact reference does not filter unless asked. A sensible value,
:func:`default_filter_eps`: ``finfo(dtype).eps / 32`` for 16-bit compute dtypes (2**-12 for
bf16, 2**-15 for fp16: a skipped entry is under 1/32 of the 16-bit spacing at 1.0, the size
of the target entry of its row, in the rounded d_logits operand of the dots), 0 for fp32.

Precision: 16-bit hidden with an fp32 weight computes in the 16-bit dtype (the weight
tile is cast on load, as autocast casts the weight), so the dots run on tensor cores
(wgmma on sm_90). fp32 inputs use TF32 dots when PyTorch allows TF32 matmuls
(``torch.get_float32_matmul_precision() != "highest"`` or
``torch.backends.cuda.matmul.allow_tf32``) and exact fp32 products otherwise. (On sm_90 the
TF32 backward's gradient dots run as mma.sync: wgmma takes their MN-major operands only for
16-bit types.)

Under ``TRITON_INTERPRET=1`` (CPU tests) bf16 ``tl.dot`` is broken in the Triton 3.9
interpreter (it multiplies the raw uint16 bit patterns), so there, and only there, bf16
operands are upcast to fp32 before each dot (``UPCAST_DOT``); bf16 x bf16 products are exact
in fp32, so this matches the tensor-core bf16 dot with fp32 accumulation that runs on GPUs.
The same flag rounds the kernels' casts to bf16 to nearest even by hand
(:func:`drdo_kernels.rounding.to_16bit`): the interpreter truncates where the GPU rounds.
The interpreter does not emulate TF32 rounding.

Block configurations per compute dtype are in :data:`CONFIGS` (:data:`TF32_CONFIGS`; for H not a
multiple of 16 :data:`UNALIGNED_CONFIGS`; a 16-bit backward with a softcap or an fp32 weight
:data:`NARROW_K_BWD_CONFIG`), chosen so that no variant spills registers. The row count, the vocabulary
size and the split counts are not specialised on (``do_not_specialize``): only H (a multiple of
16 or not) and the dtype / bias / gradient constexprs make compiled variants, which
``python -m drdo_kernels.aot`` derives from dry runs of the launchers and compiles. The launchers
never synchronise with the host (no ``.item()``, no data-dependent shapes).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .logit_transform import (
    IDENTITY,
    TRANSFORM_SOFTCAP,
    LogitTransform,
    transform_grad,
    transform_logits,
)
from .rounding import to_16bit
from .triton_runtime import triton_interpreting


class KernelConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


#: compute dtype -> (forward config, backward config). Chosen with `python -m drdo_kernels.aot`:
#: every launched variant compiles without register spills for sm_90 and sm_80, within the
#: shared memory limits. H is looped over in BLOCK_K chunks, so any H fits.
CONFIGS = {
    torch.bfloat16: (KernelConfig(128, 128, 64, 8, 8, 3), KernelConfig(128, 128, 64, 8, 8, 3)),
    torch.float16: (KernelConfig(128, 128, 64, 8, 8, 3), KernelConfig(128, 128, 64, 8, 8, 3)),
    torch.float32: (KernelConfig(64, 128, 32, 8, 8, 3), KernelConfig(64, 64, 32, 8, 8, 2)),
}
#: fp32 inputs with TF32 dots (tensor cores, so 128-row blocks as for 16-bit dtypes; K step 32
#: keeps three stages of fp32 tiles within sm_80's shared memory; two in the backward, whose
#: three pipelined loops hold their buffers at once).
TF32_CONFIGS = (KernelConfig(128, 128, 32, 8, 8, 3), KernelConfig(128, 128, 32, 8, 8, 2))
#: H not a multiple of 16 (no vector loads along K, so each stage of pipelined copies holds its
#: tile in registers): 32-wide K steps and shallower pipelines, which compile without spills.
UNALIGNED_CONFIGS = {
    torch.bfloat16: (KernelConfig(128, 128, 32, 8, 8, 1), KernelConfig(128, 128, 32, 8, 8, 2)),
    torch.float16: (KernelConfig(128, 128, 32, 8, 8, 1), KernelConfig(128, 128, 32, 8, 8, 2)),
    torch.float32: (KernelConfig(64, 64, 32, 8, 8, 1), KernelConfig(64, 64, 32, 8, 8, 2)),
}
UNALIGNED_TF32_CONFIGS = (KernelConfig(64, 128, 32, 8, 8, 1), KernelConfig(64, 128, 32, 8, 8, 1))
#: 16-bit backward with a softcap (tanh and its derivative over the tile) or an fp32 weight (cast
#: on load): 32-wide K steps. (The d_hidden product's M is BLOCK_K, so below 64 it runs as
#: mma.sync instead of wgmma.)
NARROW_K_BWD_CONFIG = KernelConfig(128, 128, 32, 8, 8, 3)
#: Most vocab tiles one forward program walks; more splits give grouped programs to share L2.
MAX_TILES_PER_SPLIT = 16


def compute_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the dot operands: 16-bit hidden with an fp32 weight -> the 16-bit dtype
    (autocast's rule for the LM head); otherwise both dtypes must be equal."""
    if hidden_dtype == weight_dtype or (hidden_dtype in (torch.bfloat16, torch.float16)
                                        and weight_dtype == torch.float32):
        if hidden_dtype not in CONFIGS:
            raise TypeError(f"Triton log-prob kernels support {list(CONFIGS)}, got {hidden_dtype}")
        return hidden_dtype
    raise TypeError(f"Triton log-prob kernels need weight dtype == hidden dtype, or a 16-bit hidden with an "
                    f"fp32 weight; got hidden {hidden_dtype}, weight {weight_dtype}")


def dot_precision(dtype: torch.dtype) -> str:
    """"ieee" for fp32 unless PyTorch allows TF32 matmuls, then "tf32"; 16-bit dots ignore it."""
    if dtype != torch.float32:
        return "tf32"
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def default_filter_eps(dtype: torch.dtype) -> float:
    """A sensible opt-in gradient-filter threshold on |softmax - onehot| (filtering is off by
    default): finfo(dtype).eps / 32 for 16-bit compute dtypes (bf16 2**-12, fp16 2**-15), 0.0
    (no filtering) for fp32."""
    return 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 32


@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M row blocks fastest, then columns, then groups."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


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

    Weight tiles are cast to hidden's dtype on load. Row/column bases are 64-bit scalars
    (V * H may exceed 2**31); in-tile offsets are 32-bit.
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
        b = to_16bit(tl.load(b_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0), h_ptr.dtype.element_ty,
                     UPCAST_DOT)
        acc = _dot(a, tl.trans(b), acc, DOT_PRECISION, UPCAST_DOT)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + col0 + offs_n, mask=col_mask, other=0.0)[None, :]
    return acc


@triton.jit(do_not_specialize=["M", "V", "TILES_PER_SPLIT", "N_SPLITS"])
def _logprobs_fwd_kernel(h_ptr, w_ptr, b_ptr, lab_ptr, part_lse_ptr, part_tgt_ptr, part_ent_ptr,
                         M, V, H, TILES_PER_SPLIT, N_SPLITS, pre, post,
                         HAS_BIAS: tl.constexpr, TRANSFORM: tl.constexpr, ENTROPY: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         UPCAST_DOT: tl.constexpr):
    """Partial LSE / target logit of BLOCK_M tokens over one vocab split -> [splits, M]; ENTROPY: also
    the entropy of the split's own softmax (from the online sum of exp(l - m) * (l - m))."""
    pid_m, pid_s = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), N_SPLITS, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    labels = tl.load(lab_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    u_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # ENTROPY: sum of exp(l - m) * (l - m), <= 0
    tile_start = pid_s * TILES_PER_SPLIT
    tile_stop = tl.minimum(tile_start + TILES_PER_SPLIT, tl.cdiv(V, BLOCK_N))
    for tile in range(tile_start, tile_stop):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        logits = _logits_tile(h_ptr, w_ptr, b_ptr, pid_m * BLOCK_M, tile * BLOCK_N, M, V, H,
                              HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
        logits = tl.where((cols < V)[None, :], transform_logits(logits, pre, post, TRANSFORM), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp(-inf - 0) = 0
        alpha = tl.exp(m_i - m_safe)
        e = tl.exp(logits - m_safe[:, None])
        if ENTROPY:  # rescaled to the new max; -inf logits add 0
            m_old_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            u_i = alpha * (u_i + (m_old_safe - m_safe) * s_i) + \
                tl.sum(e * tl.where(e > 0.0, logits - m_safe[:, None], 0.0), axis=1)
        s_i = s_i * alpha + tl.sum(e, axis=1)
        m_i = m_new
        t_i += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
    out = pid_s * M + rows
    tl.store(part_lse_ptr + out, m_i + tl.log(s_i), mask=row_mask)
    tl.store(part_tgt_ptr + out, t_i, mask=row_mask)
    if ENTROPY:
        tl.store(part_ent_ptr + out, tl.where(s_i > 0.0, tl.log(s_i) - u_i / s_i, 0.0), mask=row_mask)


@triton.jit
def _grad_hidden(d_in_t, w_ptr, dh_ptr, row0, col0, M, V, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """dH[row0:, :] += (W[col0:, k:k+BLOCK_K]^T @ d_in_t)^T, d_in_t = d_logits^T [BLOCK_N, BLOCK_M].

    Computed transposed ([BLOCK_K, BLOCK_M] per step) so that d_logits is the shared-memory
    operand of every dot, stored once per tile, and the streamed weight tile the other one.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < M - row0
    col_mask = offs_n < V - col0
    w_ptrs = w_ptr + tl.cast(col0, tl.int64) * H + (offs_k[:, None] + offs_n[None, :] * H)    # [BLOCK_K, BLOCK_N]
    dh_ptrs = dh_ptr + tl.cast(row0, tl.int64) * H + (offs_k[:, None] + offs_m[None, :] * H)  # [BLOCK_K, BLOCK_M]
    for k0 in range(0, H, BLOCK_K):
        k_mask = offs_k < H - k0
        w_t = to_16bit(tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0), d_in_t.dtype, UPCAST_DOT)
        tl.atomic_add(dh_ptrs, _dot(w_t, d_in_t, None, DOT_PRECISION, UPCAST_DOT),
                      mask=k_mask[:, None] & row_mask[None, :], sem="relaxed")
        w_ptrs += BLOCK_K
        dh_ptrs += BLOCK_K


@triton.jit
def _grad_weight(d_in, h_ptr, dw_ptr, row0, col0, M, V, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """dW[col0:, :] += (hidden[row0:, k:k+BLOCK_K]^T @ d_in)^T, d_in = d_logits [BLOCK_M, BLOCK_N]."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < M - row0
    col_mask = offs_n < V - col0
    h_ptrs = h_ptr + tl.cast(row0, tl.int64) * H + (offs_k[:, None] + offs_m[None, :] * H)    # [BLOCK_K, BLOCK_M]
    dw_ptrs = dw_ptr + tl.cast(col0, tl.int64) * H + (offs_k[:, None] + offs_n[None, :] * H)  # [BLOCK_K, BLOCK_N]
    for k0 in range(0, H, BLOCK_K):
        k_mask = offs_k < H - k0
        h_t = tl.load(h_ptrs, mask=k_mask[:, None] & row_mask[None, :], other=0.0)
        tl.atomic_add(dw_ptrs, _dot(h_t, d_in, None, DOT_PRECISION, UPCAST_DOT),
                      mask=k_mask[:, None] & col_mask[None, :], sem="relaxed")
        h_ptrs += BLOCK_K
        dw_ptrs += BLOCK_K


@triton.jit(do_not_specialize=["M", "V"])
def _logprobs_bwd_kernel(h_ptr, w_ptr, b_ptr, lab_ptr, lse_ptr, g_ptr, ent_ptr, ge_ptr, dh_ptr, dw_ptr, db_ptr,
                         M, V, H, filter_eps, compute_dh, compute_dw, compute_db, pre, post, slope,
                         HAS_BIAS: tl.constexpr, TRANSFORM: tl.constexpr, ENTROPY: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Recompute one logits tile, add its d_hidden / d_weight / d_bias share (fp32 atomics); ENTROPY:
    the logits' gradient has the entropy's term -ge * p * (log p + H) too.

    Which gradients (``compute_dh`` / ``compute_dw`` / ``compute_db``, bools) and the filter
    (``filter_eps`` > 0) are runtime arguments, not constexprs: a uniform branch costs nothing,
    the two gradient loops run one after the other (registers: the larger of the two), and one
    compiled variant serves every combination (a frozen weight, a frozen bias, ...)."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(V, BLOCK_N), GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    logits = _logits_tile(h_ptr, w_ptr, b_ptr, row0, col0, M, V, H,
                          HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
    logits = transform_logits(logits, pre, post, TRANSFORM)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_mask = offs_m < M - row0
    col_mask = offs_n < V - col0
    labels = tl.load(lab_ptr + row0 + offs_m, mask=row_mask, other=-1).to(tl.int32)
    lse = tl.load(lse_ptr + row0 + offs_m, mask=row_mask, other=float("inf"))  # padded rows: p = 0
    g = tl.load(g_ptr + row0 + offs_m, mask=row_mask, other=0.0)
    onehot = tl.where((col0 + offs_n)[None, :] == labels[:, None], 1.0, 0.0)
    in_tile = row_mask[:, None] & col_mask[None, :]
    p = tl.exp(logits - lse[:, None])
    diff = tl.where(in_tile, onehot - p, 0.0)
    d_logp = diff * g[:, None]
    if ENTROPY:  # dH/dl = -p * (log p + H); p = 0 (a -inf logit, a padded row) adds 0
        ent = tl.load(ent_ptr + row0 + offs_m, mask=row_mask, other=0.0)
        ge = tl.load(ge_ptr + row0 + offs_m, mask=row_mask, other=0.0)
        ent_term = p * tl.where(in_tile & (p > 0.0), logits - lse[:, None] + ent[:, None], 0.0)
        d_logp -= ge[:, None] * ent_term
    d_logits = transform_grad(d_logp, logits, post, slope, TRANSFORM)  # d/d(h W^T + b)
    if HAS_BIAS:
        if compute_db:
            tl.atomic_add(db_ptr + col0 + offs_n, tl.sum(d_logits, axis=0), mask=col_mask, sem="relaxed")
    keep = filter_eps <= 0.0
    if filter_eps > 0.0:
        size = tl.where(g[:, None] != 0.0, tl.abs(diff), 0.0)
        if ENTROPY:
            size = tl.maximum(size, tl.where(ge[:, None] != 0.0, tl.abs(ent_term), 0.0))
        keep = tl.max(tl.max(size, axis=1), axis=0) >= filter_eps
    if keep:
        d_in = to_16bit(d_logits, h_ptr.dtype.element_ty, UPCAST_DOT)
        if compute_dh:
            _grad_hidden(tl.trans(d_in), w_ptr, dh_ptr, row0, col0, M, V, H, BLOCK_M, BLOCK_N, BLOCK_K,
                         DOT_PRECISION, UPCAST_DOT)
        if compute_dw:
            _grad_weight(d_in, h_ptr, dw_ptr, row0, col0, M, V, H, BLOCK_M, BLOCK_N, BLOCK_K,
                         DOT_PRECISION, UPCAST_DOT)


def _config(dtype: torch.dtype, precision: str, n_hidden: int, transform_kind: int,
            weight_dtype: torch.dtype, entropy: bool = False) -> tuple[KernelConfig, KernelConfig]:
    """(forward, backward) configs of a compute dtype, DOT_PRECISION, hidden size, transform kind,
    weight dtype and whether the entropy is computed (its extra [BLOCK_M, BLOCK_N] terms take
    64-row blocks: 128 rows spill)."""
    fwd, bwd = _base_config(dtype, precision, n_hidden, transform_kind, weight_dtype)
    if entropy:
        fwd, bwd = fwd._replace(block_m=min(fwd.block_m, 64)), bwd._replace(block_m=min(bwd.block_m, 64))
    return fwd, bwd


def _base_config(dtype, precision, n_hidden, transform_kind, weight_dtype) -> tuple[KernelConfig, KernelConfig]:
    if dtype not in CONFIGS:
        raise TypeError(f"Triton log-prob kernels support {list(CONFIGS)}, got {dtype}")
    tf32 = dtype == torch.float32 and precision == "tf32"
    if n_hidden % 16:
        return UNALIGNED_TF32_CONFIGS if tf32 else UNALIGNED_CONFIGS[dtype]
    fwd, bwd = TF32_CONFIGS if tf32 else CONFIGS[dtype]
    if dtype != torch.float32 and (transform_kind == TRANSFORM_SOFTCAP or weight_dtype == torch.float32):
        bwd = NARROW_K_BWD_CONFIG
    return fwd, bwd


def _upcast_dot(dtype: torch.dtype, device: torch.device) -> bool:
    """True only for bf16 under the Triton interpreter (see the module docstring)."""
    return dtype == torch.bfloat16 and (triton_interpreting() or device.type != "cuda")


def _target_programs(device: torch.device) -> int:
    """About two waves of programs on the device (8 under the CPU interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _vocab_splits(n_rows: int, n_vocab: int, cfg: KernelConfig, device: torch.device) -> tuple[int, int]:
    """(splits, tiles_per_split): enough splits to fill the device, and at most
    MAX_TILES_PER_SPLIT tiles per program so that grouped programs share weight tiles."""
    n_tiles = triton.cdiv(n_vocab, cfg.block_n)
    row_blocks = triton.cdiv(n_rows, cfg.block_m)
    splits = min(n_tiles, max(1, triton.cdiv(_target_programs(device), row_blocks)))
    tiles_per_split = min(triton.cdiv(n_tiles, splits), MAX_TILES_PER_SPLIT)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def _bias_arg(bias: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """Bias as a contiguous fp32 [V]; without bias an unused fp32 `dummy` (same *fp32 signature)."""
    return dummy if bias is None else bias.detach().float().contiguous()


def logprobs_forward(hidden, weight, bias, labels, *, transform: LogitTransform = IDENTITY, entropy: bool = False):
    """hidden: [M, H] bf16/fp16/fp32 contiguous; weight: [V, H] contiguous, hidden's dtype or fp32
    (16-bit hidden: computed in hidden's dtype); bias: [V] | None; labels: [M] int64 in [0, V);
    transform: the logit transform (:mod:`drdo_kernels.logit_transform`).
    Returns (logp [M] fp32 <= 0, lse [M] fp32) of the transformed logits; with ``entropy``
    (logp, lse, entropy [M] fp32 >= 0)."""
    dtype = compute_dtype(hidden.dtype, weight.dtype)
    precision = dot_precision(dtype)
    (m, h), v = hidden.shape, weight.shape[0]
    fwd, _ = _config(dtype, precision, h, transform.kind, weight.dtype, entropy)
    if m == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return (empty, empty.clone(), empty.clone()) if entropy else (empty, empty.clone())
    splits, tiles_per_split = _vocab_splits(m, v, fwd, hidden.device)
    part_lse = torch.empty((splits, m), dtype=torch.float32, device=hidden.device)
    part_tgt = torch.empty((splits, m), dtype=torch.float32, device=hidden.device)
    part_ent = torch.empty((splits, m), dtype=torch.float32, device=hidden.device) if entropy else part_tgt
    grid = (triton.cdiv(m, fwd.block_m) * splits,)
    _logprobs_fwd_kernel[grid](
        hidden, weight, _bias_arg(bias, part_lse), labels, part_lse, part_tgt, part_ent, m, v, h, tiles_per_split,
        splits, transform.pre, transform.post, HAS_BIAS=bias is not None, TRANSFORM=transform.kind, ENTROPY=entropy,
        BLOCK_M=fwd.block_m,
        BLOCK_N=fwd.block_n, BLOCK_K=fwd.block_k,
        GROUP_M=fwd.group_m, DOT_PRECISION=precision, UPCAST_DOT=_upcast_dot(dtype, hidden.device),
        num_warps=fwd.num_warps, num_stages=fwd.num_stages,
    )
    lse = torch.logsumexp(part_lse, dim=0)
    logp = (part_tgt.sum(0) - lse).clamp_max(0.0)
    if not entropy:
        return logp, lse
    return logp, lse, merge_split_entropy(part_lse, part_ent, lse)


def merge_split_entropy(part_lse: torch.Tensor, part_ent: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The entropy [M] of the whole softmax from its vocab splits' [splits, M] log-sum-exps and
    entropies (each of the split's own softmax), lse [M] the whole log-sum-exp: with split weights
    w_k = exp(lse_k - lse), H = sum_k w_k * (H_k + lse - lse_k), non-negative terms; an empty
    split (lse_k = -inf) adds 0."""
    weight = (part_lse - lse).exp()
    term = weight * (part_ent + lse - part_lse)
    return torch.where(weight > 0, term, torch.zeros_like(term)).sum(0)


def logprobs_backward(grad, hidden, weight, bias, labels, lse, need_weight_grad=True, *,
                      need_hidden_grad=True, need_bias_grad=True, filter_eps=0.0,
                      transform: LogitTransform = IDENTITY, entropy: torch.Tensor | None = None,
                      grad_entropy: torch.Tensor | None = None):
    """grad: [M] upstream gradient; other args as saved by :func:`logprobs_forward` (the same
    ``transform``); entropy, grad_entropy: [M] the forward's entropy and its upstream gradient
    (both or neither: the gradients are then those of sum(grad * logp + grad_entropy * entropy)).

    filter_eps: skip the gradient dots of tiles whose |softmax - onehot| are all below it
    (0, the default: exact; see :func:`default_filter_eps`).
    Returns (d_hidden [M, H] hidden.dtype | None, d_weight [V, H] weight.dtype | None,
    d_bias [V] bias.dtype | None); a gradient that is not needed is not computed.
    """
    dtype = compute_dtype(hidden.dtype, weight.dtype)
    precision = dot_precision(dtype)
    _, bwd = _config(dtype, precision, hidden.shape[1], transform.kind, weight.dtype, entropy is not None)
    eps = float(filter_eps)
    if not eps >= 0.0:
        raise ValueError(f"filter_eps must be >= 0, got {filter_eps!r}")
    need_bias_grad = need_bias_grad and bias is not None
    (m, h), v = hidden.shape, weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros((m, h), **f32) if need_hidden_grad else lse
    d_weight = torch.zeros((v, h), **f32) if need_weight_grad else lse
    d_bias = torch.zeros(v, **f32) if need_bias_grad else lse
    grid = (triton.cdiv(m, bwd.block_m) * triton.cdiv(v, bwd.block_n),)
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("logprobs_backward takes entropy and grad_entropy together")
    g = grad.float().contiguous()
    ent = g if entropy is None else entropy.float().contiguous()
    g_ent = g if entropy is None else grad_entropy.float().contiguous()
    if m > 0 and (need_hidden_grad or need_weight_grad or need_bias_grad):
        _logprobs_bwd_kernel[grid](
            hidden, weight, _bias_arg(bias, lse), labels, lse, g, ent, g_ent,
            d_hidden, d_weight, d_bias, m, v, h, eps, bool(need_hidden_grad), bool(need_weight_grad),
            bool(need_bias_grad), transform.pre, transform.post, transform.slope,
            HAS_BIAS=bias is not None, TRANSFORM=transform.kind, ENTROPY=entropy is not None,
            BLOCK_M=bwd.block_m, BLOCK_N=bwd.block_n,
            BLOCK_K=bwd.block_k, GROUP_M=bwd.group_m, DOT_PRECISION=precision,
            UPCAST_DOT=_upcast_dot(dtype, hidden.device), num_warps=bwd.num_warps, num_stages=bwd.num_stages,
        )
    return (
        d_hidden.to(hidden.dtype) if need_hidden_grad else None,
        d_weight.to(weight.dtype) if need_weight_grad else None,
        d_bias.to(bias.dtype) if need_bias_grad else None,
    )
