"""Losses that are sums over pairs, with all LM-head gradients computed in the forward.

DRDO, DPO and the Oracle loss are ``sum_b f(z_b, aux_b)`` (or its mean), each pair's term
depending only on that pair's sequence log-probs z and per-row scores. So the forward
runs the chunked backend (:mod:`drdo_kernels.logprobs_chunked`) on chunks of WHOLE
pairs (the chosen and rejected rows of the same pairs together) and, per chunk:

    x = hidden[chunk] @ W.T (fp32)  ->  lse, target per token  ->  z of the chunk's rows
    c = d(sum of the chunk's pair losses)/dz     (autograd on the drdo.losses reference)
    d = c[row] * (onehot - softmax(x))           (in place)  ->  d_hidden, d_weight += ...

6·H·V FLOPs per token, no recompute. A pair whose tokens alone exceed the chunk size is
split into sub-chunks and takes two passes instead (its log-sum-exps first, then its
gradients with the logits recomputed: 8·H·V FLOPs for its tokens), so no buffer ever
exceeds the chunk size. The loss and metrics are the reference function applied to
the full z. The backward only scales the stored gradients by the upstream gradient
(first order only); it leaves them intact, so ``backward(retain_graph=True)`` can be
called again. Extra memory until the graph is freed: d_hidden of the valid tokens, the
fp32 d_weight accumulator and the per-row score gradients (and, during the backward,
their copies in the inputs' dtypes). When no input needs a gradient (``torch.no_grad()``,
evaluation, frozen inputs) only the log-probs are computed: 2·H·V FLOPs per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from . import logprobs_chunked as chunked
from .logprobs import TokenPlan, uses_triton_fold
from .softmax_fold import row_stats, softmax_grad

__all__ = ["PairLossSpec", "chunked_pair_loss", "group_order", "group_chunks"]


@dataclass
class PairLossSpec:
    """A loss over G groups (pairs) of R LM rows each, in TRL's side-major row layout.

    loss(z [R*g], n_tokens [R*g], scores: list of [2*g], reduction) -> (loss, metrics dict):
    the reference loss of g groups; z and n_tokens hold the LM rows (side-major: R=2 gives
    chosen rows then rejected rows), each score tensor the chosen then rejected entries.
    triton_loss: the same loss by a Triton kernel, used instead on the triton backend (or None).
    """

    loss: Callable
    rows_per_group: int
    triton_loss: Callable | None = None


def group_order(n_rows: int, n_pos: int, rows_per_group: int, device) -> torch.Tensor:
    """[n_rows * n_pos] flat positions of labels [R*G, T] (side-major rows) ordered group by
    group: the R rows of group 0, then those of group 1, ... (so a group's tokens are contiguous)."""
    return torch.arange(n_rows * n_pos, device=device).view(rows_per_group, -1, n_pos).transpose(0, 1).reshape(-1)


def group_chunks(group_tokens: list[int], max_tokens: int) -> list[tuple[int, int, int, int]]:
    """Greedy split of groups into chunks of at most ``max_tokens`` tokens, whole groups only
    (a group larger than ``max_tokens`` is a chunk of its own): [(g0, g1, tok0, tok1)]."""
    chunks, g0, tok0, tok = [], 0, 0, 0
    for g, n in enumerate(group_tokens):
        if tok + n > tok0 + max_tokens and g > g0:
            chunks.append((g0, g, tok0, tok))
            g0, tok0 = g, tok
        tok += n
    if g0 < len(group_tokens):
        chunks.append((g0, len(group_tokens), tok0, tok))
    return chunks


def _groups(t: torch.Tensor, sides: int, g0: int, g1: int) -> torch.Tensor:
    """t: [sides * G, ...] side-major -> the VIEW [sides, g1 - g0, ...] of groups g0..g1
    (writing into it writes into t)."""
    return t.view(sides, -1, *t.shape[1:])[:, g0:g1]


class _State:
    """The buffers of one forward: per-token log-probs, per-row dL/dz, and the gradients."""

    def __init__(self, hidden, h_valid, gemms, scores, needs, n_rows, n_pos):
        acc, device = gemms.acc, hidden.device
        need_h, need_w, need_b = needs[:3]
        self.token_logp = torch.zeros(n_rows * n_pos, dtype=acc, device=device)
        self.coeff = torch.zeros(n_rows, dtype=acc, device=device)
        self.d_scores = [torch.zeros_like(s, dtype=torch.promote_types(acc, s.dtype)) for s in scores]
        self.d_h = h_valid.new_empty(h_valid.shape, dtype=acc) if need_h else None
        self.d_w = torch.zeros(gemms.weight.shape, dtype=acc, device=device) if need_w else None
        self.d_b = torch.zeros(gemms.weight.shape[0], dtype=acc, device=device) if need_b else None

    def z(self, n_rows: int) -> torch.Tensor:
        """[n_rows] summed log-probs of every row."""
        return self.token_logp.view(n_rows, -1).sum(-1)

    def group_z(self, sides: int, g0: int, g1: int) -> torch.Tensor:
        """[sides * (g1 - g0)] summed log-probs of the rows of groups g0..g1, side-major."""
        return _groups(self.token_logp.view(self.coeff.shape[0], -1), sides, g0, g1).sum(-1).flatten()


class _ChunkedPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, spec, plan, rows, use_triton, reduction, needs, names, *scores):
        """hidden [R*G, T, H], labels [R*G, T], scores: [2G] tensors -> (loss, metric values);
        ``needs``: which of (hidden, weight, bias, *scores) get gradients; the metric names
        are appended to the list ``names``."""
        n_rows, n_pos, n_hidden = hidden.shape
        dtype = chunked.compute_dtype(hidden.dtype, weight.dtype)
        gemms = chunked.LMHeadGemms(weight, dtype)
        h_valid = hidden.reshape(-1, n_hidden).index_select(0, plan.index).to(dtype)
        lab_valid = labels.reshape(-1).index_select(0, plan.index).long()
        st = _State(hidden, h_valid, gemms, scores, needs, n_rows, n_pos)
        if any(needs):
            _forward_with_gradients(st, spec, plan, gemms, h_valid, lab_valid, bias, scores, rows, use_triton,
                                    reduction, n_pos)
        else:  # nothing to differentiate: the log-probs alone
            logp, _ = chunked.logprobs_forward(h_valid, lab_valid, gemms, bias, rows, use_triton)
            st.token_logp.index_copy_(0, plan.index, logp)
        with torch.no_grad():
            loss, metrics = spec.loss(st.z(n_rows), plan.counts, [s.detach() for s in scores], reduction)
        values = torch.stack([v.detach().to(loss.dtype) for v in metrics.values()])
        names.extend(metrics)
        ctx.grads = (st.d_h, st.d_w, st.d_b, st.d_scores)
        ctx.meta = (plan.index, hidden.shape, hidden.dtype, weight.dtype,
                    None if bias is None else bias.dtype, [s.dtype for s in scores], needs)
        ctx.mark_non_differentiable(values)
        return loss, values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_values):
        d_h, d_w, d_b, d_scores = ctx.grads
        index, h_shape, h_dtype, w_dtype, b_dtype, s_dtypes, needs = ctx.meta
        g = grad_loss
        out_h = None
        if d_h is not None:
            out_h = torch.zeros(h_shape, dtype=h_dtype, device=d_h.device)
            out_h.view(-1, h_shape[-1]).index_copy_(0, index, _scaled(d_h, g, h_dtype))
        out_w = None if d_w is None else _scaled(d_w, g, w_dtype)
        out_b = None if d_b is None else _scaled(d_b, g, b_dtype)
        out_s = [_scaled(ds, g, dt) if need else None for ds, dt, need in zip(d_scores, s_dtypes, needs[3:])]
        return (out_h, out_w, out_b, None, None, None, None, None, None, None, None, *out_s)


def _scaled(t: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g * t in ``dtype``, one fused scale-and-cast into a new tensor (t is left intact)."""
    return torch.mul(t, g.to(t.dtype), out=torch.empty(t.shape, dtype=dtype, device=t.device))


def _forward_with_gradients(st, spec, plan, gemms, h_valid, lab_valid, bias, scores, rows, use_triton,
                            reduction, n_pos):
    """Fill st.token_logp and every gradient, chunk of whole groups by chunk (see the module doc)."""
    sides = spec.rows_per_group
    n_rows = st.coeff.shape[0]
    groups = n_rows // sides
    counts = [sum(plan.row_counts[side * groups + g] for side in range(sides)) for g in range(groups)]
    token_row = torch.div(plan.index, n_pos, rounding_mode="floor")
    b = None if bias is None else bias.detach().to(gemms.acc)
    scale = 1.0 / groups if reduction == "mean" else 1.0
    for g0, g1, lo, hi in group_chunks(counts, rows):
        h, lab = h_valid[lo:hi], lab_valid[lo:hi]
        if hi - lo <= rows:  # one pass: the chunk's logits serve the log-probs and the gradients
            x = gemms.logits(h)
            lse, target = row_stats(x, b, lab, use_triton)
            st.token_logp.index_copy_(0, plan.index[lo:hi], (target - lse).clamp_max(0.0))
            _pair_coefficients(st, spec, plan, scores, sides, g0, g1, scale)
            d = softmax_grad(x, lab, lse, st.coeff[token_row[lo:hi]], gemms.dtype, use_triton)
            chunked.accumulate_chunk(gemms, d, h, st.d_h, lo, st.d_w, st.d_b)
            del x, d
        else:  # one group larger than a chunk: its log-sum-exps first, then its gradients (recomputed logits)
            logp, lse = chunked.logprobs_forward(h, lab, gemms, bias, rows, use_triton)
            st.token_logp.index_copy_(0, plan.index[lo:hi], logp)
            _pair_coefficients(st, spec, plan, scores, sides, g0, g1, scale)
            d_h = None if st.d_h is None else st.d_h[lo:hi]
            chunked.backward_into(st.coeff[token_row[lo:hi]], h, lab, lse, gemms, bias, rows, use_triton,
                                  d_h, st.d_w, st.d_b)


def _pair_coefficients(st, spec, plan, scores, sides, g0, g1, scale) -> None:
    """dL/dz of groups g0..g1 into st.coeff, and their score gradients into st.d_scores."""
    z = st.group_z(sides, g0, g1)
    n_tokens = _groups(plan.counts, sides, g0, g1).flatten()
    part_scores = [_groups(s, 2, g0, g1).flatten() for s in scores]
    c, d_scores = _pair_gradients(spec, z, n_tokens, part_scores)
    _groups(st.coeff, sides, g0, g1).copy_(c.view(sides, -1) * scale)
    for full, part in zip(st.d_scores, d_scores):
        _groups(full, 2, g0, g1).copy_(part.view(2, -1) * scale)


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


def chunked_pair_loss(spec: PairLossSpec, lm_head_weight, hidden, labels, scores, bias, plan: TokenPlan, *,
                      backend: str = "chunked", reduction: str = "mean", chunk_tokens: int | None = None):
    """Loss and metrics of ``spec`` from hidden states, gradients computed in the forward.

    Args:
        spec: the loss (see :class:`PairLossSpec`).
        lm_head_weight: [V, H] plain tensor (gathered); hidden: [R*G, T, H]; labels: [R*G, T]
            aligned with hidden (checked by the caller);
        scores: list of [2G] per-row tensors the loss reads (rewards, oracle scores, ...);
        bias: [V] | None;
        plan: the valid tokens of labels in :func:`group_order` order, every row scored;
        backend: "chunked" (Triton fold where it runs) or "torch";
        chunk_tokens: tokens per chunk (None: from the memory budget).
    Returns (loss, metrics) as the reference loss. No host synchronisation.
    """
    dtype = chunked.compute_dtype(hidden.dtype, lm_head_weight.dtype)
    rows = chunk_tokens or chunked.chunk_rows(lm_head_weight.shape[0], dtype, hidden.device)
    use_triton = uses_triton_fold(backend, hidden.device, dtype)
    grad_on = torch.is_grad_enabled()
    inputs = (hidden, lm_head_weight, bias, *scores)
    needs = tuple(grad_on and isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
    names: list[str] = []
    loss, values = _ChunkedPairLoss.apply(hidden, lm_head_weight, bias, labels, spec, plan, rows, use_triton,
                                          reduction, needs, names, *scores)
    metrics = dict(zip(names, values.unbind(0)))
    metrics["loss"] = loss.detach()
    return loss, metrics
