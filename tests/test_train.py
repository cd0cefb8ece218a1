"""Training loop (one process): batch semantics, resume, failures, outputs, every stage."""
from __future__ import annotations

import json
import math
import os
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from drdo.config import ConfigError
from drdo.training.checkpoint import CheckpointError, latest_checkpoint
from drdo.training.loop import TrainConfig, TrainingDiverged, rank_micro_batches, step_indices, train
from drdo.training.schedule import lr_at

KERNEL = "torch"  # the fused path (chunked PyTorch backend on CPU)


def make_rows(n, *, oracle=True, ref=False, k=1, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        row = {"prompt": f"Q{i}: {a}+{b}=", "chosen": f" {a + b}", "rejected": f" {a + b + rng.randint(1, 3)} or so"}
        if oracle:
            score = (lambda: [rng.gauss(0, 1) for _ in range(k)]) if k > 1 else (lambda: rng.gauss(0, 1))
            row["oracle_chosen"], row["oracle_rejected"] = score(), score()
        if ref:
            row["ref_chosen_logps"], row["ref_rejected_logps"] = -rng.uniform(5, 20), -rng.uniform(10, 40)
        rows.append(row)
    return rows


def write_rows(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data") / "pairs.jsonl", make_rows(12, ref=True))


def cfg(data, out, **kw):
    base = dict(stage="drdo", model="tiny", data=data, output_dir=str(out), max_steps=2, batch_size=4,
                micro_batch_size=4, lr=1e-3, warmup_steps=1, max_length=48, max_prompt_length=24, backend=KERNEL,
                progress=False, plot=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def params(out):
    return load_file(os.path.join(out, "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


# ------------------------------------------------------------------ pure helpers


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, base_lr=1.0, total_steps=10, warmup_steps=2) for s in range(10)]
    assert lrs[0] == pytest.approx(1 / 3) and lrs[1] == pytest.approx(2 / 3)
    assert lrs[2] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # strictly decreasing cosine
    assert lrs[-1] > 0  # the last step still moves
    assert lr_at(9, base_lr=1.0, total_steps=10, warmup_steps=0, min_lr_ratio=0.5) > 0.5


def test_data_order_is_a_function_of_seed_and_step():
    first = [step_indices(s, 4, 10, seed=3) for s in range(5)]
    assert first == [step_indices(s, 4, 10, seed=3) for s in range(5)]
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10))  # epoch 0 is a permutation
    assert step_indices(0, 4, 10, seed=3, shuffle=False) == [0, 1, 2, 3]
    assert rank_micro_batches(list(range(8)), 1, 2, 2) == [[4, 5], [6, 7]]


# ------------------------------------------------------------------ batch semantics


@pytest.mark.parametrize("stage", ["drdo", "sft"])
def test_accumulation_equals_one_big_micro_batch(tmp_path, data_file, stage):
    """micro 4 vs micro 2 x 2 accumulation vs micro 1 x 4: same parameters after 2 steps
    (the loss is normalised over the global step: pairs for DRDO, response tokens for SFT)."""
    outs = []
    for micro in (4, 2, 1):
        out = tmp_path / f"m{micro}"
        train(cfg(data_file, out, stage=stage, micro_batch_size=micro, lr=1e-4))
        outs.append(params(out))
    # Adam turns float rounding differences of tiny gradients into O(lr) steps: lr 1e-4 keeps them < 1e-6
    assert max_diff(outs[0], outs[1]) < 1e-6
    assert max_diff(outs[0], outs[2]) < 1e-6
    assert max_diff(outs[0], params_init_tiny()) > 5e-5  # training moved the weights


def params_init_tiny():
    from drdo.models import build_tiny_causal_lm

    return {k: v.detach() for k, v in build_tiny_causal_lm(seed=0).state_dict().items()}


def test_batch_must_divide(tmp_path, data_file):
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        train(cfg(data_file, tmp_path, batch_size=4, micro_batch_size=3))


def test_fused_kernel_path_matches_reference(tmp_path, data_file):
    train(cfg(data_file, tmp_path / "k", max_steps=3))
    train(cfg(data_file, tmp_path / "r", max_steps=3, backend="reference"))
    for a, b in zip(losses(tmp_path / "k"), losses(tmp_path / "r")):
        assert a == pytest.approx(b, rel=1e-5)
    assert max_diff(params(tmp_path / "k"), params(tmp_path / "r")) < 1e-5


# ------------------------------------------------------------------ resume, Ctrl-C, outputs


def test_ctrl_c_saves_and_resume_is_bit_exact(tmp_path, data_file):
    full = tmp_path / "full"
    result = train(cfg(data_file, full, max_steps=4, plot=True))
    assert result["status"] == "completed"

    def interrupt_after_two(step, row):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    part = tmp_path / "part"
    result = train(cfg(data_file, part, max_steps=4), on_step=interrupt_after_two)
    assert result["status"] == "interrupted" and result["step"] == 2
    assert latest_checkpoint(str(part)).endswith("step-0000002")
    assert not os.path.exists(part / "model.safetensors")  # no final export after an interrupt

    result = train(cfg(data_file, part, max_steps=4, resume=True))
    assert result["status"] == "completed" and result["step"] == 4
    a, b = params(full), params(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(full) == losses(part)  # metrics.jsonl continues where it stopped

    # outputs of the uninterrupted run
    rows = [json.loads(line) for line in open(full / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "distill", "pref", "p_w", "reward_acc", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
        assert all(math.isfinite(r[key]) for r in rows), key
    import yaml

    saved = yaml.safe_load(open(full / "config.yaml"))
    assert saved["stage"] == "drdo" and saved["max_steps"] == 4 and saved["beta"] == 0.1
    assert (full / "training_curves.png").stat().st_size > 1000
    from drdo.models import PolicyWithRewardHead

    policy = PolicyWithRewardHead.from_pretrained(str(full), require_head=True)
    assert torch.equal(policy.lm.lm_head.weight, a["lm_head.weight"])


def test_resume_errors(tmp_path, data_file):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(cfg(data_file, tmp_path / "none", resume=True))
    out = tmp_path / "run"
    train(cfg(data_file, out, max_steps=4, save_every=1, save_limit=2))
    ckpt = latest_checkpoint(str(out))
    assert ckpt.endswith("step-0000003")  # the last step is the final export, not a checkpoint
    assert sorted(os.listdir(out / "checkpoints")) == ["step-0000002", "step-0000003"]  # save_limit
    with open(os.path.join(ckpt, "optimizer.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):  # the run is complete: name the checkpoint to roll back to
        train(cfg(data_file, out, max_steps=4, resume=ckpt))
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg(data_file, out, max_steps=4, resume=str(tmp_path / "missing")))
    with pytest.raises(CheckpointError, match="batch_size"):
        train(cfg(data_file, out, max_steps=4, batch_size=2, micro_batch_size=2, resume=True))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    rows = make_rows(6)
    for row in rows[2:4]:  # step 2 (no shuffling, 2 pairs a step): each squared margin fits float32, their sum not
        row["oracle_chosen"] = 1.5e19
    data = write_rows(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match="diverged at step 2") as err:
        train(cfg(data, out, max_steps=3, batch_size=2, micro_batch_size=2, shuffle=False, save_every=1))
    assert "step-0000001" in str(err.value)
    assert latest_checkpoint(str(out)).endswith("step-0000001")
    assert len(losses(out)) == 1


def test_drdo_on_unscored_data_fails_at_once(tmp_path):
    from drdo.data import MissingFieldError

    data = write_rows(tmp_path / "raw.jsonl", make_rows(4, oracle=False))
    with pytest.raises(MissingFieldError, match="drdo oracle score"):
        train(cfg(data, tmp_path / "out"))
    with pytest.raises(MissingFieldError, match="drdo reflogps"):
        train(cfg(data, tmp_path / "out", stage="dpo"))


# ------------------------------------------------------------------ the other stages


def test_oracle_dpo_edpo_stages_run(tmp_path, data_file):
    result = train(cfg(data_file, tmp_path / "oracle", stage="oracle", max_steps=None, batch_size=4))
    assert result["total_steps"] == 3 and {"bt", "nll", "reward_acc"} <= result.keys()  # one epoch of 12 pairs
    result = train(cfg(data_file, tmp_path / "dpo", stage="dpo", max_steps=1))
    assert {"reward_margin", "reward_acc"} <= result.keys() and math.isfinite(result["loss"])
    ens = write_rows(tmp_path / "ens.jsonl", make_rows(8, ref=True, k=3))
    result = train(cfg(ens, tmp_path / "edpo", stage="edpo", max_steps=1))
    assert result["distill_max"] >= result["distill_min"] and math.isfinite(result["loss"])
    plain = train(cfg(data_file, tmp_path / "implicit", reward="implicit", unlikelihood="paper", max_steps=1))
    ckpt = train(cfg(data_file, tmp_path / "gc", reward="implicit", unlikelihood="paper", max_steps=1,
                     gradient_checkpointing=True))
    assert math.isfinite(plain["loss"]) and ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-6)
