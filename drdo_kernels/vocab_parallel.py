"""A vocabulary-parallel LM head: per-token log-probs from a weight sharded over the vocabulary.

DTensor's own convention (that of ``torch.distributed.tensor.parallel.loss_parallel``): the
weight is a DTensor [V, H] placed ``Shard(0)`` on one dimension of its device mesh (and
``Replicate()`` on any other), and the hidden states are a DTensor [*, H] placed ``Replicate()``
on the same mesh. Rank r holds the vocabulary rows [v0_r, v0_r + V_r) and never more: no rank
builds the [N, V] logits or gathers the weight. Per chunk of c tokens (fp32 buffers [c, V_r]):

    x = transform(h @ W_r.T + b_r)                          the rank's slice of the logits
    m = all_reduce(max_v x, MAX)                            [c]
    s, t = all_reduce((sum_v exp(x - m), x[label] or 0), SUM)  [2, c]   (the label lives on one rank)
    logp = t - (m + log s)

and with ``return_entropy=True`` one more row of that all-reduce, u = sum_v exp(x - m) * (x - m)
([3, c]), for the entropy H = log s - u / s of each token's whole softmax;

and in the backward, the logits recomputed per chunk:

    d = g * (onehot_r - exp(x - lse)) * dtransform          [c, V_r]
        (with the entropy: - g_H * p * (log p + H) inside the bracket, p = exp(x - lse))
    d_W_r += d.T @ h,  d_b_r += sum d                       local, no communication
    d_h = all_reduce(sum over chunks of d @ W_r, SUM)       one all-reduce of [N, H] per call

Communication: two all-reduces of c and 2c floats per chunk in the forward, one of N·H in the
backward; FLOPs as the single-device chunked path, divided by the ranks. The transform
(logit_scale, softcap, temperature) is element-wise, so each rank applies it to its slice.

The losses compose these log-probs with their reference formulas
(:func:`drdo_kernels.fused_losses`), so every loss runs vocabulary-parallel too.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from . import logprobs_chunked as chunked
from .inputs import gather_lm_head, is_dtensor
from .logit_transform import IDENTITY, LogitTransform

__all__ = ["VocabShard", "vocab_shard", "local_head", "head_inputs", "check_vocab_parallel_backend",
           "vocab_parallel_logprobs"]

#: The backends that run a vocabulary-parallel head (its chunked path; "auto" picks it).
VOCAB_PARALLEL_BACKENDS = ("auto", "chunked", "torch")


class VocabShard(NamedTuple):
    """Where a rank's slice of a vocabulary-sharded head lies: rows [start, start + size) of a
    vocabulary of ``n_vocab``, reduced over ``group`` (the process group of the sharded mesh dimension)."""

    start: int
    size: int
    n_vocab: int
    group: object


def _sharded_dim(t, what: str) -> int:
    """The one mesh dimension on which ``t`` is Shard(0), every other one Replicate()."""
    from torch.distributed.tensor import Replicate, Shard

    dims = [i for i, p in enumerate(t.placements) if p == Shard(0)]
    others = [p for i, p in enumerate(t.placements) if i not in dims]
    if len(dims) != 1 or any(p != Replicate() for p in others):
        raise ValueError(f"a vocabulary-parallel {what} is Shard(0) on one mesh dimension and Replicate() on the "
                         f"others; got placements {tuple(t.placements)}")
    return dims[0]


def vocab_shard(weight, hidden, bias=None) -> VocabShard | None:
    """The shard of a vocabulary-parallel call, or None when the call is not one.

    Vocabulary-parallel: ``weight`` a DTensor Shard(0) on one mesh dimension and ``hidden`` a
    DTensor Replicate() on the same mesh (``bias``, if any, placed as the weight). Any other
    DTensor weight (with plain hidden states) is not: the caller gathers it (FSDP2's case).
    Raises ValueError for a DTensor hidden whose placements or mesh do not fit.
    """
    from torch.distributed.tensor import Replicate

    if not (is_dtensor(weight) and is_dtensor(hidden)):
        return None
    if hidden.device_mesh != weight.device_mesh:
        raise ValueError("a vocabulary-parallel call needs hidden and weight on the same device mesh")
    if any(p != Replicate() for p in hidden.placements):
        raise ValueError(f"hidden must be a Replicate() DTensor for a vocabulary-parallel head, got "
                         f"{tuple(hidden.placements)}")
    mesh_dim = _sharded_dim(weight, "LM-head weight")
    if bias is not None and (not is_dtensor(bias) or tuple(bias.placements) != tuple(weight.placements)):
        raise ValueError("with a vocabulary-parallel weight the bias must be a DTensor placed as the weight")
    mesh, n_vocab = weight.device_mesh, weight.shape[0]
    ranks, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    per_rank = -(-n_vocab // ranks)  # torch.chunk's split, as DTensor's Shard
    start = min(n_vocab, rank * per_rank)
    size = weight.to_local().shape[0]
    if size != max(0, min(per_rank, n_vocab - start)):
        raise ValueError(f"rank {rank} holds {size} vocabulary rows where Shard(0) of {n_vocab} over {ranks} "
                         f"ranks gives {max(0, min(per_rank, n_vocab - start))}")
    return VocabShard(start, size, n_vocab, mesh.get_group(mesh_dim))


def _local_logits(gemms, h, bias, transform: LogitTransform) -> torch.Tensor:
    """[c, V_r] float32 (float64) transformed logits of the rank's slice."""
    x = gemms.logits(h)
    if bias is not None:
        x.add_(bias)
    return transform.apply_(x)


def _local_labels(labels: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into the rank's slice (0 where not held) [c] int64, held [c] bool)."""
    local = labels - shard.start
    held = (local >= 0) & (local < shard.size)
    return torch.where(held, local, torch.zeros_like(local)), held


def _forward_chunk(x, labels, shard: VocabShard, entropy: bool = False):
    """lse [c] and target logit [c] of a chunk's slice x [c, V_r], completed over the ranks; with
    ``entropy`` also the entropy [c] of the whole softmax, H = log s - u / s from the all-reduced
    s = sum exp(x - m) and u = sum exp(x - m) * (x - m) (one more row of the same all-reduce)."""
    m = x.amax(1) if x.shape[1] else x.new_full((x.shape[0],), float("-inf"))
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=shard.group)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    local, held = _local_labels(labels, shard)
    target = x.gather(1, local[:, None]).squeeze(1) if x.shape[1] else torch.zeros_like(m)
    shifted = x.sub_(m_safe[:, None])  # x is not read again: no second [c, V_r] buffer
    e = shifted.exp()
    rows = [e.sum(1), torch.where(held, target, torch.zeros_like(target))]
    if entropy:
        rows.append((e * shifted.masked_fill_(e == 0, 0.0)).sum(1))  # exp(-inf) * -inf adds 0
    sums = torch.stack(rows)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=shard.group)
    lse = m_safe + sums[0].log()
    if not entropy:
        return lse, sums[1]
    ent = torch.where(sums[0] > 0, sums[0].log() - sums[2] / sums[0], torch.zeros_like(lse))
    return lse, sums[1], ent


class _VocabParallelLogprobs(torch.autograd.Function):
    """hidden [M, H] (compute dtype, replicated), weight [V_r, H] (the rank's rows), bias [V_r] |
    None, labels [M] int64 global ids (all valid) -> logp [M] float32 (float64), or with
    ``entropy`` (logp, entropy) [M]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, shard, rows, transform, entropy=False):
        gemms = chunked.LMHeadGemms(weight, hidden.dtype)
        b = None if bias is None else bias.detach().to(gemms.acc)
        lse = hidden.new_empty(hidden.shape[0], dtype=gemms.acc)
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse) if entropy else None
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, hidden.shape[0], rows):
                hi = min(hidden.shape[0], lo + rows)
                x = _local_logits(gemms, hidden[lo:hi], b, transform)
                stats = _forward_chunk(x, labels[lo:hi], shard, entropy)
                lse[lo:hi], target = stats[0], stats[1]
                if entropy:
                    ent[lo:hi] = stats[2]
                logp[lo:hi] = (target - lse[lo:hi]).clamp_max(0.0)
        ctx.save_for_backward(hidden, bias, labels, lse, *([ent] if entropy else []))
        ctx.gemms, ctx.shard, ctx.rows, ctx.transform, ctx.weight_dtype = gemms, shard, rows, transform, weight.dtype
        ctx.entropy = entropy
        return (logp, ent) if entropy else logp

    @staticmethod
    def backward(ctx, grad, grad_entropy=None):
        hidden, bias, labels, lse, *ent = ctx.saved_tensors
        gemms, shard, transform = ctx.gemms, ctx.shard, ctx.transform
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = gemms.acc
        b = None if bias is None else bias.detach().to(acc)
        grad = grad.to(acc)
        ent = (ent[0], grad_entropy.to(acc)) if ctx.entropy else None
        d_h = hidden.new_zeros(hidden.shape, dtype=acc) if need_h else None
        d_w = torch.zeros(gemms.weight.shape, dtype=acc, device=hidden.device) if need_w else None
        d_b = torch.zeros(gemms.weight.shape[0], dtype=acc, device=hidden.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, hidden.shape[0], ctx.rows):
                hi = min(hidden.shape[0], lo + ctx.rows)
                x = _local_logits(gemms, hidden[lo:hi], b, transform)
                chunk_ent = None if ent is None else (ent[0][lo:hi], ent[1][lo:hi])
                d = _logits_grad(x, labels[lo:hi], lse[lo:hi], grad[lo:hi], shard, transform,
                                 chunk_ent).to(gemms.dtype)
                if d_h is not None:
                    gemms.write_d_hidden(d, d_h[lo:hi])
                if d_w is not None:
                    gemms.accumulate_d_weight(d_w, d, hidden[lo:hi], first=False)
                if d_b is not None:
                    d_b += d.sum(0, dtype=acc)
        if d_h is not None:
            dist.all_reduce(d_h, op=dist.ReduceOp.SUM, group=shard.group)
        return (None if d_h is None else d_h.to(hidden.dtype), None if d_w is None else d_w.to(ctx.weight_dtype),
                None if d_b is None else d_b.to(bias.dtype), None, None, None, None, None)


def _logits_grad(x, labels, lse, g, shard: VocabShard, transform: LogitTransform, ent=None) -> torch.Tensor:
    """g * (onehot_r - softmax_r) * dl/dx of a chunk's slice x [c, V_r] (transformed logits); with
    ``ent`` = (H [c], g_H [c]) minus g_H * p * (log p + H) inside the bracket (the entropy's gradient)."""
    if ent is None:
        d = (x - lse[:, None]).exp_().mul_(-g[:, None])
    else:
        log_p = x - lse[:, None]
        p = log_p.exp()
        d = log_p.add_(ent[0][:, None]).mul_(ent[1][:, None]).add_(g[:, None]).mul_(p).neg_().masked_fill_(p == 0, 0.0)
    local, held = _local_labels(labels, shard)
    if x.shape[1]:
        d.scatter_add_(1, local[:, None], torch.where(held, g, torch.zeros_like(g))[:, None])
    return d if transform.is_identity else d.mul_(transform.derivative(x))


def local_head(weight, hidden, bias=None):
    """The rank's plain tensors of a vocabulary-parallel call, or None when it is not one.

    Returns (weight_r [V_r, H], hidden [*, H], bias_r [V_r] | None, shard), each taken with a
    differentiable ``to_local()``: gradients reach the DTensors as Shard(0) (weight, bias) and
    Replicate() (hidden), FSDP2 and optimizers see them placed as their parameters.
    """
    shard = vocab_shard(weight, hidden, bias)
    if shard is None:
        return None
    return weight.to_local(), hidden.to_local(), None if bias is None else bias.to_local(), shard


def head_inputs(weight, hidden, bias=None):
    """The LM-head inputs of a fused call as plain tensors: (weight, hidden, bias, shard).

    A vocabulary-parallel call (:func:`vocab_shard`) keeps each rank's rows (``shard`` says
    which); any other DTensor head (FSDP2's) is all-gathered (:func:`gather_lm_head`, shard None)."""
    local = local_head(weight, hidden, bias)
    if local is not None:
        return local
    weight, bias = gather_lm_head(weight, bias)
    return weight, hidden, bias, None


def check_vocab_parallel_backend(backend: str) -> None:
    """A vocabulary-parallel head runs on the chunked path: "auto", "chunked" or "torch"."""
    if backend not in VOCAB_PARALLEL_BACKENDS:
        raise ValueError(f"backend={backend!r} cannot run a vocabulary-parallel LM head; use one of "
                         f"{VOCAB_PARALLEL_BACKENDS}")


def vocab_parallel_logprobs(hidden, weight, labels, bias, shard: VocabShard, *, rows: int | None = None,
                            transform: LogitTransform = IDENTITY, entropy: bool = False):
    """Per-token log-probs [M] float32 (float64) of valid tokens, vocabulary-parallel.

    hidden: [M, H] the replicated hidden states (plain, :func:`local_head`), in the compute dtype;
    weight: [V_r, H] and bias: [V_r] | None, the rank's rows; labels: [M] int64 global ids, all
    valid; shard: :func:`vocab_shard` of the call; rows: tokens per chunk (None: the memory budget
    of ``logprobs_chunked.chunk_rows`` for V_r); entropy: return (logp, entropy [M]), the
    entropy of each token's whole softmax. The result is the same on every rank.
    """
    rows = rows or chunked.chunk_rows(max(1, shard.size), hidden.dtype, hidden.device)
    return _VocabParallelLogprobs.apply(hidden.contiguous(), weight, bias, labels, shard, rows, transform, entropy)
