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
from .logprobs import (TokenPlan, check_chunk_tokens, check_inputs, check_rows_scored, plan_tokens, resolve_backend,
                       valid_logprobs)
from .pair_chunked import PairLossSpec, chunked_pair_loss, group_order
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
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of each row, via the fused LM-head kernel.

    Args:
        lm_head_weight: [V, H]; hidden: [N, T, H] (any float dtype); labels: [N, T] int,
            aligned with hidden; bias: [V] or None; chunk_tokens: as :func:`fused_linear_logprobs`.
    Returns:
        logps: [N] float32 (float64 for float64 inputs), differentiable w.r.t.
            hidden, weight and bias;
        n_tokens: [N] int64, response tokens per row.
    Raises ValueError when a row has no response token.
    """
    if hidden.dim() != 3 or labels.dim() != 2 or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"expected hidden [N, T, H] and labels [N, T], got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    weight, bias, plan, backend = _lm_inputs(lm_head_weight, hidden, labels, bias, ignore_index, backend,
                                             chunk_tokens, rows_per_group=1)
    return _planned_row_logprobs(weight, hidden, labels, bias, plan, backend, chunk_tokens), plan.counts


def _planned_row_logprobs(weight, hidden, labels, bias, plan: TokenPlan, backend: str, chunk_tokens) -> torch.Tensor:
    """[N] summed log-probs of the rows of hidden [N, T, H] over the valid tokens of ``plan``."""
    n_rows, n_pos, n_hidden = hidden.shape
    logp = valid_logprobs(hidden.reshape(-1, n_hidden).index_select(0, plan.index), weight,
                          labels.reshape(-1).index_select(0, plan.index).long(), bias, backend, chunk_tokens)
    token_logps = logp.new_zeros(n_rows * n_pos).index_copy(0, plan.index, logp).view(n_rows, n_pos)
    return token_logps.sum(-1)


def _lm_inputs(lm_head_weight, hidden, labels, bias, ignore_index: int, backend: str, chunk_tokens,
               rows_per_group: int):
    """Gather an FSDP2-sharded head, check the inputs, find the valid tokens (one host sync) and
    resolve the backend for them. Returns (weight, bias, plan, backend); the plan's tokens run
    group by group (:func:`drdo_kernels.pair_chunked.group_order`), every row holding one."""
    weight, bias = gather_lm_head(lm_head_weight, bias)  # an FSDP2-sharded (DTensor) head is all-gathered
    check_inputs(hidden, weight, labels, bias)
    check_chunk_tokens(chunk_tokens)
    order = group_order(labels.shape[0], labels.shape[1], rows_per_group, labels.device)
    plan = plan_tokens(labels, weight.shape[0], ignore_index, order=order)
    check_rows_scored(plan, ignore_index)
    resolved = resolve_backend(backend, hidden.device, chunked.compute_dtype(hidden.dtype, weight.dtype), plan.n_valid)
    return weight, bias, plan, resolved


def _fused_pair_loss(spec: PairLossSpec, lm_head_weight, hidden, labels, scores, bias, *, ignore_index: int,
                     backend: str, reduction: str, chunk_tokens):
    """(loss, metrics) of ``spec`` from hidden states: on the chunked backends with every gradient
    computed in the forward; on "triton" as ``spec.triton_loss`` (or ``spec.loss``) of the rows'
    summed log-probs."""
    weight, bias, plan, resolved = _lm_inputs(lm_head_weight, hidden, labels, bias, ignore_index, backend,
                                              chunk_tokens, spec.rows_per_group)
    if resolved in ("chunked", "torch"):
        return chunked_pair_loss(spec, weight, hidden, labels, scores, bias, plan, backend=resolved,
                                 reduction=reduction, chunk_tokens=chunk_tokens)
    z = _planned_row_logprobs(weight, hidden, labels, bias, plan, resolved, chunk_tokens)
    return (spec.triton_loss or spec.loss)(z, plan.counts, scores, reduction)


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
    chunk_tokens: int | None = None,
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
        chunk_tokens: chunked backends: at most this many tokens per chunk (None: from
            ``drdo_kernels.logprobs_chunked.CHUNK_BUDGET_BYTES``); chunks hold whole pairs,
            and a longer pair is split into chunks of this size and takes two passes.
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
    _split_rows("oracle_rewards", oracle_rewards, n_pairs)
    scores = [oracle_rewards]
    if reward == "head":
        if policy_rewards is None:
            raise ValueError('reward="head" needs policy_rewards [2B] (the reward head\'s outputs); '
                             'or use reward="implicit"')
        _split_rows("policy_rewards", policy_rewards, n_pairs)
        scores.append(policy_rewards)
    spec = _drdo_spec(alpha=alpha, gamma=gamma, reward=reward, beta=beta, unlikelihood=unlikelihood,
                      length_normalize=length_normalize)
    return _fused_pair_loss(spec, lm_head_weight, hidden, labels, scores, bias, ignore_index=ignore_index,
                            backend=backend, reduction=reduction, chunk_tokens=chunk_tokens)


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
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (:func:`drdo.losses.dpo_loss`) from hidden states; ref_logps: [2B] reference z of each
    row; chunk_tokens: as :func:`fused_linear_drdo_loss`."""
    n_pairs = _n_pairs(hidden, labels)
    _split_rows("ref_logps", ref_logps, n_pairs)
    return _fused_pair_loss(_dpo_spec(beta), lm_head_weight, hidden, labels, [ref_logps], bias,
                            ignore_index=ignore_index, backend=backend, reduction=reduction,
                            chunk_tokens=chunk_tokens)


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
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """e-DPO (:func:`drdo.losses.edpo_loss`) from hidden states.

    ref_logps: [2B]; oracle_rewards: [K, 2B] ensemble scores ([2B] is K = 1). e-DPO is a max
    over ensemble members of batch means, not a sum over pairs: it takes the two passes of
    :func:`fused_linear_logprobs` (chunk_tokens: tokens per chunk there).
    """
    n_pairs = _n_pairs(hidden, labels)
    ref_w, ref_l = _split_rows("ref_logps", ref_logps, n_pairs)
    oracle_w, oracle_l = _split_ensemble("oracle_rewards", oracle_rewards, n_pairs)
    logps, _ = row_logprobs(lm_head_weight, hidden, labels, bias, ignore_index=ignore_index, backend=backend,
                            chunk_tokens=chunk_tokens)
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
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Oracle loss (:func:`drdo.losses.oracle_loss`) from hidden states.

    rewards: [2B] reward-head outputs of each row. The LM term is the NLL of the
    chosen rows only (token-mean per row for nll_reduction="mean", else the sum), so
    only hidden[:B] goes through the LM head. chunk_tokens: as :func:`fused_linear_drdo_loss`.
    """
    n_pairs = _n_pairs(hidden, labels)
    _split_rows("rewards", rewards, n_pairs)
    if nll_reduction not in ("mean", "sum"):
        raise ValueError(f'nll_reduction must be "mean" or "sum", got {nll_reduction!r}')
    return _fused_pair_loss(_oracle_spec(alpha, nll_reduction), lm_head_weight, hidden[:n_pairs],
                            labels[:n_pairs], [rewards], bias, ignore_index=ignore_index, backend=backend,
                            reduction=reduction, chunk_tokens=chunk_tokens)


def _drdo_spec(*, alpha, gamma, reward, beta, unlikelihood, length_normalize) -> PairLossSpec:
    """drdo_loss over pairs; scores = [oracle [2B]] (+ [policy rewards [2B]] for reward="head").
    On the triton backend the loss is the pair-loss kernel :func:`drdo_pair_loss` (integer
    scores as float32; float64 ones keep the float64 reference, as on the other backends)."""

    def pair_inputs(z, n_tokens, scores):
        if length_normalize:
            z = z / n_tokens.to(z.dtype)
        z_w, z_l = z.chunk(2)
        o_w, o_l = scores[0].chunk(2)
        r_w, r_l = scores[1].chunk(2) if reward == "head" else (beta * z_w, beta * z_l)
        return z_w, z_l, r_w, r_l, o_w, o_l

    def loss(z, n_tokens, scores, reduction):
        return drdo_loss(*pair_inputs(z, n_tokens, scores), alpha=alpha, gamma=gamma, unlikelihood=unlikelihood,
                         reduction=reduction)

    def triton_loss(z, n_tokens, scores, reduction):
        inputs = pair_inputs(z, n_tokens, [s if s.is_floating_point() else s.float() for s in scores])
        if any(t.dtype == torch.float64 for t in inputs):  # the kernel computes in float32: keep float64 math
            return loss(z, n_tokens, scores, reduction)
        return drdo_pair_loss(*inputs, alpha=alpha, gamma=gamma, unlikelihood=unlikelihood, reduction=reduction,
                              backend="triton")

    return PairLossSpec(loss, rows_per_group=2, triton_loss=triton_loss)


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
        chunk_tokens: int | None = None,
    ):
        super().__init__()
        if reward not in _REWARD_MODES:
            raise ValueError(f"reward must be one of {_REWARD_MODES}, got {reward!r}")
        if unlikelihood not in ("welleck", "paper"):
            raise ValueError(f'unlikelihood must be "welleck" or "paper", got {unlikelihood!r}')
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        check_chunk_tokens(chunk_tokens)
        self.alpha, self.gamma, self.reward, self.beta = alpha, gamma, reward, beta
        self.unlikelihood, self.ignore_index, self.backend, self.reduction = unlikelihood, ignore_index, backend, reduction
        self.length_normalize, self.chunk_tokens = length_normalize, chunk_tokens

    def forward(self, lm_head_weight, hidden, labels, oracle_rewards, policy_rewards=None, bias=None):
        return fused_linear_drdo_loss(
            lm_head_weight, hidden, labels, oracle_rewards, policy_rewards, bias,
            alpha=self.alpha, gamma=self.gamma, reward=self.reward, beta=self.beta,
            unlikelihood=self.unlikelihood, length_normalize=self.length_normalize, ignore_index=self.ignore_index,
            backend=self.backend, reduction=self.reduction, chunk_tokens=self.chunk_tokens,
        )

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, gamma={self.gamma}, reward={self.reward!r}, beta={self.beta}, "
                f"unlikelihood={self.unlikelihood!r}, length_normalize={self.length_normalize}, "
                f"backend={self.backend!r}, reduction={self.reduction!r}, chunk_tokens={self.chunk_tokens}")


class FusedLinearDPOLoss(nn.Module):
    """nn.Module form of :func:`fused_linear_dpo_loss`.

    forward(lm_head_weight [V, H], hidden [2B, T, H], labels [2B, T], ref_logps [2B],
            bias [V] | None = None) -> (loss, metrics)
    """

    def __init__(self, beta: float = 0.1, *, ignore_index: int = -100, backend: str = "auto", reduction: str = "mean",
                 chunk_tokens: int | None = None):
        super().__init__()
        check_chunk_tokens(chunk_tokens)
        self.beta, self.ignore_index, self.backend, self.reduction = beta, ignore_index, backend, reduction
        self.chunk_tokens = chunk_tokens

    def forward(self, lm_head_weight, hidden, labels, ref_logps, bias=None):
        return fused_linear_dpo_loss(
            lm_head_weight, hidden, labels, ref_logps, bias, beta=self.beta, ignore_index=self.ignore_index,
            backend=self.backend, reduction=self.reduction, chunk_tokens=self.chunk_tokens,
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
        chunk_tokens: int | None = None,
    ):
        super().__init__()
        check_chunk_tokens(chunk_tokens)
        self.beta, self.pessimistic = beta, pessimistic
        self.ignore_index, self.backend, self.reduction = ignore_index, backend, reduction
        self.chunk_tokens = chunk_tokens

    def forward(self, lm_head_weight, hidden, labels, ref_logps, oracle_rewards, bias=None):
        return fused_linear_edpo_loss(
            lm_head_weight, hidden, labels, ref_logps, oracle_rewards, bias,
            beta=self.beta, pessimistic=self.pessimistic, ignore_index=self.ignore_index,
            backend=self.backend, reduction=self.reduction, chunk_tokens=self.chunk_tokens,
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
        chunk_tokens: int | None = None,
    ):
        super().__init__()
        if nll_reduction not in ("mean", "sum"):
            raise ValueError(f'nll_reduction must be "mean" or "sum", got {nll_reduction!r}')
        check_chunk_tokens(chunk_tokens)
        self.alpha, self.nll_reduction = alpha, nll_reduction
        self.ignore_index, self.backend, self.reduction = ignore_index, backend, reduction
        self.chunk_tokens = chunk_tokens

    def forward(self, lm_head_weight, hidden, labels, rewards, bias=None):
        return fused_linear_oracle_loss(
            lm_head_weight, hidden, labels, rewards, bias,
            alpha=self.alpha, nll_reduction=self.nll_reduction, ignore_index=self.ignore_index,
            backend=self.backend, reduction=self.reduction, chunk_tokens=self.chunk_tokens,
        )
