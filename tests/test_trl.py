"""DRDOTrainer: TRL's DPOTrainer with the DRDO loss, on a tiny Llama on CPU."""
from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from test_train import make_rows  # noqa: E402

from drdo.losses import drdo_loss, sequence_logprobs  # noqa: E402
from drdo.models import PolicyWithRewardHead, build_tiny_causal_lm  # noqa: E402
from drdo.tokenizer import get_tokenizer  # noqa: E402


def _config(tmp_path, **overrides):
    from drdo.integrations.trl import DRDOConfig

    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, max_length=64,
                  lr_scheduler_type="constant", alpha=0.5, bf16=False)
    values.update(overrides)
    return DRDOConfig(**values)


class _Recorder:
    """Wraps compute_loss to keep every training loss."""

    def __init__(self, trainer):
        self.losses = []
        original = trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            loss = original(model, inputs, *args, **kwargs)
            self.losses.append(float(loss.detach()))
            return loss

        trainer.compute_loss = compute_loss


def _reference_loss(lm, head, trainer, alpha, gamma):
    """drdo.losses.drdo_loss on the whole (tokenized) data set, from full logits: independent of the kernels."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = DataCollatorForPreference(pad_token_id=trainer._tokenizer.pad_token_id)(rows)
    ids, mask, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = lm.lm_head(hidden)
        labels = ids.masked_fill(comp == 0, -100)
        logps, _ = sequence_logprobs(logits[:, :-1], labels[:, 1:])
        last = mask.sum(1) - 1
        rewards = head(hidden[torch.arange(ids.shape[0]), last]).squeeze(-1)
    oracle = torch.tensor([r["oracle_chosen"] for r in rows] + [r["oracle_rejected"] for r in rows])
    n = len(rows)
    loss, _ = drdo_loss(logps[:n], logps[n:], rewards[:n], rewards[n:], oracle[:n], oracle[n:],
                        alpha=alpha, gamma=gamma)
    return float(loss)


@pytest.mark.parametrize("padding_free", [False, True])
def test_drdo_trainer_three_steps(tmp_path, padding_free):
    from drdo.integrations.trl import DRDOTrainer

    tokenizer = get_tokenizer("tiny")
    model = build_tiny_causal_lm()
    before = copy.deepcopy(model)
    trainer = DRDOTrainer(model=model, args=_config(tmp_path, padding_free=padding_free),
                          train_dataset=Dataset.from_list(make_rows(8)), processing_class=tokenizer)
    assert trainer.ref_model is None
    head_before = copy.deepcopy(trainer.reward_head)
    expected = _reference_loss(before, head_before, trainer, alpha=0.5, gamma=2.0)
    recorder = _Recorder(trainer)
    trainer.train()
    assert len(recorder.losses) == 3 and all(torch.isfinite(torch.tensor(recorder.losses)))
    # the whole data set is one batch, so the first step's loss is drdo_loss on it
    assert recorder.losses[0] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), before.parameters()))
    assert moved > 0
    assert not torch.equal(trainer.reward_head.weight, head_before.weight)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"drdo/distill", "rewards/accuracies", "logps/chosen"} <= set(logged[0])

    trainer.save_model()
    policy = PolicyWithRewardHead.from_pretrained(str(tmp_path / "out"), require_head=True)
    assert torch.allclose(policy.reward_head.weight, trainer.reward_head.weight.detach().cpu())
    assert torch.allclose(policy.lm.lm_head.weight, model.lm_head.weight.detach().cpu())


def test_conversational_rows_and_implicit_reward(tmp_path):
    from drdo.integrations.trl import DRDOTrainer

    tokenizer = get_tokenizer("tiny")
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}],
             "oracle_chosen": [r["oracle_chosen"], 0.5], "oracle_rejected": [r["oracle_rejected"], -0.5]}
            for r in make_rows(4)]
    trainer = DRDOTrainer(model=build_tiny_causal_lm(), args=_config(tmp_path, reward="implicit", max_steps=1,
                                                                     per_device_train_batch_size=4),
                          train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    assert trainer.reward_head is None and trainer.ref_model is None
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_drdo/distill" in metrics


def test_reward_grad_head_keeps_the_backbone_out_of_distillation(tmp_path):
    """alpha = 0 leaves only the distillation term: with reward_grad="head" it trains the head alone."""
    from drdo.integrations.trl import DRDOTrainer

    model = build_tiny_causal_lm()
    before = copy.deepcopy(model)
    trainer = DRDOTrainer(model=model, args=_config(tmp_path, alpha=0.0, reward_grad="head", max_steps=1),
                          train_dataset=Dataset.from_list(make_rows(8)), processing_class=get_tokenizer("tiny"))
    head_before = trainer.reward_head.weight.detach().clone()
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(model.model.parameters(), before.model.parameters()))
    assert not torch.equal(trainer.reward_head.weight, head_before)


def test_missing_oracle_scores_say_what_to_run(tmp_path):
    from drdo.integrations.trl import DRDOTrainer

    with pytest.raises(ValueError, match="drdo oracle score"):
        DRDOTrainer(model=build_tiny_causal_lm(), args=_config(tmp_path),
                    train_dataset=Dataset.from_list(make_rows(4, oracle=False)), processing_class=get_tokenizer("tiny"))


def test_config_validates_choices(tmp_path):
    with pytest.raises(ValueError, match="reward must be"):
        _config(tmp_path, reward="bogus")
    with pytest.raises(ValueError, match="reward_grad"):
        _config(tmp_path, reward="implicit", reward_grad="head")


def test_import_drdo_does_not_import_trl():
    import subprocess

    code = "import sys, drdo, drdo.models, drdo.data, drdo.training.loop; print('trl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("length_normalize", [False, True])
def test_drdo_forward_packed_equals_padded_and_normalizes(tmp_path, length_normalize):
    """The loss of one batch: padded and packed layouts agree; length_normalize divides z by the token count."""
    from drdo.integrations.trl import REWARD_HEAD_ATTR, DRDODataCollator, drdo_forward
    from drdo.models import new_reward_head

    tokenizer = get_tokenizer("tiny")
    args = _config(tmp_path, length_normalize=length_normalize, alpha=1.0)
    model = build_tiny_causal_lm()
    model.add_module(REWARD_HEAD_ATTR, new_reward_head(64, seed=1))
    examples = []
    for r in make_rows(3):
        prompt = tokenizer(r["prompt"])["input_ids"]
        examples.append({"prompt_ids": prompt, "chosen_ids": tokenizer(r["chosen"])["input_ids"],
                         "rejected_ids": tokenizer(r["rejected"])["input_ids"],
                         "oracle_chosen": r["oracle_chosen"], "oracle_rejected": r["oracle_rejected"]})
    padded = DRDODataCollator(tokenizer.pad_token_id)(examples)
    packed = DRDODataCollator(tokenizer.pad_token_id, padding_free=True)(examples)
    with torch.no_grad():
        a, b = drdo_forward(model, padded, args), drdo_forward(model, packed, args)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        labels = padded["input_ids"].masked_fill(padded["completion_mask"] == 0, -100)
        z, n = sequence_logprobs(logits[:, :-1], labels[:, 1:])
    expected_z = z / n if length_normalize else z
    assert torch.allclose(a["metrics"]["logps_chosen"], expected_z[:3].mean(), rtol=1e-5)
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(a["chosen_rewards"], b["chosen_rewards"], rtol=1e-5, atol=1e-6)
