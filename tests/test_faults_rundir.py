"""Fault injection around run directories and written files: a run never takes a directory through a
side door, a reader never loads an unfinished run, no writer follows a planted link, SIGTERM keeps
progress, and `drdo eval` / `drdo demo` check their inputs before writing anything.

Tiny model, 1-4 steps (helpers from tests/test_faults.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_faults import CLI, cfg, interrupt_at, metric_steps, one_error, recorder, rows, write_jsonl

from drdo.atomic import atomic_writes
from drdo.cli import main
from drdo.jsonl import write_jsonl as drdo_write_jsonl
from drdo.models import ModelFormatError, PolicyWithRewardHead
from drdo.training import checkpoint as ckpt
from drdo.training.loop import train
from drdo.training.rundir import LOCK_FILE, RUN_FILE, OutputDirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_cli(data, out, *flags):
    return ["train", "--model", "tiny", "--data", data, "--output-dir", out, *CLI, *flags]


def _snapshot(directory):
    """{relative path: bytes} of every file under ``directory`` but the lock (a refused run leaves it)."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in set(names) - {LOCK_FILE}:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


# ------------------------------------------------------------------- files written whole, never through a planted link


def test_writers_never_follow_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out.jsonl"
    os.symlink(victim, str(target) + ".tmp")  # at the name a writer might pick for its temporary
    drdo_write_jsonl([{"a": 1}], str(target))
    os.symlink(victim, tmp_path / "again.jsonl")  # at the target itself: replaced, not written through
    drdo_write_jsonl([{"a": 2}], str(tmp_path / "again.jsonl"))
    assert not os.path.islink(tmp_path / "again.jsonl") and not os.path.islink(target)
    assert victim.read_text() == "precious"


def test_a_failed_write_of_several_files_leaves_all_as_they_were(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    b.write_text("old b")
    with pytest.raises(RuntimeError):
        with atomic_writes([str(a), str(b)]) as (fa, fb):
            fa.write("new a")
            raise RuntimeError("disk gone")
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]


# ----------------------------------------------------------------------------- ownership of the directory


def test_resume_of_a_checkpoint_of_another_directory_passes_the_checks_of_a_fresh_start(tmp_path, data, capsys):
    fa, fb, foreign, empty = (tmp_path / n for n in ("fa", "fb", "foreign", "empty"))
    train(cfg(data, fa, save_every=1), on_step=interrupt_at(2))
    other = write_jsonl(tmp_path / "other.jsonl", rows(6))
    train(cfg(other, fb, max_steps=2, lr=5e-4, save_every=0))
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    resume = ["--max-steps", "4", "--warmup-steps", "0", "--resume", ckpt.step_dir(str(fa), 2)]  # fa's own config
    for target, needle in ((fb, "another config"), (foreign, "no drdo run")):
        before = _snapshot(target)
        one_error(capsys, _train_cli(data, target, *resume), needle, "--overwrite")
        assert _snapshot(target) == before
    # into an empty directory it starts a new run there, whose records begin after the checkpoint
    assert main([str(a) for a in _train_cli(data, empty, *resume)]) == 0
    assert metric_steps(empty) == [3, 4]
    assert json.loads((empty / RUN_FILE).read_text())["parent"] == os.path.abspath(resume[-1])


def test_a_run_never_follows_a_link_planted_in_its_directory(tmp_path, data, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    for name in (RUN_FILE, RUN_FILE + ".tmp", "config.yaml.tmp", "config.yaml"):
        os.symlink(victim, run / name)
    with pytest.raises(OutputDirError, match="unreadable"):  # a planted run.json is not a drdo run
        train(cfg(data, run, max_steps=1))
    assert main([str(a) for a in _train_cli(data, run, "--max-steps", "1", "--overwrite")]) == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    os.symlink(victim, locked / LOCK_FILE)
    one_error(capsys, _train_cli(data, locked), "--output-dir")
    assert victim.read_text() == "precious"


# ----------------------------------------------------------------------------- one fact: a complete model


def _readers(directory, data):
    """The commands that load a model from ``directory``, each with the flag that names it."""
    return [
        (["train", "--model", directory, "--data", data, "--output-dir", directory.parent / "student", *CLI],
         "--model"),
        (["oracle", "score", "--reward-model", directory, "--data", data, "--output", directory.parent / "s.jsonl"],
         "--reward-model"),
        (["reflogps", "--model", directory, "--data", data, "--output", directory.parent / "r.jsonl"], "--model"),
        (["eval", "--policy", f"p={directory}", "--prompts", data, "--judge", "len_judge:score"], "--policy"),
    ]


def test_a_killed_overwrite_run_leaves_a_directory_no_reader_loads(tmp_path, data, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main([str(a) for a in _train_cli(data, out)]) == 0  # a finished run
    real_replace, renamed = os.replace, []

    def crash_mid_export(src, dst):  # the new run dies after two files of its export were moved in
        if os.sep + ckpt.EXPORT_TMP_PREFIX in str(src):
            if len(renamed) == 2:
                raise OSError(5, "Input/output error")
            renamed.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_mid_export)
    one_error(capsys, _train_cli(data, out, "--overwrite", "--lr", "5e-4"), "final model")
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(renamed) == 2
    (tmp_path / "len_judge.py").write_text("def score(prompts, responses):\n    return [0.0 for _ in responses]\n")
    monkeypatch.chdir(tmp_path)
    for argv, flag in _readers(out, data):
        one_error(capsys, argv, flag, "has not finished", "--resume")
    with pytest.raises(ModelFormatError, match="has not finished"):
        PolicyWithRewardHead.from_pretrained(out)
    # the run's last checkpoint is kept: --resume finishes the export, and the model is readable again
    assert main([str(a) for a in _train_cli(data, out, "--lr", "5e-4", "--resume")]) == 0
    assert json.loads((out / RUN_FILE).read_text())["complete"] is True
    PolicyWithRewardHead.from_pretrained(out)


def test_an_empty_directory_or_a_killed_fresh_run_is_no_model(tmp_path, data, capsys):
    empty, killed = tmp_path / "empty", tmp_path / "killed"
    empty.mkdir()
    train(cfg(data, killed), on_step=interrupt_at(1))  # stopped before its final export
    for directory, needle in ((empty, "empty directory"), (killed, "has not finished")):
        for argv, flag in _readers(directory, data)[:2]:
            one_error(capsys, argv, flag, needle)


# ----------------------------------------------------------------------------- re-runs and resume


def test_an_identical_run_into_its_finished_directory_trains_nothing(tmp_path, data, capsys):
    out = tmp_path / "out"
    assert main([str(a) for a in _train_cli(data, out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main([str(a) for a in _train_cli(data, out)]) == 0
    assert "already holds this run, complete" in capsys.readouterr().out
    assert main([str(a) for a in _train_cli(data, out, "--resume")]) == 0
    assert _snapshot(out) == before


def test_resume_of_a_finished_run_does_not_retrain_its_last_steps(tmp_path, data):
    out = tmp_path / "out"
    train(cfg(data, out, save_limit=2))
    seen = recorder()
    result = train(cfg(data, out, save_limit=2, resume=True), on_step=seen)
    assert result["status"] == "finished" and seen.seen == [] and metric_steps(out) == [1, 2, 3, 4]


def test_data_is_compared_by_resolved_path_and_content(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "x.jsonl", rows())
    out = tmp_path / "out"
    train(cfg("x.jsonl", out), on_step=interrupt_at(2))
    assert train(cfg("./x.jsonl", out, resume=True))["status"] == "completed"
    assert train(cfg(str(tmp_path / "x.jsonl"), out))["status"] == "finished"
    write_jsonl(tmp_path / "x.jsonl", rows(6))  # the same path, other content: another run
    with pytest.raises(OutputDirError, match="content of x.jsonl changed"):
        train(cfg("x.jsonl", out))


def test_half_written_checkpoints_of_a_killed_run_are_removed_on_the_next_start(tmp_path, data):
    out = tmp_path / "out"
    train(cfg(data, out, max_steps=2), on_step=interrupt_at(1))
    stale = out / "checkpoints" / ".tmp-step-0000007-abc123"  # a SIGKILL came while writing step 7
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    export = out / ".tmp-export-xyz789"
    export.mkdir()
    train(cfg(data, out, max_steps=2, resume=True))
    assert not stale.exists() and not export.exists()


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path, data):
    out = tmp_path / "out"
    argv = [str(a) for a in _train_cli(data, out, "--max-steps", "100000", "--save-every", "0")]
    proc = subprocess.Popen([sys.executable, "-m", "drdo", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never started a step"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved" in err and "Traceback" not in err
    saved = ckpt.latest_checkpoint(str(out))
    ckpt.verify_checkpoint(saved)
    assert ckpt.read_trainer_state(saved)["step"] == metric_steps(out)[-1]


# ----------------------------------------------------------------------------- drdo eval


@pytest.fixture
def judge_dir(tmp_path, monkeypatch):
    (tmp_path / "len_judge.py").write_text("def score(prompts, responses):\n"
                                           "    return [float(len(r)) for r in responses]\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


EVAL = ["--judge", "len_judge:score", "--max-new-tokens", "2", "--num-prompts", "2", "--no-progress", "--device", "cpu"]


def test_eval_refuses_reserved_and_duplicate_policy_names(judge_dir, data, capsys):
    one_error(capsys, ["eval", "--policy", "prompt=tiny", "--prompts", data, *EVAL], "prompt", "reserved")
    one_error(capsys, ["eval", "--policy", "a=tiny", "--policy", "a=tiny", "--prompts", data, *EVAL], "'a'")
    assert not (judge_dir / "runs").exists()


def test_eval_win_rates_are_keyed_by_both_names(judge_dir, data):
    from drdo.pipeline.evaluate import evaluate

    names = ("a", "b_vs_c", "a_vs_b", "c")
    report = evaluate({n: "tiny" for n in names}, ["Q1:", "Q2:"], "len_judge:score", max_new_tokens=2,
                      progress=False, device="cpu")
    assert sorted(report["win_rate"]) == sorted(names)
    assert all(sorted(report["win_rate"][a]) == sorted(set(names) - {a}) for a in names)


def test_eval_writes_report_and_generations_together(judge_dir, data, capsys):
    report = judge_dir / "report.json"
    report.write_text("old report")
    (judge_dir / "report.json.generations.jsonl").mkdir()  # the generations cannot be written
    one_error(capsys, ["eval", "--policy", "p=tiny", "--prompts", data, "--output", report, *EVAL], "generations")
    assert report.read_text() == "old report"
    assert not [name for name in os.listdir(judge_dir) if name.endswith(".tmp")]


def test_eval_policy_that_is_neither_a_directory_nor_reachable_fails_at_once(judge_dir, data, capsys, monkeypatch):
    import drdo.pipeline.evaluate as evaluate_module

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before every --policy was checked")

    monkeypatch.setattr(evaluate_module, "load_judge", no_loading)
    one_error(capsys, ["eval", "--policy", "drdo=drdo_ou", "--prompts", data, *EVAL], "--policy", "drdo_ou")
    one_error(capsys, ["eval", "--policy", "./no/such/dir", "--prompts", data, *EVAL], "--policy", "no such")


# ----------------------------------------------------------------------------- drdo demo


@pytest.fixture
def no_training(monkeypatch):
    import drdo.training.loop as loop

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "train", refuse)


@pytest.mark.parametrize("flags,needle", [
    (["--lrs", "50"], "lr"), (["--alpha", "nan"], "alpha"), (["--oracle-lr", "nan"], "oracle"),
    (["--bt-temperature", "nan"], "bt-temperature"), (["--temperature", "inf"], "temperature"),
    (["--max-new-tokens", "100000"], "max-new-tokens"), (["--sft-lr", "2"], "SFT"),
])
def test_demo_checks_every_value_before_it_writes_or_trains(tmp_path, capsys, no_training, flags, needle):
    out = tmp_path / "demo"
    one_error(capsys, ["demo", "--quick", "--no-progress", "--workers", "1", "--output-dir", out, *flags], needle)
    assert not out.exists()


def test_demo_and_its_quick_variants_run_have_their_own_directories(tmp_path, capsys, no_training, monkeypatch):
    from test_demo import _parse

    assert _parse().output_dir != _parse("--quick").output_dir
    out = tmp_path / "demo"
    with pytest.raises(AssertionError, match="training started"):  # a full demo claims the directory ...
        main(["demo", "--no-progress", "--workers", "1", "--output-dir", str(out)])
    before = _snapshot(out)
    variants = os.path.join(REPO, "docs", "demo", "variants.yaml")
    one_error(capsys, ["demo", "--quick", "--variants", variants, "--no-progress", "--workers", "1",
                       "--output-dir", out], "other settings", "--overwrite")
    assert _snapshot(out) == before  # ... and another demo is refused before it writes anything
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    one_error(capsys, ["demo", "--quick", "--no-progress", "--workers", "1", "--output-dir", tmp_path / "foreign"],
              "no drdo demo")
