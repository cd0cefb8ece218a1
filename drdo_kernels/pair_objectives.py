"""The pair losses of the chunked path in closed form: DRDO, DPO and the Oracle loss.

:mod:`drdo_kernels.pair_chunked` needs two things of a loss that sums over pairs:

* per chunk, ``dL_b/dz`` of the chunk's pairs (its LM rows' coefficient), as soon as their
  summed log-probs z are known: :meth:`PairObjective.coefficients`;
* once, at the end, on the full z: the loss, its metrics and the gradients of the per-row
  scores (rewards, Oracle scores, reference log-probs): :meth:`PairObjective.finish`.

Both are closed forms of :mod:`drdo.losses` (the derivations are in ``docs/math.md``), a
handful of element-wise launches instead of an autograd pass per chunk. Layout: z, token
counts and each score are [R, g] (R = 2 sides, chosen then rejected, for DRDO and DPO; R = 1,
the chosen rows, for the Oracle) / [2, g]; every derivative is of the SUM over pairs (the mean's
1/B is applied by the caller's backward).

DRDO, per pair (z_eff = z / n_tokens with ``length_normalize``; rhat the reward head's
outputs, or beta * z_eff for reward="implicit"): the Triton pair kernel of
:mod:`drdo_kernels.pair_loss` (its torch twin off the GPU) gives d/dz_eff and d/drhat; the
implicit reward adds beta * d/drhat to d/dz_eff; d/dz = d/dz_eff / n_tokens; the Oracle scores
get -d/drhat. DPO: m = beta ((z_w - ref_w) - (z_l - ref_l)), dL/dm = -sigmoid(-m),
d/dz_w = beta dL/dm = -d/dz_l = -d/dref_w = d/dref_l. Oracle: the LM term alpha * nll(y_w)
gives d/dz = -alpha (/ n_tokens for the token-mean NLL), whatever z is, and the Bradley-Terry
term d/dr_w = -(1 - alpha) sigmoid(-(r_w - r_l)) = -d/dr_l.
"""
from __future__ import annotations

import torch

from drdo.losses import UNLIKELIHOOD_SIGN, DPOSpec, DRDOSpec, OracleSpec, dpo_loss, oracle_loss

from . import pair_loss

__all__ = ["PairObjective", "DRDOObjective", "DPOObjective", "OracleObjective", "objective_for"]


class PairObjective:
    """A loss summed over pairs. ``rows_per_group`` LM rows per pair; ``n_scores`` per-row score
    tensors [2G]."""

    rows_per_group: int = 2

    def scores(self, *, rewards=None, oracle=None, ref_logps=None) -> list[torch.Tensor]:
        """The per-row score tensors [2B] this loss reads, in its order, from the named inputs of
        :func:`drdo.losses.objective_loss`."""
        raise NotImplementedError

    def constant_coefficients(self, n_tokens: torch.Tensor) -> torch.Tensor | None:
        """[R, G] dL/dz when it does not depend on z (computed once), else None."""
        return None

    def coefficients(self, z, n_tokens, scores, use_triton: bool, out: torch.Tensor) -> None:
        """dL/dz [R, g] of g pairs from z, n_tokens [R, g] and scores (each [2, g]), written into
        ``out`` [R, g] (a strided view of the per-row buffer)."""
        raise NotImplementedError

    def finish(self, z, n_tokens, scores, reduction: str, use_triton: bool):
        """(loss, metrics, [d score [2, G] per score]) on the full z [R, G] (scores [2, G])."""
        raise NotImplementedError


class DRDOObjective(PairObjective):
    """DRDO's pair loss; scores = [oracle] (+ [policy rewards] for reward="head")."""

    def __init__(self, spec: DRDOSpec):
        self.spec = spec
        self.sign = UNLIKELIHOOD_SIGN[spec.unlikelihood]

    def scores(self, *, rewards=None, oracle=None, ref_logps=None):
        return [oracle] + ([rewards] if self.spec.reward == "head" else [])

    def _terms(self, z, n_tokens, scores, use_triton: bool, grads_only: bool = False):
        """(z_eff [2, g], the metric sums (None with ``grads_only``), per-pair grads [4, g]) of the
        pair kernel."""
        spec = self.spec
        z_eff = z / n_tokens if spec.length_normalize else z
        rhat = scores[1] if spec.reward == "head" else spec.beta * z_eff
        x = torch.cat([z_eff, rhat, scores[0]]).to(z.dtype)  # [6, g]: z_w, z_l, rhat_w, rhat_l, r*_w, r*_l
        fast = use_triton and x.dtype == torch.float32
        terms = pair_loss.triton_pair_terms if fast else pair_loss.torch_pair_terms
        sums, grads = terms(x.contiguous(), spec.alpha, spec.gamma, self.sign, grads_only)
        return z_eff, sums, grads

    def coefficients(self, z, n_tokens, scores, use_triton: bool, out: torch.Tensor) -> None:
        spec = self.spec
        grads = self._terms(z, n_tokens, scores, use_triton, grads_only=True)[2]
        if spec.reward == "head":
            out.copy_(grads[:2])
        else:
            torch.add(grads[:2], grads[2:], alpha=spec.beta, out=out)
        if spec.length_normalize:
            out.div_(n_tokens)

    def finish(self, z, n_tokens, scores, reduction: str, use_triton: bool):
        _, sums, grads = self._terms(z, n_tokens, scores, use_triton)
        n_pairs = z.shape[1]
        loss = sums[0] / (n_pairs if reduction == "mean" else 1)
        metrics = dict(zip(pair_loss.METRIC_NAMES, (sums / n_pairs).unbind(0)))
        metrics["loss"] = loss
        d_scores = [-grads[2:]] + ([grads[2:]] if self.spec.reward == "head" else [])
        return loss, metrics, d_scores


class DPOObjective(PairObjective):
    """DPO; scores = [reference log-probs]."""

    def __init__(self, spec: DPOSpec):
        self.spec = spec

    def scores(self, *, rewards=None, oracle=None, ref_logps=None):
        return [ref_logps]

    def _signs(self, z: torch.Tensor) -> torch.Tensor:
        """[2] (-beta, +beta) in z's dtype and device, made once."""
        signs = getattr(self, "_signs_cache", None)
        if signs is None or signs.dtype != z.dtype or signs.device != z.device:
            signs = self._signs_cache = torch.tensor([-self.spec.beta, self.spec.beta], dtype=z.dtype, device=z.device)
        return signs

    def coefficients(self, z, n_tokens, scores, use_triton: bool, out: torch.Tensor) -> None:
        """dL/dz_w = -beta sigmoid(-m) = -dL/dz_l, with -m = (-beta, beta) . (z - ref): four launches."""
        signs = self._signs(z)
        neg_margin = torch.matmul(signs, z - scores[0].to(z.dtype)).sigmoid_()  # [g]
        torch.mul(signs[:, None], neg_margin, out=out)

    def finish(self, z, n_tokens, scores, reduction: str, use_triton: bool):
        ref = scores[0]
        loss, metrics = dpo_loss(z[0], z[1], ref[0], ref[1], spec=self.spec, reduction=reduction)
        d_z = torch.empty_like(z)
        self.coefficients(z, n_tokens, scores, use_triton, out=d_z)
        return loss, metrics, [d_z.neg_()]


class OracleObjective(PairObjective):
    """The Oracle loss; the LM rows are the chosen ones (R = 1); scores = [reward-head outputs]."""

    rows_per_group = 1

    def __init__(self, spec: OracleSpec):
        self.spec = spec

    def scores(self, *, rewards=None, oracle=None, ref_logps=None):
        return [rewards]

    def constant_coefficients(self, n_tokens):
        """n_tokens: [1, G] float (the accumulation dtype)."""
        alpha = self.spec.alpha
        return -alpha / n_tokens if self.spec.nll_reduction == "mean" else torch.full_like(n_tokens, -alpha)

    def finish(self, z, n_tokens, scores, reduction: str, use_triton: bool):
        r = scores[0]
        loss, metrics = oracle_loss(r[0], r[1], -z[0], chosen_n_tokens=n_tokens[0], spec=self.spec,
                                    reduction=reduction)
        d_w = torch.sigmoid((r[1] - r[0]).to(z.dtype)).mul_(self.spec.alpha - 1.0)
        return loss, metrics, [torch.stack([d_w, -d_w])]


def objective_for(spec) -> PairObjective:
    """The closed form of a :class:`DRDOSpec`, :class:`DPOSpec` or :class:`OracleSpec`."""
    for spec_type, objective in ((DRDOSpec, DRDOObjective), (DPOSpec, DPOObjective), (OracleSpec, OracleObjective)):
        if isinstance(spec, spec_type):
            return objective(spec)
    raise TypeError(f"no chunked pair loss for {type(spec).__name__}")
