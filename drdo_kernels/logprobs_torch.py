"""Chunked PyTorch implementation of the fused LM-head log-probs (the readable spec).

Every function here works on COMPACTED tokens (all labels valid, in [0, V)):

    logits = hidden @ weight.T + bias          # [M, V], never held whole
    lse    = logsumexp(logits, -1)             # [M] float32, saved for backward
    logp   = min(logits[label] - lse, 0)       # [M] float32, never positive

Tokens are processed in chunks of ``chunk_size`` rows, so at most one
[chunk_size, V] float32 logits slab exists at a time (8 MiB by default, see
:func:`default_chunk_size`); the backward pass recomputes each slab, turns it in
place into ``d_logits = g * (onehot - softmax)`` and accumulates d_hidden, d_weight
and d_bias in float32 (float64 for float64 inputs). Extra memory: O(M) statistics,
one slab, the float32 gradient accumulators, and a float32 copy of ``weight`` when
it is bf16/fp16 (the matmuls run in float32 here; the Triton path needs no copy).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Elements of one [chunk, V] logits slab: 2**21 float32 = 8 MiB.
SLAB_ELEMENTS = 1 << 21


def default_chunk_size(n_vocab: int) -> int:
    """Rows per chunk so that a [rows, n_vocab] float32 slab holds <= SLAB_ELEMENTS."""
    return max(1, SLAB_ELEMENTS // max(1, n_vocab))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_logits(h: torch.Tensor, w_acc: torch.Tensor, b_acc: torch.Tensor | None) -> torch.Tensor:
    """h: [c, H] any float dtype; w_acc: [V, H] fp32/fp64 -> logits [c, V] in w_acc's dtype."""
    return F.linear(h.to(w_acc.dtype), w_acc, b_acc)


def _weights_acc(weight: torch.Tensor, bias: torch.Tensor | None):
    """weight/bias in the accumulation dtype (no copy when already there)."""
    acc = _acc_dtype(weight)
    return weight.to(acc), (None if bias is None else bias.to(acc))


def logprobs_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden: [M, H]; weight: [V, H]; bias: [V] | None; labels: [M] int64 in [0, V).

    Returns (logp [M], lse [M]) in float32 (float64 for float64 inputs).
    """
    w_acc, b_acc = _weights_acc(weight, bias)
    m = hidden.shape[0]
    logp = hidden.new_empty(m, dtype=w_acc.dtype)
    lse = hidden.new_empty(m, dtype=w_acc.dtype)
    for start in range(0, m, chunk_size):
        stop = min(m, start + chunk_size)
        logits = _chunk_logits(hidden[start:stop], w_acc, b_acc)
        lse[start:stop] = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, labels[start:stop, None]).squeeze(1)
        logp[start:stop] = (target - lse[start:stop]).clamp_max(0.0)
        del logits
    return logp, lse


def logprobs_backward(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    chunk_size: int,
    need_weight_grad: bool = True,
):
    """grad: [M] upstream d(loss)/d(logp); lse: [M] from :func:`logprobs_forward`.

    Returns (d_hidden [M, H] hidden.dtype, d_weight [V, H] weight.dtype | None,
    d_bias [V] bias.dtype | None). The clamp at 0 is treated as the identity
    (it only removes rounding), so d_logits = g * (onehot - softmax) everywhere.
    """
    w_acc, b_acc = _weights_acc(weight, bias)
    m = hidden.shape[0]
    grad = grad.to(w_acc.dtype)
    d_hidden = torch.empty(hidden.shape, dtype=w_acc.dtype, device=hidden.device)
    d_weight = torch.zeros_like(w_acc) if need_weight_grad else None
    d_bias = torch.zeros_like(b_acc) if b_acc is not None else None
    for start in range(0, m, chunk_size):
        stop = min(m, start + chunk_size)
        h = hidden[start:stop].to(w_acc.dtype)
        g = grad[start:stop, None]
        d_logits = _chunk_logits(h, w_acc, b_acc)
        d_logits.sub_(lse[start:stop, None]).exp_().mul_(-g)  # -g * softmax
        d_logits.scatter_add_(1, labels[start:stop, None], g)  # + g * onehot
        d_hidden[start:stop] = d_logits @ w_acc
        if d_weight is not None:
            d_weight.addmm_(d_logits.t(), h)
        if d_bias is not None:
            d_bias += d_logits.sum(0)
        del d_logits
    return (
        d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )
