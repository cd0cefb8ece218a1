"""``reduction`` of every pair loss, reference and fused, on every backend.

One check for all: "mean", "sum" or "none" (the per-pair losses [B]); anything else is the
reference's ValueError. "none" is tested against float64 full-logits references with random
upstream gradients [B], every gradient compared (hidden, weight, bias and each score).
"""
from __future__ import annotations

import pytest
import torch

import drdo_kernels as dk
from drdo import losses as L
from drdo_kernels.logprobs import BACKENDS

N_PAIRS, N_POS, N_HIDDEN, N_VOCAB, K = 3, 5, 8, 40, 2

SPECS = {
    "drdo_head": L.DRDOSpec(alpha=0.3, gamma=1.5),
    "drdo_implicit_mean": L.DRDOSpec(alpha=0.3, reward="implicit", beta=0.5, length_normalize=True),
    "dpo": L.DPOSpec(beta=0.5),
    "edpo_pessimistic": L.EDPOSpec(beta=0.5),
    "edpo_mean": L.EDPOSpec(beta=0.5, pessimistic=False),
    "oracle": L.OracleSpec(alpha=0.2),
    "oracle_sum_nll": L.OracleSpec(alpha=0.2, nll_reduction="sum"),
}


def _inputs(spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 leaves: weight [V, H], hidden [2B, T, H], bias [V], labels [2B, T] and the scores the
    spec reads (rewards [2B], oracle [2B] or [K, 2B], ref_logps [2B])."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, N_VOCAB, (2 * N_PAIRS, N_POS), generator=g)
    labels[:, :2] = -100
    labels[1, 4] = -100
    x = dict(weight=torch.randn(N_VOCAB, N_HIDDEN, generator=g, dtype=torch.float64),
             hidden=torch.randn(2 * N_PAIRS, N_POS, N_HIDDEN, generator=g, dtype=torch.float64),
             bias=0.1 * torch.randn(N_VOCAB, generator=g, dtype=torch.float64), labels=labels)
    if isinstance(spec, (L.DRDOSpec, L.OracleSpec)):
        x["rewards"] = torch.randn(2 * N_PAIRS, generator=g, dtype=torch.float64)
    if isinstance(spec, L.DRDOSpec):
        x["oracle"] = torch.randn(2 * N_PAIRS, generator=g, dtype=torch.float64)
    if isinstance(spec, (L.DPOSpec, L.EDPOSpec)):
        x["ref_logps"] = -8.0 + torch.randn(2 * N_PAIRS, generator=g, dtype=torch.float64)
    if isinstance(spec, L.EDPOSpec):
        x["oracle"] = torch.randn(K, 2 * N_PAIRS, generator=g, dtype=torch.float64)
    return x


def _leaves(x: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v if k == "labels" else v.to(dtype, copy=True).requires_grad_() for k, v in x.items()}


def _scores(x: dict) -> dict[str, torch.Tensor]:
    return {k: x[k] for k in ("rewards", "oracle", "ref_logps") if k in x}


def _reference(spec, x: dict, reduction: str):
    logits = x["hidden"] @ x["weight"].T + x["bias"]
    logps, n_tokens = L.sequence_logprobs(logits, x["labels"])
    return L.objective_loss(spec, logps, n_tokens, reduction=reduction, **_scores(x))


def _fused(spec, x: dict, reduction: str, backend: str):
    return dk.fused_objective_loss(spec, x["weight"], x["hidden"], x["labels"], x["bias"], backend=backend,
                                   reduction=reduction, chunk_tokens=7, **_scores(x))


def _grads(x: dict) -> dict[str, torch.Tensor]:
    return {k: v.grad for k, v in x.items() if k != "labels"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_reduction_none_matches_reference_with_any_upstream_gradient(name, backend):
    spec = SPECS[name]
    x = _inputs(spec)
    want_x, got_x = _leaves(x, torch.float64), _leaves(x, torch.float32)
    want, want_metrics = _reference(spec, want_x, "none")
    got, metrics = _fused(spec, got_x, "none", backend)
    assert got.shape == want.shape == (N_PAIRS,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert all(v.dim() == 0 for v in metrics.values()), {k: v.shape for k, v in metrics.items()}
    torch.testing.assert_close(metrics["loss"].double(), want_metrics["loss"], rtol=1e-5, atol=1e-5)
    upstream = torch.randn(N_PAIRS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (want * upstream).sum().backward()
    (got * upstream.float()).sum().backward()
    want_g, got_g = _grads(want_x), _grads(got_x)
    for key, w in want_g.items():
        if w is None:  # an input the loss does not read (e.g. the rewards of an implicit reward)
            assert got_g[key] is None or not got_g[key].any(), key
            continue
        assert got_g[key] is not None, key
        torch.testing.assert_close(got_g[key].double(), w, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", list(SPECS))
def test_mean_of_none_is_the_mean_loss(name):
    spec = SPECS[name]
    x = _leaves(_inputs(spec), torch.float64)
    per_pair, _ = _reference(spec, x, "none")
    mean, _ = _reference(spec, x, "mean")
    torch.testing.assert_close(per_pair.mean(), mean)


BAD = ["avg", "MEAN", None, "batchmean", 1]
_MESSAGE = r"reduction must be one of \('mean', 'sum', 'none'\), got "


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("reduction", BAD, ids=str)
def test_bad_reduction_is_refused_on_every_backend(name, backend, reduction):
    spec = SPECS[name]
    x = _leaves(_inputs(spec), torch.float32)
    with pytest.raises(ValueError, match=_MESSAGE):
        _fused(spec, x, reduction, backend)


@pytest.mark.parametrize("reduction", BAD, ids=str)
def test_bad_reduction_is_refused_by_the_references_and_modules(reduction):
    z = [torch.randn(2) for _ in range(6)]
    calls = [lambda: L.drdo_loss(*z, reduction=reduction),
             lambda: L.dpo_loss(*z[:4], reduction=reduction),
             lambda: L.edpo_loss(*z, reduction=reduction),
             lambda: L.oracle_loss(*z[:3], chosen_n_tokens=torch.ones(2), reduction=reduction),
             lambda: dk.drdo_pair_loss(*z, reduction=reduction, backend="torch")]
    calls += [lambda m=module: m(reduction=reduction) for module in
              (dk.FusedLinearDRDOLoss, dk.FusedLinearDPOLoss, dk.FusedLinearEDPOLoss, dk.FusedLinearOracleLoss)]
    for call in calls:
        with pytest.raises(ValueError, match=_MESSAGE):
            call()


def test_drdo_pair_loss_none_matches_reference():
    z = [torch.randn(4, dtype=torch.float64) for _ in range(6)]
    got, metrics = dk.drdo_pair_loss(*z, reduction="none", backend="torch")
    want, _ = L.drdo_loss(*z, reduction="none")
    assert got.shape == (4,) and metrics["loss"].dim() == 0
    torch.testing.assert_close(got, want)
