"""Why DRDO moves or does not: cheap per-step readings of Eq. 6, logged to metrics.jsonl.

Every ``diagnostics_every`` steps the DRDO objective passes this module the quantities it
trains on (with their graphs) and logs, per micro-batch (the trainer averages them over
the micro-batches of the step, weighted by pairs):

* ``diag_focal_median``: median over pairs of the focal weight (1 - p_w)^gamma,
  p_w = sigmoid(z_w - z_l); ``diag_focal_active``: share of pairs whose weight exceeds 0.01.
  A gate near 0 switches the preference term off;
* ``diag_margin_len_corr``: Pearson correlation over pairs of the margin z_w - z_l with the
  response-length difference n_w - n_l (0 when either is constant). With summed log-probs,
  a value near -1 means length, not preference, decides where the gate opens;
* ``diag_log1mexp_zl``: mean of log(1 - e^{z_l}), the part of U = z_w +/- log(1 - e^{z_l})
  whose sign the two readings of Eq. 6 disagree on; near 0, U ~ z_w and the sign is moot;
* ``diag_gnorm_distill`` / ``diag_gnorm_pref``: L2 norms of the gradients of the pair-mean
  distillation term and the pair-mean (alpha-weighted) preference term on the LM parameters
  (every parameter but the reward head), before clipping; ``diag_distill_share`` =
  distill / (distill + pref) and ``diag_grad_cos`` the cosine between the two gradients.

The split is exact and reuses the reference :func:`drdo.losses.drdo_loss`: the preference
term depends on z only, the distillation term on rhat (for ``reward="implicit"``, rhat =
beta * z is an input of its own here), so the gradient of the loss with rhat detached is the
preference gradient and the gradient with z detached the distillation gradient. That costs
two extra backward passes (``torch.autograd.grad``, graph retained) and two extra copies of the
LM parameters' gradients on a diagnostic step (``--diagnostics-every 0`` turns them off).
The gradient readings are skipped (only the cheap ones are logged) under gradient
checkpointing, which does not support ``autograd.grad``.
"""
from __future__ import annotations

import torch

from drdo.losses import LOGP_CLAMP_MAX, drdo_loss, log1mexp

__all__ = ["FOCAL_ACTIVE", "pair_diagnostics", "gradient_split", "is_diagnostic_step"]

#: A pair's preference term counts as "active" when its focal weight exceeds this.
FOCAL_ACTIVE = 0.01


def is_diagnostic_step(every: int, step: int | None) -> bool:
    """True on steps 0, N, 2N, ... (0-based) when ``every`` = N > 0 and the step is known."""
    return every > 0 and step is not None and step % every == 0


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return (a * b).sum() / denom if denom > 0 else torch.zeros((), dtype=a.dtype)


def pair_diagnostics(z_w: torch.Tensor, z_l: torch.Tensor, n_w: torch.Tensor, n_l: torch.Tensor, *,
                     gamma: float) -> dict[str, torch.Tensor]:
    """Focal gate, length and unlikelihood readings of one micro-batch.

    z_w, z_l: [B] float, the z the loss uses (summed or token-mean log-probs);
    n_w, n_l: [B] int, response token counts. Returns detached float64 scalars.
    """
    z_w, z_l = z_w.detach().double(), z_l.detach().double()
    margin = z_w - z_l
    focal = torch.exp(gamma * torch.nn.functional.logsigmoid(-margin))
    return {
        "diag_focal_median": focal.median(),
        "diag_focal_active": (focal > FOCAL_ACTIVE).double().mean(),
        "diag_margin_len_corr": _pearson(margin, (n_w - n_l).double()),
        "diag_log1mexp_zl": log1mexp(z_l.clamp(max=LOGP_CLAMP_MAX)).mean(),
    }


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """d loss / d params (None where a parameter is not reached); the graph is kept."""
    if not loss.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def _norms_and_dot(a: list, b: list) -> tuple[float, float, float]:
    """|a|, |b| and a.b over lists of per-parameter gradients (None = 0), accumulated in float64
    one tensor at a time (no flattened copy of all gradients)."""
    sq_a = sq_b = dot = 0.0  # become float64 tensors on the gradients' device: one host sync at the end
    for x, y in zip(a, b):
        if x is not None:
            sq_a = sq_a + x.double().square().sum()
        if y is not None:
            sq_b = sq_b + y.double().square().sum()
        if x is not None and y is not None:
            dot = dot + (x.double() * y.double()).sum()
    return float(sq_a) ** 0.5, float(sq_b) ** 0.5, float(dot)


def gradient_split(z_w, z_l, rhat_w, rhat_l, r_w, r_l, params: list[torch.Tensor], *, spec) -> dict[str, torch.Tensor]:
    """Gradient norms of Eq. 6's two terms on ``params``, exact (see the module docstring).

    z_*, rhat_*: [B] with graphs to ``params``; r_*: [B] Oracle rewards; spec: the
    :class:`drdo.losses.DRDOSpec`. The graph is retained for the trainer's own backward.
    Returns detached float64 scalars.
    """
    kw = dict(spec=spec, reduction="mean")
    pref, _ = drdo_loss(z_w, z_l, rhat_w.detach(), rhat_l.detach(), r_w, r_l, **kw)
    distill, _ = drdo_loss(z_w.detach(), z_l.detach(), rhat_w, rhat_l, r_w, r_l, **kw)
    n_pref, n_dist, dot = _norms_and_dot(_grads(pref, params), _grads(distill, params))
    total = n_pref + n_dist
    share = n_dist / total if total > 0 else 0.0
    cos = dot / (n_pref * n_dist) if n_pref > 0 and n_dist > 0 else 0.0
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in (
        ("diag_gnorm_distill", n_dist), ("diag_gnorm_pref", n_pref), ("diag_distill_share", share),
        ("diag_grad_cos", cos))}
