"""Fault injection around starting, resuming and finishing a run: a failed start removes only what it
created, a resume restores everything that was saved (or refuses), changed inputs are noticed by
content, and every failure after the model is complete says so.

Tiny model, 1-4 steps (helpers from tests/test_faults.py).
"""
from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch
from test_faults import CLI, KERNEL, cfg, metric_steps, one_error, rows, write_jsonl

from drdo.atomic import atomic_write
from drdo.cli import main
from drdo.models import PolicyWithRewardHead, load_head, save_head
from drdo.models.loading import build_tiny_causal_lm
from drdo.tokenizer import get_tokenizer
from drdo.training import checkpoint as ckpt
from drdo.training import loop
from drdo.training.loop import train
from drdo.training.rundir import RUN_FILE


def _train_cli(data, out, *flags, model="tiny"):
    return ["train", "--model", model, "--data", data, "--output-dir", out, *CLI, *flags]


def _files(directory):
    """Every file under ``directory``, relative."""
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, _, names in os.walk(directory) for name in names)


# ----------------------------------------------------------------------------- a failed start


def test_a_failed_start_removes_only_the_directories_it_created_while_they_hold_only_its_lock(
        tmp_path, capsys, monkeypatch):
    bad = write_jsonl(tmp_path / "bad.jsonl", rows(6) + [{"prompt": "Q:", "chosen": " a"}])  # last row: no rejected
    shared = tmp_path / "runs" / "new"
    real_load = loop._load_data

    def another_job_writes_beside(config, tokenizer):  # job a starts writing runs/new/a while b loads its data
        (shared / "a").mkdir(parents=True, exist_ok=True)
        (shared / "a" / "model.safetensors").write_bytes(b"job a")
        return real_load(config, tokenizer)

    monkeypatch.setattr(loop, "_load_data", another_job_writes_beside)
    one_error(capsys, _train_cli(bad, shared / "b"), "bad.jsonl")
    assert _files(tmp_path / "runs") == ["new/a/model.safetensors"]
    monkeypatch.setattr(loop, "_load_data", real_load)
    one_error(capsys, _train_cli(bad, tmp_path / "alone" / "x" / "y"), "bad.jsonl")  # nothing else there
    assert not (tmp_path / "alone").exists()


def test_a_directory_found_unwritable_after_it_was_created_is_removed(tmp_path, data, capsys, monkeypatch):
    from drdo.training import rundir

    def unwritable(directory):
        raise rundir.OutputDirError(f"cannot write to --output-dir {directory}: Read-only file system")

    monkeypatch.setattr(rundir, "_probe_writable", unwritable)  # the lock is given up before the error
    one_error(capsys, _train_cli(data, tmp_path / "new" / "out"), "Read-only")
    assert os.listdir(tmp_path) == []


def test_a_lock_taken_on_a_lock_file_removed_meanwhile_is_taken_again_on_the_new_one(tmp_path, monkeypatch):
    import fcntl

    from drdo.training import rundir

    directory = tmp_path / "run"
    path = directory / rundir.LOCK_FILE
    real_flock = fcntl.flock

    def removed_between_open_and_flock(fd, operation):  # a failed start removed its lock file just then
        monkeypatch.setattr(fcntl, "flock", real_flock)
        os.remove(path)
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", removed_between_open_and_flock)
    lock = rundir.RunLock(str(directory)).acquire()
    try:
        assert os.stat(path).st_ino == os.fstat(lock._fd).st_ino  # the lock is held on the file others will open
    finally:
        lock.release()


# ----------------------------------------------------------------------------- checks before anything is written


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_anything_is_written(tmp_path, data, capsys):
    tokenizer = get_tokenizer("tiny")
    tokenizer.add_tokens([f"<extra{i}>" for i in range(40)])
    tokenizer.save_pretrained(tmp_path / "big_tok")
    rows_of_model = build_tiny_causal_lm().get_input_embeddings().num_embeddings
    assert len(tokenizer) > rows_of_model
    with_new_token = write_jsonl(tmp_path / "pairs.jsonl", rows(8, chosen=" a<extra39>"))  # id 302: past row 263
    out = tmp_path / "out"
    one_error(capsys, _train_cli(with_new_token, out, "--tokenizer", tmp_path / "big_tok"), "--tokenizer",
              f"{len(tokenizer)} tokens", f"{rows_of_model} rows")
    assert not out.exists()
    assert main([str(a) for a in _train_cli(data, out)]) == 0  # the corrected command is not blocked


def test_backend_triton_on_a_cpu_is_refused_before_anything_is_written(tmp_path, data, capsys):
    from drdo_kernels.triton_runtime import triton_runs_on

    if torch.cuda.is_available() or triton_runs_on(torch.device("cpu")):
        pytest.skip("the run would go to a CUDA device, or Triton runs on this CPU (the interpreter is on)")
    out = tmp_path / "out"
    one_error(capsys, _train_cli(data, out, "--backend", "triton"), "--backend triton", "CUDA")
    assert not out.exists()


def test_a_start_model_with_a_nan_reward_head_is_named_and_leaves_nothing(tmp_path, data, capsys):
    policy = PolicyWithRewardHead.from_pretrained("tiny", dtype=torch.float32)
    policy.head_trained = True  # a trained head is kept, not replaced by a fresh one
    with torch.no_grad():
        policy.reward_head.weight[0, 3] = float("nan")
    policy.save_pretrained(tmp_path / "oracle", tokenizer=get_tokenizer("tiny"))
    line = one_error(capsys, _train_cli(data, tmp_path / "runs" / "student", model=tmp_path / "oracle"),
                     "start model is bad", "reward_head")
    assert "diverged" not in line and "--lr" not in line
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- inputs compared by content


def test_a_start_model_retrained_in_place_is_another_config(tmp_path, data, capsys):
    sft, student = tmp_path / "sft", tmp_path / "student"
    sft_cli = ["sft", "--model", "tiny", "--data", data, "--output-dir", sft, *CLI]
    assert main([str(a) for a in sft_cli]) == 0
    assert main([str(a) for a in _train_cli(data, student, model=sft)]) == 0
    capsys.readouterr()
    assert main([str(a) for a in _train_cli(data, student, model=sft)]) == 0  # the same model: nothing to train
    assert "already holds this run, complete" in capsys.readouterr().out
    assert main([str(a) for a in [*sft_cli, "--seed", "7", "--overwrite"]]) == 0  # another model, same path
    one_error(capsys, _train_cli(data, student, model=sft), "another config", "model: the content of", "--overwrite")
    recorded = json.loads((student / RUN_FILE).read_text())
    assert len(recorded["model_sha256"]) == 64 and recorded["tokenizer_sha256"] is None


# ----------------------------------------------------------------------------- resume


def test_extending_a_finished_run_past_its_kept_checkpoint_is_refused(tmp_path, data):
    out = tmp_path / "out"
    train(cfg(data, out, save_limit=2))  # steps 1-4; the step-4 checkpoint is removed after the export
    assert [ckpt.read_trainer_state(c)["step"] for c in ckpt.list_checkpoints(str(out))] == [2, 3]
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ckpt.CheckpointError, match="complete at step 4 .* step 3: .*drop the steps after 3"):
        train(cfg(data, out, save_limit=2, max_steps=8, resume=True))
    assert metric_steps(out) == [1, 2, 3, 4] and (out / "model.safetensors").read_bytes() == before
    assert json.loads((out / RUN_FILE).read_text())["complete"] is True


def _trl_trainer(tmp_path, **overrides):
    from datasets import Dataset

    from drdo.integrations.trl import DRDOConfig, DRDOTrainer

    values = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2,
                  logging_steps=1, save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, seed=0,
                  max_length=32, lr_scheduler_type="constant", bf16=False, backend=KERNEL)
    values.update(overrides)
    trainer = DRDOTrainer(model=build_tiny_causal_lm(), args=DRDOConfig(**values),
                          train_dataset=Dataset.from_list(rows(8)), processing_class=get_tokenizer("tiny"))
    losses = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        loss = original(model, inputs, *args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = compute_loss
    return trainer, losses


def test_drdo_trainer_resume_restores_the_trained_reward_head(tmp_path):
    pytest.importorskip("trl")
    whole, whole_losses = _trl_trainer(tmp_path)
    whole.train()
    checkpoint = tmp_path / "trl" / "checkpoint-2"
    head_at_2 = load_head(str(checkpoint), 64)
    resumed, resumed_losses = _trl_trainer(tmp_path, output_dir=str(tmp_path / "again"))
    assert not torch.allclose(resumed.reward_head.weight.detach(), head_at_2.weight, atol=1e-3)  # trained away
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert len(whole_losses) == 4 and len(resumed_losses) == 2
    assert resumed_losses == pytest.approx(whole_losses[2:], rel=1e-4, abs=1e-6)
    torch.testing.assert_close(resumed.reward_head.weight, whole.reward_head.weight, rtol=1e-4, atol=1e-6)
    os.remove(checkpoint / "reward_head.safetensors")  # a checkpoint without its head is refused
    refused, _ = _trl_trainer(tmp_path, output_dir=str(tmp_path / "third"))
    with pytest.raises(ValueError, match="no reward_head.safetensors"):
        refused.train(resume_from_checkpoint=str(checkpoint))


def test_a_second_sigterm_exits_143(tmp_path, data, capsys, monkeypatch):
    real_step = loop.Trainer.train_step

    def step_then_two_sigterms(self, step):
        row = real_step(self, step)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the second one aborts at once
        return row

    monkeypatch.setattr(loop.Trainer, "train_step", step_then_two_sigterms)
    assert main([str(a) for a in _train_cli(data, tmp_path / "out")]) == 128 + signal.SIGTERM
    assert "SIGTERM" in capsys.readouterr().err


# ----------------------------------------------------------------------------- after the model is complete


def test_a_full_disk_while_drawing_the_plot_says_what_failed_and_that_the_model_is_complete(
        tmp_path, data, capsys, monkeypatch):
    import drdo.training.plots as plots

    def disk_full(fig, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(plots, "save_figure", disk_full)
    out = tmp_path / "out"
    one_error(capsys, _train_cli(data, out, "--plot"), "no space left", "training_curves.png",
              "final model", "is complete")
    PolicyWithRewardHead.from_pretrained(out, require_head=True)


def test_a_full_disk_at_the_last_flush_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old")
    with pytest.raises(OSError) as err:
        with atomic_write(str(target)) as f:
            f.write("new rows\n" * 10)  # still in the file's buffer
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, f.fileno())  # every write to the temporary now fails with ENOSPC
            os.close(full)
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["out.jsonl"] and target.read_text() == "old"


# ----------------------------------------------------------------------------- messages


def test_bad_types_in_reward_head_json_name_the_value_not_the_file(tmp_path):
    from drdo.models import ModelFormatError

    save_head(torch.nn.Linear(64, 1), str(tmp_path))
    (tmp_path / "reward_head.json").write_text(json.dumps({"hidden_size": "64", "notes": "x" * 500}))
    with pytest.raises(ModelFormatError, match="hidden_size '64', but the model's is 64") as err:
        load_head(str(tmp_path), 64)
    assert "notes" not in str(err.value)
    (tmp_path / "reward_head.json").write_text(json.dumps(["y" * 500] * 20))
    with pytest.raises(ModelFormatError, match="must hold a JSON object, got list") as err:
        load_head(str(tmp_path), 64)
    assert len(str(err.value)) < 400


def test_a_none_score_in_drdo_trainer_data_is_named_as_none(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset

    from drdo.data import InvalidExampleError
    from drdo.integrations.trl import DRDOConfig, DRDOTrainer

    items = rows(4)
    items[1]["oracle_rejected"] = None
    args = DRDOConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(InvalidExampleError, match="row 2 .*'oracle_rejected' is None, not a number"):
        DRDOTrainer(model=build_tiny_causal_lm(), args=args, train_dataset=Dataset.from_list(items),
                    processing_class=get_tokenizer("tiny"))


def test_only_rank_0_reports_where_the_model_was_saved(tmp_path, data, capsys, monkeypatch):
    assert train(cfg(data, tmp_path / "out", max_steps=1))["rank"] == 0
    capsys.readouterr()
    monkeypatch.setattr(loop, "train", lambda config: dict(status="completed", output_dir=config.output_dir, rank=1))
    assert main([str(a) for a in _train_cli(data, tmp_path / "other")]) == 0
    assert capsys.readouterr().out == ""
