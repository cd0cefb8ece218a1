"""Kernel launches of the chunked DRDO loss, forward and backward together, per chunk.

Counted with a ``TorchDispatchMode``: every ATen op that launches work (views, allocations and
metadata ops left out), plus one per call of the Triton launchers (a Triton kernel is not an
ATen op). On the path CUDA runs (the Triton fold and the Triton pair kernel; on a CPU under the
interpreter) a chunk costs at most :data:`PER_CHUNK` launches, counted two ways: the marginal cost
of a chunk (the count at 16 chunks minus the count at 8, over 8) and the whole call's count over its
8 chunks. The autograd pass per chunk this replaced cost about 190. The PyTorch twins (a CPU
without Triton) take more launches per chunk (each a cheap CPU op): bounded by
:data:`TORCH_PER_CHUNK`.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import drdo_kernels as dk
from drdo_kernels import pair_chunked, pair_loss

PER_CHUNK = 25
TORCH_PER_CHUNK = 90
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "alias", "_local_scalar_dense"}


class _Launches(TorchDispatchMode):
    """Counts launching ATen ops by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _NO_LAUNCH):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _count_triton_launchers(monkeypatch, counter: collections.Counter) -> None:
    """Each call of a Triton launcher counts one launch (and its own ATen ops are not counted)."""
    for module, name in ((pair_chunked, "row_stats"), (pair_chunked, "softmax_grad"), (pair_loss, "triton_pair_terms")):
        launcher = getattr(module, name)

        def counted(*args, _launcher=launcher, _name=name, **kwargs):
            counter[_name] += 1
            with _disable_current_modes():
                return _launcher(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def _launches(n_pairs: int, backend: str, **options) -> int:
    """Launches of one fused DRDO loss fwd+bwd whose pairs (8 scored tokens each) fill one chunk each."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=g).requires_grad_()
    hidden = torch.randn(2 * n_pairs, 6, 16, generator=g).requires_grad_()
    labels = torch.randint(0, 300, (2 * n_pairs, 6), generator=g)
    labels[:, :2] = -100
    oracle, rewards = torch.randn(2 * n_pairs, generator=g), torch.randn(2 * n_pairs, generator=g).requires_grad_()
    with _Launches() as mode:
        loss, _ = dk.fused_linear_drdo_loss(weight, hidden, labels, oracle, rewards, backend=backend, chunk_tokens=8,
                                            **options)
        loss.backward()
    return sum(mode.ops.values())


def _per_chunk(count) -> tuple[float, float]:
    """(marginal launches of one chunk, launches of an 8-chunk call over its chunks)."""
    eight, sixteen = count(8), count(16)
    return (sixteen - eight) / 8, eight / 8


OPTIONS = [{}, dict(reward="implicit", length_normalize=True)]


@pytest.mark.triton
@pytest.mark.parametrize("options", OPTIONS, ids=["head", "implicit_token_mean"])
def test_chunked_drdo_launches_per_chunk(monkeypatch, options):
    triton_launches: collections.Counter = collections.Counter()
    _count_triton_launchers(monkeypatch, triton_launches)

    def count(n_pairs):
        triton_launches.clear()
        return _launches(n_pairs, "chunked", **options) + sum(triton_launches.values())

    marginal, average = _per_chunk(count)
    assert marginal <= PER_CHUNK and average <= PER_CHUNK, (marginal, average)


@pytest.mark.parametrize("options", OPTIONS, ids=["head", "implicit_token_mean"])
def test_torch_twins_launches_per_chunk(options):
    marginal, average = _per_chunk(lambda n: _launches(n, "torch", **options))
    assert marginal <= TORCH_PER_CHUNK and average <= TORCH_PER_CHUNK, (marginal, average)
