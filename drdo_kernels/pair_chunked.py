"""Losses that are sums over pairs, with all LM-head gradients computed in the forward.

DRDO, DPO and the Oracle loss are ``sum_b f(z_b, aux_b)`` (or its mean), each pair's term
depending only on that pair's sequence log-probs z and per-row scores. So the forward
runs the chunked backend (:mod:`drdo_kernels.logprobs_chunked`) on chunks of WHOLE
pairs (the chosen and rejected rows of the same pairs together) and, per chunk:

    x = hidden[chunk] @ W.T (fp32)  ->  lse, target per token  ->  z of the chunk's rows
    c = dL/dz of the chunk's pairs      (closed form: drdo_kernels.pair_objectives)
    d = c[row] * (onehot - softmax(x))  (in place)  ->  d_hidden[chunk] = d @ W, d_weight += d.T @ h

6·H·V FLOPs per token, no recompute, and about 15 launches per chunk (the logits GEMM, the
fold, four small ops for z, two to five for c, the gather, the softmax gradient, the two
gradient GEMMs; the first chunk writes d_weight, the others add to it). A pair whose tokens
alone exceed the chunk size is split into sub-chunks and takes two passes instead (its
log-sum-exps first, then its gradients with the logits recomputed: 8·H·V FLOPs for its
tokens), so no buffer ever exceeds the chunk size. The loss, the metrics and the score
gradients come once, at the end, from the full z. The backward scales the stored gradients
by the upstream gradient (and 1/B for a mean) in one fused scale-and-cast each (first order
only); it leaves them intact, so ``backward(retain_graph=True)`` can be called again. Extra
memory until the graph is freed: d_hidden of the valid tokens, the fp32 d_weight and the
per-row score gradients (and, during the backward, their copies in the inputs' dtypes).
When no input needs a gradient (``torch.no_grad()``, evaluation, frozen inputs) only the
log-probs are computed: 2·H·V FLOPs per token.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import logprobs_chunked as chunked
from .logit_transform import IDENTITY, LogitTransform
from .logprobs import TokenPlan, uses_triton_fold
from .pair_objectives import PairObjective
from .softmax_fold import row_stats, softmax_grad

__all__ = ["chunked_pair_loss", "group_order", "group_chunks"]


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


class _Chunks:
    """One forward's inputs and buffers. Per-row tensors are [R, G] (side-major rows)."""

    def __init__(self, objective, gemms, hidden, labels, bias, plan, scores, needs, rows, use_triton, transform):
        n_rows, n_pos, n_hidden = hidden.shape
        acc, device = gemms.acc, hidden.device
        self.objective, self.gemms, self.plan, self.rows, self.use_triton = objective, gemms, plan, rows, use_triton
        self.transform = transform
        self.sides = objective.rows_per_group
        self.h = hidden.reshape(-1, n_hidden).index_select(0, plan.index).to(gemms.dtype)
        self.labels = labels.reshape(-1).index_select(0, plan.index).long()
        self.bias = None if bias is None else bias.detach().to(acc)
        self.scores = [s.detach().reshape(2, -1) for s in scores]
        self.n_tokens = plan.counts.to(acc).view(self.sides, -1)
        self.token_logp = torch.zeros(n_rows, n_pos, dtype=acc, device=device)
        self.coeff = torch.zeros(n_rows, dtype=acc, device=device)
        need_h, need_w, need_b = needs[:3]
        self.d_h = self.h.new_empty(self.h.shape, dtype=acc) if need_h else None
        self.d_w = torch.empty(gemms.weight.shape, dtype=acc, device=device) if need_w else None
        self.d_w_written = False
        self.d_b = torch.zeros(gemms.weight.shape[0], dtype=acc, device=device) if need_b else None

    # ---- per-row views
    def rows_of(self, t: torch.Tensor, g0: int, g1: int) -> torch.Tensor:
        """[R*G, ...] -> the VIEW [R, g1 - g0, ...] of groups g0..g1 (writes go into t)."""
        return t.view(self.sides, -1, *t.shape[1:])[:, g0:g1]

    def z(self, g0: int = 0, g1: int | None = None) -> torch.Tensor:
        """[R, g] summed log-probs of the rows of groups g0..g1."""
        return self.rows_of(self.token_logp, g0, g1).sum(-1)

    # ---- the pieces of a chunk
    def store_logp(self, lo: int, hi: int, logp: torch.Tensor) -> None:
        self.token_logp.view(-1).index_copy_(0, self.plan.index[lo:hi], logp)

    def set_coefficients(self, g0: int, g1: int) -> None:
        """dL/dz of groups g0..g1 (their z complete) into self.coeff."""
        c = self.objective.coefficients(self.z(g0, g1), self.n_tokens[:, g0:g1],
                                        [s[:, g0:g1] for s in self.scores], self.use_triton)
        self.rows_of(self.coeff, g0, g1).copy_(c)

    def token_coefficients(self, lo: int, hi: int) -> torch.Tensor:
        return self.coeff.index_select(0, self.token_row[lo:hi])

    def accumulate(self, d: torch.Tensor, lo: int) -> None:
        """d_hidden[lo:], d_weight, d_bias from d = dL/dlogits [c, V] of tokens lo.. (compute dtype)."""
        if self.d_h is not None:
            self.gemms.write_d_hidden(d, self.d_h[lo:lo + d.shape[0]])
        if self.d_w is not None:
            self.gemms.accumulate_d_weight(self.d_w, d, self.h[lo:lo + d.shape[0]], first=not self.d_w_written)
            self.d_w_written = True
        if self.d_b is not None:
            self.d_b += d.sum(0, dtype=self.gemms.acc)

    # ---- the two paths of a chunk of groups
    def one_pass(self, g0, g1, lo, hi) -> None:
        """The chunk's logits serve the log-probs and the gradients."""
        x = self.gemms.logits(self.h[lo:hi])
        lse, target = row_stats(x, self.bias, self.labels[lo:hi], self.use_triton, self.transform)
        self.store_logp(lo, hi, torch.sub(target, lse).clamp_max_(0.0))
        if self.constant is None:
            self.set_coefficients(g0, g1)
        d = softmax_grad(x, self.labels[lo:hi], lse, self.token_coefficients(lo, hi), self.gemms.dtype,
                         self.use_triton, self.transform)
        del x
        self.accumulate(d, lo)

    def two_passes(self, g0, g1, lo, hi) -> None:
        """One group larger than a chunk: its log-sum-exps first, then its gradients."""
        h, labels = self.h[lo:hi], self.labels[lo:hi]
        logp, lse = chunked.logprobs_forward(h, labels, self.gemms, self.bias, self.rows, self.use_triton,
                                             self.transform)
        self.store_logp(lo, hi, logp)
        if self.constant is None:
            self.set_coefficients(g0, g1)
        grad = self.token_coefficients(lo, hi)
        for a in range(0, hi - lo, self.rows):
            b = min(hi - lo, a + self.rows)
            x = self.gemms.logits(h[a:b])
            if self.bias is not None:
                x.add_(self.bias)
            d = softmax_grad(x, labels[a:b], lse[a:b], grad[a:b], self.gemms.dtype, self.use_triton, self.transform,
                             raw=True)
            del x
            self.accumulate(d, lo + a)

    def run(self) -> None:
        """Every chunk; afterwards token_logp and the LM-head gradients are complete."""
        n_pos = self.token_logp.shape[1]
        self.token_row = torch.div(self.plan.index, n_pos, rounding_mode="floor")
        self.constant = self.objective.constant_coefficients(self.n_tokens)
        if self.constant is not None:
            self.coeff.copy_(self.constant.reshape(-1))
        groups = self.coeff.shape[0] // self.sides
        counts = [sum(self.plan.row_counts[s * groups + g] for s in range(self.sides)) for g in range(groups)]
        for g0, g1, lo, hi in group_chunks(counts, self.rows):
            (self.one_pass if hi - lo <= self.rows else self.two_passes)(g0, g1, lo, hi)
        if self.d_w is not None and not self.d_w_written:  # no valid token: nothing was written
            self.d_w.zero_()


class _ChunkedPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, objective, plan, rows, use_triton, transform, reduction, needs,
                names, *scores):
        """hidden [R*G, T, H], labels [R*G, T], scores: [2G] tensors -> (loss, metric values);
        ``needs``: which of (hidden, weight, bias, *scores) get gradients; the metric names
        are appended to the list ``names``."""
        dtype = chunked.compute_dtype(hidden.dtype, weight.dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # the GEMMs' precision is LMHeadGemms' choice
            gemms = chunked.LMHeadGemms(weight, dtype)
            work = _Chunks(objective, gemms, hidden, labels, bias, plan, scores, needs, rows, use_triton, transform)
            if any(needs):
                work.run()
            else:  # nothing to differentiate: the log-probs alone
                logp, _ = chunked.logprobs_forward(work.h, work.labels, gemms, bias, rows, use_triton, transform)
                work.store_logp(0, logp.shape[0], logp)
            loss, metrics, d_scores = objective.finish(work.z(), work.n_tokens, work.scores, reduction, use_triton)
        values = torch.stack([v.detach().to(loss.dtype) for v in metrics.values()])
        names.extend(metrics)
        n_pairs = work.coeff.shape[0] // work.sides
        ctx.grads = (work.d_h, work.d_w, work.d_b, [d.reshape(-1) for d in d_scores])
        ctx.meta = (plan.index, hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype,
                    [s.dtype for s in scores], needs, 1.0 / n_pairs if reduction == "mean" else 1.0)
        ctx.mark_non_differentiable(values)
        return loss, values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_values):
        d_h, d_w, d_b, d_scores = ctx.grads
        index, h_shape, h_dtype, w_dtype, b_dtype, s_dtypes, needs, scale = ctx.meta
        g = grad_loss * scale
        out_h = None
        if d_h is not None:
            out_h = torch.zeros(h_shape, dtype=h_dtype, device=d_h.device)
            out_h.view(-1, h_shape[-1]).index_copy_(0, index, _scaled(d_h, g, h_dtype))
        out_w = None if d_w is None else _scaled(d_w, g, w_dtype)
        out_b = None if d_b is None else _scaled(d_b, g, b_dtype)
        out_s = [_scaled(ds, g, dt) if need else None for ds, dt, need in zip(d_scores, s_dtypes, needs[3:])]
        return (out_h, out_w, out_b, None, None, None, None, None, None, None, None, None, *out_s)


def _scaled(t: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g * t in ``dtype``, one fused scale-and-cast into a new tensor (t is left intact)."""
    return torch.mul(t, g.to(t.dtype), out=torch.empty(t.shape, dtype=dtype, device=t.device))


def chunked_pair_loss(objective: PairObjective, lm_head_weight, hidden, labels, scores, bias, plan: TokenPlan, *,
                      backend: str = "chunked", reduction: str = "mean", chunk_tokens: int | None = None,
                      transform: LogitTransform = IDENTITY):
    """Loss and metrics of ``objective`` from hidden states, gradients computed in the forward.

    Args:
        objective: the loss in closed form (:mod:`drdo_kernels.pair_objectives`).
        lm_head_weight: [V, H] plain tensor (gathered); hidden: [R*G, T, H]; labels: [R*G, T]
            aligned with hidden (checked by the caller);
        scores: list of [2G] per-row tensors the loss reads (rewards, oracle scores, ...);
        bias: [V] | None;
        plan: the valid tokens of labels in :func:`group_order` order, every row scored;
        backend: "chunked" (Triton fold and pair kernel where they run) or "torch";
        chunk_tokens: tokens per chunk (None: from the memory budget);
        transform: the logit transform (:mod:`drdo_kernels.logit_transform`).
    Returns (loss, metrics) as the reference loss. No host synchronisation.
    """
    dtype = chunked.compute_dtype(hidden.dtype, lm_head_weight.dtype)
    rows = chunk_tokens or chunked.chunk_rows(lm_head_weight.shape[0], dtype, hidden.device)
    use_triton = uses_triton_fold(backend, hidden.device, dtype)
    grad_on = torch.is_grad_enabled()
    inputs = (hidden, lm_head_weight, bias, *scores)
    needs = tuple(grad_on and isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
    names: list[str] = []
    loss, values = _ChunkedPairLoss.apply(hidden, lm_head_weight, bias, labels, objective, plan, rows, use_triton,
                                          transform, reduction, needs, names, *scores)
    metrics = dict(zip(names, values.unbind(0)))
    metrics["loss"] = loss.detach()
    return loss, metrics
