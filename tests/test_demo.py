"""`drdo demo`: flag resolution, and `drdo demo --quick` end to end (the CI smoke run of the main command)."""
import argparse
import json
import math
import os

import pytest

from drdo.demo.run import QUICK, DemoSettings, add_arguments, settings_from_args

METHODS = ("sft", "drdo", "dpo", "edpo")
STAT_KEYS = ("true_reward_mean", "ci95", "oracle_reward_mean", "win_rate_vs_sft")


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))


def test_defaults_cover_three_seeds_and_two_noise_levels():
    s = _parse()
    assert s.seeds == [0, 1, 2] and len(s.noise) >= 2 and len(s.lrs) >= 2
    assert s.output_dir == "runs/demo" and not s.quick


def test_quick_and_overrides():
    s = _parse("--quick")
    assert s.quick and s.seeds == QUICK["seeds"] and s.steps == QUICK["steps"] and len(s.noise) >= 2
    s = _parse("--quick", "--steps", "7", "--seeds", "2", "--noise", "0.4", "0.1", "--lrs", "1e-4", "2e-4",
               "--output-dir", "x")
    assert (s.steps, s.seeds, s.noise, s.lrs, s.output_dir) == (7, [0, 1], [0.1, 0.4], [1e-4, 2e-4], "x")
    assert s.sft_steps == QUICK["sft_steps"]  # untouched flags keep the --quick value
    assert _parse("--steps", "9").sft_steps == DemoSettings().sft_steps


@pytest.mark.parametrize("argv, match", [
    (("--noise", "0.7"), "flip rates in"),
    (("--seeds", "0"), "--seeds"),
    (("--steps", "0"), "--steps"),
    (("--lrs", "-1"), "--lrs"),
    (("--train-pairs", "4"), "--train-pairs"),
])
def test_bad_flags_raise(argv, match):
    with pytest.raises(ValueError, match=match):
        _parse(*argv)


def test_demo_quick_end_to_end(tmp_path):
    from drdo.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["noise_levels"] == sorted(report["noise_levels"]) and len(report["noise_levels"]) >= 2
    assert set(report["methods"]) == set(METHODS)
    for method in METHODS:
        per_noise = report["methods"][method]
        assert set(per_noise) == {str(float(n)) for n in report["noise_levels"]}
        for stats in per_noise.values():
            for key in STAT_KEYS:
                assert isinstance(stats[key], float) and math.isfinite(stats[key]), (method, key, stats[key])
            assert 0.0 <= stats["true_reward_mean"] <= 1.0 and stats["ci95"] >= 0.0
            assert 0.0 <= stats["win_rate_vs_sft"] <= 1.0
    # the SFT start plays against itself: exactly a tie on every prompt
    assert all(v["win_rate_vs_sft"] == 0.5 for v in report["methods"]["sft"].values())
    md = (out / "report.md").read_text()
    assert "| noise" in md and "DRDO" in md and "DPO" in md and "e-DPO" in md
    assert (out / "report.png").stat().st_size > 1000
    gens = (out / "work" / "seed0" / "noise0" / "test_generations.jsonl").read_text().splitlines()
    assert len(gens) == QUICK["test_prompts"] and set(json.loads(gens[0])) == {"prompt", *METHODS}
    assert os.path.isdir(out / "work" / "seed0" / "noise0" / "oracle3")  # K = 3 Oracles for e-DPO
