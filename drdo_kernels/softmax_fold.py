"""The per-row fold of a [rows, V] float32 logits buffer, in Triton and in PyTorch.

Two steps, both IN PLACE on the buffer a cuBLAS GEMM just wrote:

* :func:`row_stats` adds the bias (when there is one), applies the logit transform (when it
  is not the identity: :mod:`drdo_kernels.logit_transform`) and returns, per row, the
  log-sum-exp (an online max / rescaled sum over vocab blocks) and the target logit
  ``l[r, labels[r]]``: one read of the buffer (and one write with a bias or a transform).
* With ``entropy=True`` :func:`row_stats` also returns each row's entropy
  ``H = lse - sum_v p_v * l_v`` (p = softmax(l)), from an online ``sum exp(l - m) * (l - m)``
  rescaled with the running max as the sum of exponentials is: ``H = log s - t / s``, two
  non-negative terms, no cancellation.
* :func:`softmax_grad` turns each row into ``g[r] * (onehot(labels[r]) - softmax(l[r]))``
  (given the entropy and its upstream gradient ``ge``, minus ``ge[r] * p * (log p + H[r])``,
  the entropy's gradient ``dH/dl = -p * (l - E_p[l])``),
  times the transform's derivative ``dl/dx`` (recovered from the transformed logit ``l`` itself),
  given that row's log-sum-exp: one read and one write, into the buffer itself
  (float32) or into a 16-bit buffer of the same shape that feeds the 16-bit GEMMs. Given
  untransformed logits (``raw=True``, the recomputing backward passes) it transforms them
  on load.

Both are NaN-safe for -inf logits: blocks (or whole rows but the label) of -inf
contribute exactly 0, never ``inf - inf`` or ``0 * inf``. The Triton kernels run one
program per row; the PyTorch versions are the same math in torch ops (used on the
CPU without the Triton interpreter, and for float64).
"""
from __future__ import annotations

import torch

from .logit_transform import (
    IDENTITY,
    LogitTransform,
    transform_grad,
    transform_logits,
)
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

    @triton.jit(do_not_specialize_on_alignment=["lab_ptr", "lse_ptr", "tgt_ptr", "ent_ptr"])
    def _row_stats_kernel(x_ptr, b_ptr, lab_ptr, lse_ptr, tgt_ptr, ent_ptr, V, stride, pre, post,
                          HAS_BIAS: tl.constexpr, TRANSFORM: tl.constexpr, ENTROPY: tl.constexpr,
                          BLOCK: tl.constexpr):
        """One row: x = transform(x + bias) (stored back), lse = logsumexp(x), tgt = x[label];
        ENTROPY: also ent = -sum softmax(x) * log_softmax(x), from the online sum of exp(x - m) * (x - m)."""
        row = tl.program_id(0)
        x_row = x_ptr + row.to(tl.int64) * stride
        label = tl.load(lab_ptr + row)
        cols = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane running max
        s = tl.zeros([BLOCK], tl.float32)  # per-lane sum of exp(x - m)
        t = tl.zeros([BLOCK], tl.float32)  # ENTROPY: per-lane sum of exp(x - m) * (x - m), <= 0
        tgt = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=float("-inf"))
            if HAS_BIAS:
                x = x + tl.load(b_ptr + offs, mask=mask, other=0.0)
            if TRANSFORM != 0:
                x = tl.where(mask, transform_logits(x, pre, post, TRANSFORM), float("-inf"))
            if HAS_BIAS or TRANSFORM != 0:
                tl.store(x_row + offs, x, mask=mask)
            tgt += tl.where(offs == label, x, 0.0)
            m_new = tl.maximum(m, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: add exact zeros
            alpha = tl.exp(m - m_safe)
            e = tl.exp(x - m_safe)
            if ENTROPY:  # rescaled to the new max: sum e * (x - m_old) -> sum e * (x - m_new); -inf adds 0
                m_old_safe = tl.where(m == float("-inf"), 0.0, m)
                t = alpha * (t + (m_old_safe - m_safe) * s) + e * tl.where(e > 0.0, x - m_safe, 0.0)
            s = s * alpha + e
            m = m_new
        m_row = tl.max(m, axis=0)
        m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
        lane_scale = tl.exp(m - m_row_safe)
        total = tl.sum(s * lane_scale, axis=0)
        tl.store(lse_ptr + row, m_row_safe + tl.log(total))
        tl.store(tgt_ptr + row, tl.sum(tgt, axis=0))
        if ENTROPY:
            m_lane_safe = tl.where(m == float("-inf"), 0.0, m)
            t_row = tl.sum(lane_scale * (t + (m_lane_safe - m_row_safe) * s), axis=0)
            tl.store(ent_ptr + row, tl.where(total > 0.0, tl.log(total) - t_row / total, 0.0))

    @triton.jit(do_not_specialize_on_alignment=["lab_ptr", "lse_ptr", "g_ptr", "ent_ptr", "ge_ptr"])
    def _softmax_grad_kernel(x_ptr, out_ptr, lab_ptr, lse_ptr, g_ptr, ent_ptr, ge_ptr, V, x_stride, out_stride,
                             pre, post, slope, IN_PLACE: tl.constexpr, TRANSFORM: tl.constexpr, RAW: tl.constexpr,
                             ENTROPY: tl.constexpr, BLOCK: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
        """One row: out = (g * (onehot(label) - p) - ge * p * (log p + ent)) * dl/dx, p = exp(l - lse),
        into x itself or into out (l = x, or transform(x) with RAW; the ge term only with ENTROPY;
        ROUND_BY_HAND: bf16 under the interpreter, see :mod:`drdo_kernels.rounding`)."""
        row = tl.program_id(0)
        x_row = x_ptr + row.to(tl.int64) * x_stride
        out_row = out_ptr + row.to(tl.int64) * out_stride
        label = tl.load(lab_ptr + row)
        lse = tl.load(lse_ptr + row)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        g = tl.load(g_ptr + row)
        if ENTROPY:
            ent = tl.load(ent_ptr + row)
            ge = tl.load(ge_ptr + row)
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=0.0)  # lanes past V: finite, never stored
            if RAW:
                x = transform_logits(x, pre, post, TRANSFORM)
            p = tl.exp(x - lse)
            d = g * (tl.where(offs == label, 1.0, 0.0) - p)
            if ENTROPY:  # dH/dl = -p * (l - E_p[l]) = -p * (log p + H); p = 0 (l = -inf) adds 0
                d -= ge * p * tl.where(p > 0.0, x - lse + ent, 0.0)
            d = transform_grad(d, x, post, slope, TRANSFORM)
            if IN_PLACE:
                tl.store(x_row + offs, d, mask=mask)
            else:
                tl.store(out_row + offs, to_16bit(d, out_ptr.dtype.element_ty, ROUND_BY_HAND), mask=mask)


def _quarters(x: torch.Tensor):
    """x split into (at most) four blocks of rows: a temporary per block is at most a quarter of x."""
    return x.split(max(1, -(-x.shape[0] // 4)))


def _torch_entropy(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """-sum_v p * log p per row of x [c, V] given its lse [c], p = exp(x - lse); a quarter of the
    rows at a time (p = 0 adds 0)."""
    parts = []
    for part, part_lse in zip(_quarters(x), _quarters(lse)):
        log_p = part - part_lse.masked_fill(part_lse == float("-inf"), 0.0)[:, None]
        p = log_p.exp()
        parts.append(-(p * log_p.masked_fill_(p == 0, 0.0)).sum(-1))
    return torch.cat(parts) if parts else x.new_zeros(0)


def _torch_row_stats(x, bias, labels, transform: LogitTransform, entropy: bool):
    """row_stats in torch ops; logsumexp (and the entropy) over quarters of the rows, so a
    temporary is at most a quarter of the buffer."""
    if bias is not None:
        x.add_(bias.to(x.dtype))
    transform.apply_(x)
    lse = torch.cat([torch.logsumexp(part, dim=-1) for part in _quarters(x)]) \
        if x.shape[0] else x.new_zeros(0)
    target = x.gather(1, labels[:, None]).squeeze(1)
    return (lse, target, _torch_entropy(x, lse)) if entropy else (lse, target)


def row_stats(x: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, use_triton: bool,
              transform: LogitTransform = IDENTITY, *, entropy: bool = False):
    """x: [c, V] float32 (float64 with use_triton=False) contiguous, modified in place
    (x = transform(x + bias)); bias: [V] | None; labels: [c] int64 in [0, V).

    Returns (lse [c], target [c]) in x.dtype, and with ``entropy`` (lse, target, entropy [c]),
    entropy = -sum_v softmax(l) * log_softmax(l) >= 0; afterwards x holds the transformed logits.
    """
    if not use_triton or x.shape[0] == 0:
        return _torch_row_stats(x, bias, labels, transform, entropy)
    rows, n_vocab = x.shape
    lse = torch.empty(rows, dtype=torch.float32, device=x.device)
    tgt = torch.empty_like(lse)
    ent = torch.empty_like(lse) if entropy else lse
    b = lse if bias is None else bias.to(torch.float32).contiguous()
    _row_stats_kernel[(rows,)](x, b, labels, lse, tgt, ent, n_vocab, x.stride(0), transform.pre, transform.post,
                               HAS_BIAS=bias is not None, TRANSFORM=transform.kind, ENTROPY=entropy, BLOCK=BLOCK,
                               num_warps=NUM_WARPS)
    return (lse, tgt, ent) if entropy else (lse, tgt)


def _torch_softmax_grad(x, labels, lse, g, transform: LogitTransform, raw: bool, ent=None, g_ent=None) -> None:
    """softmax_grad in torch ops, in place on x. Without a softcap dl/dx is the constant
    ``transform.slope`` (folded into g); with one it is taken from each quarter of the rows
    before that quarter is overwritten (a temporary of a quarter of x), as is p for the entropy term."""
    if raw:
        transform.apply_(x)
    lse = lse.masked_fill(lse == float("-inf"), 0.0)
    if transform.softcap is None and ent is None:
        g = g * transform.slope if not transform.is_identity else g
        x.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # -g * softmax
        x.scatter_add_(1, labels[:, None], g[:, None])  # + g * onehot
        return
    no_entropy = [None] * len(_quarters(x))
    entropy_parts = (_quarters(ent), _quarters(g_ent)) if ent is not None else (no_entropy, no_entropy)
    for part, part_labels, part_lse, part_g, part_ent, part_ge in zip(
            _quarters(x), _quarters(labels), _quarters(lse), _quarters(g), *entropy_parts):
        slope = transform.derivative(part) if transform.softcap is not None else None
        part.sub_(part_lse[:, None])  # log p
        if part_ent is None:
            part.exp_().mul_(-part_g[:, None])
        else:  # -p * (g + ge * (log p + H)); p = 0 adds 0
            p = part.exp()
            part.add_(part_ent[:, None]).mul_(part_ge[:, None]).add_(part_g[:, None]).mul_(p).neg_()
            part.masked_fill_(p == 0, 0.0)
        part.scatter_add_(1, part_labels[:, None], part_g[:, None])
        if slope is not None:
            part.mul_(slope)
        elif not transform.is_identity:
            part.mul_(transform.slope)


def softmax_grad(x: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                 out_dtype: torch.dtype, use_triton: bool, transform: LogitTransform = IDENTITY,
                 raw: bool = False, *, entropy: torch.Tensor | None = None,
                 grad_entropy: torch.Tensor | None = None) -> torch.Tensor:
    """x: [c, V] transformed logits l (float32/float64, contiguous), or with ``raw`` the biased
    logits before the transform; lse, g: [c] x.dtype; entropy, grad_entropy: [c] (both or
    neither) the rows' entropy H (:func:`row_stats`) and the upstream gradient on it.

    Returns d_x = (g * (onehot(labels) - p) - grad_entropy * p * (log p + H)) * dl/dx [c, V],
    p = softmax(l), in ``out_dtype``: x itself when out_dtype == x.dtype (overwritten), else a
    new 16-bit tensor.
    """
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("softmax_grad takes entropy and grad_entropy together")
    if not use_triton or x.shape[0] == 0:
        ent, g_ent = (None, None) if entropy is None else (entropy.to(x.dtype), grad_entropy.to(x.dtype))
        _torch_softmax_grad(x, labels, lse, g, transform, raw, ent, g_ent)
        return x if out_dtype == x.dtype else x.to(out_dtype)
    rows, n_vocab = x.shape
    in_place = out_dtype == x.dtype
    out = x if in_place else torch.empty(x.shape, dtype=out_dtype, device=x.device)
    g = g.to(torch.float32).contiguous()
    ent = g if entropy is None else entropy.to(torch.float32).contiguous()
    g_ent = g if entropy is None else grad_entropy.to(torch.float32).contiguous()
    _softmax_grad_kernel[(rows,)](x, out, labels, lse, g, ent, g_ent, n_vocab,
                                  x.stride(0), out.stride(0), transform.pre, transform.post, transform.slope,
                                  IN_PLACE=in_place, TRANSFORM=transform.kind, RAW=raw and not transform.is_identity,
                                  ENTROPY=entropy is not None, BLOCK=BLOCK,
                                  ROUND_BY_HAND=emulate_rounding(out_dtype, x.device), num_warps=NUM_WARPS)
    return out
