"""Fault injection: a run never mixes or loses data, and every known failure is one clear line.

Tiny model, 2-4 steps, fused torch kernel (or the reference path without drdo_kernels).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import time

import pytest
import torch

from drdo.cli import main
from drdo.config import ConfigError, TrainConfig, resolve
from drdo.data import DataSourceError, InvalidExampleError, load_preference_dataset
from drdo.tokenizer import build_byte_tokenizer
from drdo.training import checkpoint as ckpt
from drdo.training.loop import TrainingDiverged, train
from drdo.training.rundir import LOCK_FILE, OutputDirError

try:
    import drdo_kernels  # noqa: F401

    KERNEL = "torch"
except ImportError:
    KERNEL = "reference"


def rows(n=8, **extra):
    out = []
    for i in range(n):
        out.append({"prompt": f"Q{i}:", "chosen": f" a{i % 3}", "rejected": f" bb{i % 5}",
                    "oracle_chosen": 0.5 + i / 10, "oracle_rejected": -0.5, **extra})
    return out


def write_jsonl(path, items):
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return str(path)


def cfg(data, out, **kw):
    base = dict(stage="drdo", model="tiny", data=data, output_dir=str(out), max_steps=4, batch_size=2,
                micro_batch_size=2, lr=1e-3, warmup_steps=0, max_length=32, max_prompt_length=16, backend=KERNEL,
                progress=False, plot=False, seed=0, save_every=1, save_limit=0)
    base.update(kw)
    return TrainConfig(**base)


CLI = ["--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "2", "--max-length", "32",
       "--max-prompt-length", "16", "--backend", KERNEL, "--no-progress", "--no-plot", "--lr", "1e-3"]


def interrupt_at(step_to_stop):
    seen = []

    def on_step(step, row):
        seen.append(step)
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    on_step.seen = seen
    return on_step


def recorder():
    seen = []

    def on_step(step, row):
        seen.append(step)

    on_step.seen = seen
    return on_step


def metric_steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def one_error(capsys, argv, *needles):
    """main(argv) exits 2 with exactly one ``drdo: error:`` line (containing ``needles``), no traceback."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("drdo:")]
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("drdo: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def tmpfs(path, size_bytes, *, readonly=False):
    """A small tmpfs at ``path`` (root only; the test is skipped otherwise or when mount fails)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(path, exist_ok=True)
    options = f"size={int(size_bytes)}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ----------------------------------------------------------------------------- ownership of the directory


def test_lock_refuses_a_second_run_and_a_stale_lock_does_not_block(tmp_path, data, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_FILE, "w") as holder:  # another live process holding the lock
        holder.write("4242\n")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_error(capsys, ["train", "--model", "tiny", "--data", data, "--output-dir", out, *CLI], "in use", "4242")
    assert sorted(os.listdir(out)) == [LOCK_FILE]  # nothing written by the refused run
    # the lock file of a process that died (no flock held) does not block
    assert main(["train", "--model", "tiny", "--data", data, "--output-dir", str(out), *CLI]) == 0


def test_foreign_directory_is_refused_unless_overwrite(tmp_path, data, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    one_error(capsys, ["train", "--model", "tiny", "--data", data, "--output-dir", out, *CLI], "no drdo run",
              "--overwrite")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'
    assert main(["train", "--model", "tiny", "--data", data, "--output-dir", str(out), *CLI, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and metric_steps(out) == [1, 2]


def test_run_of_another_config_is_refused(tmp_path, data):
    out = tmp_path / "out"
    train(cfg(data, out, max_steps=2))
    before = (out / "config.yaml").read_text()
    with pytest.raises(OutputDirError, match="another config.*lr"):
        train(cfg(data, out, max_steps=2, lr=2e-3))
    assert (out / "config.yaml").read_text() == before
    train(cfg(data, out, max_steps=2))  # the same config may run again


def test_second_run_keeps_its_checkpoints_and_resumes_them(tmp_path, data):
    out = tmp_path / "out"
    train(cfg(data, out, save_limit=2))  # an earlier run: checkpoints step-2, step-3
    result = train(cfg(data, out, save_limit=2, overwrite=True), on_step=interrupt_at(1))  # a new run, no --resume
    assert result["status"] == "interrupted" and os.path.isdir(result["checkpoint"])
    assert result["checkpoint"].endswith("step-0000001")
    resumed = recorder()
    result = train(cfg(data, out, save_limit=2, resume=True), on_step=resumed)
    assert resumed.seen == [2, 3, 4] and result["status"] == "completed"  # not the earlier run's step 3
    assert metric_steps(out) == [1, 2, 3, 4]


def test_roll_back_then_plain_resume_continues_the_new_branch(tmp_path, data):
    out = tmp_path / "out"
    train(cfg(data, out), on_step=interrupt_at(3))  # checkpoints 1, 2, 3
    step1 = ckpt.step_dir(str(out), 1)
    train(cfg(data, out, resume=step1), on_step=interrupt_at(2))  # roll back to 1, stop again at 2
    assert metric_steps(out) == [1, 2]
    later = recorder()
    train(cfg(data, out, resume=True), on_step=later)
    assert later.seen == [3, 4]  # from the branch's step 2, not the abandoned step 3
    assert metric_steps(out) == [1, 2, 3, 4]
    assert any(name.startswith("step-0000002-run-") for name in os.listdir(out / "checkpoints"))  # kept aside


def test_resume_refuses_a_changed_config(tmp_path, data):
    out = tmp_path / "out"
    train(cfg(data, out), on_step=interrupt_at(2))
    before = (out / "config.yaml").read_text()
    for change, field in ((dict(lr=5e-4), "lr"), (dict(alpha=0.5), "alpha"), (dict(max_steps=1), "max_steps")):
        with pytest.raises(ckpt.CheckpointError, match=f"another config.*{field}"):
            train(cfg(data, out, resume=True, **change))
        assert (out / "config.yaml").read_text() == before
    other = write_jsonl(tmp_path / "other.jsonl", rows(6))
    with pytest.raises(ckpt.CheckpointError, match="data"):
        train(cfg(other, out, resume=True))
    # settings that cannot change the result, and a longer run, are fine
    result = train(cfg(data, out, resume=True, max_steps=5, save_every=3, save_limit=1))
    assert result["status"] == "completed" and result["step"] == 5


def test_resume_with_allow_config_change(tmp_path, data):
    out = tmp_path / "out"
    train(cfg(data, out), on_step=interrupt_at(2))
    result = train(cfg(data, out, resume=True, lr=5e-4, allow_config_change=True))
    assert result["status"] == "completed"


def test_half_written_metrics_line_does_not_block_resume(tmp_path, data):
    out = tmp_path / "out"
    train(cfg(data, out), on_step=interrupt_at(2))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.69')  # the crash came mid-line
    assert train(cfg(data, out, resume=True))["status"] == "completed"
    assert metric_steps(out) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- checkpoint integrity


def _flip_bytes(path, where=0.75):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(int(size * where))
        chunk = f.read(4)
        f.seek(int(size * where))
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_corrupt_checkpoint_is_refused_naming_the_newest_valid_one(tmp_path, data):
    out = tmp_path / "out"
    train(cfg(data, out), on_step=interrupt_at(2))
    step1, step2 = ckpt.step_dir(str(out), 1), ckpt.step_dir(str(out), 2)
    _flip_bytes(os.path.join(step2, "model.safetensors"))  # inside the tensor data: safetensors still loads
    with pytest.raises(ckpt.CheckpointError, match="step-0000002 is corrupt.*model.safetensors") as err:
        train(cfg(data, out, resume=True))
    assert step1 in str(err.value)
    assert train(cfg(data, out, resume=step1))["status"] == "completed"


def test_edited_trainer_state_is_refused(tmp_path, data):
    out = tmp_path / "out"
    train(cfg(data, out), on_step=interrupt_at(2))
    state_file = os.path.join(ckpt.step_dir(str(out), 2), ckpt.STATE_FILE)
    state = json.load(open(state_file))
    state["step"] = 3
    json.dump(state, open(state_file, "w"))
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json does not match"):
        train(cfg(data, out, resume=True))


def test_non_finite_weights_are_never_saved(tmp_path, data, monkeypatch):
    original = torch.optim.AdamW.step
    calls = []

    def poisoned_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second update overflows one weight
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match="step 2.*weights are not finite") as err:
        train(cfg(data, out))
    assert "step-0000001" in str(err.value)
    assert ckpt.latest_checkpoint(str(out)).endswith("step-0000001")
    assert not os.path.exists(ckpt.step_dir(str(out), 2))


# ----------------------------------------------------------------------------- disk full


def _checkpoint_bytes(directory):
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_last(tmp_path, data, capsys):
    probe = tmp_path / "probe"
    train(cfg(data, probe, max_steps=2), on_step=interrupt_at(1))
    size = _checkpoint_bytes(ckpt.step_dir(str(probe), 1))
    with tmpfs(tmp_path / "small", 1.6 * size) as small:  # room for one checkpoint, not two
        out = small / "out"
        one_error(capsys, ["train", "--model", "tiny", "--data", data, "--output-dir", out, *CLI, "--max-steps", "3",
                           "--save-every", "1", "--save-limit", "1"], "no space left", "step-0000001")
        step1 = ckpt.step_dir(str(out), 1)
        ckpt.verify_checkpoint(step1)
        assert not any(n.startswith(".tmp") for n in os.listdir(out / "checkpoints"))


def test_disk_full_at_the_final_export_is_one_line(tmp_path, data, capsys):
    with tmpfs(tmp_path / "tiny_disk", 64 * 1024) as small:
        one_error(capsys, ["train", "--model", "tiny", "--data", data, "--output-dir", small / "out", *CLI],
                  "no space left")


# ----------------------------------------------------------------------------- data read as written


def test_values_stay_as_written_beside_a_conversational_row(tmp_path):
    tok = build_byte_tokenizer()
    items = [{"prompt": "42", "chosen": "null", "rejected": "[1, 2]"},
             {"prompt": "  7.50  ", "chosen": "true", "rejected": "{}"},
             {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
              "rejected": [{"role": "assistant", "content": "b"}]}]
    ds = load_preference_dataset(write_jsonl(tmp_path / "mixed.jsonl", items), tok)
    assert len(ds) == 3 and ds.dropped == {}
    assert [ds.raw[0]["prompt"], ds.raw[0]["chosen"], ds.raw[0]["rejected"]] == ["42", "null", "[1, 2]"]
    assert ds.raw[1]["prompt"] == "  7.50  " and ds.raw[1]["chosen"] == "true"


@pytest.mark.parametrize("score", ["0.9", "1e5"])
def test_a_string_score_is_an_error_naming_the_line(tmp_path, score):
    items = rows(3)
    items[1]["oracle_chosen"] = score
    path = write_jsonl(tmp_path / "s.jsonl", items)
    with pytest.raises(InvalidExampleError, match="s.jsonl: line 2: .*oracle_chosen.*must be a number.*--skip-invalid"):
        load_preference_dataset(path, build_byte_tokenizer())


def test_non_utf8_bytes_name_the_line(tmp_path, capsys):
    path = tmp_path / "latin.jsonl"
    good = json.dumps(rows(1)[0]).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + good.replace(b"Q0", b"Q\xe9") + b"\n")
    with pytest.raises(DataSourceError, match="line 3: not valid UTF-8"):
        load_preference_dataset(path, build_byte_tokenizer())
    one_error(capsys, ["train", "--data", path, "--output-dir", tmp_path / "o", *CLI], "line 3", "UTF-8")


def test_csv_and_corrupt_parquet_are_one_line(tmp_path, capsys):
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,chosen,rejected\na,b,c\n")
    one_error(capsys, ["train", "--data", csv, "--output-dir", tmp_path / "o1", *CLI], ".csv")
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    one_error(capsys, ["train", "--data", bad, "--output-dir", tmp_path / "o2", *CLI], "parquet")


def test_a_huge_row_is_cut_before_tokenizing(tmp_path, monkeypatch):
    from drdo.data import preferences

    longest = []
    real = preferences._batch_ids

    def spy(tokenizer, texts):
        longest.append(max((len(t) for t in texts), default=0))
        return real(tokenizer, texts)

    monkeypatch.setattr(preferences, "_batch_ids", spy)
    tok = build_byte_tokenizer()
    huge = {"prompt": "p" * 3_000_000 + "Q:", "chosen": " yes" + "y" * 3_000_000, "rejected": " no"}
    small = {"prompt": "p" * 100 + "Q:", "chosen": " yes" + "y" * 100, "rejected": " no"}
    a = load_preference_dataset([huge], tok, max_length=32, max_prompt_length=16)[0]
    b = load_preference_dataset([small], tok, max_length=32, max_prompt_length=16)[0]
    assert a["chosen_input_ids"] == b["chosen_input_ids"] and a["rejected_input_ids"] == b["rejected_input_ids"]
    assert max(longest) < 100_000


def test_identical_chosen_and_rejected_are_counted_and_warned(caplog):
    items = rows(4)
    items[1]["rejected"] = items[1]["chosen"]
    with caplog.at_level(logging.WARNING, logger="drdo.data"):
        ds = load_preference_dataset(items, build_byte_tokenizer())
    assert ds.identical_pairs == 1
    assert any("identical chosen and rejected" in r.getMessage() and "row 2" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------------------- options and the command line


@pytest.mark.parametrize("flags,needle", [
    (["--lr", "nan"], "lr"), (["--lr", "1e38"], "lr"), (["--adam-beta1", "1.5"], "adam_beta1"),
    (["--alpha", "-1"], "alpha"), (["--max-grad-norm", "nan"], "max_grad_norm"),
    (["--reward", "implicit", "--beta", "0"], "beta"),
])
def test_bad_options_are_one_line(tmp_path, data, capsys, flags, needle):
    out = tmp_path / "o"
    one_error(capsys, ["train", "--model", "tiny", "--data", data, "--output-dir", out, *CLI, *flags], needle)
    assert not (out / "config.yaml").exists()


def test_dpo_beta_zero_and_yaml_strings_for_booleans(tmp_path, data, capsys):
    one_error(capsys, ["train", "--loss", "dpo", "--data", data, "--output-dir", tmp_path / "o", *CLI, "--beta", "0"],
              "beta")
    config = tmp_path / "c.yaml"
    config.write_text('progress: "no"\n')
    one_error(capsys, ["train", "--config", config, "--data", data, "--output-dir", tmp_path / "o"], "progress")
    with pytest.raises(ConfigError, match="progress"):
        resolve(TrainConfig(data="d", output_dir="o", progress="no"))


def test_loss_functions_refuse_silent_no_ops():
    from drdo.losses import dpo_loss, drdo_loss

    t = torch.zeros(2)
    with pytest.raises(ValueError, match="alpha"):
        drdo_loss(t - 1, t - 2, t, t, t, t, alpha=-1.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(t - 1, t - 2, t - 1, t - 2, beta=0.0)


def test_output_path_that_is_a_file_is_one_line(tmp_path, data, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_error(capsys, ["train", "--data", data, "--output-dir", a_file, *CLI], "not a directory")


def test_missing_model_directory_is_one_line(tmp_path, data, capsys):
    one_error(capsys, ["train", "--model", tmp_path / "no" / "model", "--data", data, "--output-dir",
                       tmp_path / "o", *CLI], "no such directory")


def test_unknown_hub_model_fails_fast_offline(tmp_path, data, capsys, monkeypatch):
    from drdo import hub

    hub.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: as good as offline
    start = time.perf_counter()
    one_error(capsys, ["train", "--model", "no-such-org/no-such-model-x1", "--data", data, "--output-dir",
                       tmp_path / "o", *CLI], "no-such-org/no-such-model-x1")
    hub.hub_reachable.cache_clear()
    assert time.perf_counter() - start < 15  # not after half a minute of retries


def test_missing_judge_directory_is_one_line(tmp_path, data, capsys):
    one_error(capsys, ["eval", "--policy", "p=tiny", "--prompts", data, "--judge", tmp_path / "no_judge"],
              "--judge")


def test_read_only_output_directory_is_one_line(tmp_path, data, capsys):
    with tmpfs(tmp_path / "ro", 1 << 20, readonly=True) as ro:
        one_error(capsys, ["train", "--data", data, "--output-dir", ro / "out", *CLI], "--output-dir")


def test_debug_shows_the_traceback_and_keeps_exit_status_2(tmp_path, data, capsys):
    assert main(["--debug", "train", "--data", data, "--output-dir", str(tmp_path / "o"), *CLI, "--lr", "nan"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and err.rstrip().splitlines()[-1].startswith("drdo: error: lr")
