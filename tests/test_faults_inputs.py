"""Every input is checked where it enters: options, YAML files, data values, model directories, judges.

A bad input is one ``drdo: error:`` line and exit status 2 before anything is written; nothing
silently changes meaning. Tiny model, a few rows, at most a couple of optimizer steps.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import pytest
import torch

from drdo.cli import main, parse_args, train_config_from_args
from drdo.config import ConfigError, TrainConfig, resolve, save_yaml
from drdo.data import InvalidExampleError, load_preference_dataset
from drdo.models import PolicyWithRewardHead, save_head
from drdo.tokenizer import build_byte_tokenizer

try:
    import drdo_kernels  # noqa: F401

    KERNEL = "torch"
except ImportError:
    KERNEL = "reference"

TRAIN = ["--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "2", "--max-length", "32",
         "--max-prompt-length", "16", "--backend", KERNEL, "--no-progress", "--no-plot", "--lr", "1e-3"]
PASS = ["--no-progress", "--device", "cpu"]


def rows(n=8):
    return [{"prompt": f"Q{i}:", "chosen": f" a{i % 3}", "rejected": f" bb{i % 5}",
             "oracle_chosen": 0.5 + i / 10, "oracle_rejected": -0.5} for i in range(n)]


def write_lines(path, lines) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return str(path)


def write_rows(path, items) -> str:
    return write_lines(path, [json.dumps(item) for item in items])


def one_error(capsys, argv, *needles) -> str:
    """main(argv) exits 2 with exactly one short ``drdo: error:`` line (containing ``needles``), no traceback."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("drdo:")]
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("drdo: error: ") and len(lines[0]) < 800, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def save_policy(directory, *, trained: bool, nan_head: bool = False) -> str:
    """The tiny model saved as a drdo model directory (no training): an SFT-like directory whose head
    was never trained, an Oracle-like one, or one whose head returns NaN."""
    policy = PolicyWithRewardHead.from_pretrained("tiny")
    policy.save_pretrained(directory, build_byte_tokenizer())
    if trained or nan_head:
        if nan_head:
            torch.nn.init.constant_(policy.reward_head.weight, float("nan"))
        save_head(policy.reward_head, str(directory), trained=True)
    return str(directory)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {"data": write_rows(root / "pairs.jsonl", rows()), "sft": save_policy(root / "sft", trained=False),
            "oracle": save_policy(root / "oracle", trained=True), "root": root}


# ----------------------------------------------------------------------------- tracebacks that became one line


def _broken(files, name, text):
    """A copy of the Oracle-like directory with ``name`` overwritten by ``text``."""
    import shutil

    target = files["root"] / f"broken-{name}"
    if not target.exists():
        shutil.copytree(files["oracle"], target)
        (target / name).write_text(text)
    return target


def _data_with(files, index, **fields):
    items = rows()
    items[index].update(fields)
    return write_rows(files["root"] / f"bad-{'-'.join(fields)}-{index}.jsonl", items)


def _data_with_line(files, index, old, new):
    lines = [json.dumps(item) for item in rows()]
    lines[index] = lines[index].replace(old, new)
    return write_lines(files["root"] / f"line-{index}.jsonl", lines)


def _yaml(files, name, data: bytes):
    path = files["root"] / name
    path.write_bytes(data)
    return path


ONE_LINE = {
    "lone surrogate": (lambda f: ["train", "--data", _data_with(f, 2, chosen=" a\ud800"),
                                  "--output-dir", f["root"] / "o", *TRAIN], ["line 3", "surrogate"]),
    "score 10**400": (lambda f: ["train", "--data", _data_with_line(f, 3, '"oracle_chosen": 0.8', '"oracle_chosen": 1'
                                                                    + "0" * 400), "--output-dir", f["root"] / "o",
                                 *TRAIN], ["line 4", "oracle_chosen", "beyond the range"]),
    "non-UTF-8 config": (lambda f: ["train", "--config", _yaml(f, "latin.yaml", b"lr: 0.001 # caf\xe9\n"),
                                    "--data", f["data"], "--output-dir", f["root"] / "o"], ["latin.yaml", "UTF-8"]),
    "score batch 0": (lambda f: ["oracle", "score", "--reward-model", f["oracle"], "--data", f["data"], "--output",
                                 f["root"] / "s.jsonl", "--batch-size", "0", *PASS], ["batch_size"]),
    "reflogps batch 0": (lambda f: ["reflogps", "--data", f["data"], "--output", f["root"] / "r.jsonl",
                                    "--batch-size", "0", *PASS], ["batch_size"]),
    "eval batch 0": (lambda f: ["eval", "--policy", "p=tiny", "--prompts", f["data"], "--judge", f["oracle"],
                                "--output", f["root"] / "e" / "r.json", "--batch-size", "0", *PASS], ["batch_size"]),
    "score max-length 0": (lambda f: ["oracle", "score", "--reward-model", f["oracle"], "--data", f["data"],
                                      "--output", f["root"] / "s.jsonl", "--max-length", "0", *PASS], ["max_length"]),
    "score max-length -5": (lambda f: ["oracle", "score", "--reward-model", f["oracle"], "--data", f["data"],
                                       "--output", f["root"] / "s.jsonl", "--max-length", "-5", *PASS], ["max_length"]),
    "eval num-prompts 0": (lambda f: ["eval", "--policy", "p=tiny", "--prompts", f["data"], "--judge", f["oracle"],
                                      "--output", f["root"] / "e" / "r.json", "--num-prompts", "0", *PASS],
                           ["num_prompts"]),
    "eval max-new-tokens 0": (lambda f: ["eval", "--policy", "p=tiny", "--prompts", f["data"], "--judge", f["oracle"],
                                         "--output", f["root"] / "e" / "r.json", "--max-new-tokens", "0", *PASS],
                              ["max_new_tokens"]),
    "eval max-new-tokens -3": (lambda f: ["eval", "--policy", "p=tiny", "--prompts", f["data"], "--judge",
                                          f["oracle"], "--output", f["root"] / "e" / "r.json", "--max-new-tokens",
                                          "-3", *PASS], ["max_new_tokens"]),
    "duplicate policy names": (lambda f: ["eval", "--policy", "p=tiny", "--policy", "p=tiny", "--prompts", f["data"],
                                          "--judge", f["oracle"], "--output", f["root"] / "e" / "r.json", *PASS],
                               ["two policies", "'p'"]),
    "YAML batch_size 4.0": (lambda f: ["oracle", "score", "--config", _yaml(f, "bs.yaml", b"batch_size: 4.0\n"),
                                       "--reward-model", f["oracle"], "--data", f["data"], "--output",
                                       f["root"] / "s.jsonl", *PASS], ["batch_size", "4.0"]),
    "train seed 2**70": (lambda f: ["train", "--data", f["data"], "--output-dir", f["root"] / "o", *TRAIN, "--seed",
                                    2**70], ["seed"]),
    "reflogps seed 2**70": (lambda f: ["reflogps", "--data", f["data"], "--output", f["root"] / "r.jsonl", "--seed",
                                       2**70, *PASS], ["seed"]),
    "eval seed 2**70": (lambda f: ["eval", "--policy", "p=tiny", "--prompts", f["data"], "--judge", f["oracle"],
                                   "--output", f["root"] / "e" / "r.json", "--seed", 2**70, *PASS], ["seed"]),
    "train broken config.json": (lambda f: ["train", "--model", _broken(f, "config.json", "{not json"), "--data",
                                            f["data"], "--output-dir", f["root"] / "o", *TRAIN], ["config.json"]),
    "score broken config.json": (lambda f: ["oracle", "score", "--reward-model", _broken(f, "config.json", "{not json"),
                                            "--data", f["data"], "--output", f["root"] / "s.jsonl", *PASS],
                                 ["config.json"]),
    "train broken tokenizer.json": (lambda f: ["train", "--model", _broken(f, "tokenizer.json", "{not json"),
                                               "--data", f["data"], "--output-dir", f["root"] / "o", *TRAIN],
                                    ["tokenizer", "broken-tokenizer.json"]),
}


@pytest.mark.parametrize("case", list(ONE_LINE))
def test_a_bad_input_is_one_line_and_writes_nothing(files, capsys, case):
    argv, needles = ONE_LINE[case]
    argv = argv(files)
    one_error(capsys, argv, *needles)
    written = [argv[i + 1] for i, a in enumerate(argv) if a in ("--output", "--output-dir")]
    assert not any(os.path.exists(str(path)) for path in written)


# ----------------------------------------------------------------------------- options of the offline passes


def test_a_negative_batch_size_writes_no_empty_file(files, capsys):
    out = files["root"] / "neg.jsonl"
    one_error(capsys, ["oracle", "score", "--reward-model", files["oracle"], "--data", files["data"], "--output", out,
                       "--batch-size", "-1", *PASS], "batch_size")
    assert not out.exists()


@pytest.mark.parametrize("command", ["score", "reflogps", "eval"])
def test_an_output_that_is_the_input_is_refused_and_the_input_kept(files, capsys, command):
    data = write_rows(files["root"] / f"own-{command}.jsonl", rows())
    link = files["root"] / f"link-{command}.jsonl"
    link.symlink_to(data)  # the same file under another name
    before = open(data, encoding="utf-8").read()
    argv = {"score": ["oracle", "score", "--reward-model", files["oracle"], "--data", data],
            "reflogps": ["reflogps", "--data", data],
            "eval": ["eval", "--policy", "p=tiny", "--judge", files["oracle"], "--prompts", data]}[command]
    one_error(capsys, [*argv, "--output", link, *PASS], "--output")
    assert open(data, encoding="utf-8").read() == before


@pytest.mark.parametrize("flags,needle", [(["--num-prompts", "-1"], "num_prompts"),
                                          (["--temperature", "-1"], "temperature"),
                                          (["--temperature", "nan"], "temperature"), (["--top-p", "0"], "top_p")])
def test_eval_refuses_values_that_would_change_meaning(files, capsys, flags, needle):
    out = files["root"] / "ev" / "r.json"
    one_error(capsys, ["eval", "--policy", "p=tiny", "--prompts", files["data"], "--judge", files["oracle"], "--output",
                       out, "--max-new-tokens", "2", *flags, *PASS], needle)
    assert not out.parent.exists()


# ----------------------------------------------------------------------------- reference log-probs


def test_reference_logps_of_other_settings_are_refused_naming_both_values(files, tmp_path, capsys):
    ref = tmp_path / "ref.jsonl"
    assert main(["reflogps", "--data", files["data"], "--output", str(ref), "--max-length", "64",
                 "--max-prompt-length", "16", "--backend", KERNEL, *PASS]) == 0
    dpo = ["train", "--loss", "dpo", "--data", ref, *TRAIN, "--max-steps", "1"]
    line = one_error(capsys, [*dpo, "--output-dir", tmp_path / "a"], "max_length 64 (reference log-probs) vs 32")
    assert "max_prompt_length" not in line
    assert main([str(a) for a in [*dpo, "--output-dir", tmp_path / "b", "--max-length", "64", "--seed", "1"]]) == 2
    assert "tiny, seed 0 (reference log-probs) vs tiny, seed 1" in capsys.readouterr().err
    assert main([str(a) for a in [*dpo, "--output-dir", tmp_path / "c", "--max-length", "64"]]) == 0
    with open(tmp_path / "c" / "metrics.jsonl") as f:
        assert json.loads(f.readline())["loss"] == pytest.approx(math.log(2), abs=1e-4)


# ----------------------------------------------------------------------------- Oracle scores


@pytest.mark.parametrize("chosen,rejected", [(3e38, -3e38), (2e19, 0.0), ([3e38, 3e38], [0.0, 0.0])])
def test_scores_that_overflow_the_loss_dtype_are_refused_at_load(tmp_path, chosen, rejected):
    items = rows()
    k = len(chosen) if isinstance(chosen, list) else 1
    for item in items:
        item["oracle_chosen"], item["oracle_rejected"] = ([0.5] * k, [0.1] * k) if k > 1 else (0.5, 0.1)
    items[4].update(oracle_chosen=chosen, oracle_rejected=rejected)
    with pytest.raises(InvalidExampleError, match="line 5: .*float32"):
        load_preference_dataset(write_rows(tmp_path / "huge.jsonl", items), build_byte_tokenizer())


def test_huge_scores_stop_the_command_at_load_naming_the_line(files, capsys):
    data = _data_with(files, 4, oracle_chosen=3e38, oracle_rejected=-3e38)
    one_error(capsys, ["train", "--data", data, "--output-dir", files["root"] / "o", *TRAIN], "line 5", "float32")


@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), None, [], "0.5"], ids=repr)
def test_drdo_trainer_refuses_bad_oracle_scores_naming_the_row(tmp_path, bad):
    pytest.importorskip("trl")
    from datasets import Dataset

    from drdo.integrations.trl import DRDOConfig, DRDOTrainer
    from drdo.models import build_tiny_causal_lm

    items = rows(4)
    if isinstance(bad, (list, str)):  # a column Arrow can hold: all lists, or all strings
        for item in items:
            item["oracle_chosen"] = [item["oracle_chosen"]] if isinstance(bad, list) else str(item["oracle_chosen"])
    items[2]["oracle_chosen"] = bad
    row = "row 1" if isinstance(bad, str) else "row 3"
    args = DRDOConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(InvalidExampleError, match=f"train dataset: {row} .*oracle_chosen"):
        DRDOTrainer(model=build_tiny_causal_lm(), args=args, train_dataset=Dataset.from_list(items),
                    processing_class=build_byte_tokenizer())


def test_drdo_trainer_never_saves_non_finite_weights(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset

    from drdo.integrations.trl import DRDOConfig, DRDOTrainer
    from drdo.models import build_tiny_causal_lm

    args = DRDOConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True)
    trainer = DRDOTrainer(model=build_tiny_causal_lm(), args=args, train_dataset=Dataset.from_list(rows(4)),
                          processing_class=build_byte_tokenizer())
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="not saving.*lm_head"):
        trainer.save_model()
    out = tmp_path / "out"
    assert not (out.exists() and any(name.endswith(".safetensors") for name in os.listdir(out)))


# ----------------------------------------------------------------------------- YAML files


def _bomb(levels: int) -> str:
    """A YAML value of a few hundred bytes that stands for 10**levels elements through aliases."""
    nested = ["&a0 [" + ", ".join(["x"] * 10) + "]"]
    nested += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(nested) + "]"


def test_a_yaml_alias_bomb_is_refused_at_once_in_a_short_line(tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(f"data: {_bomb(6)}\n")
    start = time.perf_counter()
    line = one_error(capsys, ["train", "--config", config, "--output-dir", tmp_path / "o", *TRAIN], "data",
                     "single value")
    assert len(line) < 300 and time.perf_counter() - start < 10


def test_a_variants_alias_bomb_is_refused_in_a_short_line(tmp_path, capsys):
    variants = tmp_path / "variants.yaml"
    variants.write_text(f"- name: big\n  alpha: {_bomb(6)}\n")
    line = one_error(capsys, ["demo", "--variants", variants, "--output-dir", tmp_path / "demo", "--no-progress"],
                     "alpha")
    assert len(line) < 400 and not (tmp_path / "demo").exists()


def test_a_yaml_file_is_bounded_and_holds_single_values(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("lr: 0.001\n" + "# padding\n" * 200_000)
    one_error(capsys, ["train", "--config", big, "--output-dir", tmp_path / "o", *TRAIN], "larger than")
    nested = tmp_path / "nested.yaml"
    nested.write_text("lr: [0.001, 0.002]\n")
    one_error(capsys, ["train", "--config", nested, "--output-dir", tmp_path / "o", *TRAIN], "lr", "single value")


def test_a_scalar_where_a_list_belongs_is_refused(files, tmp_path, capsys):
    config = tmp_path / "score.yaml"
    config.write_text(f"reward_model: {files['oracle']}\n")
    one_error(capsys, ["oracle", "score", "--config", config, "--data", files["data"], "--output", tmp_path / "s.jsonl",
                       *PASS], "reward_model", "list")
    config.write_text(f"reward_model: [{files['oracle']}]\n")  # the list form is taken
    assert parse_args(["oracle", "score", "--config", str(config)]).reward_models == [files["oracle"]]


def test_yaml_keys_are_the_flag_names_and_a_runs_own_config_comes_back(tmp_path):
    config = tmp_path / "loss.yaml"
    config.write_text("loss: dpo\nmax-steps: 3\n")
    assert train_config_from_args(parse_args(["train", "--config", str(config)])).stage == "dpo"
    run_config = tmp_path / "config.yaml"  # what a drdo train run writes into its directory
    save_yaml(resolve(TrainConfig(stage="drdo", model="tiny", data="d.jsonl", output_dir="run", max_steps=2)),
              str(run_config))
    back = resolve(train_config_from_args(parse_args(["train", "--config", str(run_config)])))
    assert back.stage == "drdo" and back.max_steps == 2 and back.oracle_alpha == 0.01
    with pytest.raises(ConfigError, match="'drdo' stage"):
        parse_args(["sft", "--config", str(run_config)])


# ----------------------------------------------------------------------------- reward models and judges


def test_an_oracle_directory_without_its_head_file_is_named(files, tmp_path, capsys):
    import shutil

    headless = tmp_path / "headless"
    shutil.copytree(files["oracle"], headless)
    os.remove(headless / "reward_head.safetensors")
    one_error(capsys, ["oracle", "score", "--reward-model", headless, "--data", files["data"], "--output",
                       tmp_path / "s.jsonl", *PASS], "reward_head.safetensors")


def test_a_reward_model_returning_nan_is_an_error_naming_the_row(files, tmp_path, capsys):
    nan_model = save_policy(tmp_path / "nan", trained=True, nan_head=True)
    out = tmp_path / "s.jsonl"
    one_error(capsys, ["oracle", "score", "--reward-model", nan_model, "--data", files["data"], "--output", out, *PASS],
              "line 1", "finite")
    assert not out.exists()


def test_an_untrained_head_is_refused_unless_allowed(files, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    one_error(capsys, ["oracle", "score", "--reward-model", files["sft"], "--data", files["data"], "--output", out,
                       *PASS], "untrained", "--allow-untrained-head")
    assert not out.exists()
    assert main(["oracle", "score", "--reward-model", files["sft"], "--data", files["data"], "--output", str(out),
                 "--allow-untrained-head", *PASS]) == 0
    assert out.exists()


JUDGE = ("import colorsys\n\ndef score(prompts, responses):\n"
         "    return [float(hasattr(colorsys, 'SHADOW'))] * len(responses)\n")


def test_a_judge_module_never_shadows_the_standard_library(tmp_path, monkeypatch):
    from drdo.pipeline.evaluate import load_judge

    (tmp_path / "colorsys.py").write_text("SHADOW = True\n")
    (tmp_path / "shadow_check_judge.py").write_text(JUDGE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)  # imported afresh by the judge
    path_before = list(sys.path)
    judge = load_judge("shadow_check_judge:score")
    assert judge(["p"], ["r"]) == [0.0]  # the standard library's colorsys
    assert sys.path == path_before and "shadow_check_judge" not in sys.modules
    assert not str(getattr(sys.modules.get("colorsys"), "__file__", "")).startswith(str(tmp_path))


def test_a_judge_file_is_loaded_by_its_path(tmp_path, monkeypatch):
    from drdo.pipeline.evaluate import load_judge

    (tmp_path / "judges").mkdir()
    (tmp_path / "judges" / "length.py").write_text(JUDGE.replace("float(hasattr(colorsys, 'SHADOW'))", "2.0"))
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    assert load_judge("judges/length.py:score")(["p", "q"], ["r", "s"]) == [2.0, 2.0]
    assert not {name for name in set(sys.modules) - before if "judge" in name or "length" in name}


# ----------------------------------------------------------------------------- data paths and the schedule


def test_a_fifo_or_a_device_is_named_not_missing(tmp_path, capsys):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    one_error(capsys, ["train", "--data", fifo, "--output-dir", tmp_path / "o", *TRAIN], "FIFO")
    one_error(capsys, ["train", "--data", "/dev/null", "--output-dir", tmp_path / "o", *TRAIN], "character device")


def test_warmup_longer_than_the_run_is_refused(files, tmp_path, capsys):
    one_error(capsys, ["train", "--data", files["data"], "--output-dir", tmp_path / "o", *TRAIN, "--warmup-steps", "5"],
              "warmup_steps (5)", "2 optimizer steps")
    assert not (tmp_path / "o").exists()
