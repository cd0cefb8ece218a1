"""Preference losses straight from the last hidden state and the LM head weight.

Each loss here is its :mod:`drdo.losses` twin composed on sequence log-probs that
:func:`drdo_kernels.fused_linear_logprobs` computes without ever materialising the
[tokens, vocab] logits:

    hidden [2B, T, H], labels [2B, T]  --fused_linear_logprobs-->  logp [2B, T] fp32
    --sum over T-->  z [2B] fp32 (and token counts [2B])  --split-->  z_w = z[:B], z_l = z[B:]

Conventions (TRL / Liger-Kernel): rows 0..B-1 are the chosen responses, rows B..2B-1
the rejected ones; ``labels`` are ALIGNED with ``hidden`` (position t predicts
labels[t]); ``ignore_index`` marks prompt and padding tokens. Every row that enters a
loss must hold at least one response token (z of an empty response is meaningless);
checking that costs one host sync per call.

``backend`` ("auto" | "chunked" | "torch" | "triton") selects the log-prob kernel.
With "chunked" and "torch" (the chunked backend, with or without its Triton fold), DRDO,
DPO and the Oracle loss compute every LM-head gradient during the forward on chunks of
whole pairs (:mod:`drdo_kernels.pair_chunked`: 6·N·H·V FLOPs, no recompute), and the
backward only scales them; e-DPO (a max over ensemble members of batch means, not a
sum over pairs) takes the two passes of :func:`fused_linear_logprobs`. With "triton"
every loss composes :func:`fused_linear_logprobs` with its reference (DRDO with the
pair-loss kernel :func:`drdo_kernels.drdo_pair_loss`). "auto" resolves per call with
:func:`drdo_kernels.logprobs.auto_backend`.
"""
from __future__ import annotations

import torch
from torch import nn

from drdo.losses import dpo_loss, drdo_loss, edpo_loss, oracle_loss

from . import logprobs_chunked as chunked
from .inputs import gather_lm_head
from .logprobs import check_inputs, check_rows_scored, plan_tokens, resolve_backend, valid_logprobs
from .pair_chunked import PairLossSpec, chunked_pair_loss
from .pair_loss import drdo_pair_loss

__all__ = [
    "row_logprobs",
    "fused_linear_drdo_loss",
    "fused_linear_dpo_loss",
    "fused_linear_edpo_loss",
    "fused_linear_oracle_loss",
    "FusedLinearDRDOLoss",
    "FusedLinearDPOLoss",
    "FusedLinearEDPOLoss",
    "FusedLinearOracleLoss",
]

_REWARD_MODES = ("head", "implicit")


def row_logprobs(
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of each row, via the fused LM-head kernel.

    Args:
        lm_head_weight: [V, H]; hidden: [N, T, H] (any float dtype); labels: [N, T] int,
            aligned with hidden; bias: [V] or None.
    Returns:
        logps: [N] float32 (float64 for float64 inputs), differentiable w.r.t.
            hidden, weight and bias;
        n_tokens: [N] int64, response tokens per row.
    Raises ValueError when a row has no response token.
    """
    lm_head_weight, bias = gather_lm_head(lm_head_weight, bias)  # an FSDP2-sharded (DTensor) head is all-gathered
    if hidden.dim() != 3 or labels.dim() != 2 or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"expected hidden [N, T, H] and labels [N, T], got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    check_inputs(hidden, lm_head_weight, labels, bias)
    n_rows, n_pos, n_hidden = hidden.shape
    plan = plan_tokens(labels, lm_head_weight.shape[0], ignore_index)
    check_rows_scored(plan, ignore_index)
    backend = _resolve(backend, hidden, lm_head_weight, plan.n_valid)
    logp = valid_logprobs(hidden.reshape(-1, n_hidden).index_select(0, plan.index), lm_head_weight,
                          labels.reshape(-1).index_select(0, plan.index).long(), bias, backend)
    token_logps = logp.new_zeros(n_rows * n_pos).index_copy(0, plan.index, logp).view(n_rows, n_pos)
    return token_logps.sum(-1), plan.counts


def _resolve(backend: str, hidden: torch.Tensor, weight: torch.Tensor, n_tokens: int = 0) -> str:
    """resolve_backend for these inputs (device, GEMM dtype, valid tokens)."""
    return resolve_backend(backend, hidden.device, chunked.compute_dtype(hidden.dtype, weight.dtype), n_tokens)


def _chunked(backend: str, hidden: torch.Tensor, weight: torch.Tensor) -> str | None:
    """The resolved backend when it is a chunked one ("chunked" | "torch"), else None."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None
    resolved = _resolve(backend, hidden, weight, hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else 0)
    return resolved if resolved in ("chunked", "torch") else None


def _n_pairs(hidden: torch.Tensor, labels: torch.Tensor) -> int:
    """Rows must be [chosen; rejected]: an even count 2B >= 2. Returns B."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [2B, T, H], got shape {tuple(hidden.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's [2B, T] = {tuple(hidden.shape[:2])}")
    rows = hidden.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(
            f"expected 2B rows (B chosen, then B rejected), got {rows}: the row count must be even and positive"
        )
    return rows // 2


def _split_rows(name: str, t: torch.Tensor | None, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-row tensor [2B] -> (chosen [B], rejected [B])."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [2B], got {type(t).__name__}")
    if tuple(t.shape) != (2 * n_pairs,):
        raise ValueError(f"{name} must have shape [2B] = ({2 * n_pairs},), got {tuple(t.shape)}")
    return t[:n_pairs], t[n_pairs:]


def _split_ensemble(name: str, t: torch.Tensor, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble scores [K, 2B] (or [2B] for K = 1) -> (chosen [K, B], rejected [K, B])."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [K, 2B] or [2B], got {type(t).__name__}")
    scores = t.unsqueeze(0) if t.dim() == 1 else t
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] != 2 * n_pairs:
        raise ValueError(f"{name} must have shape [K, 2B] or [2B] with 2B = {2 * n_pairs}, got {tuple(t.shape)}")
    return scores[:, :n_pairs], scores[:, n_pairs:]


def fused_linear_drdo_loss(
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    oracle_rewards: torch.Tensor,
    policy_rewards: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    alpha: float = 0.1,
    gamma: float = 2.0,
    reward: str = "head",
    beta: float = 0.1,
    unlikelihood: str = "welleck",
    length_normalize: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DRDO loss (:func:`drdo.losses.drdo_loss`) from hidden states.

    Args:
        lm_head_weight: [V, H]; hidden: [2B, T, H]; labels: [2B, T] aligned;
        oracle_rewards: [2B] r* of each row (one Oracle; average an ensemble first);
        policy_rewards: [2B] the student's reward-head outputs, required for
            reward="head", ignored for reward="implicit" (rhat = beta * z);
        bias: [V] or None;
        length_normalize: z = token-mean response log-prob (summed log-prob / token count)
            instead of the sum; a departure from the paper.
    Returns: (loss, metrics) as drdo.losses.drdo_loss.
    """
    if reward not in _REWARD_MODES:
        raise ValueError(f"reward must be one of {_REWARD_MODES}, got {reward!r}")
    n_pairs = _n_pairs(hidden, labels)
    if isinstance(oracle_rewards, torch.Tensor) and oracle_rewards.dim() == 2:
        raise ValueError(
            f"oracle_rewards has shape {tuple(oracle_rewards.shape)}: DRDO distils ONE Oracle score per row [2B]; "
            "reduce an ensemble [K, 2B] first (e.g. .mean(0))"
        )
    oracle_w, oracle_l = _split_rows("oracle_rewards", oracle_rewards, n_pairs)
    if reward == "head":
        if policy_rewards is None:
            raise ValueError('reward="head" needs policy_rewards [2B] (the reward head\'s outputs); '
                             'or use reward="implicit"')
        rhat_w, rhat_l = _split_rows("policy_rewards", policy_rewards, n_pairs)
    kind = _chunked(backend, hidden, lm_head_weight)
    if kind is not None and not length_normalize:  # token-mean z: the two-pass path below
        spec = _drdo_spec(alpha=alpha, gamma=gamma, reward=reward, beta=beta, unlikelihood=unlikelihood)
        scores = [oracle_rewards] + ([policy_rewards] if reward == "head" else [])
        return chunked_pair_loss(spec, lm_head_weight, hidden, labels, scores, bias,
                                 ignore_index=ignore_index, backend=kind, reduction=reduction)
    logps, n_tokens = row_logprobs(lm_head_weight, hidden, labels, bias, ignore_index=ignore_index, backend=backend)
    if length_normalize:
        logps = logps / n_tokens.to(logps.dtype)
    z_w, z_l = logps[:n_pairs], logps[n_pairs:]
    if reward == "implicit":
        rhat_w, rhat_l = beta * z_w, beta * z_l
    return drdo_pair_loss(
        z_w, z_l, rhat_w, rhat_l, oracle_w, oracle_l,
        alpha=alpha, gamma=gamma, unlikelihood=unlikelihood, reduction=reduction, backend="triton",
    )


def fused_linear_dpo_loss(
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    ignore_index: int = -100,
    backend: str = "auto",
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (:func:`drdo.losses.dpo_loss`) from hidden states; ref_logps: [2B] reference z of each row."""
    n_pairs = _n_pairs(hidden, labels)
    ref_w, ref_l = _split_rows("ref_logps", ref_logps, n_pairs)
    kind = _chunked(backend, hidden, lm_head_weight)
    if kind is not None:
        return chunked_pair_loss(_dpo_spec(beta), lm_head_weight, hidden, labels, [ref_logps], bias,
                                 ignore_index=ignore_index, backend=kind, reduction=reduction)
    logps, _ = row_logprobs(lm_head_weight, hidden, labels, bias, ignore_index=ignore_index, backend=backend)
    return dpo_loss(logps[:n_pairs], logps[n_pairs:], ref_w, ref_l, beta=beta, reduction=reduction)


def fused_linear_edpo_loss(
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    oracle_rewards: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    pessimistic: bool = True,
    ignore_index: int = -100,
    backend: str = "auto",
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """e-DPO (:func:`drdo.losses.edpo_loss`) from hidden states.

    ref_logps: [2B]; oracle_rewards: [K, 2B] ensemble scores ([2B] is K = 1).
    """
    n_pairs = _n_pairs(hidden, labels)
    ref_w, ref_l = _split_rows("ref_logps", ref_logps, n_pairs)
    oracle_w, oracle_l = _split_ensemble("oracle_rewards", oracle_rewards, n_pairs)
    logps, _ = row_logprobs(lm_head_weight, hidden, labels, bias, ignore_index=ignore_index, backend=backend)
    return edpo_loss(
        logps[:n_pairs], logps[n_pairs:], ref_w, ref_l, oracle_w, oracle_l,
        beta=beta, pessimistic=pessimistic, reduction=reduction,
    )


def fused_linear_oracle_loss(
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    alpha: float = 0.01,
    nll_reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Oracle loss (:func:`drdo.losses.oracle_loss`) from hidden states.

    rewards: [2B] reward-head outputs of each row. The LM term is the NLL of the
    chosen rows only (token-mean per row for nll_reduction="mean", else the sum), so
    only hidden[:B] goes through the LM head.
    """
    n_pairs = _n_pairs(hidden, labels)
    r_w, r_l = _split_rows("rewards", rewards, n_pairs)
    if nll_reduction not in ("mean", "sum"):
        raise ValueError(f'nll_reduction must be "mean" or "sum", got {nll_reduction!r}')
    kind = _chunked(backend, hidden, lm_head_weight)
    if kind is not None:
        spec = _oracle_spec(alpha, nll_reduction)
        return chunked_pair_loss(spec, lm_head_weight, hidden[:n_pairs], labels[:n_pairs], [rewards], bias,
                                 ignore_index=ignore_index, backend=kind, reduction=reduction)
    logps, n_tokens = row_logprobs(
        lm_head_weight, hidden[:n_pairs], labels[:n_pairs], bias, ignore_index=ignore_index, backend=backend
    )
    return oracle_loss(
        r_w, r_l, -logps, alpha=alpha, chosen_n_tokens=n_tokens, nll_reduction=nll_reduction, reduction=reduction
    )


def _drdo_spec(**kw) -> PairLossSpec:
    """drdo_loss over pairs; scores = [oracle [2B]] (+ [policy rewards [2B]] for reward="head")."""
    reward, beta = kw.pop("reward"), kw.pop("beta")

    def loss(z, n_tokens, scores, reduction):
        z_w, z_l = z.chunk(2)
        o_w, o_l = scores[0].chunk(2)
        r_w, r_l = scores[1].chunk(2) if reward == "head" else (beta * z_w, beta * z_l)
        return drdo_loss(z_w, z_l, r_w, r_l, o_w, o_l, reduction=reduction, **kw)

    return PairLossSpec(loss, rows_per_group=2)


def _dpo_spec(beta: float) -> PairLossSpec:
    """dpo_loss over pairs; scores = [reference log-probs [2B]]."""

    def loss(z, n_tokens, scores, reduction):
        z_w, z_l = z.chunk(2)
        ref_w, ref_l = scores[0].chunk(2)
        return dpo_loss(z_w, z_l, ref_w, ref_l, beta=beta, reduction=reduction)

    return PairLossSpec(loss, rows_per_group=2)


def _oracle_spec(alpha: float, nll_reduction: str) -> PairLossSpec:
    """oracle_loss over pairs: the LM rows are the chosen ones only; scores = [rewards [2B]]."""

    def loss(z, n_tokens, scores, reduction):
        r_w, r_l = scores[0].chunk(2)
        return oracle_loss(r_w, r_l, -z, alpha=alpha, chosen_n_tokens=n_tokens, nll_reduction=nll_reduction,
                           reduction=reduction)

    return PairLossSpec(loss, rows_per_group=1)


class FusedLinearDRDOLoss(nn.Module):
    """nn.Module form of :func:`fused_linear_drdo_loss`.

    forward(lm_head_weight [V, H], hidden [2B, T, H], labels [2B, T], oracle_rewards [2B],
            policy_rewards [2B] | None = None, bias [V] | None = None) -> (loss, metrics)
    """

    def __init__(
        self,
        alpha: float = 0.1,
        gamma: float = 2.0,
        *,
        reward: str = "head",
        beta: float = 0.1,
        unlikelihood: str = "welleck",
        length_normalize: bool = False,
        ignore_index: int = -100,
        backend: str = "auto",
        reduction: str = "mean",
    ):
        super().__init__()
        if reward not in _REWARD_MODES:
            raise ValueError(f"reward must be one of {_REWARD_MODES}, got {reward!r}")
        if unlikelihood not in ("welleck", "paper"):
            raise ValueError(f'unlikelihood must be "welleck" or "paper", got {unlikelihood!r}')
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.alpha, self.gamma, self.reward, self.beta = alpha, gamma, reward, beta
        self.unlikelihood, self.ignore_index, self.backend, self.reduction = unlikelihood, ignore_index, backend, reduction
        self.length_normalize = length_normalize

    def forward(self, lm_head_weight, hidden, labels, oracle_rewards, policy_rewards=None, bias=None):
        return fused_linear_drdo_loss(
            lm_head_weight, hidden, labels, oracle_rewards, policy_rewards, bias,
            alpha=self.alpha, gamma=self.gamma, reward=self.reward, beta=self.beta,
            unlikelihood=self.unlikelihood, length_normalize=self.length_normalize, ignore_index=self.ignore_index,
            backend=self.backend, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, gamma={self.gamma}, reward={self.reward!r}, beta={self.beta}, "
                f"unlikelihood={self.unlikelihood!r}, length_normalize={self.length_normalize}, "
                f"backend={self.backend!r}, reduction={self.reduction!r}")


class FusedLinearDPOLoss(nn.Module):
    """nn.Module form of :func:`fused_linear_dpo_loss`.

    forward(lm_head_weight [V, H], hidden [2B, T, H], labels [2B, T], ref_logps [2B],
            bias [V] | None = None) -> (loss, metrics)
    """

    def __init__(self, beta: float = 0.1, *, ignore_index: int = -100, backend: str = "auto", reduction: str = "mean"):
        super().__init__()
        self.beta, self.ignore_index, self.backend, self.reduction = beta, ignore_index, backend, reduction

    def forward(self, lm_head_weight, hidden, labels, ref_logps, bias=None):
        return fused_linear_dpo_loss(
            lm_head_weight, hidden, labels, ref_logps, bias,
            beta=self.beta, ignore_index=self.ignore_index, backend=self.backend, reduction=self.reduction,
        )


class FusedLinearEDPOLoss(nn.Module):
    """nn.Module form of :func:`fused_linear_edpo_loss`.

    forward(lm_head_weight [V, H], hidden [2B, T, H], labels [2B, T], ref_logps [2B],
            oracle_rewards [K, 2B], bias [V] | None = None) -> (loss, metrics)
    """

    def __init__(
        self,
        beta: float = 0.1,
        pessimistic: bool = True,
        *,
        ignore_index: int = -100,
        backend: str = "auto",
        reduction: str = "mean",
    ):
        super().__init__()
        self.beta, self.pessimistic = beta, pessimistic
        self.ignore_index, self.backend, self.reduction = ignore_index, backend, reduction

    def forward(self, lm_head_weight, hidden, labels, ref_logps, oracle_rewards, bias=None):
        return fused_linear_edpo_loss(
            lm_head_weight, hidden, labels, ref_logps, oracle_rewards, bias,
            beta=self.beta, pessimistic=self.pessimistic, ignore_index=self.ignore_index,
            backend=self.backend, reduction=self.reduction,
        )


class FusedLinearOracleLoss(nn.Module):
    """nn.Module form of :func:`fused_linear_oracle_loss` (NLL of the chosen rows only).

    forward(lm_head_weight [V, H], hidden [2B, T, H], labels [2B, T], rewards [2B],
            bias [V] | None = None) -> (loss, metrics)
    """

    def __init__(
        self,
        alpha: float = 0.01,
        nll_reduction: str = "mean",
        *,
        ignore_index: int = -100,
        backend: str = "auto",
        reduction: str = "mean",
    ):
        super().__init__()
        if nll_reduction not in ("mean", "sum"):
            raise ValueError(f'nll_reduction must be "mean" or "sum", got {nll_reduction!r}')
        self.alpha, self.nll_reduction = alpha, nll_reduction
        self.ignore_index, self.backend, self.reduction = ignore_index, backend, reduction

    def forward(self, lm_head_weight, hidden, labels, rewards, bias=None):
        return fused_linear_oracle_loss(
            lm_head_weight, hidden, labels, rewards, bias,
            alpha=self.alpha, nll_reduction=self.nll_reduction, ignore_index=self.ignore_index,
            backend=self.backend, reduction=self.reduction,
        )
