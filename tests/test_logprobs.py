"""drdo.policy_logprobs: the one summed-log-prob path of training and the offline passes, against float64."""
from __future__ import annotations

import pytest
import torch

from drdo.losses import IGNORE_INDEX
from drdo.policy_logprobs import BACKENDS, hidden_sequence_logprobs, policy_sequence_logprobs


def _float64_logps(hidden, weight, bias, labels):
    logits = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0)
    logp = torch.log_softmax(logits, -1)
    mask = labels != IGNORE_INDEX
    token = logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, token, 0).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("bias", [False, True])
def test_hidden_path_matches_float64_with_ignored_tokens_and_an_empty_row(bias):
    g = torch.Generator().manual_seed(0)
    rows, t, h, v = 5, 7, 13, 37
    hidden = torch.randn(rows, t, h, generator=g, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=bias)
    labels = torch.randint(0, v, (rows, t), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    labels[3] = IGNORE_INDEX  # a row with no counted token: an error naming it, or 0 when allowed
    with pytest.raises(ValueError, match=r"rows \[3\] have no response token"):
        hidden_sequence_logprobs(hidden, head, labels, backend="torch")
    logps, n_tokens = hidden_sequence_logprobs(hidden, head, labels, backend="torch", allow_empty_rows=True)
    expected, expected_n = _float64_logps(hidden.detach(), head.weight.detach(), head.bias, labels)
    assert logps.dtype == torch.float32 and logps.shape == (rows,)
    assert torch.equal(n_tokens, expected_n) and n_tokens[3] == 0 and logps[3] == 0
    assert torch.allclose(logps.double(), expected, atol=1e-5, rtol=1e-5)
    logps.sum().backward()  # differentiable w.r.t. the hidden states; ignored positions get no gradient
    assert hidden.grad[:, :3].abs().max() == 0 and hidden.grad[:, 3:].abs().max() > 0


def test_policy_reference_and_fused_paths_agree():
    from drdo.models import PolicyWithRewardHead

    policy = PolicyWithRewardHead.from_pretrained("tiny")
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 200, (4, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, :4] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    with torch.no_grad():
        results = {k: policy_sequence_logprobs(policy, input_ids, attention_mask, labels, backend=k)
                   for k in ("reference", "torch")}
        out = policy(input_ids, attention_mask)
        expected, _ = _float64_logps(out.hidden_states, policy.lm_head.weight, None, labels)
    assert results["reference"][2].logits is not None and results["torch"][2].logits is None
    for logps, n_tokens, _ in results.values():
        assert torch.equal(n_tokens, (labels != IGNORE_INDEX).sum(-1))
        assert torch.allclose(logps.double(), expected, atol=1e-4, rtol=1e-5)


def test_unknown_backend_is_an_error():
    assert "reference" in BACKENDS
    with pytest.raises(ValueError, match="backend must be one of"):
        policy_sequence_logprobs(None, None, None, None, backend="cuda")
