"""What a new user meets first: defaults that train, quiet output, threads, judges, eval outputs, clean failures."""
from __future__ import annotations

import glob
import json
import os
import sys

import pytest
import torch
from test_train import make_rows, write_rows

from drdo.cli import build_parser, main
from drdo.models import is_tiny_model
from drdo.training.schedule import default_lr

TINY_RUN = ["--max-length", "48", "--max-prompt-length", "24", "--batch-size", "4", "--micro-batch-size", "4",
            "--no-plot", "--backend", "torch"]


def _losses(directory):
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_tiny_model_trains_at_its_default_lr_quietly_and_says_where_it_saved(tmp_path, capsys):
    import datasets
    from transformers.utils import logging as hf_logging

    data = write_rows(tmp_path / "raw.jsonl", make_rows(16, oracle=False))
    out = str(tmp_path / "sft")
    hf_logging.enable_progress_bar()  # the caller's bars are on (an earlier test may have turned them off)
    datasets.enable_progress_bars()
    assert main(["sft", "--model", "tiny", "--data", data, "--output-dir", out, "--max-steps", "12",
                 "--no-progress", "--threads", "1", *TINY_RUN]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == f"saved to {out}"
    assert "it/s" not in captured.err and "%|" not in captured.err  # no progress bar of any library
    # the caller's progress bars and thread count are given back
    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    losses = _losses(out)
    assert losses[-1] < 0.75 * losses[0], losses  # 5e-6 leaves the tiny model where it started
    assert is_tiny_model(out) and is_tiny_model("tiny") and not is_tiny_model(str(tmp_path))
    assert default_lr("oracle", out) == 1e-3 and default_lr("sft", "tiny") == 5e-3
    assert default_lr("drdo", str(tmp_path)) == 5e-6


def test_every_subcommand_takes_threads(capsys):
    _, leaves = build_parser()
    commands = [path for path in leaves if not path.endswith("(group)")]
    assert len(commands) == 7
    for path in commands:
        assert "--threads" in leaves[path].format_help(), path


def test_threads_are_set_and_restored_and_checked(capsys):
    from drdo.process_settings import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive integer"):
        with torch_threads(0):
            pass
    assert main(["sft", "--data", "x.jsonl", "--output-dir", "o", "--threads", "0"]) == 2
    assert "threads must be a positive integer" in capsys.readouterr().err


def test_judge_module_in_the_current_directory_and_default_eval_output(tmp_path, monkeypatch, capsys):
    (tmp_path / "myjudge.py").write_text("def score(prompts, responses):\n"
                                         "    return [float(len(r)) for r in responses]\n")
    prompts = write_rows(tmp_path / "prompts.jsonl", make_rows(3, oracle=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # as the console script
    monkeypatch.delitem(sys.modules, "myjudge", raising=False)
    assert main(["eval", "--policy", "tiny", "--prompts", prompts, "--judge", "myjudge:score",
                 "--max-new-tokens", "3", "--no-progress"]) == 0
    monkeypatch.delitem(sys.modules, "myjudge", raising=False)
    assert str(tmp_path) not in sys.path  # the import did not leave the directory on the path
    reports = glob.glob(os.path.join("runs", "eval-*", "report.json"))
    assert len(reports) == 1
    generations = reports[0] + ".generations.jsonl"
    with open(generations) as f:
        assert len(f.readlines()) == 3
    out = capsys.readouterr().out
    assert f"report (with every per-prompt score): {reports[0]}" in out and f"generations: {generations}" in out


def test_a_failed_start_leaves_no_directory_behind(tmp_path, capsys):
    rows = make_rows(4, oracle=False)
    rows[2]["chosen"] = ""  # an empty response: the data is refused before training starts
    data = write_rows(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "new" / "run"
    assert main(["sft", "--model", "tiny", "--data", data, "--output-dir", str(out), "--no-progress"]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(["sft", "--model", "tiny", "--data", data, "--output-dir", str(existing), "--no-progress"]) == 2
    assert (existing / "keep.txt").read_text() == "mine"
