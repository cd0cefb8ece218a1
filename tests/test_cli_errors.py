"""Failures that used to print a traceback (or hang) and are now one ``drdo: error:`` line, exit status 2.

Machine settings (--precision, --device, --attn-implementation), judges, launcher variables, data
files that break the parsers, outputs that cannot be written (checked before anything is
computed), file names that are not UTF-8, conversations without a chat template, and default eval
directories of runs started in the same second.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time

import pytest
import torch
from test_faults_inputs import PASS, TRAIN, rows, save_policy, write_rows

from drdo.cli import main
from drdo.tokenizer import build_byte_tokenizer

NO_CUDA = not torch.cuda.is_available()


def only_line(capsys, argv, *needles) -> str:
    """main(argv) returns 2 and stderr is exactly one ``drdo: error:`` line holding every needle."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("drdo: error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    return {"data": write_rows(root / "pairs.jsonl", rows()), "oracle": save_policy(root / "oracle", trained=True),
            "root": root}


def _train(files, out, *flags):
    return ["train", "--data", files["data"], "--output-dir", out, *TRAIN, *flags]


# ----------------------------------------------------------------------------- settings this machine cannot run


@pytest.mark.skipif(not NO_CUDA, reason="bf16 runs where CUDA is available")
def test_bf16_without_cuda_is_one_line_and_makes_no_directory(files, capsys):
    out = files["root"] / "bf16"
    only_line(capsys, _train(files, out, "--precision", "bf16"), "--precision bf16", "CUDA")
    assert not out.exists()


DEVICES = [("bogus", "not a device"), ("cuda:x", "not a device"), ("mps", "only 'auto', 'cpu'")]
if NO_CUDA:
    DEVICES.append(("cuda", "CUDA is not available"))


@pytest.mark.parametrize("device,needle", DEVICES)
@pytest.mark.parametrize("command", ["reflogps", "eval", "oracle score"])
def test_a_device_this_machine_lacks_is_one_line(files, capsys, command, device, needle):
    out = files["root"] / f"dev-{command.replace(' ', '-')}.json"
    argv = {"reflogps": ["reflogps", "--data", files["data"]],
            "oracle score": ["oracle", "score", "--reward-model", files["oracle"], "--data", files["data"]],
            "eval": ["eval", "--policy", "tiny", "--prompts", files["data"], "--judge", files["oracle"]]}[command]
    only_line(capsys, [*argv, "--output", out, "--no-progress", "--device", device], "--device", device, needle)
    assert not out.exists()


ATTENTION = [("bogus", "not an attention implementation")]
if importlib.util.find_spec("flash_attn") is None:
    ATTENTION.append(("flash_attention_2", "flash-attn"))


@pytest.mark.parametrize("name,needle", ATTENTION)
def test_an_attention_that_cannot_run_is_one_line(files, capsys, name, needle):
    out = files["root"] / f"attn-{name}"
    only_line(capsys, _train(files, out, "--attn-implementation", name), "--attn-implementation", name, needle)
    assert not out.exists()


# ----------------------------------------------------------------------------- judges


JUDGES = {
    "strings": ("return ['good'] * len(responses)", ["'good'", "response 1", "finite number"]),
    "None": ("return None", ["returned None", "a list of one number per response"]),
    "None scores": ("return [None] * len(responses)", ["returned None", "response 1"]),
    "NaN": ("return [float('nan')] * len(responses)", ["nan", "finite number"]),
    "too few": ("return [1.0]", ["1 scores for 2 responses"]),
    "raises": ("raise RuntimeError('judge server down')", ["raised RuntimeError", "judge server down"]),
}


@pytest.mark.parametrize("case", list(JUDGES))
def test_a_judge_that_returns_no_scores_or_raises_is_one_line(files, tmp_path, capsys, case):
    body, needles = JUDGES[case]
    judge = tmp_path / "judge.py"
    judge.write_text(f"def score(prompts, responses):\n    {body}\n")
    out = tmp_path / "report.json"
    only_line(capsys, ["eval", "--policy", "p=tiny", "--prompts", files["data"], "--judge", f"{judge}:score",
                       "--num-prompts", "2", "--max-new-tokens", "2", "--output", out, *PASS], "policy 'p'", *needles)
    assert not out.exists()


def test_judge_scores_accept_any_real_number():
    import numpy as np

    from drdo.pipeline.evaluate import judge_scores

    got = judge_scores(lambda p, r: [1, np.float32(0.5), torch.tensor(2.0)], ["a"] * 3, ["x"] * 3)
    assert got == [1.0, 0.5, 2.0] and all(type(v) is float for v in got)


# ----------------------------------------------------------------------------- WORLD_SIZE / RANK without torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_launcher_variables_without_the_other_ranks_time_out_in_one_line(files, monkeypatch, capsys, rank):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("DRDO_DIST_START_TIMEOUT", "1")
    out = files["root"] / f"dist-{rank}"
    start = time.monotonic()
    only_line(capsys, _train(files, out), f"rank {rank} of WORLD_SIZE=2", "within 1 s", "DRDO_DIST_START_TIMEOUT")
    assert time.monotonic() - start < 30  # bounded: it used to wait for the other rank for 30 minutes
    assert not torch.distributed.is_initialized() and not out.exists()


@pytest.mark.parametrize("env,needles", [({}, ["MASTER_ADDR and MASTER_PORT", "torchrun"]),
                                         ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"}, ["MASTER_PORT='x'"]),
                                         ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234", "RANK": "5"},
                                          ["RANK=5"]),
                                         ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234",
                                           "DRDO_DIST_START_TIMEOUT": "soon"}, ["DRDO_DIST_START_TIMEOUT='soon'"])])
def test_launcher_variables_that_cannot_start_a_group_are_one_line(files, monkeypatch, capsys, env, needles):
    for name in ("MASTER_ADDR", "MASTER_PORT", "DRDO_DIST_START_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    only_line(capsys, _train(files, files["root"] / "dist-env"), *needles)


# ----------------------------------------------------------------------------- data files that break the parsers


def _deep(path, depth=100_000):
    path.write_text('{"prompt": ' + "[" * depth + "]" * depth + ', "chosen": " a", "rejected": " b"}\n')
    return path


def _long_number(path):
    path.write_text(json.dumps(rows()[0])[:-1] + ', "oracle_margin": 1' + "0" * 5000 + "}\n")
    return path


def _broken_dataset_dict(path):
    path.mkdir()
    (path / "dataset_dict.json").write_text('{"splits": ["tra')
    return path


def _mixed_schemas(path):
    path.mkdir()
    write_rows(path / "a.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " b"}])
    write_rows(path / "b.jsonl", [{"prompt": "p", "chosen": [1, 2], "rejected": {"x": 1}}])
    return path


DATA = {"nested 100000 deep": (_deep, ["line 1", "nested more than"]),
        "a 5000-digit number": (_long_number, ["line 1", "more than 4300 digits"]),
        "broken dataset_dict.json": (_broken_dataset_dict, ["cannot read the dataset directory", "JSONDecodeError"]),
        "files of different columns": (_mixed_schemas, ["cannot read the dataset directory",
                                                        "DatasetGenerationError"])}


@pytest.mark.parametrize("case", list(DATA))
def test_data_that_breaks_the_parsers_is_one_line(tmp_path, capsys, case):
    make, needles = DATA[case]
    source = make(tmp_path / ("data.jsonl" if case[0] in "na" else "data"))
    out = tmp_path / "out.jsonl"
    only_line(capsys, ["reflogps", "--data", source, "--output", out, *PASS], str(source), *needles)
    assert not out.exists()


def test_conversations_with_a_tokenizer_without_chat_template_are_one_line(tmp_path, capsys):
    from drdo.models import PolicyWithRewardHead

    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    model = tmp_path / "plain"
    PolicyWithRewardHead.from_pretrained("tiny").save_pretrained(model, tokenizer)
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]
    data = write_rows(tmp_path / "chat.jsonl", chat)
    only_line(capsys, ["reflogps", "--model", model, "--data", data, "--output", tmp_path / "o.jsonl", *PASS],
              "conversations", "chat_template")


# ----------------------------------------------------------------------------- outputs


def _read_only_dir(tmp_path):
    """A directory this process cannot create files in, or None (root ignores modes; /sys refuses root)."""
    if os.geteuid() != 0:
        path = tmp_path / "read-only"
        path.mkdir()
        path.chmod(0o555)
        return path
    try:
        open("/sys/.drdo-probe", "w").close()
    except OSError:
        return "/sys"
    os.remove("/sys/.drdo-probe")
    return None


def _no_computation(monkeypatch):
    """Anything that would load a model, read the data or evaluate fails the test (it is not a known error)."""
    def computed(*args, **kwargs):
        raise AssertionError("the command computed before checking its --output")

    import drdo.models
    import drdo.pipeline.evaluate
    import drdo.pipeline.reflogps
    import drdo.pipeline.scoring

    monkeypatch.setattr(drdo.models.PolicyWithRewardHead, "from_pretrained", computed)
    monkeypatch.setattr(drdo.pipeline.reflogps, "load_preference_dataset", computed)
    monkeypatch.setattr(drdo.pipeline.scoring, "load_reward_model", computed)
    monkeypatch.setattr(drdo.pipeline.evaluate, "evaluate", computed)


@pytest.mark.parametrize("where", ["the current directory", "a file as parent", "a read-only directory"])
@pytest.mark.parametrize("command", ["reflogps", "oracle score", "eval"])
def test_an_unwritable_output_is_refused_before_computing(files, tmp_path, monkeypatch, capsys, command, where):
    monkeypatch.chdir(tmp_path)
    if where == "the current directory":
        out, needle = ".", "is a directory"
    elif where == "a file as parent":
        (tmp_path / "taken").write_text("a file")
        out, needle = "taken/sub/out.jsonl", "is a file, not a directory"
    else:
        directory = _read_only_dir(tmp_path)
        if directory is None:
            pytest.skip("no directory refuses this process's files")
        out, needle = os.path.join(directory, "sub", "out.jsonl"), "cannot write in"
    argv = {"reflogps": ["reflogps", "--data", files["data"]],
            "oracle score": ["oracle", "score", "--reward-model", files["oracle"], "--data", files["data"]],
            "eval": ["eval", "--policy", "tiny", "--prompts", files["data"], "--judge", files["oracle"]]}[command]
    _no_computation(monkeypatch)
    only_line(capsys, [*argv, "--output", out, *PASS], f"--output {out}", needle)


@pytest.mark.skipif(sys.platform != "linux", reason="a file name of any bytes")
def test_a_name_that_is_not_utf8_is_refused_and_nothing_is_made(files, tmp_path, capsys):
    name = os.fsdecode(b"run-\xff")  # what Python makes of such bytes on the command line
    only_line(capsys, _train(files, tmp_path / name), "--output-dir", "\\xff", "not UTF-8")
    only_line(capsys, ["reflogps", "--data", files["data"], "--output", tmp_path / name / "r.jsonl", *PASS],
              "--output", "\\xff")
    assert os.listdir(tmp_path) == []


def test_two_evals_in_the_same_second_keep_both_reports(files, tmp_path, monkeypatch, capsys):
    judge = tmp_path / "judge.py"
    judge.write_text("def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    monkeypatch.chdir(tmp_path)
    frozen = time.strftime

    monkeypatch.setattr(time, "strftime", lambda fmt, t=None: frozen(fmt, time.gmtime(0)))  # one second for all
    argv = ["eval", "--policy", "tiny", "--prompts", files["data"], "--judge", f"{judge}:score", "--num-prompts", "2",
            "--max-new-tokens", "2", *PASS]
    paths = []
    for seed in ("0", "1"):
        assert main([*argv, "--seed", seed]) == 0
        paths.append(capsys.readouterr().out.split("report (with every per-prompt score): ")[1].split("\n")[0])
    assert paths[0] != paths[1] and all(os.path.isfile(p) for p in paths)
    assert sorted(os.listdir(tmp_path / "runs")) == ["eval-19700101-000000", "eval-19700101-000000-2"]
    assert main([*argv, "--judge", f"{judge}:missing"]) == 2  # a failed eval leaves no directory of its own
    assert len(os.listdir(tmp_path / "runs")) == 2
