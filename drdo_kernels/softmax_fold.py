"""The per-row fold of a [rows, V] float32 logits buffer, in Triton and in PyTorch.

Two steps, both IN PLACE on the buffer a cuBLAS GEMM just wrote:

* :func:`row_stats` adds the bias (when there is one) and returns, per row, the
  log-sum-exp (an online max / rescaled sum over vocab blocks) and the target logit
  ``x[r, labels[r]]``: one read of the buffer (and one write with a bias).
* :func:`softmax_grad` turns each row into ``g[r] * (onehot(labels[r]) - softmax(x[r]))``
  given that row's log-sum-exp: one read and one write, into the buffer itself
  (float32) or into a 16-bit buffer of the same shape that feeds the 16-bit GEMMs.

Both are NaN-safe for -inf logits: blocks (or whole rows but the label) of -inf
contribute exactly 0, never ``inf - inf`` or ``0 * inf``. The Triton kernels run one
program per row; the PyTorch versions are the same math in torch ops (used on the
CPU without the Triton interpreter, and for float64).
"""
from __future__ import annotations

import torch

from .rounding import emulate_rounding, to_16bit
from .triton_runtime import triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["row_stats", "softmax_grad", "BLOCK", "NUM_WARPS"]

#: Vocab entries per block of the row loop, and warps per program (one row each).
BLOCK = 2048
NUM_WARPS = 8


if triton is not None:

    @triton.jit(do_not_specialize_on_alignment=["lab_ptr", "lse_ptr", "tgt_ptr"])
    def _row_stats_kernel(x_ptr, b_ptr, lab_ptr, lse_ptr, tgt_ptr, V, stride,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """One row: x += bias (stored back), lse = logsumexp(x), tgt = x[label]."""
        row = tl.program_id(0)
        x_row = x_ptr + row.to(tl.int64) * stride
        label = tl.load(lab_ptr + row)
        cols = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane running max
        s = tl.zeros([BLOCK], tl.float32)  # per-lane sum of exp(x - m)
        tgt = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=float("-inf"))
            if HAS_BIAS:
                x = x + tl.load(b_ptr + offs, mask=mask, other=0.0)
                tl.store(x_row + offs, x, mask=mask)
            tgt += tl.where(offs == label, x, 0.0)
            m_new = tl.maximum(m, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: add exact zeros
            s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
            m = m_new
        m_row = tl.max(m, axis=0)
        m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
        total = tl.sum(s * tl.exp(m - m_row_safe), axis=0)
        tl.store(lse_ptr + row, m_row_safe + tl.log(total))
        tl.store(tgt_ptr + row, tl.sum(tgt, axis=0))

    @triton.jit(do_not_specialize_on_alignment=["lab_ptr", "lse_ptr", "g_ptr"])
    def _softmax_grad_kernel(x_ptr, out_ptr, lab_ptr, lse_ptr, g_ptr, V, x_stride, out_stride,
                             IN_PLACE: tl.constexpr, BLOCK: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
        """One row: out = g * (onehot(label) - exp(x - lse)), into x itself or into out
        (ROUND_BY_HAND: bf16 under the interpreter, see :mod:`drdo_kernels.rounding`)."""
        row = tl.program_id(0)
        x_row = x_ptr + row.to(tl.int64) * x_stride
        out_row = out_ptr + row.to(tl.int64) * out_stride
        label = tl.load(lab_ptr + row)
        lse = tl.load(lse_ptr + row)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        g = tl.load(g_ptr + row)
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=float("-inf"))
            d = g * (tl.where(offs == label, 1.0, 0.0) - tl.exp(x - lse))
            if IN_PLACE:
                tl.store(x_row + offs, d, mask=mask)
            else:
                tl.store(out_row + offs, to_16bit(d, out_ptr.dtype.element_ty, ROUND_BY_HAND), mask=mask)


def _torch_row_stats(x, bias, labels):
    """row_stats in torch ops; logsumexp over quarters of the rows, so its temporary is at
    most a quarter of the buffer."""
    if bias is not None:
        x.add_(bias.to(x.dtype))
    lse = torch.cat([torch.logsumexp(part, dim=-1) for part in x.split(max(1, -(-x.shape[0] // 4)))]) \
        if x.shape[0] else x.new_zeros(0)
    return lse, x.gather(1, labels[:, None]).squeeze(1)


def row_stats(x: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, use_triton: bool):
    """x: [c, V] float32 (float64 with use_triton=False) contiguous, modified in place
    (x += bias); bias: [V] | None; labels: [c] int64 in [0, V).

    Returns (lse [c], target [c]) in x.dtype; afterwards x holds the biased logits.
    """
    if not use_triton or x.shape[0] == 0:
        return _torch_row_stats(x, bias, labels)
    rows, n_vocab = x.shape
    lse = torch.empty(rows, dtype=torch.float32, device=x.device)
    tgt = torch.empty_like(lse)
    b = lse if bias is None else bias.to(torch.float32).contiguous()
    _row_stats_kernel[(rows,)](x, b, labels, lse, tgt, n_vocab, x.stride(0),
                               HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return lse, tgt


def softmax_grad(x: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                 out_dtype: torch.dtype, use_triton: bool) -> torch.Tensor:
    """x: [c, V] biased logits (float32/float64, contiguous); lse, g: [c] x.dtype.

    Returns d_logits = g * (onehot(labels) - softmax(x)) [c, V] in ``out_dtype``:
    x itself when out_dtype == x.dtype (overwritten), else a new 16-bit tensor.
    """
    if not use_triton or x.shape[0] == 0:
        lse = lse.masked_fill(lse == float("-inf"), 0.0)
        x.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # -g * softmax
        x.scatter_add_(1, labels[:, None], g[:, None])  # + g * onehot
        return x if out_dtype == x.dtype else x.to(out_dtype)
    rows, n_vocab = x.shape
    in_place = out_dtype == x.dtype
    out = x if in_place else torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _softmax_grad_kernel[(rows,)](x, out, labels, lse, g.to(torch.float32).contiguous(), n_vocab,
                                  x.stride(0), out.stride(0), IN_PLACE=in_place, BLOCK=BLOCK,
                                  ROUND_BY_HAND=emulate_rounding(out_dtype, x.device), num_warps=NUM_WARPS)
    return out
