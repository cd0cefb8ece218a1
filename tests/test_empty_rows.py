"""A response with no scored token: one error, naming the row, in the reference and every fused path.

The sequence log-prob of an empty response is no log-probability of anything; a pair loss that
took it as 0 would train on a made-up value. Token sums (SFT's NLL) still take such rows when
asked to (``allow_empty_rows=True``: they add 0).
"""
from __future__ import annotations

import pytest
import torch

import drdo_kernels as dk
from drdo import losses as L
from drdo.policy_logprobs import hidden_sequence_logprobs
from drdo_kernels.logprobs import BACKENDS

N_PAIRS, N_POS, N_HIDDEN, N_VOCAB = 3, 5, 8, 40
EMPTY_ROW = 4  # the rejected row of pair 1 (the chosen row 1 for the Oracle, whose LM rows are the chosen ones)
SPECS = [L.DRDOSpec(), L.DRDOSpec(reward="implicit"), L.DPOSpec(), L.EDPOSpec(), L.OracleSpec()]


def _batch(empty_row: int):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, N_VOCAB, (2 * N_PAIRS, N_POS), generator=g)
    labels[:, :2] = -100
    labels[empty_row] = -100
    scores = dict(rewards=torch.randn(2 * N_PAIRS, generator=g), oracle=torch.randn(2 * N_PAIRS, generator=g),
                  ref_logps=-5.0 + torch.randn(2 * N_PAIRS, generator=g))
    return (torch.randn(N_VOCAB, N_HIDDEN, generator=g), torch.randn(2 * N_PAIRS, N_POS, N_HIDDEN, generator=g),
            labels, scores)


def _empty_row(spec) -> int:
    return 1 if isinstance(spec, L.OracleSpec) else EMPTY_ROW


_MESSAGE = r"rows \[{}\] have no response token"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_reference_composition_raises_naming_the_row(spec):
    row = _empty_row(spec)
    weight, hidden, labels, scores = _batch(row)
    logits = hidden @ weight.T
    with pytest.raises(ValueError, match=_MESSAGE.format(row)):
        L.sequence_logprobs(logits, labels)  # the README's composition stops here
    head = torch.nn.Linear(N_HIDDEN, N_VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    with pytest.raises(ValueError, match=_MESSAGE.format(row)):  # the policy's log-probs, on the hidden path
        hidden_sequence_logprobs(hidden, head, labels, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_fused_losses_raise_the_same(spec, backend):
    row = _empty_row(spec)
    weight, hidden, labels, scores = _batch(row)
    with pytest.raises(ValueError, match=_MESSAGE.format(row)):
        dk.fused_objective_loss(spec, weight, hidden, labels, backend=backend, **scores)


def test_token_sums_still_take_empty_rows():
    weight, hidden, labels, _ = _batch(EMPTY_ROW)
    logps, n_tokens = L.sequence_logprobs(hidden @ weight.T, labels, allow_empty_rows=True)
    assert n_tokens[EMPTY_ROW] == 0 and logps[EMPTY_ROW] == 0 and bool(logps.isfinite().all())
    token_logps = dk.fused_linear_logprobs(hidden, weight, labels)  # per-token: no row needs a token
    assert token_logps[EMPTY_ROW].abs().sum() == 0
