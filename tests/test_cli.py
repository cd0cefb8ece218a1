"""The `drdo` command line: help, YAML config, errors, and every subcommand end to end on the tiny model."""
from __future__ import annotations

import json
import math
import os

import pytest
from test_train import KERNEL, make_rows, write_rows

from drdo.cli import main, parse_args, train_config_from_args
from drdo.config import TrainConfig, resolve
from drdo.training.schedule import default_lr

SMALL = ["--max-length", "48", "--max-prompt-length", "24", "--batch-size", "4", "--micro-batch-size", "2",
         "--no-progress", "--no-plot", "--backend", KERNEL, "--lr", "1e-3"]

SUBCOMMANDS = {
    ("sft",): ["--batch-size", "--micro-batch-size", "--config", "--resume", "--gradient-checkpointing"],
    ("oracle", "train"): ["--oracle-alpha", "--num-epochs"],
    ("oracle", "score"): ["--reward-model", "--output"],
    ("train",): ["--loss", "--reward", "--alpha", "--gamma", "--beta", "--unlikelihood", "--backend"],
    ("reflogps",): ["--model", "--output"],
    ("eval",): ["--policy", "--judge", "--prompts"],
    ("demo",): [],
}


#: Flags a subcommand must NOT show: each stage shows only the options it uses.
FOREIGN = {
    ("sft",): ["--alpha", "--gamma", "--beta", "--reward", "--unlikelihood", "--pessimistic", "--oracle-alpha"],
    ("oracle", "train"): ["--alpha", "--gamma", "--beta", "--reward", "--unlikelihood", "--pessimistic"],
    ("train",): ["--oracle-alpha"],
}


@pytest.mark.parametrize("path", list(FOREIGN), ids=lambda p: " ".join(p))
def test_each_stage_shows_only_its_own_flags(path, capsys):
    assert main([*path, "--help"]) == 0
    shown = capsys.readouterr().out
    assert not [flag for flag in FOREIGN[path] if f"{flag} " in shown or f"{flag}," in shown]


def test_a_flag_of_another_stage_is_refused(capsys):
    assert main(["sft", "--alpha", "5", "--data", "x.jsonl", "--output-dir", "out"]) == 2
    assert "unrecognized arguments: --alpha" in capsys.readouterr().err
    with pytest.raises(Exception, match="--alpha not used by the dpo stage"):
        resolve(TrainConfig(stage="dpo", alpha=5.0, data="x", output_dir="y"))


@pytest.mark.parametrize("path", list(SUBCOMMANDS), ids=lambda p: " ".join(p))
def test_help_of_every_subcommand(path, capsys):
    assert main([*path, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: drdo " + " ".join(path))
    for flag in SUBCOMMANDS[path]:
        assert flag in text


def test_no_subcommand_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "sft" in capsys.readouterr().err


def test_paper_defaults():
    model = "org/a-7b-model"  # any model but the tiny one gets the paper's learning rates
    c = resolve(TrainConfig(model=model, data="d", output_dir="o"))
    assert (default_lr("drdo", model), c.weight_decay, c.batch_size, c.max_steps) == (5e-6, 0.05, 64, 1000)
    assert (c.max_length, c.max_prompt_length, c.alpha, c.gamma) == (1024, 512, 0.1, 2.0)
    oracle = resolve(TrainConfig(model=model, stage="oracle", data="d", output_dir="o"))
    assert (default_lr("oracle", model), oracle.max_steps, oracle.num_epochs, oracle.oracle_alpha) == (1e-5, None, 1.0,
                                                                                                     0.01)
    assert resolve(TrainConfig(stage="dpo", data="d", output_dir="o")).beta == 0.1


def test_yaml_config_with_flag_override(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 3.0e-4\nbatch_size: 8\nmicro-batch-size: 2\nalpha: 0.5\nresume: false\n")
    args = parse_args(["train", "--loss", "dpo", "--config", str(cfg), "--batch-size", "16", "--no-shuffle"])
    c = train_config_from_args(args)
    assert (c.stage, c.lr, c.batch_size, c.micro_batch_size, c.alpha) == ("dpo", 3e-4, 16, 2, 0.5)
    assert (c.shuffle, c.weight_decay, c.max_length) == (False, 0.05, 1024)  # flag, then defaults
    assert train_config_from_args(parse_args(["oracle", "train", "--data", "x"])).stage == "oracle"
    cfg.write_text("learning_rate: 1\n")
    assert main(["sft", "--config", str(cfg)]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_train_on_unscored_data_says_to_score_first(tmp_path, capsys):
    data = write_rows(tmp_path / "raw.jsonl", make_rows(4, oracle=False))
    rc = main(["train", "--loss", "drdo", "--model", "tiny", "--data", data, "--output-dir", str(tmp_path / "o")])
    assert rc == 2
    assert "drdo oracle score" in capsys.readouterr().err


def _tiny_sequence_classifier(directory, num_labels=1):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from drdo.tokenizer import TINY_VOCAB_SIZE, build_byte_tokenizer

    tok = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels,
                         pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    data = write_rows(tmp_path / "raw.jsonl", make_rows(8, oracle=False))
    sft, oracle = str(tmp_path / "sft"), str(tmp_path / "oracle")
    assert main(["sft", "--model", "tiny", "--data", data, "--output-dir", sft, "--max-steps", "2", *SMALL]) == 0
    assert main(["oracle", "train", "--model", "tiny", "--data", data, "--output-dir", oracle, *SMALL]) == 0
    assert len(_read(os.path.join(oracle, "metrics.jsonl"))) == 2  # one epoch: 8 pairs / 4 per step
    # an SFT output's head was never trained: an Oracle started from it gets a fresh head per seed
    import torch

    from drdo.models import head_is_trained
    from drdo.training.loop import _build_policy

    assert head_is_trained(sft) is False and head_is_trained(oracle) is True and head_is_trained("tiny") is None
    heads = [_build_policy(TrainConfig(stage="oracle", model=m, seed=seed), torch.device("cpu")).reward_head.weight
             for m, seed in ((sft, 1), (sft, 2), (oracle, 1), (oracle, 2))]
    assert not torch.equal(heads[0], heads[1]) and torch.equal(heads[2], heads[3])

    # oracle score: our Oracle (K = 1: floats) and an ensemble with an HF sequence classifier (K = 2: lists)
    scored, scored2 = str(tmp_path / "scored.jsonl"), str(tmp_path / "scored2.jsonl")
    capsys.readouterr()
    assert main(["oracle", "score", "--reward-model", oracle, "--data", data, "--output", scored, "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    margins = [r["oracle_chosen"] - r["oracle_rejected"] for r in _read(scored)]
    assert printed[0].startswith("scored 8 pairs with 1 reward model: mean margin (chosen - rejected) ")
    assert float(printed[0].split("rejected) ")[1].split(",")[0]) == pytest.approx(sum(margins) / 8, rel=1e-3, abs=1e-4)
    assert f"chosen preferred in {100 * sum(m > 0 for m in margins) / 8:.1f}% of pairs" in printed[0]
    assert printed[1:] == [f"saved to {scored}"]
    seqcls = _tiny_sequence_classifier(tmp_path / "seqcls")
    assert main(["oracle", "score", "--reward-model", oracle, seqcls, "--data", data, "--output", scored2,
                 "--no-progress", "--batch-size", "3"]) == 0
    one, two = _read(scored), _read(scored2)
    assert len(one) == len(two) == 8 and one[0]["prompt"] == two[0]["prompt"]
    assert all(isinstance(r["oracle_chosen"], float) and isinstance(r["oracle_rejected"], float) for r in one)
    assert all(len(r["oracle_chosen"]) == 2 and len(r["oracle_rejected"]) == 2 for r in two)
    for a, b in zip(one, two):  # the same Oracle gives the same score whatever the batch
        assert b["oracle_chosen"][0] == pytest.approx(a["oracle_chosen"], abs=1e-5)
    bad = _tiny_sequence_classifier(tmp_path / "two_labels", num_labels=2)
    assert main(["oracle", "score", "--reward-model", bad, "--data", data, "--output", str(tmp_path / "x.jsonl"),
                 "--no-progress"]) == 2
    assert "exactly one" in capsys.readouterr().err

    # reference log-probs of the SFT model; DPO from the same model starts at loss ln 2
    ref = str(tmp_path / "ref.jsonl")
    assert main(["reflogps", "--model", sft, "--data", scored2, "--output", ref, "--backend", KERNEL,
                 "--max-length", "48", "--max-prompt-length", "24", "--no-progress"]) == 0
    rows = _read(ref)
    assert all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 and len(r["oracle_chosen"]) == 2 for r in rows)
    dpo = str(tmp_path / "dpo")
    assert main(["train", "--loss", "dpo", "--model", sft, "--data", ref, "--output-dir", dpo, "--max-steps", "1",
                 *SMALL]) == 0
    assert _read(os.path.join(dpo, "metrics.jsonl"))[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert main(["train", "--loss", "edpo", "--model", sft, "--data", ref, "--output-dir", str(tmp_path / "edpo"),
                 "--max-steps", "1", *SMALL]) == 0
    drdo = str(tmp_path / "drdo")
    assert main(["train", "--loss", "drdo", "--model", sft, "--data", scored, "--output-dir", drdo, "--max-steps",
                 "2", *SMALL]) == 0
    assert os.path.isfile(os.path.join(drdo, "model.safetensors"))

    # eval with a module:function judge, and with a reward-model judge
    (tmp_path / "my_judge.py").write_text("def length(prompts, responses):\n"
                                          "    return [float(len(r)) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    report_path = str(tmp_path / "eval.json")
    common = ["--prompts", data, "--max-new-tokens", "6", "--no-progress", "--device", "cpu", "--num-prompts", "5"]
    assert main(["eval", "--policy", f"sft={sft}", "--policy", drdo, "--judge", "my_judge:length",
                 "--output", report_path, *common]) == 0
    report = json.load(open(report_path))
    gens = _read(report_path + ".generations.jsonl")
    assert report["num_prompts"] == 5 and len(gens) == 5
    assert report["reward"]["drdo"]["mean"] == pytest.approx(sum(len(g["drdo"]) for g in gens) / 5)
    assert report["win_rate"]["sft"]["drdo"] + report["win_rate"]["drdo"]["sft"] == pytest.approx(1.0)
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # without --output the report goes to runs/eval-<date>-<time>/ under the cwd
    assert main(["eval", "--policy", f"sft={sft}", "--policy", drdo, "--judge", oracle, *common]) == 0
    printed = capsys.readouterr().out
    reports = list((tmp_path / "runs").glob("eval-*/report.json"))
    assert len(reports) == 1
    report = json.load(open(reports[0]))
    assert len(report["scores"]["sft"]) == 5 and math.isfinite(report["reward"]["sft"]["mean"])
    # a summary and where the report is; the per-prompt scores stay in the report
    assert printed.splitlines()[0] == "2 policies on 5 prompts; mean judge reward +- std error:"
    assert f"  sft   {report['reward']['sft']['mean']:.4g} +- " in printed
    assert f"win rate of drdo over sft: {report['win_rate']['drdo']['sft']:.3f}" in printed
    assert f"report (with every per-prompt score): {os.path.join('runs', reports[0].parent.name, 'report.json')}" \
        in printed
    assert f"{report['scores']['sft'][0]}" not in printed and len(printed.splitlines()) == 7


def test_generation_is_seeded():
    from drdo.pipeline.evaluate import generate

    prompts = ["Q: 1+1=", "Hello"]
    a = generate("tiny", prompts, max_new_tokens=5, seed=3, progress=False, device="cpu")
    b = generate("tiny", prompts, max_new_tokens=5, seed=3, progress=False, device="cpu")
    assert a == b and len(a) == 2


# ----------------------------------------------------------------------------- help and version


def _leaves():
    from drdo.cli import build_parser

    parser, leaves = build_parser()
    return parser, {path: p for path, p in leaves.items() if not path.endswith("(group)")}


def test_version(capsys):
    import drdo

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"drdo {drdo.__version__}"


def test_every_option_with_a_default_shows_it(capsys):
    """Every flag whose setting has a default says it in --help, the demo's too (its flags default to
    None so that --quick can set them: the help shows the default and --quick's value)."""
    import dataclasses

    from drdo.config import DeprecatedFlag, EvalConfig, RefLogpsConfig, ScoreConfig
    from drdo.demo.run import DemoSettings

    defaults = {"demo": DemoSettings(), "oracle score": ScoreConfig(), "reflogps": RefLogpsConfig(),
                "eval": EvalConfig()}
    _, leaves = _leaves()
    for path, parser in leaves.items():
        help_text = " ".join(parser.format_help().split())
        config = defaults.get(path, TrainConfig())
        for action in parser._actions:
            if not action.option_strings or isinstance(action, DeprecatedFlag) or action.dest in ("help", "config"):
                continue
            names = {f.name for f in dataclasses.fields(config)}
            default = getattr(config, action.dest) if action.dest in names else action.default
            if default is None:
                continue
            flag = action.option_strings[0]
            entry = help_text.split(f" {flag}", 2)[-1].split("  --", 1)[0]
            assert "default" in entry, (path, flag, entry)
    demo = " ".join(leaves["demo"].format_help().split())
    assert "(default: 3; with --quick: 1)" in demo and "(default: 100; with --quick: 40)" in demo
    assert "(default: drdo,dpo,edpo)" in demo and "(default: 0.0 0.3)" in demo


def test_overwrite_has_one_form_everywhere(tmp_path):
    _, leaves = _leaves()
    with_overwrite = [path for path, p in leaves.items() if "--overwrite" in p.format_help()]
    assert set(with_overwrite) == {"sft", "oracle train", "train", "demo"}
    for path in with_overwrite:
        assert "[--overwrite | --no-overwrite]" in " ".join(leaves[path].format_usage().split()), path
    assert parse_args(["demo", "--no-overwrite"]).overwrite is False


def test_backend_lists_its_choices(capsys):
    from drdo_kernels.logprobs import BACKENDS

    _, leaves = _leaves()
    choices = "{" + ",".join(BACKENDS) + "}"
    for path in ("sft", "oracle train", "train", "reflogps", "demo"):
        assert f"--backend {choices}" in leaves[path].format_help(), path
    # refused as everywhere else, with check_backend's message
    assert main(["reflogps", "--backend", "bogus", "--data", "absent.jsonl", "--output", "out.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "backend must be one of" in err and "'bogus'" in err


def test_help_shows_no_rest_literals(capsys):
    parser, leaves = _leaves()
    assert main(["oracle", "--help"]) == 0
    texts = [parser.format_help(), capsys.readouterr().out] + [p.format_help() for p in leaves.values()]
    assert not [text for text in texts if "``" in text]
    assert "drdo --debug COMMAND ..." in " ".join(parser.format_help().split())
