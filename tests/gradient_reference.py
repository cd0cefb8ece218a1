"""The losses of the gradient harness, written out from ``docs/math.md``: the side the fused
kernels are compared against.

Nothing here comes from ``drdo`` or ``drdo_kernels``: a formula that is wrong in ``drdo.losses``
(which the fused pair objectives call) must not be wrong here too. Every function computes in
the dtype of its inputs (float64 for the reference, float32 for the plain yardstick) and is
differentiated by autograd; none of them has a hand-written gradient.

Shapes: logits [R, T, V]; labels [R, T] int64 (``IGNORED`` marks an unscored token); z, counts,
rewards, scores [2B] (chosen rows first) or [B] per side; Oracle ensembles [K, 2B].
"""
from __future__ import annotations

import math

import torch

IGNORED = -100
#: z_l is clamped to at most this value inside log(1 - e^{z_l}) (docs/math.md: c = -10^-6).
LOGP_CEILING = -1e-6
#: U = z_w + s log(1 - e^{z_l}): s by the ``unlikelihood`` option.
UNLIKELIHOOD_SIGNS = {"welleck": 1.0, "paper": -1.0}


def transform_logits(x: torch.Tensor, *, temperature: float = 1.0, softcap: float | None = None,
                     logit_scale: float = 1.0) -> torch.Tensor:
    """The model's logits from the LM head's output x: logit_scale * x, then softcap * tanh(. / softcap)
    when a soft cap is set, then divided by the temperature (the identity when all are defaults)."""
    x = logit_scale * x
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[R, T] log softmax(logits)[label] = logit[label] - LSE (0 where ignored), in logits' dtype."""
    scored = labels != IGNORED
    top = logits.detach().amax(-1, keepdim=True)
    lse = (top + torch.log(torch.exp(logits - top).sum(-1, keepdim=True))).squeeze(-1)
    target = logits.gather(-1, torch.where(scored, labels, 0)[..., None]).squeeze(-1)
    return torch.where(scored, target - lse, torch.zeros_like(lse))


def token_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[R, T] entropy of softmax(logits), H = LSE - sum_v p_v logit_v with p = softmax(logits) (0 where
    ignored), in logits' dtype."""
    top = logits.detach().amax(-1, keepdim=True)
    lse = top + torch.log(torch.exp(logits - top).sum(-1, keepdim=True))
    p = torch.exp(logits - lse)
    entropy = (lse - (p * logits).sum(-1, keepdim=True)).squeeze(-1)
    return torch.where(labels != IGNORED, entropy, torch.zeros_like(entropy))


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [R]: summed log-probs of each row's scored tokens, counts [R] int64)."""
    return token_logprobs(logits, labels).sum(-1), (labels != IGNORED).sum(-1)


def log_one_minus_exp(z: torch.Tensor) -> torch.Tensor:
    """log(1 - e^z) for z < 0: log(-expm1(z)) above -ln 2, log1p(-e^z) below, each branch fed an
    input where it is finite (so that the branch not taken has a finite gradient)."""
    near = z > -math.log(2.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, z, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, z))))


def reduce_pairs(per_pair: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mean or sum over pairs [B] -> scalar; "none" keeps [B]."""
    if reduction == "none":
        return per_pair
    return per_pair.mean() if reduction == "mean" else per_pair.sum()


def drdo(z, counts, rewards, oracle, *, alpha, gamma, reward, beta, unlikelihood, length_normalize, reduction,
         **_unused):
    """DRDO (Eq. 6) per pair: (m* - m^)^2 - alpha (1 - p_w)^gamma U, from z [2B] (summed, or the
    token mean with ``length_normalize``), rewards [2B] (the head's; None for reward="implicit",
    which is beta z) and oracle [2B]."""
    n = z.shape[0] // 2
    z = z / counts.to(z.dtype) if length_normalize else z
    rhat = rewards.to(z.dtype) if reward == "head" else beta * z
    oracle = oracle.to(z.dtype)
    distill = ((oracle[:n] - oracle[n:]) - (rhat[:n] - rhat[n:])) ** 2
    z_w, z_l = z[:n], z[n:]
    focal = torch.exp(-gamma * torch.logaddexp(torch.zeros_like(z_w), z_w - z_l))  # (1 - sigmoid(z_w - z_l))^gamma
    u = z_w + UNLIKELIHOOD_SIGNS[unlikelihood] * log_one_minus_exp(torch.clamp(z_l, max=LOGP_CEILING))
    return reduce_pairs(distill - alpha * focal * u, reduction)


def implicit_margin(z, ref, beta):
    """[B] beta ((z_w - ref_w) - (z_l - ref_l)) from z and ref [2B]."""
    n = z.shape[0] // 2
    d = z - ref.to(z.dtype)
    return beta * (d[:n] - d[n:])


def dpo(z, ref, *, beta, reduction, **_unused):
    """DPO per pair: -log sigmoid(h) = log(1 + e^{-h}), h the implicit margin."""
    h = implicit_margin(z, ref, beta)
    return reduce_pairs(torch.logaddexp(torch.zeros_like(h), -h), reduction)


def edpo(z, ref, oracle, *, beta, pessimistic, reduction, **_unused):
    """e-DPO: L_k = reduce_b (m*_k - h)^2 per member k of oracle [K, 2B]; max_k L_k (pessimistic)
    or mean_k. reduction="none": the [B] squared errors of the member the max selects (its mean
    largest, held fixed), or their mean over members."""
    h = implicit_margin(z, ref, beta)
    n = h.shape[0]
    oracle = oracle.to(z.dtype)
    per_member = torch.stack([(o[:n] - o[n:] - h) ** 2 for o in oracle])  # [K, B]
    if reduction == "none":
        return per_member[per_member.detach().mean(-1).argmax()] if pessimistic else per_member.mean(0)
    totals = per_member.mean(-1) if reduction == "mean" else per_member.sum(-1)
    return totals.amax() if pessimistic else totals.mean()


def oracle_loss(z_chosen, counts_chosen, rewards, *, alpha, nll_reduction, reduction, **_unused):
    """The Oracle (Eq. 5) per pair: -(1 - alpha) log sigmoid(r_w - r_l) + alpha nll(y_w), nll the
    token mean of -z_w (``nll_reduction="mean"``) or -z_w; z_chosen, counts_chosen [B], rewards [2B]."""
    n = z_chosen.shape[0]
    margin = (rewards[:n] - rewards[n:]).to(z_chosen.dtype)
    nll = -z_chosen / counts_chosen.to(z_chosen.dtype) if nll_reduction == "mean" else -z_chosen
    return reduce_pairs((1.0 - alpha) * torch.logaddexp(torch.zeros_like(margin), -margin) + alpha * nll, reduction)
