"""Losses that are sums over pairs, with all LM-head gradients computed in the forward.

DRDO, DPO and the Oracle loss are ``sum_b f(z_b, aux_b)`` (or its mean), each pair's term
depending only on that pair's sequence log-probs z and per-row scores. So the forward
runs the chunked backend (:mod:`drdo_kernels.logprobs_chunked`) on chunks of WHOLE
pairs (the chosen and rejected rows of the same pairs together) and, per chunk:

    x = hidden[chunk] @ W.T (fp32)  ->  lse, target per token  ->  z of the chunk's rows
    c = d(sum of the chunk's pair losses)/dz     (autograd on the drdo.losses reference)
    d = c[row] * (onehot - softmax(x))           (in place)  ->  d_hidden, d_weight += ...

6·H·V FLOPs per token, no recompute. The loss and metrics are then the reference
function applied to the full z; the backward only scales the stored gradients by the
upstream gradient (first order only). Extra memory until backward: d_hidden of the
valid tokens, the fp32 d_weight accumulator and the per-row score gradients.
A pair whose tokens alone exceed the chunk budget gets a chunk of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from . import logprobs_chunked as chunked
from .inputs import gather_lm_head
from .logprobs import plan_tokens, uses_triton_fold
from .softmax_fold import row_stats, softmax_grad

__all__ = ["PairLossSpec", "chunked_pair_loss"]


@dataclass
class PairLossSpec:
    """A loss over G groups (pairs) of R LM rows each, in TRL's side-major row layout.

    loss(z [R*g], n_tokens [R*g], scores: list of [2*g], reduction) -> (loss, metrics dict):
    the reference loss of g groups; z and n_tokens hold the LM rows (side-major: R=2 gives
    chosen rows then rejected rows), each score tensor the chosen then rejected entries.
    """

    loss: Callable
    rows_per_group: int


def _group_chunks(group_tokens: list[int], max_tokens: int) -> list[tuple[int, int, int, int]]:
    """Greedy split of groups into chunks of at most max_tokens tokens (one group at least):
    [(g0, g1, tok0, tok1)]."""
    chunks, g0, tok0, tok = [], 0, 0, 0
    for g, n in enumerate(group_tokens):
        if tok + n > tok0 + max_tokens and g > g0:
            chunks.append((g0, g, tok0, tok))
            g0, tok0 = g, tok
        tok += n
    if g0 < len(group_tokens):
        chunks.append((g0, len(group_tokens), tok0, tok))
    return chunks


def _side_slice(t: torch.Tensor, sides: int, g0: int, g1: int) -> torch.Tensor:
    """t: [sides * G, ...] side-major -> its groups g0..g1 as [sides * (g1 - g0), ...]."""
    return t.unflatten(0, (sides, -1))[:, g0:g1].flatten(0, 1)


class _ChunkedPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, spec, plan, rows, use_triton, reduction, names, *scores):
        """hidden [R*G, T, H], labels [R*G, T], scores: [2G] tensors -> (loss, metric values);
        the metric names are appended to the list ``names``."""
        n_rows, n_pos, n_hidden = hidden.shape
        sides, groups = spec.rows_per_group, n_rows // spec.rows_per_group
        dtype = chunked.compute_dtype(hidden.dtype, weight.dtype)
        gemms = chunked.LMHeadGemms(weight, dtype)
        acc = gemms.acc
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h_valid = hidden.reshape(-1, n_hidden).index_select(0, plan.index).to(dtype)
        lab_valid = labels.reshape(-1).index_select(0, plan.index).long()
        token_row = torch.div(plan.index, n_pos, rounding_mode="floor")
        b = None if bias is None else bias.detach().to(acc)
        n_tokens = plan.counts
        counts = [sum(plan.row_counts[side * groups + g] for side in range(sides)) for g in range(groups)]

        token_logp = hidden.new_zeros(n_rows * n_pos, dtype=acc)
        coeff = hidden.new_zeros(n_rows, dtype=acc)  # dL/dz of every LM row
        d_scores = [torch.zeros_like(s, dtype=torch.promote_types(acc, s.dtype)) for s in scores]
        d_h = h_valid.new_empty(h_valid.shape, dtype=acc) if need_h else None
        d_w = torch.zeros(gemms.weight.shape, dtype=acc, device=hidden.device) if need_w else None
        d_b = torch.zeros(weight.shape[0], dtype=acc, device=hidden.device) if need_b else None
        scale = 1.0 / groups if reduction == "mean" else 1.0
        for g0, g1, lo, hi in _group_chunks(counts, rows):
            x = gemms.logits(h_valid[lo:hi])
            lse, target = row_stats(x, b, lab_valid[lo:hi], use_triton)
            token_logp.index_copy_(0, plan.index[lo:hi], (target - lse).clamp_max(0.0))
            z = _side_slice(token_logp.view(n_rows, n_pos), sides, g0, g1).sum(-1)
            c, dsc = _pair_gradients(spec, z, _side_slice(n_tokens, sides, g0, g1),
                                     [_side_slice(s, 2, g0, g1) for s in scores])
            _side_slice(coeff, sides, g0, g1).copy_(c * scale)
            for full, part in zip(d_scores, dsc):
                _side_slice(full, 2, g0, g1).copy_(part * scale)
            if need_h or need_w or need_b:
                d = softmax_grad(x, lab_valid[lo:hi], lse, coeff[token_row[lo:hi]], dtype, use_triton)
                chunked.accumulate_chunk(gemms, d, h_valid[lo:hi], d_h, lo, d_w, d_b)
            del x
        z_all = token_logp.view(n_rows, n_pos).sum(-1)
        with torch.no_grad():
            loss, metrics = spec.loss(z_all, n_tokens, [s.detach() for s in scores], reduction)
        values = torch.stack([v.detach().to(loss.dtype) for v in metrics.values()])
        names.extend(metrics)
        ctx.grads = (d_h, d_w, d_b, d_scores)
        ctx.meta = (acc, plan.index, hidden.shape, hidden.dtype, weight.dtype,
                    None if bias is None else bias.dtype, [s.dtype for s in scores])
        ctx.mark_non_differentiable(values)
        return loss, values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_values):
        d_h, d_w, d_b, d_scores = ctx.grads
        acc, index, h_shape, h_dtype, w_dtype, b_dtype, s_dtypes = ctx.meta
        ctx.grads = None
        g = grad_loss.to(acc)
        out_h = None
        if d_h is not None:
            out_h = torch.zeros(h_shape, dtype=h_dtype, device=d_h.device)
            out_h.view(-1, h_shape[-1]).index_copy_(0, index, d_h.mul_(g).to(h_dtype))
        out_w = None if d_w is None else d_w.mul_(g).to(w_dtype)
        out_b = None if d_b is None else d_b.mul_(g).to(b_dtype)
        out_s = [ds.mul_(g).to(dt) if need else None
                 for ds, dt, need in zip(d_scores, s_dtypes, ctx.needs_input_grad[10:])]
        return (out_h, out_w, out_b, None, None, None, None, None, None, None, *out_s)


def _pair_gradients(spec: PairLossSpec, z, n_tokens, scores):
    """d(sum of the chunk's pair losses)/d(z, scores), by autograd on the reference loss.

    z: [R*g]; scores: [2*g] tensors. Returns (dz [R*g], [d score [2*g]]) (zeros where unused).
    """
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        leaves = [s.detach().requires_grad_() if s.is_floating_point() else s.detach() for s in scores]
        loss, _ = spec.loss(z, n_tokens, leaves, "sum")
        wrt = [z] + [s for s in leaves if s.requires_grad]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(wrt, grads)]
    it = iter(grads[1:])
    return grads[0], [next(it) if s.requires_grad else torch.zeros_like(s) for s in leaves]


def chunked_pair_loss(spec: PairLossSpec, lm_head_weight, hidden, labels, scores, bias=None, *,
                      ignore_index: int = -100, backend: str = "chunked", reduction: str = "mean"):
    """Loss and metrics of ``spec`` from hidden states, gradients computed in the forward.

    Args:
        spec: the loss (see :class:`PairLossSpec`).
        lm_head_weight: [V, H]; hidden: [R*G, T, H]; labels: [R*G, T] aligned with hidden;
        scores: list of [2G] per-row tensors the loss reads (rewards, oracle scores, ...);
        bias: [V] | None; backend: "chunked" (Triton fold where it runs) or "torch".
    Returns (loss, metrics) as the reference loss. Raises ValueError when a row has no
    response token. One host synchronisation (the token counts).
    """
    from .logprobs import check_inputs, check_rows_scored

    lm_head_weight, bias = gather_lm_head(lm_head_weight, bias)  # an FSDP2-sharded (DTensor) head is all-gathered
    check_inputs(hidden, lm_head_weight, labels, bias)
    n_rows, n_pos = labels.shape
    sides = spec.rows_per_group
    order = torch.arange(n_rows * n_pos, device=labels.device).view(sides, -1, n_pos).transpose(0, 1).reshape(-1)
    plan = plan_tokens(labels, lm_head_weight.shape[0], ignore_index, order=order)
    check_rows_scored(plan, ignore_index)
    dtype = chunked.compute_dtype(hidden.dtype, lm_head_weight.dtype)
    rows = chunked.chunk_rows(lm_head_weight.shape[0], dtype, hidden.device)
    use_triton = uses_triton_fold(backend, hidden.device, dtype)
    names: list[str] = []
    loss, values = _ChunkedPairLoss.apply(hidden, lm_head_weight, bias, labels, spec, plan, rows, use_triton,
                                          reduction, names, *scores)
    metrics = dict(zip(names, values.unbind(0)))
    metrics["loss"] = loss.detach()
    return loss, metrics

