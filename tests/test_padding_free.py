"""Padding-free (packed) batches give what the padded batch gives: hidden states, rewards, log-probs."""
from __future__ import annotations

import pytest
import torch
from test_train import make_rows

from drdo.data import PreferenceCollator, load_preference_dataset
from drdo.data.packing import PackedPreferenceCollator, pack_sequences, segment_sum
from drdo.models import PolicyWithRewardHead
from drdo.tokenizer import get_tokenizer
from drdo_kernels import fused_linear_logprobs, row_logprobs


@pytest.fixture(scope="module")
def items():
    tokenizer = get_tokenizer("tiny")
    rows = make_rows(5, seed=3)
    rows[1]["chosen"] = " a much longer answer than the others, to skew the lengths"
    dataset = load_preference_dataset(rows, tokenizer, max_length=96, max_prompt_length=32)
    return tokenizer, [dataset[i] for i in range(len(dataset))]


def test_pack_sequences_layout():
    packed = pack_sequences([[1, 2, 3], [4, 5]], [[-100, 2, 3], [-100, 5]])
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[2, 3, -100, 5, -100]]
    assert packed["seq_idx"].tolist() == [[0, 0, 0, 1, 1]]
    assert packed["cu_seqlens"].tolist() == [0, 3, 5]
    sums = segment_sum(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]), packed["cu_seqlens"])
    assert sums.tolist() == [6.0, 9.0]
    with pytest.raises(ValueError):
        pack_sequences([[1], []], [[1], []])


def test_packed_forward_equals_padded(items):
    tokenizer, batch_items = items
    policy = PolicyWithRewardHead.from_pretrained("tiny").eval()
    padded = PreferenceCollator(tokenizer.pad_token_id)(batch_items)
    packed = PackedPreferenceCollator()(batch_items)
    assert padded["attention_mask"].sum() == packed["input_ids"].shape[1] < padded["input_ids"].numel()
    assert torch.equal(padded["oracle_rewards"], packed["oracle_rewards"])
    with torch.no_grad():
        a = policy(padded["input_ids"], padded["attention_mask"])
        b = policy(packed["input_ids"], position_ids=packed["position_ids"], cu_seqlens=packed["cu_seqlens"])
    cu = packed["cu_seqlens"].tolist()
    scale = a.hidden_states.abs().max()
    for r in range(len(cu) - 1):
        n = cu[r + 1] - cu[r]
        diff = (a.hidden_states[r, :n] - b.hidden_states[0, cu[r]:cu[r + 1]]).abs().max()
        assert diff <= 1e-5 * scale, (r, float(diff))
    assert torch.allclose(a.rewards, b.rewards, rtol=1e-5, atol=1e-6)
    # summed response log-probs per sequence: padded rows vs segment sums of the packed row
    w = policy.lm_head.weight
    logps_padded, _ = row_logprobs(w, a.hidden_states, padded["labels"], backend="torch")
    token_logps = fused_linear_logprobs(w, b.hidden_states[0], packed["labels"][0], backend="torch")
    logps_packed = segment_sum(token_logps, packed["cu_seqlens"])
    assert torch.allclose(logps_padded, logps_packed, rtol=1e-5, atol=1e-4)
    # attention really is block-diagonal: without the restart the second sequence would differ
    with torch.no_grad():
        c = policy(packed["input_ids"], position_ids=torch.arange(cu[-1]).unsqueeze(0), cu_seqlens=packed["cu_seqlens"])
    assert (c.hidden_states[0, cu[1]:cu[2]] - b.hidden_states[0, cu[1]:cu[2]]).abs().max() > 1e-3 * scale


def test_packed_forward_rejects_padded_layout(items):
    tokenizer, batch_items = items
    policy = PolicyWithRewardHead.from_pretrained("tiny")
    padded = PreferenceCollator(tokenizer.pad_token_id)(batch_items)
    with pytest.raises(ValueError, match="packed input"):
        policy(padded["input_ids"], padded["attention_mask"], cu_seqlens=torch.tensor([0, 3]))


@pytest.mark.parametrize("stage", ["drdo", "sft"])
def test_train_padding_free_first_step_equals_padded(tmp_path, stage):
    import json

    from test_train import KERNEL, write_rows

    from drdo.training.loop import TrainConfig, train

    data = write_rows(tmp_path / "scored.jsonl", make_rows(8, seed=1))
    losses = {}
    for padding_free in (False, True):
        out = tmp_path / f"pf{padding_free}"
        train(TrainConfig(stage=stage, model="tiny", data=data, output_dir=str(out), max_steps=2, batch_size=4,
                          micro_batch_size=2, lr=1e-3, max_length=48, max_prompt_length=24, backend=KERNEL,
                          padding_free=padding_free, progress=False, plot=False, seed=0))
        with open(out / "metrics.jsonl") as f:
            losses[padding_free] = [json.loads(line)["loss"] for line in f]
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5, abs=1e-7)
    assert losses[True][1] == pytest.approx(losses[False][1], rel=1e-4, abs=1e-6)


def test_bench_padding_free_runs(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_padding_free import main

    result = main(["--device", "cpu", "--quick", "--steps", "1", "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "padding_free.json").read_text())
    assert saved["packed"]["slots"] == saved["real_tokens"] < saved["padded"]["slots"]
    assert result["packed"]["tokens_per_s"] > 0 and result["padded"]["tokens_per_s"] > 0
