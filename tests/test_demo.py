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


# ------------------------------------------------------------------------------------------ variants and grids


def _variants_file(tmp_path, text):
    path = tmp_path / "variants.yaml"
    path.write_text(text)
    return str(path)


def test_lr_grids_scale_with_steps_and_methods_choose_the_students(tmp_path):
    from drdo.demo.run import lr_grid, students

    s = _parse("--steps", "300", "--dpo-lrs", "1e-4", "3e-4", "--methods", "dpo,edpo")
    assert lr_grid(s, "drdo") == pytest.approx([1e-4, 1e-3 / 3])  # the default grid at 100 steps, x 100/300
    assert lr_grid(s, "dpo") == pytest.approx([1e-4 / 3, 1e-4])
    assert [name for name, _, _ in students(s)] == ["dpo", "edpo"]
    assert lr_grid(_parse(), "edpo") == pytest.approx(DemoSettings().lrs)  # 100 steps: the grid as given
    assert lr_grid(_parse("--quick"), "drdo") == pytest.approx([1e-3])
    v = _variants_file(tmp_path, "- name: a\n  alpha: 1\n- name: b\n  reward: implicit\n  beta: 0.1\n")
    got = students(_parse("--variants", v))
    assert got == [("drdo", "drdo", {}), ("a", "drdo", {"alpha": 1.0}),
                   ("b", "drdo", {"reward": "implicit", "beta": 0.1}), ("dpo", "dpo", {}), ("edpo", "edpo", {})]


@pytest.mark.parametrize("text, match", [
    ("- name: a\n  alpah: 1\n", "variant 'a': unknown key 'alpah'"),
    ("- name: a\n  alpha: -1\n", "variant 'a': alpha must be a finite number >= 0"),
    ("- name: a\n  reward_grad: shared\n", "variant 'a': reward_grad must be one of"),
    ("- name: a\n  length_normalize: 1\n", "variant 'a': length_normalize must be true or false"),
    ("- name: a\n  beta: 0.1\n", "variant 'a', key 'beta': beta scales the implicit reward only"),
    ("- name: a\n  reward: implicit\n  reward_grad: head\n", "variant 'a': reward_grad=\"head\" needs reward=\"head\""),
    ("- name: a\n  reward: implicit\n  beta: 0\n", "variant 'a': beta must be a finite number > 0"),
    ("- name: dpo\n  alpha: 1\n", "variant 'dpo': the name is taken"),
    ("- name: a\n- name: a\n", "variant 'a': the name appears twice"),
    ("- alpha: 1\n", "needs a 'name'"),
    ("name: a\n", "must hold a YAML list"),
    ("- [unclosed\n", "not valid YAML"),
    # the DRDO student's training options
    ("- name: a\n  max_grad_norm: -1\n", "variant 'a', key 'max_grad_norm': must be a finite number >= 0"),
    ("- name: a\n  max_grad_norm: .nan\n", "variant 'a', key 'max_grad_norm'"),
    ("- name: a\n  max_grad_norm: off\n", "variant 'a', key 'max_grad_norm'"),
    ("- name: a\n  steps: 0\n", "variant 'a', key 'steps': must be an integer >= 1, got 0"),
    ("- name: a\n  steps: 2.5\n", "variant 'a', key 'steps'"),
    ("- name: a\n  lrs: 0.001\n", "variant 'a', key 'lrs': must be a non-empty list of positive numbers"),
    ("- name: a\n  lrs: [0.001, -1]\n", "variant 'a', key 'lrs'"),
    ("- name: a\n  lrs: []\n", "variant 'a', key 'lrs'"),
])
def test_bad_variants_raise_one_clear_error(tmp_path, text, match):
    from drdo.config import ConfigError

    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        _parse("--variants", _variants_file(tmp_path, text))


@pytest.mark.parametrize("argv, match", [
    (("--methods", "dpo,ipo"), "--methods"),
    (("--methods", "dpo,dpo"), "--methods"),
    (("--drdo-lrs", "0"), "--drdo-lrs"),
    (("--diagnostics-every", "-1"), "--diagnostics-every"),
])
def test_bad_method_and_grid_flags_raise(argv, match):
    with pytest.raises(ValueError, match=match):
        _parse(*argv)


def test_demo_with_two_variants_reports_them_beside_the_baselines(tmp_path):
    """A test-sized run (one noise level, a few steps): both variants beside SFT/DPO/e-DPO, paired
    differences per seed with intervals, the diagnostics summary, the chosen lr per cell."""
    from drdo.cli import main

    v = _variants_file(tmp_path, "- name: head-only\n  reward_grad: head\n"
                                 "- name: token-mean\n  length_normalize: true\n  alpha: 1\n")
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--noise", "0.1", "--steps", "3", "--sft-steps", "6", "--oracle-steps", "3",
            "--train-pairs", "32", "--batch-size", "16", "--val-prompts", "4", "--test-prompts", "8",
            "--max-new-tokens", "6", "--methods", "dpo,edpo", "--variants", v, "--diagnostics-every", "2",
            "--lrs", "1e-4", "3e-4", "--workers", "1", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    names = ("sft", "head-only", "token-mean", "dpo", "edpo")
    assert list(report["methods"]) == list(names)
    for name in names:
        stats = report["methods"][name]["0.1"]
        assert 0.0 <= stats["true_reward_mean"] <= 1.0 and stats["ci95"] >= 0.0
    comp = report["comparisons"]["0.1"]
    for name in ("head-only", "token-mean"):
        for other in ("dpo", "edpo", "sft"):
            d = comp[f"{name}_minus_{other}"]
            mine, theirs = report["methods"][name]["0.1"], report["methods"][other]["0.1"]
            assert d["per_seed"] == pytest.approx([mine["true_reward_per_seed"][0] - theirs["true_reward_per_seed"][0]])
            assert d["ci95"] >= 0.0
        chosen = report["methods"][name]["0.1"]["selected_lr_per_seed"][0]
        assert any(chosen == pytest.approx(lr * 100 / 3) for lr in (1e-4, 3e-4))
        training = report["methods"][name]["0.1"]["training"]
        assert 0.0 <= training["diag_focal_active"] <= 1.0 and 0.0 <= training["clipped_share"] <= 1.0
    assert "drdo_minus_dpo" not in comp and "drdo" not in report["methods"]  # --methods left DRDO out
    assert report["methods"]["head-only"]["0.1"]["training"]["diag_gnorm_distill"] == 0.0
    assert report["methods"]["token-mean"]["0.1"]["training"]["diag_gnorm_distill"] > 0.0
    assert "diag_focal_median" not in report["methods"]["dpo"]["0.1"]["training"]
    assert [v["name"] for v in report["settings"]["variant_specs"]] == ["head-only", "token-mean"]
    md = (out / "report.md").read_text()
    assert "`head-only`" in md and "`token-mean`: alpha=1, length_normalize=True" in md
    assert "## Paired differences" in md and "## Why DRDO moves" in md
    assert (out / "report.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------- training options of variants


def test_variants_set_their_students_training_options(tmp_path):
    from drdo.demo.run import _stage_config, lr_grid, student_steps, students

    v = _variants_file(tmp_path, "- name: no-clip\n  max_grad_norm: 0\n"
                                 "- name: long\n  steps: 200\n  lrs: [1.0e-4, 4.0e-4]\n  max_grad_norm: 10\n")
    s = _parse("--variants", v)
    by_name = {name: overrides for name, _, overrides in students(s)}
    assert by_name["no-clip"] == {"max_grad_norm": 0.0}
    assert by_name["long"] == {"steps": 200, "lrs": [1e-4, 4e-4], "max_grad_norm": 10.0}
    assert student_steps(s, by_name["long"]) == 200 and student_steps(s, by_name["no-clip"]) == s.steps
    assert lr_grid(s, "drdo", by_name["long"]) == pytest.approx([1e-4 * 100 / 200, 4e-4 * 100 / 200])
    assert lr_grid(s, "drdo", by_name["no-clip"]) == lr_grid(s, "drdo")
    config = _stage_config(s, "drdo", "d.jsonl", "out", model="tiny", steps=200, lr=1e-3, seed=0,
                           drdo=by_name["long"])
    assert config.max_grad_norm == 10.0 and config.max_steps == 200
    assert _stage_config(s, "drdo", "d.jsonl", "out", model="tiny", steps=9, lr=1e-3, seed=0).max_grad_norm == 1.0


def test_committed_variants_hold_the_clipping_readings():
    import pathlib

    from drdo.demo.variants import load_variants

    docs = pathlib.Path(__file__).resolve().parents[1] / "docs" / "demo"
    every = {v["name"]: v for v in load_variants(str(docs / "variants.yaml"))}
    clipping = load_variants(str(docs / "clipping.yaml"))
    assert [v["name"] for v in clipping] == ["no-clip", "clip-10"]
    assert all(every[v["name"]] == v for v in clipping)
    assert [v["max_grad_norm"] for v in clipping] == [0.0, 10.0]


def _fake_run(tmp_path, max_grad_norm, norms):
    from drdo.run_record import RUN_FILE

    run_dir = tmp_path / f"run{max_grad_norm:g}"
    run_dir.mkdir()
    (run_dir / RUN_FILE).write_text(json.dumps({"run_id": "x", "complete": True,
                                                "config": {"stage": "drdo", "max_grad_norm": max_grad_norm}}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "grad_norm": n}) + "\n"
                                                   for i, n in enumerate(norms)))
    return str(run_dir)


def test_steps_clipped_counts_against_each_runs_own_limit(tmp_path):
    from drdo.training.metrics import training_summary

    norms = [0.5, 2.0, 5.0, 20.0]
    off, default, ten = (training_summary(_fake_run(tmp_path, limit, norms)) for limit in (0.0, 1.0, 10.0))
    assert (off["clipped_share"], default["clipped_share"], ten["clipped_share"]) == (0.0, 0.75, 0.25)
    from drdo.demo.report import clipped_text

    assert (off["max_grad_norm"], ten["max_grad_norm"]) == (0.0, 10.0)
    assert off["grad_norm_mean"] == pytest.approx(6.875)
    assert clipped_text(off) == "off" and clipped_text(ten) == "25% (at 10)"


def test_report_time_says_when_and_what_was_reused():
    from drdo.demo.readme_table import readme_block
    from drdo.demo.report import run_time_text

    fresh = {"started_at": "2026-12-06T07:00:00+00:00", "elapsed_s": 684.2, "cpu_count": 2,
             "training_runs": {"trained": 54, "reused": 0}}
    cached = dict(fresh, elapsed_s=51.0, training_runs={"trained": 0, "reused": 54})
    assert run_time_text(fresh) == ("started 2026-12-06T07:00:00+00:00, 684 s wall clock on a machine with 2 CPU "
                                    "cores, all 54 training runs trained in this run")
    assert "51 s" in run_time_text(cached) and "54 of 54 training runs reused" in run_time_text(cached)
    assert "not the time of a whole demo" in run_time_text(cached)
    undated = {"elapsed_s": 51.0, "cpu_count": 2}
    assert "51" not in run_time_text(undated) and "no time is given" in run_time_text(undated)
    report = json.loads((pathlib_root() / "docs" / "demo" / "report.json").read_text())
    report["settings"].update(cached)
    assert "54 of 54 training runs reused" in readme_block(report).splitlines()[0]


def pathlib_root():
    import pathlib

    return pathlib.Path(__file__).resolve().parents[1]


def test_variant_training_options_end_to_end_and_a_rerun_reports_its_reuse(tmp_path):
    """A test-sized run: the no-clip variant's run records max_grad_norm 0 and reports no clipped step,
    the short variant trains its own steps at its own lr; a re-run reuses every training run and says so."""
    from drdo.cli import main

    v = _variants_file(tmp_path, "- name: no-clip\n  max_grad_norm: 0\n- name: short\n  steps: 2\n  lrs: [2.0e-4]\n")
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--noise", "0", "--steps", "3", "--sft-steps", "4", "--oracle-steps", "2",
            "--train-pairs", "16", "--batch-size", "16", "--val-prompts", "4", "--test-prompts", "4",
            "--max-new-tokens", "4", "--methods", "dpo", "--variants", v, "--workers", "1", "--output-dir", str(out),
            "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    work = out / "work" / "seed0" / "noise0"
    no_clip, short = (json.loads(next(work.glob(f"{n}_lr*")).joinpath("run.json").read_text())["config"]
                      for n in ("no-clip", "short"))
    assert no_clip["max_grad_norm"] == 0.0 and no_clip["max_steps"] == 3
    assert short["max_grad_norm"] == 1.0 and short["max_steps"] == 2 and short["lr"] == pytest.approx(2e-4 * 100 / 2)
    training = report["methods"]["no-clip"]["0.0"]["training"]
    assert training["max_grad_norm"] == 0.0 and training["clipped_share"] == 0.0
    assert report["methods"]["dpo"]["0.0"]["training"]["max_grad_norm"] == 1.0
    runs = report["settings"]["training_runs"]
    assert runs == {"trained": 1 + 3 + 3, "reused": 0} and report["settings"]["started_at"][:2] == "20"
    md = (out / "report.md").read_text()
    assert "| 0 | DRDO variant `no-clip` |" in md and "| off |" in md and "all 7 training runs trained" in md
    assert main(argv) == 0  # the same settings again: every training run is reused, and the report says so
    again = json.loads((out / "report.json").read_text())["settings"]
    assert again["training_runs"] == {"trained": 0, "reused": 7}
    assert "7 of 7 training runs reused" in (out / "report.md").read_text()
