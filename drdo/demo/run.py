"""``drdo demo``: a controlled noisy-preference study with a KNOWN true reward, on a CPU.

For every seed and every label-noise level (flip rate):

1. data: pairs of the letters task (:mod:`drdo.demo.synthetic`) labelled by
   Bradley-Terry on the true reward r_true, each label flipped with probability
   = the noise level (the same candidate pairs at every noise level of a seed);
2. SFT: the tiny model fine-tuned on the chosen responses of THESE (noisy) labels;
3. Oracle (paper Eq. 5, stage "oracle") trained on the same noisy pairs from the
   SFT model with a fresh reward head; K = 3 Oracles that differ in the head seed
   (and data order) score every pair offline; Oracle 1 is the one DRDO distils;
4. reference log-probs of the SFT model (for DPO / e-DPO);
5. students from the same SFT start, same steps and batch: DRDO (Eq. 6), DPO,
   e-DPO (pessimistic, K = 3) (``--methods`` picks which), and any named DRDO
   variants of ``--variants FILE.yaml`` (:mod:`drdo.demo.variants`); per student
   the lr of its method's grid with the best mean r_true of samples on
   validation prompts is kept. DRDO students log the diagnostics of
   :mod:`drdo.training.diagnostics` every ``--diagnostics-every`` steps;
   the report summarises them;
6. one sample per held-out test prompt from SFT and each selected student,
   judged by r_true (the truth) and, beside it, by Oracle 1 (to show how an
   Oracle-judged evaluation differs).

Learning rates: each method has a grid (``--lrs``, or ``--drdo-lrs`` / ``--dpo-lrs`` /
``--edpo-lrs``) given for ``--lr-ref-steps`` = 100 optimizer steps; a run of S steps uses
every rate times 100 / S (default grid {3e-4, 1e-3} at 100 steps: {1e-4, 3.3e-4} at 300
steps), so a longer run keeps the product of rate and steps and does not handicap a method
whose best rate falls as it trains longer. The rate chosen per cell is in the report.

Writes under ``--output-dir`` (default ``runs/demo``, with ``--quick`` ``runs/demo-quick``):
settings.json first, then work/ (data, checkpoints, generations), report.md, report.json and
report.png. Every value, and the config of every training run, is checked before anything is
written; a directory holding other files, or a demo of other settings, is refused unless
``--overwrite``. A re-run with the same settings skips the training runs that finished.
Everything is deterministic given the seeds (up to floating-point non-determinism of
multi-threaded CPU kernels).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

from drdo.atomic import write_text
from drdo.config import ConfigError, TrainConfig, add_config_flags, derived_option, option
from drdo.losses import DPOSpec
from drdo.process_settings import disable_library_progress_bars, quiet_libraries, torch_threads
from drdo.training.metrics import training_summary

__all__ = ["add_arguments", "run_demo", "DemoSettings", "settings_from_args"]

METHODS = ("drdo", "dpo", "edpo")
K_ORACLES = 3
#: Token lengths of every stage: prompts of the letters task fit in 16 tokens, pairs in 64.
MAX_PROMPT_LENGTH, MAX_LENGTH = 16, 64
#: Largest --max-new-tokens: the students learn responses of at most MAX_LENGTH - MAX_PROMPT_LENGTH tokens.
MAX_NEW_TOKENS = 256
SETTINGS_FILE = "settings.json"
#: Settings that do not change the demo's results: they may differ between runs into one directory.
RUNTIME_ONLY = frozenset({"output_dir", "overwrite", "progress", "threads", "workers"})


def _comma_list(text: str) -> list[str]:
    """'dpo,edpo' -> ['dpo', 'edpo'] (the --methods flag)."""
    return [part.strip() for part in text.split(",") if part.strip()]


_PER_SEED = "per seed and noise level"


@dataclass
class DemoSettings:
    """Every knob of the demo: default, help and flag declared once (see :func:`drdo.config.option`).

    Flags left out on the command line take the default here, or with ``--quick`` the value in
    :data:`QUICK`.
    """

    model: str = derived_option(TrainConfig, "model", help="base model of every stage: 'tiny' (built in, no "
                                "download), an HF dir or hub id (it must handle raw byte-like text prompts such as "
                                "'dkm:')")
    seeds: list = option([0, 1, 2], "number of seeds 0..N-1", type=int, metavar="N")
    noise: list = option([0.0, 0.3], "label-noise levels = flip rates in [0, 0.5]", type=float, nargs="+",
                         metavar="FLIP")
    bt_temperature: float = option(
        0.05, "Bradley-Terry temperature of the labels (0: the better response always wins before flips)")
    steps: int = option(100, "optimizer steps of every student")
    sft_steps: int = option(400, "SFT steps")
    oracle_steps: int = option(100, "steps of each Oracle")
    batch_size: int = derived_option(TrainConfig, "batch_size", default=32,
                                     help="pairs per optimizer step (every stage)")
    lrs: list = option([3e-4, 1e-3], "learning-rate grid of every method, given at --lr-ref-steps steps (a run of "
                                     "S steps uses lr x lr_ref_steps / S)", type=float, nargs="+")
    drdo_lrs: list | None = option(None, "DRDO's grid (its variants' too), as --lrs (default: --lrs)", type=float,
                                   nargs="+")
    dpo_lrs: list | None = option(None, "DPO's grid, as --lrs (default: --lrs)", type=float, nargs="+")
    edpo_lrs: list | None = option(None, "e-DPO's grid, as --lrs (default: --lrs)", type=float, nargs="+")
    lr_ref_steps: int = option(100, "step count at which the lr grids are given")
    methods: list = option(list(METHODS), "the demo's own students to run: drdo (the default DRDO), dpo, edpo",
                           type=_comma_list, metavar="M1,M2")
    variants: str | None = option(None, "YAML list of named DRDO variants trained beside the methods "
                                        "(drdo/demo/variants.py)", type=str, metavar="FILE.yaml")
    diagnostics_every: int = derived_option(TrainConfig, "diagnostics_every", default=10)
    sft_lr: float = option(5e-3, "SFT learning rate")
    oracle_lr: float = option(1e-3, "Oracle learning rate")
    alpha: float = derived_option(TrainConfig, "alpha")
    gamma: float = derived_option(TrainConfig, "gamma")
    beta: float | None = derived_option(TrainConfig, "beta", help=f"DPO / e-DPO beta (default: {DPOSpec.beta}; the "
                                                                  "DRDO variants set their own)")
    oracle_alpha: float = derived_option(TrainConfig, "oracle_alpha")
    train_pairs: int = option(1024, f"training pairs {_PER_SEED}")
    val_prompts: int = option(64, "validation prompts for the lr choice")
    test_prompts: int = option(256, "held-out test prompts")
    max_new_tokens: int = option(24, f"generation length (at most {MAX_NEW_TOKENS})")
    temperature: float = option(1.0, "sampling temperature of the judged samples")
    backend: str = derived_option(TrainConfig, "backend")
    threads: int = option(1, "torch CPU threads (the tiny model gains nothing from more, and loses much when "
                             "cores are shared)")
    workers: int = option(2, "cells (seed x noise level) run in this many processes at once (each with "
                             "--threads threads)")
    output_dir: str = option("runs/demo", "where settings.json, report.md / report.json / report.png and work/ go "
                                          "(default: runs/demo; with --quick: runs/demo-quick)")
    overwrite: bool = option(False, "use --output-dir even if it holds other files or a demo of other settings")
    progress: bool = option(True, "show progress bars")
    quick: bool = option(False, "a fast smoke run: 1 seed, fewer steps, one lr", action="store_true")


#: The settings a demo passes to each training run's TrainConfig (where the stage uses them).
TRAINING_FIELDS = ("batch_size", "diagnostics_every", "alpha", "gamma", "beta", "oracle_alpha", "backend")

#: --quick: one seed, fewer steps, one lr (4e-4 at 100 steps = 1e-3 at 40), fewer prompts (both noise levels kept),
#: its own directory.
QUICK = dict(seeds=[0], steps=40, sft_steps=150, oracle_steps=40, lrs=[4e-4], train_pairs=512, val_prompts=32,
             test_prompts=96, output_dir="runs/demo-quick")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``drdo demo`` flags to ``parser``: one per :class:`DemoSettings` field, default None
    (= the field's default, or --quick's value), and ``--config``."""
    add_config_flags(parser, DemoSettings)
    parser.set_defaults(**{f.name: None for f in dataclasses.fields(DemoSettings) if f.name != "quick"})
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag values (flags override it)")


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """Resolve flags (None = the default, or --quick's value) into validated :class:`DemoSettings`."""
    s = DemoSettings(quick=bool(getattr(args, "quick", False)))
    if s.quick:
        for k, v in QUICK.items():
            setattr(s, k, list(v) if isinstance(v, list) else v)
    for f in dataclasses.fields(DemoSettings):
        value = getattr(args, f.name, None)
        if value is None or f.name == "quick":
            continue
        if f.name == "seeds":
            value = list(range(value))
        elif f.name == "noise":
            value = sorted({float(n) for n in value})
        setattr(s, f.name, list(value) if isinstance(value, list) else value)
    if s.beta is None:  # recorded in the settings and the report
        s.beta = DPOSpec().beta
    _validate(s)
    return s


def _validate(s: DemoSettings) -> None:
    """Raise ConfigError (a ValueError; `drdo` exits with status 2) on an unusable setting, before
    anything is written: every value, then the config of every training run (:func:`_check_stages`)."""
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if f.name in TRAINING_FIELDS:  # checked with every training run's config below
            continue
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"--{f.name.replace('_', '-')} must be finite, got {value}")
    if not s.seeds:
        raise ConfigError("--seeds must be >= 1")
    for n in s.noise:
        if not 0.0 <= n <= 0.5:
            raise ConfigError(f"--noise levels are flip rates in [0, 0.5], got {n}")
    for name in ("steps", "sft_steps", "oracle_steps", "batch_size", "train_pairs", "test_prompts", "val_prompts",
                 "max_new_tokens", "threads", "workers", "lr_ref_steps"):
        if getattr(s, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    for name in ("lrs", "drdo_lrs", "dpo_lrs", "edpo_lrs"):
        grid = getattr(s, name)
        if (grid is not None or name == "lrs") and (not grid or any(not (lr > 0 and math.isfinite(lr)) for lr in grid)):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive numbers, got {grid}")
    methods = [s.methods] if isinstance(s.methods, str) else list(s.methods)
    s.methods = [m for part in methods for m in _comma_list(str(part))]
    bad = [m for m in s.methods if m not in METHODS]
    if bad or len(set(s.methods)) != len(s.methods):
        raise ConfigError(f"--methods takes distinct names among {', '.join(METHODS)} (comma-separated), "
                          f"got {','.join(s.methods)}")
    if s.diagnostics_every < 0:
        raise ConfigError(f"--diagnostics-every must be >= 0, got {s.diagnostics_every}")
    if not students(s):
        raise ConfigError("nothing to train: --methods is empty and --variants gives no variant")
    if s.train_pairs < s.batch_size:
        raise ConfigError(f"--train-pairs ({s.train_pairs}) must be >= --batch-size ({s.batch_size})")
    if s.bt_temperature < 0:
        raise ConfigError(f"--bt-temperature must be >= 0, got {s.bt_temperature}")
    if s.max_new_tokens > MAX_NEW_TOKENS:
        raise ConfigError(f"--max-new-tokens must be <= {MAX_NEW_TOKENS} (the students learn responses of at most "
                          f"{MAX_LENGTH - MAX_PROMPT_LENGTH} tokens), got {s.max_new_tokens}")
    _check_stages(s)


def _check_stages(s: DemoSettings) -> None:
    """Resolve the config of every training run of the demo (SFT, Oracle, each student at each lr of
    its grid), so that a bad value is refused before the first run starts, naming the run."""
    from drdo.config import resolve

    runs = [("SFT", "sft", s.sft_lr, {}), ("the Oracles", "oracle", s.oracle_lr, {})]
    runs += [(f"the {name} student at lr {lr:g} (its grid x --lr-ref-steps / its steps)", stage, lr, overrides)
             for name, stage, overrides in students(s) for lr in lr_grid(s, stage, overrides)]
    for what, stage, lr, overrides in runs:
        try:
            resolve(_stage_config(s, stage, "data.jsonl", s.output_dir, model=s.model,
                                  steps=student_steps(s, overrides), lr=lr, seed=0, drdo=overrides))
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}") from None


def students(s: DemoSettings) -> list[tuple[str, str, dict]]:
    """(name, stage, DRDO overrides) of every student, in report order: DRDO, the variants, DPO, e-DPO."""
    from drdo.demo.variants import load_variants

    out = [("drdo", "drdo", {})] if "drdo" in s.methods else []
    out += [(v["name"], "drdo", {k: x for k, x in v.items() if k != "name"}) for v in load_variants(s.variants)]
    return out + [(m, m, {}) for m in ("dpo", "edpo") if m in s.methods]


def student_steps(s: DemoSettings, overrides: dict | None = None) -> int:
    """Optimizer steps of a student: its variant's ``steps``, else --steps."""
    return (overrides or {}).get("steps", s.steps)


def lr_grid(s: DemoSettings, stage: str, overrides: dict | None = None) -> list[float]:
    """The learning rates a ``stage`` student tries: its variant's ``lrs``, else its method's grid (or --lrs),
    x lr_ref_steps / its steps (:func:`student_steps`)."""
    base = (overrides or {}).get("lrs") or getattr(s, f"{stage}_lrs") or s.lrs
    return [lr * s.lr_ref_steps / student_steps(s, overrides) for lr in base]


# ----------------------------------------------------------------------------- data


def _split_prompts(seed: int, n_val: int, n_test: int, exclude: set) -> tuple[list[str], list[str]]:
    """Validation and test prompts of a seed: distinct, disjoint, and not among the training prompts."""
    from drdo.demo.synthetic import DEFAULT_TASK

    rng = random.Random(f"letters-heldout-{seed}")
    seen, out = set(exclude), []
    while len(out) < n_val + n_test:
        p = DEFAULT_TASK.sample_prompt(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out[:n_val], out[n_val:]


def _write_pairs(rows: list[dict], path: str) -> str:
    from drdo.jsonl import write_jsonl

    return write_jsonl(({k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows), path)


def _single_oracle_file(scored: str, path: str) -> str:
    """Copy of a K-Oracle scored file keeping only Oracle 1's scores (floats), for DRDO."""
    from drdo.jsonl import read_jsonl, write_jsonl

    rows = []
    for row in read_jsonl(scored):
        row = dict(row)
        row["oracle_chosen"] = float(row["oracle_chosen"][0])
        row["oracle_rejected"] = float(row["oracle_rejected"][0])
        rows.append(row)
    return write_jsonl(rows, path)


# ----------------------------------------------------------------------------- stages


def _stage_config(s: DemoSettings, stage: str, data: str, out: str, *, model: str, steps: int, lr: float, seed: int,
                  drdo: dict | None = None):
    """The TrainConfig of one stage; ``drdo``: overrides of a DRDO variant (see :mod:`drdo.demo.variants`:
    its loss keys and ``max_grad_norm`` go into the config; its ``lrs`` and ``steps`` arrive as ``lr`` and
    ``steps``)."""
    from drdo.config import fields_for
    from drdo.demo.variants import spec_overrides

    stage_fields = {f.name for f in fields_for(TrainConfig, (stage,))}
    shared = {name: getattr(s, name) for name in TRAINING_FIELDS if name in stage_fields}
    if stage == "drdo":
        shared.pop("beta", None)  # the demo's --beta is DPO's; a DRDO variant sets its own
        shared.update(spec_overrides(drdo or {}))
        if "max_grad_norm" in (drdo or {}):
            shared["max_grad_norm"] = drdo["max_grad_norm"]
    return TrainConfig(
        stage=stage, model=model, data=data, output_dir=out, overwrite=s.overwrite, max_steps=steps,
        micro_batch_size=s.batch_size, lr=lr, warmup_ratio=0.1, max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH, seed=seed, progress=s.progress, plot=False, **shared,
    )


def _train(s: DemoSettings, stage: str, data: str, out: str, tally: dict, **kwargs) -> str:
    """Train one stage (:func:`_stage_config`); a run already complete in ``out`` is kept. Counts the
    run in ``tally["trained"]`` or, when it was kept, ``tally["reused"]``."""
    from drdo.training.loop import train

    result = train(_stage_config(s, stage, data, out, **kwargs))
    if result.get("status") not in ("completed", "finished"):
        raise RuntimeError(f"{stage} training in {out} did not complete: {result.get('status')}")
    tally["reused" if result["status"] == "finished" else "trained"] += 1
    return out


def _generate(s: DemoSettings, policy: str, prompts: list[str], seed: int) -> list[str]:
    from drdo.pipeline.evaluate import generate

    return generate(policy, prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=seed,
                    batch_size=64, max_prompt_length=MAX_PROMPT_LENGTH, device="auto", progress=s.progress)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = _mean(a), _mean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else 0.0


def _stages_per_cell(s: DemoSettings) -> int:
    """Ticks of the outer progress bar per cell (see :func:`run_cell`)."""
    return 1 + 1 + K_ORACLES + 1 + sum(len(lr_grid(s, stage, o)) for _, stage, o in students(s)) + 1


class _Stages:
    """Progress of one cell: ``step(text)`` names the running stage, ``done()`` ticks it off.

    In the main process it drives the outer tqdm bar; in a worker process it sends
    ("step"|"done", text) messages to the main process through ``queue``.
    """

    def __init__(self, bar=None, queue=None):
        self.bar, self.queue = bar, queue

    def step(self, text: str) -> None:
        if self.queue is not None:
            self.queue.put(("step", text))
        elif self.bar is not None:
            self.bar.set_postfix_str(text)

    def done(self) -> None:
        if self.queue is not None:
            self.queue.put(("done", ""))
        elif self.bar is not None:
            self.bar.update(1)


def _oracle_data(s: DemoSettings, work: str, sft: str, oracles: list[str], pairs: str) -> dict[str, str]:
    """Score the pairs with the K Oracles (offline) and add the SFT reference log-probs.

    Returns the training file of each method: DRDO gets Oracle 1's scores (floats), DPO and
    e-DPO the K-member lists plus ref log-probs (DPO ignores the Oracle scores)."""
    from drdo.config import RefLogpsConfig, ScoreConfig
    from drdo.pipeline.reflogps import compute_reference_logps
    from drdo.pipeline.scoring import score_dataset

    common = dict(batch_size=128, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, progress=s.progress)
    scored = score_dataset(ScoreConfig(reward_models=oracles, data=pairs, output=os.path.join(work, "scored_k3.jsonl"),
                                       **common))
    with_ref = compute_reference_logps(RefLogpsConfig(model=sft, data=scored, backend=s.backend,
                                                      output=os.path.join(work, "scored_k3_ref.jsonl"), **common))
    single = _single_oracle_file(scored, os.path.join(work, "scored_oracle1.jsonl"))
    return {"drdo": single, "dpo": with_ref, "edpo": with_ref}


def _sweep(s: DemoSettings, student: tuple, data: str, start: str, work: str, seed: int, val_prompts: list[str],
           stages: "_Stages", tag: str, tally: dict) -> tuple[str, dict]:
    """Train a student (name, stage, overrides) once per lr of its grid; keep the lr whose samples on the
    validation prompts have the highest mean r_true. Returns (selected policy dir,
    {"selected_lr", "sweep": {lr: value}, "training": summary of its metrics.jsonl})."""
    from drdo.demo.synthetic import true_rewards

    name, stage, overrides = student
    lrs = lr_grid(s, stage, overrides)
    sweep, best = {}, None
    for lr in lrs:
        stages.step(f"{tag}: {name} lr {lr:g}")
        out = _train(s, stage, data, os.path.join(work, f"{name}_lr{lr:g}"), tally, model=start,
                     steps=student_steps(s, overrides), lr=lr, seed=seed, drdo=overrides)
        val = 0.0
        if len(lrs) > 1:  # a sweep of one needs no validation
            val = _mean(true_rewards(val_prompts, _generate(s, out, val_prompts, seed=seed + 7)))
            sweep[f"{lr:g}"] = val
        if best is None or val > best[0]:
            best = (val, lr, out)
        stages.done()
    return best[2], {"selected_lr": best[1], "sweep": sweep, "training": training_summary(best[2])}


def _judge_test(s: DemoSettings, policies: dict[str, str], oracle: str, prompts: list[str], seed: int,
                work: str, results: dict) -> float:
    """Sample each policy on the test prompts; score with r_true and with the Oracle.

    Fills results[name]["true" | "oracle"] (per-prompt scores), writes test_generations.jsonl
    and returns the Pearson correlation of Oracle and true scores over all samples."""
    from drdo.demo.synthetic import true_rewards
    from drdo.jsonl import write_jsonl
    from drdo.pipeline.evaluate import load_judge

    judge = load_judge(oracle, device="auto")
    generations = {}
    for name, path in policies.items():
        generations[name] = _generate(s, path, prompts, seed=seed + 11)
        results[name]["true"] = true_rewards(prompts, generations[name])
        results[name]["oracle"] = [float(v) for v in judge(prompts, generations[name])]
    write_jsonl(({"prompt": p, **{m: {"response": generations[m][i], "true": results[m]["true"][i],
                                      "oracle": results[m]["oracle"][i]} for m in policies}}
                 for i, p in enumerate(prompts)), os.path.join(work, "test_generations.jsonl"))
    return _pearson([v for m in policies for v in results[m]["true"]],
                    [v for m in policies for v in results[m]["oracle"]])


def run_cell(s: DemoSettings, seed: int, noise: float, work: str, stages: _Stages) -> dict:
    """The whole pipeline for one (seed, noise level); returns the cell result of :mod:`drdo.demo.report`."""
    from drdo.demo.bradley_terry import build_preference_pairs

    tag = f"seed {seed} noise {noise:g}"
    os.makedirs(work, exist_ok=True)
    stages.step(f"{tag}: data")
    rows = build_preference_pairs(s.train_pairs, seed=seed, temperature=s.bt_temperature, flip_rate=noise)
    pairs = _write_pairs(rows, os.path.join(work, "train.jsonl"))
    val_prompts, test_prompts = _split_prompts(seed, s.val_prompts, s.test_prompts, {r["prompt"] for r in rows})
    stages.done()

    tally = {"trained": 0, "reused": 0}
    stages.step(f"{tag}: SFT")
    sft = _train(s, "sft", pairs, os.path.join(work, "sft"), tally, model=s.model, steps=s.sft_steps, lr=s.sft_lr,
                 seed=seed)
    stages.done()

    oracles = []
    for k in range(K_ORACLES):
        stages.step(f"{tag}: Oracle {k + 1}/{K_ORACLES}")
        oracles.append(_train(s, "oracle", pairs, os.path.join(work, f"oracle{k + 1}"), tally, model=sft,
                              steps=s.oracle_steps, lr=s.oracle_lr, seed=1000 * seed + k))
        stages.done()

    stages.step(f"{tag}: Oracle scores + reference log-probs")
    data = _oracle_data(s, work, sft, oracles, pairs)
    stages.done()

    policies, results = {"sft": sft}, {"sft": {"selected_lr": None, "sweep": {}}}
    for student in students(s):
        name, stage, _ = student
        policies[name], results[name] = _sweep(s, student, data[stage], sft, work, seed, val_prompts, stages,
                                               tag, tally)

    stages.step(f"{tag}: test generations")
    corr = _judge_test(s, policies, oracles[0], test_prompts, seed, work, results)
    stages.done()
    return {"seed": seed, "noise": noise, "methods": results, "oracle_true_corr": corr,
            "label_agreement": _mean([float(r["agrees"]) for r in rows]), "training_runs": tally}


def _run_serial(s: DemoSettings, jobs: list, bar) -> list[dict]:
    stages = _Stages(bar=bar)
    return [run_cell(s, seed, noise, work, stages) for seed, noise, work in jobs]


_WORKER_QUEUE = None


def _init_worker(queue, threads: int) -> None:
    """Worker process set-up: the progress queue, torch threads, quiet library bars."""
    global _WORKER_QUEUE
    import torch

    _WORKER_QUEUE = queue
    torch.set_num_threads(threads)
    disable_library_progress_bars()


def _cell_worker(settings: dict, seed: int, noise: float, work: str) -> dict:
    s = DemoSettings(**settings)
    s.progress = False  # one outer bar in the main process; per-stage bars would interleave
    return run_cell(s, seed, noise, work, _Stages(queue=_WORKER_QUEUE))


def _run_parallel(s: DemoSettings, jobs: list, bar) -> list[dict]:
    """Run the cells in ``s.workers`` spawned processes; the main process draws the progress bar."""
    import multiprocessing as mp
    import queue as queue_module
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    workers = min(s.workers, len(jobs))
    with ctx.Manager() as manager:
        messages = manager.Queue()
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(messages, s.threads)) as pool:
            futures = [pool.submit(_cell_worker, asdict(s), seed, noise, work) for seed, noise, work in jobs]
            while not all(f.done() for f in futures):
                try:
                    kind, text = messages.get(timeout=0.5)
                except queue_module.Empty:
                    continue
                if bar is not None:
                    bar.update(1) if kind == "done" else bar.set_postfix_str(text)
            return [f.result() for f in futures]  # re-raises a worker's exception


def _identity(s: DemoSettings) -> dict:
    """The settings that decide the demo's results, as JSON values (the variants' contents included)."""
    values = {k: v for k, v in asdict(s).items() if k not in RUNTIME_ONLY}
    values["variant_specs"] = [[name, stage, overrides] for name, stage, overrides in students(s)]
    return json.loads(json.dumps(values))


def _read_settings(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _claim_output_dir(s: DemoSettings) -> None:
    """Refuse an output directory that holds other files or a demo of other settings (unless
    --overwrite) before anything is written; then record this demo's settings in it."""
    out, identity = s.output_dir, _identity(s)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output-dir {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not s.overwrite:
        saved = _read_settings(os.path.join(out, SETTINGS_FILE))
        if saved is None:
            raise ConfigError(f"--output-dir {out} is not empty and holds no drdo demo; choose another directory "
                              "or pass --overwrite")
        diffs = [k for k, v in identity.items() if saved.get(k) != v]
        if diffs:
            raise ConfigError(f"--output-dir {out} holds a demo of other settings (differing: {', '.join(diffs)}); "
                              "choose another directory or pass --overwrite")
    write_text(os.path.join(out, SETTINGS_FILE), json.dumps(identity, indent=2))


def run_demo(s: DemoSettings) -> int:
    """Run the demo with settings (:func:`settings_from_args`); writes the report; returns 0."""
    from drdo.demo.report import plot_report, summarize, write_report_json, write_report_md

    start, started_at = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)
    _claim_output_dir(s)
    jobs = [(seed, noise, os.path.join(s.output_dir, "work", f"seed{seed}", f"noise{noise:g}"))
            for seed in s.seeds for noise in s.noise]
    bar = None
    if s.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=_stages_per_cell(s) * len(jobs), desc="drdo demo", dynamic_ncols=True)
    try:
        with torch_threads(s.threads), quiet_libraries():
            if s.workers > 1 and len(jobs) > 1:
                cells = _run_parallel(s, jobs, bar)
            else:
                cells = _run_serial(s, jobs, bar)
    finally:
        if bar is not None:
            bar.close()
    settings = asdict(s)
    settings["students"] = [[name, stage] for name, stage, _ in students(s)]
    settings["variant_specs"] = [{"name": name, **o} for name, stage, o in students(s) if o or name != stage]
    settings["lr_grids"] = {stage: lr_grid(s, stage) for stage in METHODS}
    settings["started_at"] = started_at.isoformat(timespec="seconds")
    settings["elapsed_s"] = time.perf_counter() - start
    settings["cpu_count"] = os.cpu_count()
    settings["training_runs"] = {k: sum(c["training_runs"][k] for c in cells) for k in ("trained", "reused")}
    report = summarize(cells, settings)
    write_text(os.path.join(s.output_dir, "cells.json"), json.dumps(cells))
    write_report_json(report, os.path.join(s.output_dir, "report.json"))
    plot_report(report, os.path.join(s.output_dir, "report.png"))
    md = write_report_md(report, os.path.join(s.output_dir, "report.md"), plot_name="report.png")
    print(open(md, encoding="utf-8").read())
    print(f"drdo demo: wrote {md}, report.json and report.png in {settings['elapsed_s']:.0f} s")
    return 0
