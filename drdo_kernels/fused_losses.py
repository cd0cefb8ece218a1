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

``temperature``, ``softcap`` and ``logit_scale`` (keyword-only everywhere) are the model's logit
transform (:mod:`drdo_kernels.logit_transform`), applied exactly on every backend.

``backend`` ("auto" | "chunked" | "torch" | "triton" | "reference") selects the log-prob kernel.
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

from drdo.losses import DPOSpec, DRDOSpec, EDPOSpec, OracleSpec, drdo_loss, objective_loss

from . import logprobs_chunked as chunked
from .inputs import gather_lm_head
from .logit_transform import IDENTITY, LogitTransform, logit_transform
from .logprobs import (
    TokenPlan,
    check_backend,
    check_chunk_tokens,
    check_inputs,
    check_rows_scored,
    plan_tokens,
    resolve_backend,
    valid_logprobs,
)
from .pair_chunked import chunked_pair_loss, group_order
from .pair_loss import drdo_pair_loss
from .pair_objectives import objective_for

__all__ = [
    "row_logprobs",
    "fused_objective_loss",
    "fused_linear_drdo_loss",
    "fused_linear_dpo_loss",
    "fused_linear_edpo_loss",
    "fused_linear_oracle_loss",
    "FusedLinearDRDOLoss",
    "FusedLinearDPOLoss",
    "FusedLinearEDPOLoss",
    "FusedLinearOracleLoss",
]

def row_logprobs(
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_tokens: int | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of each row, via the fused LM-head kernel.

    Args:
        lm_head_weight: [V, H]; hidden: [N, T, H] (any float dtype); labels: [N, T] int,
            aligned with hidden; bias: [V] or None; chunk_tokens, temperature, softcap,
            logit_scale: as :func:`fused_linear_logprobs`.
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
    transform = logit_transform(temperature, softcap, logit_scale)
    weight, bias, plan, backend = _lm_inputs(lm_head_weight, hidden, labels, bias, ignore_index, backend,
                                             chunk_tokens, rows_per_group=1)
    return _planned_row_logprobs(weight, hidden, labels, bias, plan, backend, chunk_tokens, transform), plan.counts


def _planned_row_logprobs(weight, hidden, labels, bias, plan: TokenPlan, backend: str, chunk_tokens,
                          transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """[N] summed log-probs of the rows of hidden [N, T, H] over the valid tokens of ``plan``."""
    n_rows, n_pos, n_hidden = hidden.shape
    logp = valid_logprobs(hidden.reshape(-1, n_hidden).index_select(0, plan.index), weight,
                          labels.reshape(-1).index_select(0, plan.index).long(), bias, backend, chunk_tokens,
                          transform=transform)
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
    resolved = resolve_backend(backend, hidden.device, chunked.compute_dtype(hidden.dtype, weight.dtype), plan.n_valid,
                               weight.shape[1])
    return weight, bias, plan, resolved


def _fused_pair_loss(spec, lm_head_weight, hidden, labels, bias, *, ignore_index: int, backend: str,
                     reduction: str, chunk_tokens, transform: LogitTransform, **named_scores):
    """(loss, metrics) of ``spec`` from hidden states and the named per-row scores of
    :func:`drdo.losses.objective_loss` (rewards, oracle, ref_logps): on the chunked backends in
    closed form with every gradient computed in the forward; on "triton" and "reference" as
    ``objective_loss`` of the rows' summed log-probs, DRDO on "triton" with the Triton pair kernel."""
    objective = objective_for(spec)
    weight, bias, plan, resolved = _lm_inputs(lm_head_weight, hidden, labels, bias, ignore_index, backend,
                                              chunk_tokens, objective.rows_per_group)
    if resolved in ("chunked", "torch"):
        return chunked_pair_loss(objective, weight, hidden, labels, objective.scores(**named_scores), bias, plan,
                                 backend=resolved, reduction=reduction, chunk_tokens=chunk_tokens,
                                 transform=transform)
    z = _planned_row_logprobs(weight, hidden, labels, bias, plan, resolved, chunk_tokens, transform)
    return objective_loss(spec, z, plan.counts, reduction=reduction,
                          drdo_fn=_triton_drdo if resolved == "triton" else None, **named_scores)


def _triton_drdo(*pair, spec, reduction):
    """drdo_loss by the Triton pair kernel (integer scores as float32; float64 inputs keep the
    float64 reference, as on the other backends)."""
    pair = [t if t.is_floating_point() else t.float() for t in pair]
    if any(t.dtype == torch.float64 for t in pair):
        return drdo_loss(*pair, spec=spec, reduction=reduction)
    return drdo_pair_loss(*pair, spec=spec, reduction=reduction, backend="triton")


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


def _check_rows(name: str, t: torch.Tensor | None, n_pairs: int) -> torch.Tensor:
    """A per-row tensor [2B] (chosen, then rejected)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [2B], got {type(t).__name__}")
    if tuple(t.shape) != (2 * n_pairs,):
        raise ValueError(f"{name} must have shape [2B] = ({2 * n_pairs},), got {tuple(t.shape)}")
    return t


def _check_ensemble(name: str, t: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Ensemble scores [K, 2B] (or [2B] for K = 1)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [K, 2B] or [2B], got {type(t).__name__}")
    scores = t.unsqueeze(0) if t.dim() == 1 else t
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] != 2 * n_pairs:
        raise ValueError(f"{name} must have shape [K, 2B] or [2B] with 2B = {2 * n_pairs}, got {tuple(t.shape)}")
    return t


_CHUNK_DOC = """chunk_tokens: chunked backends: at most this many tokens per chunk (None: from
            ``drdo_kernels.logprobs_chunked.CHUNK_BUDGET_BYTES``); chunks hold whole pairs,
            and a longer pair is split into chunks of this size and takes two passes."""


def fused_linear_drdo_loss(
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    oracle_rewards: torch.Tensor,
    policy_rewards: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    spec: DRDOSpec | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    reduction: str = "mean",
    chunk_tokens: int | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DRDO loss (:func:`drdo.losses.drdo_loss`) from hidden states.

    Args:
        lm_head_weight: [V, H]; hidden: [2B, T, H]; labels: [2B, T] aligned;
        oracle_rewards: [2B] r* of each row (one Oracle; average an ensemble first);
        policy_rewards: [2B] the student's reward-head outputs, required for
            reward="head", ignored for reward="implicit" (rhat = beta * z);
        bias: [V] or None;
        spec / options: a :class:`drdo.losses.DRDOSpec`, or its fields as keywords (alpha,
            gamma, reward, beta, unlikelihood, length_normalize; reward_grad is the caller's);
        {chunk}
        temperature, softcap, logit_scale: the model's logit transform, as
            :func:`drdo_kernels.fused_linear_logprobs` (every backend).
    Returns: (loss, metrics) as drdo.losses.drdo_loss.
    """
    spec = DRDOSpec.build(spec, **options)
    n_pairs = _n_pairs(hidden, labels)
    if isinstance(oracle_rewards, torch.Tensor) and oracle_rewards.dim() == 2:
        raise ValueError(
            f"oracle_rewards has shape {tuple(oracle_rewards.shape)}: DRDO distils ONE Oracle score per row [2B]; "
            "reduce an ensemble [K, 2B] first (e.g. .mean(0))"
        )
    _check_rows("oracle_rewards", oracle_rewards, n_pairs)
    if spec.reward == "head":
        if policy_rewards is None:
            raise ValueError('reward="head" needs policy_rewards [2B] (the reward head\'s outputs); '
                             'or use reward="implicit"')
        _check_rows("policy_rewards", policy_rewards, n_pairs)
    return _fused_pair_loss(spec, lm_head_weight, hidden, labels, bias, ignore_index=ignore_index,
                            backend=backend, reduction=reduction, chunk_tokens=chunk_tokens,
                            transform=logit_transform(temperature, softcap, logit_scale),
                            oracle=oracle_rewards, rewards=policy_rewards)


def fused_linear_dpo_loss(
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    spec: DPOSpec | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    reduction: str = "mean",
    chunk_tokens: int | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (:func:`drdo.losses.dpo_loss`) from hidden states; ref_logps: [2B] reference z of each
    row; spec / options: a :class:`drdo.losses.DPOSpec` or its field (beta); chunk_tokens: as
    :func:`fused_linear_drdo_loss`."""
    spec = DPOSpec.build(spec, **options)
    n_pairs = _n_pairs(hidden, labels)
    _check_rows("ref_logps", ref_logps, n_pairs)
    return _fused_pair_loss(spec, lm_head_weight, hidden, labels, bias, ignore_index=ignore_index,
                            backend=backend, reduction=reduction, chunk_tokens=chunk_tokens,
                            transform=logit_transform(temperature, softcap, logit_scale), ref_logps=ref_logps)


def fused_linear_edpo_loss(
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    oracle_rewards: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    spec: EDPOSpec | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    reduction: str = "mean",
    chunk_tokens: int | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """e-DPO (:func:`drdo.losses.edpo_loss`) from hidden states.

    ref_logps: [2B]; oracle_rewards: [K, 2B] ensemble scores ([2B] is K = 1); spec / options:
    a :class:`drdo.losses.EDPOSpec` or its fields (beta, pessimistic). e-DPO is a max over
    ensemble members of batch means, not a sum over pairs: it takes the two passes of
    :func:`fused_linear_logprobs` (chunk_tokens: tokens per chunk there).
    """
    spec = EDPOSpec.build(spec, **options)
    n_pairs = _n_pairs(hidden, labels)
    _check_rows("ref_logps", ref_logps, n_pairs)
    _check_ensemble("oracle_rewards", oracle_rewards, n_pairs)
    logps, n_tokens = row_logprobs(lm_head_weight, hidden, labels, bias, ignore_index=ignore_index, backend=backend,
                                   chunk_tokens=chunk_tokens, temperature=temperature, softcap=softcap,
                                   logit_scale=logit_scale)
    return objective_loss(spec, logps, n_tokens, ref_logps=ref_logps, oracle=oracle_rewards, reduction=reduction)


def fused_linear_oracle_loss(
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    spec: OracleSpec | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    reduction: str = "mean",
    chunk_tokens: int | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Oracle loss (:func:`drdo.losses.oracle_loss`) from hidden states.

    rewards: [2B] reward-head outputs of each row; spec / options: a
    :class:`drdo.losses.OracleSpec` or its fields (alpha, nll_reduction). The LM term is the NLL
    of the chosen rows only (token-mean per row for nll_reduction="mean", else the sum), so only
    hidden[:B] goes through the LM head. chunk_tokens: as :func:`fused_linear_drdo_loss`.
    """
    spec = OracleSpec.build(spec, **options)
    n_pairs = _n_pairs(hidden, labels)
    _check_rows("rewards", rewards, n_pairs)
    return _fused_pair_loss(spec, lm_head_weight, hidden[:n_pairs], labels[:n_pairs], bias,
                            ignore_index=ignore_index, backend=backend, reduction=reduction,
                            chunk_tokens=chunk_tokens, transform=logit_transform(temperature, softcap, logit_scale),
                            rewards=rewards)


fused_linear_drdo_loss.__doc__ = fused_linear_drdo_loss.__doc__.replace("{chunk}", _CHUNK_DOC)


class _FusedLoss(nn.Module):
    """The nn.Module form shared by the four losses: a spec plus the call options. Each subclass
    names every field of its spec in its constructor (None: the spec's value, or its default)."""

    spec_type = None
    loss_fn = None

    def __init__(self, spec=None, *, ignore_index: int = -100, backend: str = "auto", reduction: str = "mean",
                 chunk_tokens: int | None = None, temperature: float = 1.0, softcap: float | None = None,
                 logit_scale: float = 1.0, **options):
        super().__init__()
        check_chunk_tokens(chunk_tokens)
        check_backend(backend)
        self.spec = self.spec_type.build(spec, **options)
        self.ignore_index, self.backend = ignore_index, backend
        self.reduction, self.chunk_tokens = reduction, chunk_tokens
        self.transform = logit_transform(temperature, softcap, logit_scale)

    @property
    def temperature(self) -> float:
        return self.transform.temperature

    @property
    def softcap(self) -> float | None:
        return self.transform.softcap

    @property
    def logit_scale(self) -> float:
        return self.transform.logit_scale

    def __getattr__(self, name: str):
        """The spec's fields read as attributes (``loss_fn.alpha``)."""
        spec = self.__dict__.get("spec")
        if spec is not None and name in spec.to_dict():
            return getattr(spec, name)
        return super().__getattr__(name)

    def _call(self, *args):
        t = self.transform
        return type(self).loss_fn(*args, spec=self.spec, ignore_index=self.ignore_index, backend=self.backend,
                                  reduction=self.reduction, chunk_tokens=self.chunk_tokens,
                                  temperature=t.temperature, softcap=t.softcap, logit_scale=t.logit_scale)

    def extra_repr(self) -> str:
        return (f"{self.spec}, backend={self.backend!r}, reduction={self.reduction!r}, "
                f"chunk_tokens={self.chunk_tokens}, {self.transform}")


class FusedLinearDRDOLoss(_FusedLoss):
    """nn.Module form of :func:`fused_linear_drdo_loss`: ``FusedLinearDRDOLoss(alpha, gamma, *,
    reward, beta, unlikelihood, reward_grad, length_normalize, spec, ...)`` (the fields of
    :class:`drdo.losses.DRDOSpec`; None keeps the spec's value), the call options and the logit
    transform (``temperature``, ``softcap``, ``logit_scale``).

    forward(lm_head_weight [V, H], hidden [2B, T, H], labels [2B, T], oracle_rewards [2B],
            policy_rewards [2B] | None = None, bias [V] | None = None) -> (loss, metrics)
    """

    spec_type = DRDOSpec
    loss_fn = fused_linear_drdo_loss

    def __init__(self, alpha: float | None = None, gamma: float | None = None, *, reward: str | None = None,
                 beta: float | None = None, unlikelihood: str | None = None, reward_grad: str | None = None,
                 length_normalize: bool | None = None, spec: DRDOSpec | None = None, ignore_index: int = -100,
                 backend: str = "auto", reduction: str = "mean", chunk_tokens: int | None = None,
                 temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0):
        super().__init__(spec, ignore_index=ignore_index, backend=backend, reduction=reduction,
                         chunk_tokens=chunk_tokens, temperature=temperature, softcap=softcap,
                         logit_scale=logit_scale, alpha=alpha, gamma=gamma, reward=reward, beta=beta,
                         unlikelihood=unlikelihood, reward_grad=reward_grad, length_normalize=length_normalize)

    def forward(self, lm_head_weight, hidden, labels, oracle_rewards, policy_rewards=None, bias=None):
        return self._call(lm_head_weight, hidden, labels, oracle_rewards, policy_rewards, bias)


class FusedLinearDPOLoss(_FusedLoss):
    """nn.Module form of :func:`fused_linear_dpo_loss`: ``FusedLinearDPOLoss(beta, *, spec=None, ...)``.

    forward(lm_head_weight [V, H], hidden [2B, T, H], labels [2B, T], ref_logps [2B],
            bias [V] | None = None) -> (loss, metrics)
    """

    spec_type = DPOSpec
    loss_fn = fused_linear_dpo_loss

    def __init__(self, beta: float | None = None, *, spec: DPOSpec | None = None, ignore_index: int = -100,
                 backend: str = "auto", reduction: str = "mean", chunk_tokens: int | None = None,
                 temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0):
        super().__init__(spec, ignore_index=ignore_index, backend=backend, reduction=reduction,
                         chunk_tokens=chunk_tokens, temperature=temperature, softcap=softcap,
                         logit_scale=logit_scale, beta=beta)

    def forward(self, lm_head_weight, hidden, labels, ref_logps, bias=None):
        return self._call(lm_head_weight, hidden, labels, ref_logps, bias)


class FusedLinearEDPOLoss(_FusedLoss):
    """nn.Module form of :func:`fused_linear_edpo_loss`: ``FusedLinearEDPOLoss(beta, pessimistic, *, ...)``.

    forward(lm_head_weight [V, H], hidden [2B, T, H], labels [2B, T], ref_logps [2B],
            oracle_rewards [K, 2B], bias [V] | None = None) -> (loss, metrics)
    """

    spec_type = EDPOSpec
    loss_fn = fused_linear_edpo_loss

    def __init__(self, beta: float | None = None, pessimistic: bool | None = None, *, spec: EDPOSpec | None = None,
                 ignore_index: int = -100, backend: str = "auto", reduction: str = "mean",
                 chunk_tokens: int | None = None, temperature: float = 1.0, softcap: float | None = None,
                 logit_scale: float = 1.0):
        super().__init__(spec, ignore_index=ignore_index, backend=backend, reduction=reduction,
                         chunk_tokens=chunk_tokens, temperature=temperature, softcap=softcap,
                         logit_scale=logit_scale, beta=beta, pessimistic=pessimistic)

    def forward(self, lm_head_weight, hidden, labels, ref_logps, oracle_rewards, bias=None):
        return self._call(lm_head_weight, hidden, labels, ref_logps, oracle_rewards, bias)


class FusedLinearOracleLoss(_FusedLoss):
    """nn.Module form of :func:`fused_linear_oracle_loss` (NLL of the chosen rows only):
    ``FusedLinearOracleLoss(alpha, nll_reduction, *, ...)``.

    forward(lm_head_weight [V, H], hidden [2B, T, H], labels [2B, T], rewards [2B],
            bias [V] | None = None) -> (loss, metrics)
    """

    spec_type = OracleSpec
    loss_fn = fused_linear_oracle_loss

    def __init__(self, alpha: float | None = None, nll_reduction: str | None = None, *,
                 spec: OracleSpec | None = None, ignore_index: int = -100, backend: str = "auto",
                 reduction: str = "mean", chunk_tokens: int | None = None, temperature: float = 1.0,
                 softcap: float | None = None, logit_scale: float = 1.0):
        super().__init__(spec, ignore_index=ignore_index, backend=backend, reduction=reduction,
                         chunk_tokens=chunk_tokens, temperature=temperature, softcap=softcap,
                         logit_scale=logit_scale, alpha=alpha, nll_reduction=nll_reduction)

    def forward(self, lm_head_weight, hidden, labels, rewards, bias=None):
        return self._call(lm_head_weight, hidden, labels, rewards, bias)


def fused_objective_loss(
    spec,
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    rewards: torch.Tensor | None = None,
    oracle: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    reduction: str = "mean",
    chunk_tokens: int | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`drdo.losses.objective_loss` from hidden states: the loss of a DRDO, DPO, e-DPO or
    Oracle spec, with the inputs it reads (hidden [2B, T, H], labels [2B, T]; rewards, oracle,
    ref_logps as there; DRDO averages an Oracle ensemble [K, 2B]); temperature, softcap,
    logit_scale: the model's logit transform, as :func:`drdo_kernels.fused_linear_logprobs`."""
    common = dict(spec=spec, ignore_index=ignore_index, backend=backend, reduction=reduction, chunk_tokens=chunk_tokens,
                  temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    if isinstance(spec, DRDOSpec):
        single = oracle.mean(0) if oracle.dim() == 2 else oracle
        return fused_linear_drdo_loss(lm_head_weight, hidden, labels, single,
                                      rewards if spec.reward == "head" else None, bias, **common)
    if isinstance(spec, OracleSpec):
        return fused_linear_oracle_loss(lm_head_weight, hidden, labels, rewards, bias, **common)
    if isinstance(spec, DPOSpec):
        return fused_linear_dpo_loss(lm_head_weight, hidden, labels, ref_logps, bias, **common)
    if isinstance(spec, EDPOSpec):
        return fused_linear_edpo_loss(lm_head_weight, hidden, labels, ref_logps, oracle, bias, **common)
    raise TypeError(f"fused_objective_loss takes a DRDO, DPO, e-DPO or Oracle spec, got {type(spec).__name__}")
