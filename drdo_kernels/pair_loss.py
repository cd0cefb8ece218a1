"""The DRDO pair loss (paper Eq. 6) with its exact gradient, in one Triton launch.

Per pair b (z = summed response log-probs, rhat = policy rewards, r* = oracle):

    distill = (r*_w - r*_l - (rhat_w - rhat_l))^2
    focal   = (1 - p_w)^gamma = exp(-gamma * softplus(z_w - z_l)),   p_w = sigmoid(z_w - z_l)
    L       = log(1 - exp(min(z_l, LOGP_CLAMP_MAX)))                  (log1mexp)
    U       = z_w + s * L,  s = +1 ("welleck") or -1 ("paper")
    loss_b  = distill - alpha * focal * U

and its derivatives, with focal' = d focal / d(z_w - z_l) = -gamma * focal * p_w,
L' = -exp(z_l) / (1 - exp(z_l)) where z_l <= LOGP_CLAMP_MAX and 0 where it is clamped
(as ``torch.clamp`` differentiates):

    dloss/dz_w    = -alpha * (focal' * U + focal)
    dloss/dz_l    = -alpha * (-focal' * U + focal * s * L')
    dloss/drhat_w = -2 * (r*_w - r*_l - rhat_w + rhat_l) = -dloss/dr*_w
    dloss/drhat_l = +2 * (r*_w - r*_l - rhat_w + rhat_l) = -dloss/dr*_l

The forward pass computes all of it at once (one Triton kernel over blocks of pairs
that also writes per-block sums of the loss and of every metric); the backward pass
only scales the saved per-pair gradients [4, B] by the upstream gradient (and 1/B for
``reduction="mean"``); it is first-order only (double backward raises). Oracle rewards
get the exact gradient too (the negated rhat gradients), though they are normally
constants. Extra memory: the [4, B] float32 gradients, nothing per token.

Precision: the Triton kernel computes in float32 (inputs of any float dtype are cast
to float32 first); log1p and expm1 are evaluated with short series (Triton has no
portable log1p/expm1), accurate to a few float32 ulp. ``backend="torch"`` is the same
closed form in PyTorch ops, in float32, or float64 when any input is float64 (the
reference's rule). ``backend="auto"`` picks Triton for CUDA tensors that are not
float64 and PyTorch otherwise; ``backend="triton"`` refuses float64 inputs.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from drdo.losses import (
    LOGP_CLAMP_MAX,
    UNLIKELIHOOD_SIGN,
    DRDOSpec,
    check_pair_shapes,
    check_reduction,
    drdo_loss,
    log1mexp,
)

from .logprobs import resolve_backend
from .triton_runtime import triton_available

try:  # Triton is optional: without it only backend="torch" exists.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["drdo_pair_loss", "triton_pair_terms", "torch_pair_terms", "METRIC_NAMES", "BLOCK_PAIRS"]


#: Order of the per-block sums the kernel writes; metric means are these sums / B.
#: "loss" is the sum of the per-pair losses; "reward_acc" counts rhat_w > rhat_l.
METRIC_NAMES = (
    "loss",
    "distill",
    "pref",
    "p_w",
    "reward_acc",
    "focal",
    "unlikelihood",
    "reward_margin",
    "oracle_margin",
    "logps_chosen",
    "logps_rejected",
)
_N_STATS = len(METRIC_NAMES)

#: Pairs per Triton program (one warp, one pair per lane). The only launch config.
BLOCK_PAIRS = 32
_NUM_WARPS = 1
_NUM_STAGES = 1


# --------------------------------------------------------------------------- Triton


if triton is not None:

    @triton.jit
    def _log1p_mid(t):
        """log(1 + t) for t in [-0.5, 1] (fp32): 2 * atanh(s), s = t / (2 + t) in [-1/3, 1/3],
        by its odd series to s^15 (truncation < 2e-9 relative)."""
        s = t / (2.0 + t)
        s2 = s * s
        p = s2 * 0.06666666666666667 + 0.07692307692307693  # 1/15, 1/13
        p = p * s2 + 0.09090909090909091  # 1/11
        p = p * s2 + 0.1111111111111111  # 1/9
        p = p * s2 + 0.14285714285714285  # 1/7
        p = p * s2 + 0.2
        p = p * s2 + 0.3333333333333333
        p = p * s2 + 1.0
        return 2.0 * s * p

    @triton.jit
    def _expm1_mid(x):
        """exp(x) - 1 for x in [-ln 2, 0] (fp32): Taylor series to x^11 in nested form
        (truncation < 1e-10 relative)."""
        p = x * 0.09090909090909091 + 1.0  # 1 + x/11
        p = x * 0.1 * p + 1.0
        p = x * 0.1111111111111111 * p + 1.0
        p = x * 0.125 * p + 1.0
        p = x * 0.14285714285714285 * p + 1.0
        p = x * 0.16666666666666666 * p + 1.0
        p = x * 0.2 * p + 1.0
        p = x * 0.25 * p + 1.0
        p = x * 0.3333333333333333 * p + 1.0
        p = x * 0.5 * p + 1.0
        return x * p

    @triton.jit(do_not_specialize=["B"])  # one compiled variant for every B (the AOT one)
    def _drdo_pair_kernel(
        x_ptr,  # [6, B] fp32: z_w, z_l, rhat_w, rhat_l, r*_w, r*_l
        grad_ptr,  # [4, B] fp32 out: d loss_b / d (z_w, z_l, rhat_w, rhat_l)
        stats_ptr,  # [n_programs, N_STATS] fp32 out: per-block sums, METRIC_NAMES order
        B,
        alpha,
        gamma,
        sign,  # +1 welleck, -1 paper
        clamp_max,  # LOGP_CLAMP_MAX
        BLOCK: tl.constexpr,
        N_STATS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < B
        z_w = tl.load(x_ptr + offs, mask=mask, other=-1.0)
        z_l = tl.load(x_ptr + B + offs, mask=mask, other=-1.0)
        rh_w = tl.load(x_ptr + 2 * B + offs, mask=mask, other=0.0)
        rh_l = tl.load(x_ptr + 3 * B + offs, mask=mask, other=0.0)
        or_w = tl.load(x_ptr + 4 * B + offs, mask=mask, other=0.0)
        or_l = tl.load(x_ptr + 5 * B + offs, mask=mask, other=0.0)

        # reward distillation
        oracle_margin = or_w - or_l
        reward_margin = rh_w - rh_l
        diff = oracle_margin - reward_margin
        distill = diff * diff

        # focal factor (1 - p_w)^gamma and its derivative w.r.t. delta = z_w - z_l
        delta = z_w - z_l
        e = tl.exp(-tl.abs(delta))
        inv = 1.0 / (1.0 + e)
        p_w = tl.where(delta >= 0, inv, e * inv)
        softplus = tl.maximum(delta, 0.0) + _log1p_mid(e)
        focal = tl.exp(-gamma * softplus)
        d_focal = -gamma * focal * p_w

        # log(1 - exp(zc)), zc = min(z_l, clamp_max), and d/dz_l (0 where clamped)
        zc = tl.minimum(z_l, clamp_max)
        near = zc > -0.6931471805599453
        ez = tl.exp(zc)
        one_m_near = -_expm1_mid(tl.where(near, zc, -0.5))
        l1me_near = tl.log(one_m_near)
        l1me_far = _log1p_mid(-tl.where(near, 0.5, ez))
        l1me = tl.where(near, l1me_near, l1me_far)
        one_m_ez = tl.where(near, one_m_near, 1.0 - ez)
        d_l1me = tl.where(z_l <= clamp_max, -ez / one_m_ez, 0.0)

        u = z_w + sign * l1me
        pref = -alpha * focal * u
        loss = distill + pref

        g_zw = -alpha * (d_focal * u + focal)
        g_zl = -alpha * (focal * sign * d_l1me - d_focal * u)
        g_rw = -2.0 * diff
        tl.store(grad_ptr + offs, g_zw, mask=mask)
        tl.store(grad_ptr + B + offs, g_zl, mask=mask)
        tl.store(grad_ptr + 2 * B + offs, g_rw, mask=mask)
        tl.store(grad_ptr + 3 * B + offs, -g_rw, mask=mask)

        out = stats_ptr + pid * N_STATS
        tl.store(out + 0, tl.sum(tl.where(mask, loss, 0.0), axis=0))
        tl.store(out + 1, tl.sum(tl.where(mask, distill, 0.0), axis=0))
        tl.store(out + 2, tl.sum(tl.where(mask, pref, 0.0), axis=0))
        tl.store(out + 3, tl.sum(tl.where(mask, p_w, 0.0), axis=0))
        tl.store(out + 4, tl.sum(tl.where(mask & (reward_margin > 0), 1.0, 0.0), axis=0))
        tl.store(out + 5, tl.sum(tl.where(mask, focal, 0.0), axis=0))
        tl.store(out + 6, tl.sum(tl.where(mask, u, 0.0), axis=0))
        tl.store(out + 7, tl.sum(tl.where(mask, reward_margin, 0.0), axis=0))
        tl.store(out + 8, tl.sum(tl.where(mask, oracle_margin, 0.0), axis=0))
        tl.store(out + 9, tl.sum(tl.where(mask, z_w, 0.0), axis=0))
        tl.store(out + 10, tl.sum(tl.where(mask, z_l, 0.0), axis=0))


def triton_pair_terms(x: torch.Tensor, alpha: float, gamma: float, sign: float, grads_only: bool = False):
    """x: [6, B] float32 contiguous -> (sums [N_STATS] fp32 | None with ``grads_only``, grads [4, B]
    fp32), one launch."""
    n_pairs = x.shape[1]
    n_programs = triton.cdiv(n_pairs, BLOCK_PAIRS)
    grads = torch.empty(4, n_pairs, dtype=torch.float32, device=x.device)
    stats = torch.empty(n_programs, _N_STATS, dtype=torch.float32, device=x.device)
    _drdo_pair_kernel[(n_programs,)](
        x, grads, stats, n_pairs, float(alpha), float(gamma), float(sign), float(LOGP_CLAMP_MAX),
        BLOCK=BLOCK_PAIRS, N_STATS=_N_STATS, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    return None if grads_only else stats.sum(0), grads


# --------------------------------------------------------------------------- PyTorch


def torch_pair_terms(x: torch.Tensor, alpha: float, gamma: float, sign: float, grads_only: bool = False):
    """The kernel's closed form in PyTorch ops. x: [6, B] float32/float64.

    Returns (sums [N_STATS] | None with ``grads_only``, grads [4, B]) in x.dtype, laid out as the
    kernel's.
    """
    z_w, z_l, rh_w, rh_l, or_w, or_l = x.unbind(0)
    oracle_margin = or_w - or_l
    reward_margin = rh_w - rh_l
    diff = oracle_margin - reward_margin
    distill = diff * diff

    delta = z_w - z_l
    p_w = torch.sigmoid(delta)
    focal = torch.exp(gamma * torch.nn.functional.logsigmoid(-delta))
    d_focal = -gamma * focal * p_w

    zc = z_l.clamp(max=LOGP_CLAMP_MAX)
    l1me = log1mexp(zc)
    d_l1me = torch.where(z_l <= LOGP_CLAMP_MAX, torch.exp(zc) / torch.expm1(zc), torch.zeros_like(zc))

    u = z_w + sign * l1me
    pref = -alpha * focal * u
    grads = torch.stack(
        [
            -alpha * (d_focal * u + focal),
            -alpha * (focal * sign * d_l1me - d_focal * u),
            -2.0 * diff,
            2.0 * diff,
        ]
    )
    if grads_only:
        return None, grads
    per_pair = [distill + pref, distill, pref, p_w, (reward_margin > 0).to(x.dtype), focal, u,
                reward_margin, oracle_margin, z_w, z_l]
    return torch.stack(per_pair).sum(1), grads


# --------------------------------------------------------------------------- autograd


class _DRDOPairLossFn(torch.autograd.Function):
    """Forward computes the loss, the metric sums and all per-pair gradients; backward scales them.

    First-order only: double backward raises (the saved gradients are constants)."""

    @staticmethod
    def forward(ctx, z_w, z_l, rh_w, rh_l, or_w, or_l, alpha, gamma, sign, reduction, backend):
        inputs = (z_w, z_l, rh_w, rh_l, or_w, or_l)
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
        x = torch.stack([t.detach().to(dtype) for t in inputs])
        terms = triton_pair_terms if backend == "triton" else torch_pair_terms
        sums, grads = terms(x, alpha, gamma, sign)
        divisor = x.shape[1] if reduction == "mean" else 1
        loss = sums[0] / divisor
        ctx.save_for_backward(grads)
        ctx.divisor = divisor
        ctx.input_dtypes = [t.dtype for t in inputs]
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_sums):
        (grads,) = ctx.saved_tensors
        g = grads * (grad_loss.to(grads.dtype) / ctx.divisor)
        per_input = (g[0], g[1], g[2], g[3], -g[2], -g[3])
        out = [
            gi.to(dt) if need else None
            for gi, dt, need in zip(per_input, ctx.input_dtypes, ctx.needs_input_grad[:6])
        ]
        return (*out, None, None, None, None, None)


def _check_inputs(inputs: dict, reduction: str) -> None:
    check_reduction(reduction)
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
    check_pair_shapes(**inputs)
    devices = {t.device for t in inputs.values()}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def _resolve_backend(backend: str, tensors) -> str:
    """The pair loss has a Triton kernel and a torch closed form. "auto" (and "chunked", whose pair
    losses use this kernel too) take the kernel for CUDA inputs that are not float64 when Triton
    imports, else torch. "triton" on CPU tensors needs TRITON_INTERPRET=1; it refuses float64."""
    has_fp64 = any(t.dtype == torch.float64 for t in tensors)
    device = tensors[0].device
    resolved = resolve_backend(backend, device)
    if backend in ("auto", "chunked"):
        return "triton" if device.type == "cuda" and triton_available() and not has_fp64 else "torch"
    if resolved == "triton" and has_fp64:
        raise ValueError('the Triton pair-loss kernel computes in float32; use backend="torch" for float64 inputs')
    return resolved


def drdo_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    policy_chosen_rewards: torch.Tensor,
    policy_rejected_rewards: torch.Tensor,
    oracle_chosen_rewards: torch.Tensor,
    oracle_rejected_rewards: torch.Tensor,
    *,
    spec: DRDOSpec | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    **options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DRDO loss with the same arguments and results as :func:`drdo.losses.drdo_loss`.

    Args (all [B], any float dtype, one device):
        policy_chosen_logps, policy_rejected_logps: z_w, z_l (summed response log-probs).
        policy_chosen_rewards, policy_rejected_rewards: rhat_w, rhat_l (beta * z for
            reward="implicit": pass the same tensors, autograd adds both paths).
        oracle_chosen_rewards, oracle_rejected_rewards: r*_w, r*_l.
        spec / options: a :class:`drdo.losses.DRDOSpec` or its fields (alpha, gamma and
            unlikelihood are read here); reduction ("mean" | "sum" | "none": the per-pair
            losses [B], computed by :func:`drdo.losses.drdo_loss`).
        backend: "auto" | "triton" | "torch" (see the module docstring).
    Returns:
        loss: scalar float32 (float64 on the torch backend for float64 inputs);
        metrics: detached means, the keys of drdo_loss's metrics (METRIC_NAMES order).
    """
    inputs = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        policy_chosen_rewards=policy_chosen_rewards,
        policy_rejected_rewards=policy_rejected_rewards,
        oracle_chosen_rewards=oracle_chosen_rewards,
        oracle_rejected_rewards=oracle_rejected_rewards,
    )
    spec = DRDOSpec.build(spec, **options)
    _check_inputs(inputs, reduction)
    tensors = list(inputs.values())
    if reduction == "none":  # the kernel writes sums; per-pair losses come from the reference
        return drdo_loss(*tensors, spec=spec, reduction=reduction)
    backend = _resolve_backend(backend, tensors)
    loss, sums = _DRDOPairLossFn.apply(
        *tensors, spec.alpha, spec.gamma, UNLIKELIHOOD_SIGN[spec.unlikelihood], reduction, backend
    )
    means = sums / tensors[0].shape[0]
    metrics = {name: means[i] for i, name in enumerate(METRIC_NAMES)}
    metrics["loss"] = loss.detach()
    return loss, metrics
