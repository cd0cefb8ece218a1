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

import dataclasses
import math
import numbers

import torch
import torch.nn.functional as F

from drdo.errors import shown

__all__ = [
    "DRDOSpec",
    "DPOSpec",
    "EDPOSpec",
    "OracleSpec",
    "SFTSpec",
    "LossSpec",
    "objective_loss",
    "sequence_logprobs",
    "drdo_loss",
    "oracle_loss",
    "dpo_loss",
    "edpo_loss",
    "log1mexp",
    "LOGP_CLAMP_MAX",
    "REDUCTIONS",
    "check_reduction",
    "check_rows_scored",
    "UNLIKELIHOOD_SIGN",
    "check_pair_shapes",
]

#: z_l is clamped to at most this value before log(1 - exp(z_l)) so that the
#: unlikelihood term stays finite for a response whose probability rounds to 1.
#: log(1 - exp(-1e-6)) = -13.8; its derivative there is about -1e6.
IGNORE_INDEX = -100  # label of a token that is not scored (prompt, padding), as in PyTorch and HF
LOGP_CLAMP_MAX = -1e-6

UNLIKELIHOOD_SIGN = {"welleck": 1.0, "paper": -1.0}
REDUCTIONS = ("mean", "sum", "none")
REWARDS = ("head", "implicit")
REWARD_GRADS = ("backbone", "head")
NLL_REDUCTIONS = ("mean", "sum")


# ------------------------------------------------------------------------------------------ loss specs
# One frozen dataclass per objective holds its hyperparameters: each default is declared here
# once and each value is checked here once (__post_init__). Everything else (the reference
# losses below, the fused kernels, the training objective, the CLI, the demo, the TRL config)
# takes or builds one of these and passes it whole.


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {shown(value)}")
    return float(value)


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {shown(value)}")


class LossSpec:
    """Base of the loss specs: building one from options, and the checks they share."""

    @classmethod
    def build(cls, spec: "LossSpec | None" = None, **options):
        """``spec`` with ``options`` applied (options left as None keep the spec's value), or a
        new spec of this class from the options. A spec of another class is a TypeError."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"{cls.__name__} has no option {unknown[0]!r}; its options: "
                            f"{', '.join(f.name for f in dataclasses.fields(cls)) or 'none'}")
        if spec is None:
            return cls(**given)
        if not isinstance(spec, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(spec).__name__}")
        return dataclasses.replace(spec, **given) if given else spec

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    def _weight(self, name: str) -> None:
        """A finite number >= 0 (a negative weight reverses its term)."""
        value = _number(name, getattr(self, name))
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self._set(name, value)

    def _positive(self, name: str) -> None:
        """A finite number > 0."""
        value = _number(name, getattr(self, name))
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
        self._set(name, value)

    def _flag(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):
            raise ValueError(f"{name} must be true or false, got {shown(getattr(self, name))}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DRDOSpec(LossSpec):
    """DRDO (paper Eq. 6): ``(r*_w - r*_l - (rhat_w - rhat_l))^2 - alpha (1 - p_w)^gamma U(z_w, z_l)``.

    alpha: weight of the focal preference term (>= 0). gamma: focal exponent (>= 0).
    reward: the student's reward rhat, "head" (a linear reward head) or "implicit" (beta * z).
    beta: the implicit reward's scale (> 0); with reward="head" only its default is accepted (another
    value would be ignored). unlikelihood: U = z_w + s log(1 - e^{z_l}), s = +1
    ("welleck") or -1 ("paper", the sign as printed). reward_grad: "backbone" (the distillation
    gradient reaches the layers the head shares with the policy) or "head" (it trains the head
    only; needs reward="head"). length_normalize: z is the token-mean response log-prob instead
    of the sum (a departure from the paper).
    """

    alpha: float = 0.1
    gamma: float = 2.0
    reward: str = "head"
    beta: float = 0.1
    unlikelihood: str = "welleck"
    reward_grad: str = "backbone"
    length_normalize: bool = False

    def __post_init__(self):
        self._weight("alpha")
        self._weight("gamma")
        self._positive("beta")
        _choice("reward", self.reward, REWARDS)
        _choice("unlikelihood", self.unlikelihood, tuple(UNLIKELIHOOD_SIGN))
        _choice("reward_grad", self.reward_grad, REWARD_GRADS)
        self._flag("length_normalize")
        if self.reward_grad == "head" and self.reward != "head":
            raise ValueError('reward_grad="head" needs reward="head" (an implicit reward has no head to stop at)')
        default_beta = next(f.default for f in dataclasses.fields(self) if f.name == "beta")
        if self.reward == "head" and self.beta != default_beta:
            raise ValueError(f'beta={self.beta:g} scales the implicit reward only; with reward="head" it would be '
                             'ignored: drop it or set reward="implicit"')


@dataclasses.dataclass(frozen=True)
class DPOSpec(LossSpec):
    """DPO: ``-log sigmoid(beta ((z_w - zref_w) - (z_l - zref_l)))``; beta > 0."""

    beta: float = 0.1

    def __post_init__(self):
        self._positive("beta")


@dataclasses.dataclass(frozen=True)
class EDPOSpec(LossSpec):
    """e-DPO: each ensemble member's squared distillation error, then the max over members
    (pessimistic) or their mean; beta > 0 scales the implicit reward margin."""

    beta: float = 0.1
    pessimistic: bool = True

    def __post_init__(self):
        self._positive("beta")
        self._flag("pessimistic")


@dataclasses.dataclass(frozen=True)
class OracleSpec(LossSpec):
    """The Oracle (paper Eq. 5): ``-(1 - alpha) log sigmoid(r_w - r_l) + alpha nll(y_w)``.

    alpha: weight of the LM regulariser, in [0, 1]. nll_reduction: the NLL of y_w as the
    token-mean ("mean", the usual SFT loss) or the sum ("sum")."""

    alpha: float = 0.01
    nll_reduction: str = "mean"

    def __post_init__(self):
        self._weight("alpha")
        if self.alpha > 1:
            raise ValueError(f"alpha must be in [0, 1] (it weighs the Bradley-Terry term by 1 - alpha), "
                             f"got {self.alpha}")
        _choice("nll_reduction", self.nll_reduction, NLL_REDUCTIONS)


@dataclasses.dataclass(frozen=True)
class SFTSpec(LossSpec):
    """SFT: the token-mean NLL of the chosen responses; no hyperparameters."""


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


def check_reduction(reduction) -> str:
    """``reduction`` must be one of :data:`REDUCTIONS` ("mean", "sum", "none": the per-pair
    losses [B]); returns it. The one check of every loss, reference and fused."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {shown(reduction)}")
    return reduction


def check_rows_scored(n_tokens, ignore_index: int = IGNORE_INDEX) -> None:
    """ValueError naming the rows with no response token (an empty response has no sequence
    log-prob). n_tokens: [N] int tensor or list of ints, the response tokens per row."""
    empty = [r for r, n in enumerate(n_tokens.tolist() if isinstance(n_tokens, torch.Tensor) else n_tokens) if not n]
    if empty:
        raise ValueError(f"rows {empty[:8]} have no response token (every label is ignore_index={ignore_index}); "
                         "a sequence log-prob needs at least one token")


def _reduce(per_pair: torch.Tensor, reduction: str) -> torch.Tensor:
    """The mean or sum of per_pair [B], or per_pair itself for "none"."""
    return {"mean": per_pair.mean, "sum": per_pair.sum, "none": lambda: per_pair}[check_reduction(reduction)]()


def _detached(**values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached scalar metrics (a per-pair loss [B] of reduction="none" is logged as its mean)."""
    return {k: v.detach().mean() for k, v in values.items()}


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
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, *, allow_empty_rows: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens of each row.

    Args:
        logits: [N, T, V] (any float dtype), aligned with ``labels``.
        labels: [N, T] int64; ``ignore_index`` marks tokens that do not count.
        allow_empty_rows: a row with no counted token is a ValueError naming it (its log-prob
            is meaningless to a pair loss, as in the fused losses), unless True (token sums, as
            SFT's NLL: such a row sums to 0).
    Returns:
        logps_sum: [N] float32 (float64 for float64 logits), sum over counted tokens
            of log_softmax(logits)[label].
        n_tokens: [N] int64, the number of counted tokens per row.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits [N, T, V] and labels [N, T], "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
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
    if not allow_empty_rows:
        check_rows_scored(mask.sum(-1), ignore_index)
    return token_logp.sum(-1), mask.sum(-1)


def drdo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    policy_chosen_rewards: torch.Tensor,
    policy_rejected_rewards: torch.Tensor,
    oracle_chosen_rewards: torch.Tensor,
    oracle_rejected_rewards: torch.Tensor,
    *,
    spec: DRDOSpec | None = None,
    reduction: str = "mean",
    **options,
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
        spec / options: a :class:`DRDOSpec`, or its fields as keywords (alpha, gamma,
            unlikelihood are read here; the others say how the caller forms z and rhat).
        reduction: "mean" (default) or "sum" over pairs, or "none" (the per-pair losses [B]).
    Returns:
        loss: scalar float32 (float64 for float64 inputs), [B] for reduction="none";
        metrics: distill, pref, p_w, reward_acc, focal, unlikelihood,
            reward_margin, oracle_margin, logps_chosen, logps_rejected (means).
    """
    spec = DRDOSpec.build(spec, **options)
    check_reduction(reduction)
    alpha, gamma = spec.alpha, spec.gamma
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
    u = z_w + UNLIKELIHOOD_SIGN[spec.unlikelihood] * log1mexp(z_l.clamp(max=LOGP_CLAMP_MAX))
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
    chosen_n_tokens: torch.Tensor | None = None,
    spec: OracleSpec | None = None,
    reduction: str = "mean",
    **options,
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
        spec / options: an :class:`OracleSpec`, or its fields (alpha, nll_reduction).
        reduction: "mean" or "sum" over pairs, or "none" (the per-pair losses [B]).
    Returns:
        loss, metrics: loss, bt (the Bradley-Terry term), nll, reward_acc,
        reward_margin, rewards_chosen, rewards_rejected.
    """
    spec = OracleSpec.build(spec, **options)
    check_reduction(reduction)
    alpha = spec.alpha
    check_pair_shapes(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, chosen_nll=chosen_nll)
    dtype = _compute_dtype(chosen_rewards, rejected_rewards, chosen_nll)
    r_w, r_l, nll = (_as_float(t, dtype) for t in (chosen_rewards, rejected_rewards, chosen_nll))
    if spec.nll_reduction == "mean":
        if chosen_n_tokens is None:
            raise ValueError('nll_reduction="mean" needs chosen_n_tokens (the token count of each chosen response)')
        check_pair_shapes(chosen_nll=chosen_nll, chosen_n_tokens=chosen_n_tokens)
        nll = nll / chosen_n_tokens.to(dtype).clamp(min=1)

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
    pc, pr, rc, rr = (_as_float(t, dtype) for t in (pc, pr, rc, rr))
    chosen = beta * (pc - rc)
    rejected = beta * (pr - rr)
    return chosen - rejected, chosen, rejected


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    spec: DPOSpec | None = None,
    reduction: str = "mean",
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023), per pair: -log sigmoid(beta * ((z_w - zref_w) - (z_l - zref_l))).

    Args: four [B] tensors of summed response log-probs; a :class:`DPOSpec` or its field (beta);
        reduction: "mean", "sum" or "none" (the per-pair losses [B]).
    Returns: loss, metrics: loss, rewards_chosen, rewards_rejected, reward_margin,
        reward_acc (implicit reward of y_w above that of y_l), logps_chosen, logps_rejected.
    """
    inputs = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    spec = DPOSpec.build(spec, **options)
    check_reduction(reduction)
    check_pair_shapes(**inputs)
    dtype = _compute_dtype(*inputs.values())
    margin, chosen, rejected = _implicit_margin(*inputs.values(), spec.beta, dtype)
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
    spec: EDPOSpec | None = None,
    reduction: str = "mean",
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Ensemble reward-model distillation (e-DPO; Fisch et al. 2024, paper Eq. 4).

    For each ensemble member k:
        L_k = reduce_b ( r_k(x,y_w) - r_k(x,y_l) - beta*((z_w - zref_w) - (z_l - zref_l)) )^2
    and the loss is max_k L_k (``pessimistic=True``) or mean_k L_k. The max is
    taken over the batch estimate of each member's expectation.

    Args:
        policy_*/ref_*: [B] summed response log-probs.
        oracle_chosen_rewards, oracle_rejected_rewards: [K, B] (a [B] tensor is K = 1).
        spec / options: an :class:`EDPOSpec`, or its fields (beta, pessimistic).
        reduction: "mean" or "sum" (each member's reduction over pairs), or "none": the per-pair
            terms [B] of the member the loss selects (pessimistic: the member of the largest mean;
            else the mean over members of each pair's squared errors), so that their mean is the
            loss of reduction="mean".
    Returns: loss, metrics: loss, distill_min, distill_max, worst_member (index, float),
        reward_margin, oracle_margin, reward_acc.
    """
    inputs = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    spec = EDPOSpec.build(spec, **options)
    check_reduction(reduction)
    n_pairs = check_pair_shapes(**inputs)
    oracle_w = oracle_chosen_rewards if oracle_chosen_rewards.dim() == 2 else oracle_chosen_rewards.unsqueeze(0)
    oracle_l = oracle_rejected_rewards if oracle_rejected_rewards.dim() == 2 else oracle_rejected_rewards.unsqueeze(0)
    if (oracle_w.shape != oracle_l.shape or oracle_w.dim() != 2 or oracle_w.shape[1] != n_pairs
            or oracle_w.shape[0] == 0):
        raise ValueError(
            f"oracle rewards must both be [K, B] with B={n_pairs}, K >= 1; "
            f"got {tuple(oracle_chosen_rewards.shape)} and {tuple(oracle_rejected_rewards.shape)}"
        )
    dtype = _compute_dtype(*inputs.values(), oracle_w, oracle_l)
    margin, _, _ = _implicit_margin(*inputs.values(), spec.beta, dtype)
    oracle_margin = _as_float(oracle_w, dtype) - _as_float(oracle_l, dtype)  # [K, B]
    squared = (oracle_margin - margin) ** 2  # [K, B]
    per_member = squared.sum(1) if reduction == "sum" else squared.mean(1)  # [K]
    if reduction != "none":
        loss = per_member.max() if spec.pessimistic else per_member.mean()
    else:
        loss = squared[per_member.argmax()] if spec.pessimistic else squared.mean(0)
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


def objective_loss(
    spec: LossSpec,
    logps: torch.Tensor,
    n_tokens: torch.Tensor,
    *,
    rewards: torch.Tensor | None = None,
    oracle: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    reduction: str = "mean",
    drdo_fn=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``spec`` from sequence log-probs: how a spec's options turn z into its loss.

    Args:
        spec: a :class:`DRDOSpec`, :class:`DPOSpec`, :class:`EDPOSpec` or :class:`OracleSpec`.
        logps: [2B] summed response log-probs (chosen rows, then rejected); for the Oracle [B]
            (its LM term reads the chosen rows only) or [2B] (the first B are used).
        n_tokens: the response token counts of the rows of ``logps``.
        rewards: [2B] reward-head outputs (DRDO with reward="head"; the Oracle).
        oracle: [2B] Oracle scores (DRDO; a [K, 2B] ensemble is averaged), or [K, 2B] (e-DPO).
        ref_logps: [2B] reference log-probs (DPO, e-DPO).
        drdo_fn: the pair loss DRDO uses (default :func:`drdo_loss`; the fused kernels pass
            their Triton twin).
        reduction: "mean", "sum" or "none" (per-pair losses [B]).
    Returns (loss, metrics) of the objective's reference function. ``spec.reward_grad`` is the
    caller's: it says how the rewards were computed. Rows with no response token are refused
    where z is computed (:func:`sequence_logprobs`, the fused kernels), not here (no host sync).
    """
    if isinstance(spec, OracleSpec):
        n = rewards.shape[0] // 2
        return oracle_loss(rewards[:n], rewards[n:], -logps[:n], chosen_n_tokens=n_tokens[:n], spec=spec,
                           reduction=reduction)
    n = logps.shape[0] // 2
    if isinstance(spec, DRDOSpec):
        z = logps / n_tokens.to(logps.dtype) if spec.length_normalize else logps
        rhat = rewards if spec.reward == "head" else spec.beta * z
        if rhat is None:
            raise ValueError('reward="head" needs the reward head\'s outputs (rewards [2B]); or use reward="implicit"')
        if oracle.dim() == 2:
            oracle = oracle.mean(0)
        return (drdo_fn or drdo_loss)(z[:n], z[n:], rhat[:n], rhat[n:], oracle[:n], oracle[n:], spec=spec,
                                      reduction=reduction)
    if isinstance(spec, DPOSpec):
        return dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], spec=spec, reduction=reduction)
    if isinstance(spec, EDPOSpec):
        ensemble = oracle if oracle.dim() == 2 else oracle.unsqueeze(0)
        return edpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], ensemble[:, :n], ensemble[:, n:],
                         spec=spec, reduction=reduction)
    raise TypeError(f"objective_loss takes a DRDO, DPO, e-DPO or Oracle spec, got {type(spec).__name__}")
