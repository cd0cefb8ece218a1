"""float16 with loss scaling: the fused pair losses' gradients under an upstream scale.

A float16 model trained with a loss scaler (``torch.amp.GradScaler``, 2^16 to start) multiplies
the loss before the backward so that small gradients survive float16. The fused losses must give
gradients as exact as an unfused float16 model's (float16 logits, log-softmax in float32:
``backend="reference"``), whatever the scale: each gradient's error against float64 is held to
twice that of the unfused model. DPO with a small beta is the hard case: dL/dz = beta·sigmoid(-m)
times softmax entries of about 1/V is below float16's smallest subnormal unless the scale is
applied before the rounding. A vocabulary above float16's largest value (65504) is covered too.
"""
from __future__ import annotations

import pytest
import torch

import drdo_kernels as dk

SCALE = 65536.0
N_PAIRS, N_POS, N_HIDDEN = 2, 4, 8


def _problem(n_vocab: int, seed: int = 0):
    """float64 master values: weight [V, H], hidden [2B, T, H], labels [2B, T], ref_logps [2B]."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_vocab, N_HIDDEN, generator=g, dtype=torch.float64)
    hidden = torch.randn(2 * N_PAIRS, N_POS, N_HIDDEN, generator=g, dtype=torch.float64)
    labels = torch.randint(0, n_vocab, (2 * N_PAIRS, N_POS), generator=g)
    labels[:, 0] = -100
    ref_logps = -30.0 + 5.0 * torch.randn(2 * N_PAIRS, generator=g, dtype=torch.float64)
    # the float16 values every path computes with (and the float64 truth is taken at)
    return weight.half().double(), hidden.half().double(), labels, ref_logps.float().double()


def _gradients(problem, backend: str, beta: float, dtype: torch.dtype, scale: float):
    """Unscaled gradients (hidden, weight, ref_logps) of ``scale`` * DPO loss, inputs cast to ``dtype``
    from float32 leaves (float64 leaves for the float64 truth)."""
    weight, hidden, labels, ref_logps = problem
    leaf = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [t.to(leaf, copy=True).requires_grad_() for t in (hidden, weight, ref_logps)]
    loss, _ = dk.fused_linear_dpo_loss(leaves[1].to(dtype), leaves[0].to(dtype), labels, leaves[2], beta=beta,
                                       backend=backend)
    (loss * scale).backward()
    return [t.grad.double() / scale for t in leaves]


def _errors(grads, truth) -> list[float]:
    return [float((g - t).norm() / t.norm()) for g, t in zip(grads, truth)]


_PROBLEMS = {}


def _cached_problem(n_vocab):
    if n_vocab not in _PROBLEMS:
        _PROBLEMS[n_vocab] = _problem(n_vocab)
    return _PROBLEMS[n_vocab]


@pytest.mark.parametrize("n_vocab", [32000, 70000])
@pytest.mark.parametrize("beta", [0.1, 0.01, 0.001])
@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_fp16_scaled_loss_gradients_as_exact_as_unfused_fp16(n_vocab, beta, backend):
    problem = _cached_problem(n_vocab)
    truth = _gradients(problem, "reference", beta, torch.float64, 1.0)
    unfused = _errors(_gradients(problem, "reference", beta, torch.float16, SCALE), truth)
    fused = _errors(_gradients(problem, backend, beta, torch.float16, SCALE), truth)
    for name, ours, theirs in zip(("hidden", "weight", "ref_logps"), fused, unfused):
        assert ours <= max(2 * theirs, 1e-5), (name, ours, theirs)


def test_grad_scaler_fp16_step_matches_float64():
    """A real float16 step: float32 master weights, a float16 forward, GradScaler's scale and unscale."""
    weight, hidden, labels, ref_logps = _cached_problem(70000)
    truth = _gradients((weight, hidden, labels, ref_logps), "reference", 0.001, torch.float64, 1.0)
    unfused = _errors(_gradients((weight, hidden, labels, ref_logps), "reference", 0.001, torch.float16, SCALE),
                      truth)
    params = [torch.nn.Parameter(t.float()) for t in (hidden, weight)]
    opt = torch.optim.SGD(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    loss, _ = dk.fused_linear_dpo_loss(params[1].half(), params[0].half(), labels, ref_logps.float(), beta=0.001,
                                       backend="chunked")
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    errors = _errors([p.grad.double() for p in params], truth[:2])
    for name, ours, theirs in zip(("hidden", "weight"), errors, unfused[:2]):
        assert ours <= max(2 * theirs, 1e-5), (name, ours, theirs)
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == SCALE  # no inf/NaN found: the step was taken
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
