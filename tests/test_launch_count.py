"""Kernel launches of the chunked pair losses (DRDO, DPO, e-DPO, the Oracle), forward and backward
together, per chunk.

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
from drdo_kernels import logprobs_chunked, pair_chunked, pair_loss

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
    folds = ("row_stats", "softmax_grad")
    launchers = [(module, name) for module in (pair_chunked, logprobs_chunked) for name in folds]
    for module, name in launchers + [(pair_loss, "triton_pair_terms")]:
        launcher = getattr(module, name)

        def counted(*args, _launcher=launcher, _name=name, **kwargs):
            counter[_name] += 1
            with _disable_current_modes():
                return _launcher(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def _loss(name: str, n_pairs: int, chunk_tokens: int, backend: str, **options):
    """One fused loss of ``name`` over n_pairs pairs of two rows with 4 scored tokens each."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=g).requires_grad_()
    hidden = torch.randn(2 * n_pairs, 6, 16, generator=g).requires_grad_()
    labels = torch.randint(0, 300, (2 * n_pairs, 6), generator=g)
    labels[:, :2] = -100
    oracle, rewards = torch.randn(2 * n_pairs, generator=g), torch.randn(2 * n_pairs, generator=g).requires_grad_()
    ref_logps = -10.0 + torch.randn(2 * n_pairs, generator=g)
    common = dict(backend=backend, chunk_tokens=chunk_tokens, **options)
    if name == "drdo":
        return dk.fused_linear_drdo_loss(weight, hidden, labels, oracle, rewards, **common)
    if name == "dpo":
        return dk.fused_linear_dpo_loss(weight, hidden, labels, ref_logps, **common)
    if name == "edpo":
        return dk.fused_linear_edpo_loss(weight, hidden, labels, ref_logps, torch.stack([oracle, -oracle]), **common)
    return dk.fused_linear_oracle_loss(weight, hidden, labels, rewards, **common)


#: Scored tokens of one pair that the LM head sees: both rows (4 tokens each), the Oracle's chosen row only.
PAIR_TOKENS = {"drdo": 8, "dpo": 8, "edpo": 8, "oracle": 4}


def _launches(name: str, n_chunks: int, backend: str, split: int = 1, **options) -> int:
    """Launches of one fused loss fwd+bwd over ``n_chunks`` chunks, each holding one pair's tokens
    (``split`` > 1: each pair is ``split`` chunks long and takes the two passes)."""
    with _Launches() as mode:
        loss, _ = _loss(name, n_chunks // split, PAIR_TOKENS[name] // split, backend, **options)
        loss.backward()
    return sum(mode.ops.values())


def _per_chunk(count) -> tuple[float, float]:
    """(marginal launches of one chunk, launches of an 8-chunk call over its chunks)."""
    eight, sixteen = count(8), count(16)
    return (sixteen - eight) / 8, eight / 8


CASES = {"drdo_head": ("drdo", {}),
         "drdo_implicit_token_mean": ("drdo", dict(reward="implicit", length_normalize=True)),
         "dpo": ("dpo", {}), "edpo": ("edpo", {}), "oracle": ("oracle", {})}


def _triton_counter(monkeypatch):
    triton_launches: collections.Counter = collections.Counter()
    _count_triton_launchers(monkeypatch, triton_launches)

    def count(name, n_chunks, split=1, **options):
        triton_launches.clear()
        return _launches(name, n_chunks, "chunked", split, **options) + sum(triton_launches.values())

    return count


@pytest.mark.triton
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_launches_per_chunk(monkeypatch, case):
    name, options = CASES[case]
    count = _triton_counter(monkeypatch)
    marginal, average = _per_chunk(lambda n: count(name, n, **options))
    assert marginal <= PER_CHUNK and average <= PER_CHUNK, (marginal, average)


@pytest.mark.triton
@pytest.mark.parametrize("case", ["drdo_head", "dpo"])
def test_chunked_two_pass_launches_per_chunk(monkeypatch, case):
    """A pair longer than a chunk (here two chunks long) takes two passes: at most twice the launches."""
    name, options = CASES[case]
    count = _triton_counter(monkeypatch)
    marginal, average = _per_chunk(lambda n: count(name, n, split=2, **options))
    assert marginal <= 2 * PER_CHUNK and average <= 2 * PER_CHUNK, (marginal, average)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_twins_launches_per_chunk(case):
    name, options = CASES[case]
    marginal, average = _per_chunk(lambda n: _launches(name, n, "torch", **options))
    assert marginal <= TORCH_PER_CHUNK and average <= TORCH_PER_CHUNK, (marginal, average)
