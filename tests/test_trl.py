"""DRDOTrainer: TRL's DPOTrainer with the DRDO loss, on a tiny Llama on CPU."""
from __future__ import annotations

import copy
import math
import pathlib
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class _HostSyncs(TorchDispatchMode):
    """Counts what would make a GPU wait for the host, by the package whose code asked for it
    ("transformers", "drdo_kernels", "drdo", "other": the innermost of these on the stack): a
    scalar read (``.item()``, ``bool``, ``float``, ``int``: aten._local_scalar_dense), an output
    whose size depends on the data (nonzero, masked_select, unique, boolean-mask indexing), and
    ``.tolist()`` / ``.numpy()`` (patched by :func:`host_syncs`: they read the memory directly).
    Works on CPU tensors, where nothing waits but the same ops run."""

    DATA_DEPENDENT = ("aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
                      "aten::unique_consecutive", "aten::repeat_interleave")
    PACKAGES = ("transformers", "drdo_kernels", "drdo")

    def __init__(self):
        super().__init__()
        self.counts, self.active = {}, False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def count(self, op: str) -> None:
        import traceback

        owner = "other"
        for frame in reversed(traceback.extract_stack()[:-2]):
            parts = pathlib.Path(frame.filename).parts
            found = [p for p in self.PACKAGES if p in parts]
            if found:
                owner = found[0]
                break
        self.counts[owner] = self.counts.get(owner, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name == "aten::_local_scalar_dense" or name in self.DATA_DEPENDENT:
            self.count(name)
        elif name in ("aten::index.Tensor", "aten::index_put_", "aten::index_put") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.count(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_syncs(monkeypatch):
    """A :class:`_HostSyncs` counter, with Tensor.tolist / Tensor.numpy counted while it is entered."""
    counter = _HostSyncs()
    for method in ("tolist", "numpy"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            if counter.active:
                counter.count(f"Tensor.{_method}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    return counter


def _step_syncs(tmp_path, counter, steps: int, logging_steps: int, **config):
    """Host syncs counted inside each of ``steps`` ``training_step`` calls (forward, DRDO loss,
    metrics, backward) of a DRDOTrainer on a tiny Llama, by package; and the log history."""
    from drdo.integrations.trl import DRDOTrainer

    trainer = DRDOTrainer(model=build_tiny_causal_lm(), processing_class=get_tokenizer("tiny"),
                          args=_config(tmp_path, max_steps=steps, logging_steps=logging_steps,
                                       per_device_train_batch_size=4, **config),
                          train_dataset=Dataset.from_list(make_rows(12)))
    original, counts = trainer.training_step, []

    def training_step(*args, **kwargs):
        with counter:
            loss = original(*args, **kwargs)
        counts.append(dict(counter.counts))
        counter.counts.clear()
        return loss

    trainer.training_step = training_step
    trainer.train()
    return counts, trainer.state.log_history


@pytest.mark.parametrize("padding_free", [False, True])
def test_a_training_step_makes_only_the_planning_sync(tmp_path, host_syncs, padding_free):
    """Three steps with logging_steps=10 (no log on the way): in each, our code (drdo, the DRDO loss,
    its metrics and backward) makes no host sync (padding-free: one, the empty-response check), and
    the kernels make the one of their planning (the valid tokens per row); the backbone's own
    (transformers' attention-mask checks) are not ours.
    A run that logs every step still logs the metrics, as numbers."""
    counts, _ = _step_syncs(tmp_path, host_syncs, steps=3, logging_steps=10, padding_free=padding_free)
    assert [c.get("drdo_kernels", 0) for c in counts] == [1, 1, 1], counts
    ours = 1 if padding_free else 0  # packed: the check that no response lost every token to truncation
    assert [c.get("drdo", 0) + c.get("other", 0) for c in counts] == [ours] * 3, counts
    _, history = _step_syncs(tmp_path / "logged", host_syncs, steps=2, logging_steps=1, padding_free=padding_free)
    logged = [entry for entry in history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        for key in ("logps/chosen", "rewards/accuracies", "rewards/chosen", "drdo/distill", "num_tokens"):
            assert isinstance(entry[key], (int, float)) and math.isfinite(entry[key]), (key, entry[key])
    assert logged[1]["num_tokens"] > logged[0]["num_tokens"] > 0


def test_metrics_to_host_takes_each_keys_mean():
    from drdo.integrations.trl import metrics_to_host

    metrics = {"a": [torch.tensor(1.0), torch.tensor(3.0)], "b": [torch.tensor(0.5)], "c": [2.0, 4.0],
               "num_tokens": [torch.tensor(7)]}
    metrics_to_host(metrics)
    assert metrics["a"] == [2.0] and metrics["b"] == [0.5] and metrics["c"] == [2.0, 4.0]
    assert isinstance(metrics["num_tokens"][0], torch.Tensor)
