"""Plain PyTorch reference of every loss in the project.

This module is the ground truth that every kernel is tested against, so it is
written to be read next to ``docs/math.md``: one function per
formula, no fusion, no tricks beyond numerically stable primitives.

Conventions (the same as TRL and Liger-Kernel):
* a batch of B pairs is stacked as 2B rows, chosen first, then rejected;
* labels are aligned with logits (position t predicts ``labels[t]``);
  ``ignore_index`` marks prompt and padding tokens;
* sequence log-probs are SUMS over response tokens;
* math runs in float32 at least; float64 inputs stay float64 (gradcheck).

Every loss returns ``(loss, metrics)``: a scalar tensor and a dict of detached
scalar tensors for logging.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "sequence_logprobs",
    "drdo_loss",
    "oracle_loss",
    "dpo_loss",
    "edpo_loss",
    "log1mexp",
    "LOGP_CLAMP_MAX",
    "REDUCTIONS",
    "UNLIKELIHOOD_SIGN",
    "check_pair_shapes",
]

#: z_l is clamped to at most this value before log(1 - exp(z_l)) so that the
#: unlikelihood term stays finite for a response whose probability rounds to 1.
#: log(1 - exp(-1e-6)) = -13.8; its derivative there is about -1e6.
IGNORE_INDEX = -100  # label of a token that is not scored (prompt, padding), as in PyTorch and HF
LOGP_CLAMP_MAX = -1e-6

UNLIKELIHOOD_SIGN = {"welleck": 1.0, "paper": -1.0}
REDUCTIONS = ("mean", "sum")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never lower)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _as_float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.dtype != dtype else t


def check_pair_shapes(**tensors: torch.Tensor) -> int:
    """All tensors must be 1-D of the same length B >= 1; returns B."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first_name, first = next(iter(shapes.items()))
    for name, shape in shapes.items():
        if len(shape) != 1:
            raise ValueError(f"{name} must be a 1-D tensor [B], got shape {shape}")
        if shape != first:
            raise ValueError(f"{name} has shape {shape} but {first_name} has shape {first}; all must be [B]")
    if first[0] == 0:
        raise ValueError("empty batch: the loss of zero pairs is undefined")
    return first[0]


def _reduce(per_pair: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _detached(**values: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in values.items()}


def log1mexp(z: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(z)) for z < 0, stable at both ends (Maechler 2012).

    Uses log(-expm1(z)) for z > -ln 2 and log1p(-exp(z)) otherwise. Each branch
    is evaluated on an input where it is safe, so no inf/NaN reaches the gradient
    of the branch that is not selected.
    """
    near_zero = z > -math.log(2.0)
    z_near = torch.where(near_zero, z, torch.full_like(z, -1.0))
    z_far = torch.where(near_zero, torch.full_like(z, -1.0), z)
    return torch.where(near_zero, torch.log(-torch.expm1(z_near)), torch.log1p(-torch.exp(z_far)))


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens of each row.

    Args:
        logits: [N, T, V] (any float dtype), aligned with ``labels``.
        labels: [N, T] int64; ``ignore_index`` marks tokens that do not count.
    Returns:
        logps_sum: [N] float32 (float64 for float64 logits), sum over counted tokens
            of log_softmax(logits)[label]; 0 for a row with no counted token.
        n_tokens: [N] int64, the number of counted tokens per row.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits [N, T, V] and labels [N, T], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    dtype = _compute_dtype(logits)
    mask = labels != ignore_index
    vocab = logits.shape[-1]
    valid_labels = labels[mask]
    if valid_labels.numel() and (valid_labels.min() < 0 or valid_labels.max() >= vocab):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(_as_float(logits, dtype), dim=-1)
    token_logp = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    token_logp = torch.where(mask, token_logp, torch.zeros_like(token_logp))
    return token_logp.sum(-1), mask.sum(-1)


def drdo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    policy_chosen_rewards: torch.Tensor,
    policy_rejected_rewards: torch.Tensor,
    oracle_chosen_rewards: torch.Tensor,
    oracle_rejected_rewards: torch.Tensor,
    *,
    alpha: float = 0.1,
    gamma: float = 2.0,
    unlikelihood: str = "welleck",
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DRDO loss (paper Eq. 6), per pair:

        (r*_w - r*_l - (rhat_w - rhat_l))^2  -  alpha * (1 - p_w)^gamma * U(z_w, z_l)

    with p_w = sigmoid(z_w - z_l), U = z_w + s * log(1 - exp(z_l)),
    s = +1 for ``unlikelihood="welleck"`` and -1 for ``"paper"`` (as printed).
    The focal factor is differentiated (not detached). z_l is clamped to at most
    ``LOGP_CLAMP_MAX`` inside log(1 - exp(z_l)) only.

    Args (all [B], any float dtype; z are summed response log-probs):
        policy_chosen_logps, policy_rejected_logps: z_w, z_l.
        policy_chosen_rewards, policy_rejected_rewards: rhat_w, rhat_l (for
            reward="implicit" pass beta * z).
        oracle_chosen_rewards, oracle_rejected_rewards: r*_w, r*_l.
        reduction: "mean" (default) or "sum" over pairs.
    Returns:
        loss: scalar float32 (float64 for float64 inputs);
        metrics: distill, pref, p_w, reward_acc, focal, unlikelihood,
            reward_margin, oracle_margin, logps_chosen, logps_rejected (means).
    """
    if unlikelihood not in UNLIKELIHOOD_SIGN:
        raise ValueError(f"unlikelihood must be one of {tuple(UNLIKELIHOOD_SIGN)}, got {unlikelihood!r}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha} (a negative alpha reverses the preference term)")
    inputs = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        policy_chosen_rewards=policy_chosen_rewards,
        policy_rejected_rewards=policy_rejected_rewards,
        oracle_chosen_rewards=oracle_chosen_rewards,
        oracle_rejected_rewards=oracle_rejected_rewards,
    )
    check_pair_shapes(**inputs)
    dtype = _compute_dtype(*inputs.values())
    z_w, z_l, rhat_w, rhat_l, r_w, r_l = (_as_float(t, dtype) for t in inputs.values())

    oracle_margin = r_w - r_l
    reward_margin = rhat_w - rhat_l
    distill = (oracle_margin - reward_margin) ** 2

    delta = z_w - z_l
    p_w = torch.sigmoid(delta)
    focal = torch.exp(gamma * F.logsigmoid(-delta))  # (1 - p_w)^gamma, stable and differentiable
    u = z_w + UNLIKELIHOOD_SIGN[unlikelihood] * log1mexp(z_l.clamp(max=LOGP_CLAMP_MAX))
    pref = -alpha * focal * u

    loss = _reduce(distill + pref, reduction)
    metrics = _detached(
        loss=loss,
        distill=distill.mean(),
        pref=pref.mean(),
        p_w=p_w.mean(),
        reward_acc=(reward_margin > 0).to(dtype).mean(),
        focal=focal.mean(),
        unlikelihood=u.mean(),
        reward_margin=reward_margin.mean(),
        oracle_margin=oracle_margin.mean(),
        logps_chosen=z_w.mean(),
        logps_rejected=z_l.mean(),
    )
    return loss, metrics


def oracle_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    alpha: float = 0.01,
    chosen_n_tokens: torch.Tensor | None = None,
    nll_reduction: str = "mean",
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Oracle reward-model loss (paper Eq. 5), per pair:

        -(1 - alpha) * log sigmoid(r_w - r_l)  +  alpha * nll(y_w)

    Args:
        chosen_rewards, rejected_rewards: [B] r_phi(x, y_w), r_phi(x, y_l).
        chosen_nll: [B] the SUMMED token negative log-likelihood of y_w
            (``-sequence_logprobs(...)[0]`` of the chosen rows).
        chosen_n_tokens: [B] response token counts of y_w; required for
            ``nll_reduction="mean"`` (the default: per-sequence token-mean NLL,
            the usual SFT loss), ignored for ``"sum"``.
        reduction: "mean" or "sum" over pairs.
    Returns:
        loss, metrics: loss, bt (the Bradley-Terry term), nll, reward_acc,
        reward_margin, rewards_chosen, rewards_rejected.
    """
    check_pair_shapes(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, chosen_nll=chosen_nll)
    dtype = _compute_dtype(chosen_rewards, rejected_rewards, chosen_nll)
    r_w, r_l, nll = (_as_float(t, dtype) for t in (chosen_rewards, rejected_rewards, chosen_nll))
    if nll_reduction == "mean":
        if chosen_n_tokens is None:
            raise ValueError('nll_reduction="mean" needs chosen_n_tokens (the token count of each chosen response)')
        check_pair_shapes(chosen_nll=chosen_nll, chosen_n_tokens=chosen_n_tokens)
        nll = nll / chosen_n_tokens.to(dtype).clamp(min=1)
    elif nll_reduction != "sum":
        raise ValueError(f'nll_reduction must be "mean" or "sum", got {nll_reduction!r}')

    margin = r_w - r_l
    bt = -F.logsigmoid(margin)
    loss = _reduce((1.0 - alpha) * bt + alpha * nll, reduction)
    metrics = _detached(
        loss=loss,
        bt=bt.mean(),
        nll=nll.mean(),
        reward_acc=(margin > 0).to(dtype).mean(),
        reward_margin=margin.mean(),
        rewards_chosen=r_w.mean(),
        rewards_rejected=r_l.mean(),
    )
    return loss, metrics


def _implicit_margin(pc, pr, rc, rr, beta, dtype):
    """beta * ((z_w - zref_w) - (z_l - zref_l)) and the two implicit rewards."""
    _check_beta(beta)
    pc, pr, rc, rr = (_as_float(t, dtype) for t in (pc, pr, rc, rr))
    chosen = beta * (pc - rc)
    rejected = beta * (pr - rr)
    return chosen - rejected, chosen, rejected


def _check_beta(beta: float) -> None:
    """beta must be finite and > 0: with beta 0 the DPO loss is the constant log 2 and nothing is learned."""
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023), per pair: -log sigmoid(beta * ((z_w - zref_w) - (z_l - zref_l))).

    Args: four [B] tensors of summed response log-probs.
    Returns: loss, metrics: loss, rewards_chosen, rewards_rejected, reward_margin,
        reward_acc (implicit reward of y_w above that of y_l), logps_chosen, logps_rejected.
    """
    inputs = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    check_pair_shapes(**inputs)
    dtype = _compute_dtype(*inputs.values())
    margin, chosen, rejected = _implicit_margin(*inputs.values(), beta, dtype)
    loss = _reduce(-F.logsigmoid(margin), reduction)
    metrics = _detached(
        loss=loss,
        rewards_chosen=chosen.mean(),
        rewards_rejected=rejected.mean(),
        reward_margin=margin.mean(),
        reward_acc=(margin > 0).to(dtype).mean(),
        logps_chosen=_as_float(policy_chosen_logps, dtype).mean(),
        logps_rejected=_as_float(policy_rejected_logps, dtype).mean(),
    )
    return loss, metrics


def edpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    oracle_chosen_rewards: torch.Tensor,
    oracle_rejected_rewards: torch.Tensor,
    *,
    beta: float = 0.1,
    pessimistic: bool = True,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Ensemble reward-model distillation (e-DPO; Fisch et al. 2024, paper Eq. 4).

    For each ensemble member k:
        L_k = reduce_b ( r_k(x,y_w) - r_k(x,y_l) - beta*((z_w - zref_w) - (z_l - zref_l)) )^2
    and the loss is max_k L_k (``pessimistic=True``) or mean_k L_k. The max is
    taken over the batch estimate of each member's expectation.

    Args:
        policy_*/ref_*: [B] summed response log-probs.
        oracle_chosen_rewards, oracle_rejected_rewards: [K, B] (a [B] tensor is K = 1).
    Returns: loss, metrics: loss, distill_min, distill_max, worst_member (index, float),
        reward_margin, oracle_margin, reward_acc.
    """
    inputs = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    n_pairs = check_pair_shapes(**inputs)
    oracle_w = oracle_chosen_rewards if oracle_chosen_rewards.dim() == 2 else oracle_chosen_rewards.unsqueeze(0)
    oracle_l = oracle_rejected_rewards if oracle_rejected_rewards.dim() == 2 else oracle_rejected_rewards.unsqueeze(0)
    if oracle_w.shape != oracle_l.shape or oracle_w.dim() != 2 or oracle_w.shape[1] != n_pairs or oracle_w.shape[0] == 0:
        raise ValueError(
            f"oracle rewards must both be [K, B] with B={n_pairs}, K >= 1; "
            f"got {tuple(oracle_chosen_rewards.shape)} and {tuple(oracle_rejected_rewards.shape)}"
        )
    dtype = _compute_dtype(*inputs.values(), oracle_w, oracle_l)
    margin, _, _ = _implicit_margin(*inputs.values(), beta, dtype)
    oracle_margin = _as_float(oracle_w, dtype) - _as_float(oracle_l, dtype)  # [K, B]
    per_member = torch.stack([_reduce((om - margin) ** 2, reduction) for om in oracle_margin])  # [K]
    loss = per_member.max() if pessimistic else per_member.mean()
    metrics = _detached(
        loss=loss,
        distill_min=per_member.min(),
        distill_max=per_member.max(),
        worst_member=per_member.argmax().to(dtype),
        reward_margin=margin.mean(),
        oracle_margin=oracle_margin.mean(),
        reward_acc=(margin > 0).to(dtype).mean(),
    )
    return loss, metrics
