"""A whole training step's gradients: the fused kernels (``backend="auto"``) against full logits
(``backend="reference"``), on a tiny Llama with a 32k vocabulary, where a CPU chunk holds 128
tokens (several pairs, not all of them), for every stage, padded and padding-free; and
``DRDOTrainer``'s step against ``drdo.losses`` on full logits.

Both sides compute in float32 from the same weights and batch. They differ in summation order
only (a 32000-way log-sum-exp in chunks, gradient GEMMs over chunks of tokens). Measured here:
at most 5e-7 relative on any LM parameter, and 1.4e-5 on a reward-head bias whose exact gradient
is zero (judged against 1e-4 of the whole gradient's norm). TOL = 1e-4 is seven times the worst;
a pair whose gradient is lost, or a stage reading the wrong scores, is off by order 1 (the
kernels before the chunk-layout fix: 1.0 for the Oracle, DRDO and DPO stages).
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_train import cfg, make_rows, write_rows

from drdo.config import resolve
from drdo.losses import drdo_loss, sequence_logprobs
from drdo.models import build_tiny_causal_lm
from drdo.tokenizer import get_tokenizer
from drdo.training.distributed import DistState
from drdo.training.loop import Trainer

VOCAB = 32000
TOL = 1e-4


@pytest.fixture(autouse=True)
def chunks_of_128_tokens(monkeypatch):
    """A 16 MiB CPU budget: 128-token chunks of the 32k vocabulary, so that chunks hold several
    pairs but not all of them (the default CPU budget holds this whole batch in one chunk)."""
    from drdo_kernels import logprobs_chunked

    monkeypatch.setitem(logprobs_chunked.CHUNK_BUDGET_BYTES, "cpu", 16 << 20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama32k")
    build_tiny_causal_lm(vocab_size=VOCAB, seed=3).save_pretrained(path)
    return str(path)


def long_rows(n: int, k: int = 1) -> list[dict]:
    """make_rows with responses of 12-30 bytes: 12 pairs hold about 450 scored tokens, so the
    128-token chunks of a 32k vocabulary hold two to five pairs each (chosen rows only: about eight)."""
    rows = make_rows(n, ref=True, k=k)
    for i, row in enumerate(rows):
        row["chosen"] += " because " + "ab" * (i % 5)
        row["rejected"] += " since " + "xyz" * (i % 4)
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {1: write_rows(root / "k1.jsonl", long_rows(12)), 2: write_rows(root / "k2.jsonl", long_rows(12, k=2))}


def relative_errors(a: dict, b: dict) -> dict:
    """{name: ||a - b|| / max(||b||, 1e-4 * the whole gradient's norm)} over the parameters with a
    gradient (the same set on both sides). The floor keeps a gradient that is zero in exact
    arithmetic (a reward-head bias under a loss of reward differences) from being judged
    relative to its rounding noise."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    total = float(torch.stack([g.norm() for g in b.values()]).norm())
    return {k: float((a[k] - b[k]).norm()) / max(float(b[k].norm()), 1e-4 * total) for k in b}


def _step_gradients(config) -> dict:
    """The gradients of step 0 (all its micro-batches), before clipping and the update."""
    trainer = Trainer(resolve(config), DistState())
    batches = trainer._micro_batches(0)
    normaliser = sum(count for _, count, _ in batches)
    for batch, _, _ in batches:
        trainer._forward_backward(batch, normaliser)
    return {n: p.grad.detach().clone() for n, p in trainer.root.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
@pytest.mark.parametrize("stage", ["sft", "oracle", "drdo", "dpo", "edpo"])
def test_fused_step_equals_full_logits(tmp_path, model_dir, data, stage, padding_free):
    common = dict(stage=stage, model=model_dir, tokenizer="tiny", batch_size=12, micro_batch_size=12,
                  padding_free=padding_free, max_length=128, max_prompt_length=24)
    fused = _step_gradients(cfg(data[2 if stage == "edpo" else 1], tmp_path / "a", backend="auto", **common))
    reference = _step_gradients(cfg(data[2 if stage == "edpo" else 1], tmp_path / "b", backend="reference", **common))
    errors = relative_errors(fused, reference)
    assert any("lm_head" in name for name in errors)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{stage}: {worst} relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("padding_free,backend", [(False, "auto"), (True, "auto"), (False, "chunked")],
                         ids=["padded", "padding_free", "padded_chunked"])
def test_drdo_trainer_step_equals_full_logits(tmp_path, padding_free, backend):
    """DRDOTrainer's loss (fused, backend=backend) on one batch, backward, against
    drdo.losses.drdo_loss on full logits of the same model, reward head and batch."""
    pytest.importorskip("trl")
    from datasets import Dataset

    from drdo.integrations.trl import REWARD_HEAD_ATTR, DRDOConfig, DRDOTrainer

    args = DRDOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=12, max_steps=1,
                      report_to="none", use_cpu=True, seed=0, max_length=128, alpha=0.5, bf16=False,
                      padding_free=padding_free, backend=backend)
    trainer = DRDOTrainer(model=build_tiny_causal_lm(vocab_size=VOCAB, seed=3), args=args,
                          train_dataset=Dataset.from_list(long_rows(12)), processing_class=get_tokenizer("tiny"))
    model = trainer._base_model()
    reference = copy.deepcopy(model)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    model(drdo_batch=trainer.data_collator(rows))["loss"].backward()
    _full_logits_drdo_loss(reference, getattr(reference, REWARD_HEAD_ATTR), rows, trainer, alpha=0.5).backward()
    fused = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    errors = relative_errors(fused, {n: p.grad for n, p in reference.named_parameters() if p.grad is not None})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst} relative error {errors[worst]:.2e}"


def _full_logits_drdo_loss(lm, head, rows, trainer, alpha):
    """drdo_loss of the padded batch from full logits (independent of the kernels and of TRL's layout code)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=trainer._tokenizer.pad_token_id)(rows)
    ids, mask, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logps, _ = sequence_logprobs(lm.lm_head(hidden)[:, :-1], ids.masked_fill(comp == 0, -100)[:, 1:])
    rewards = head(hidden[torch.arange(ids.shape[0]), mask.sum(1) - 1]).squeeze(-1)
    oracle = torch.tensor([r["oracle_chosen"] for r in rows] + [r["oracle_rejected"] for r in rows])
    n = len(rows)
    return drdo_loss(logps[:n], logps[n:], rewards[:n], rewards[n:], oracle[:n], oracle[n:], alpha=alpha)[0]
