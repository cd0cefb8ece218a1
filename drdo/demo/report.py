"""Aggregate the demo's per-seed results and write report.json, report.md and the plot.

Input: a list of "cell" results, one per (seed, noise level), each
``{"seed": int, "noise": float, "methods": {name: {"true": [float], "oracle": [float],
"selected_lr": float | None, "sweep": {lr: val_true_mean}, "training": {...}}}, "label_agreement": float,
"oracle_true_corr": float}`` where ``true`` / ``oracle`` are the per-prompt scores
of the method's generations on the test prompts (same prompts, same order, for
every method of the cell) and ``training`` the summary of the selected run's
metrics.jsonl (:func:`drdo.training.metrics.training_summary`). Methods are "sft" and the
students that ran: "drdo", "dpo", "edpo" and DRDO variants under their own names
(``settings["students"]`` lists [name, stage] pairs; without it, the three methods).

Statistics (per method and noise level):
* true_reward_mean: mean over seeds of the per-seed mean r_true;
* ci95: half-width of the 95% interval of that mean. With >= 2 seeds it is
  Student-t over the per-seed means (seed-to-seed variation: data, init, sampling);
  with 1 seed, 1.96 x the standard error over test prompts (sampling only);
* oracle_reward_mean: the same mean of the Oracle's scores of the same generations;
* win_rate_vs_sft: share of test prompts where the method's response has a higher
  r_true than SFT's (ties 1/2), averaged over seeds; oracle_win_rate_vs_sft: the
  same judged by the Oracle;
* training: the mean over seeds of each entry of the selected runs' training summaries
  (grad_norm_mean, clipped_share, and for DRDO students the diag_* readings).

Paired differences (``comparisons[noise]["A_minus_B"]``): per seed, mean true reward of A
minus that of B on the same test prompts; their mean, per-seed values and 95% interval,
for every DRDO student against DPO, e-DPO, SFT and the default DRDO, and DPO / e-DPO
against SFT (where both ran).
"""
from __future__ import annotations

import json
import math

from drdo.atomic import save_figure, write_text
from drdo.losses import DRDOSpec

__all__ = ["METHODS", "LABELS", "ci95_halfwidth", "summarize", "write_report_json", "write_report_md", "plot_report",
           "noise_key", "students", "label", "inflation_text", "clipped_text", "run_time_text"]

METHODS = ("sft", "drdo", "dpo", "edpo")
LABELS = {"sft": "SFT (start)", "drdo": "DRDO", "dpo": "DPO", "edpo": "e-DPO (K=3)"}
#: diag_* readings shown in report.md: (key, column title, format)
DIAG_COLUMNS = (
    ("diag_focal_median", "median (1-p_w)^gamma", ".1e"),
    ("diag_focal_active", "pairs with weight > 0.01", ".0%"),
    ("diag_margin_len_corr", "corr(z_w - z_l, n_w - n_l)", "+.2f"),
    ("diag_log1mexp_zl", "mean log(1 - e^z_l)", ".1e"),
    ("diag_distill_share", "distill share of LM grad norm", ".2f"),
    ("diag_grad_cos", "cos(distill, pref) grad", "+.2f"),
)


def students(report_or_settings: dict) -> list[tuple[str, str]]:
    """[(name, stage)] of the students of a report (or its settings), in report order."""
    settings = report_or_settings.get("settings", report_or_settings)
    return [tuple(x) for x in settings.get("students", [(m, m) for m in METHODS[1:]])]


def label(report: dict, method: str) -> str:
    return LABELS.get(method, f"DRDO variant `{method}`")
#: two-sided 95% Student-t quantiles for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def noise_key(noise: float) -> str:
    """The report.json key of a noise level: ``str(float(noise))`` ("0.0", "0.3")."""
    return str(float(noise))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ci95_halfwidth(values: list[float]) -> float:
    """Half-width of the 95% Student-t interval of the mean of ``values`` (needs >= 2 values)."""
    n = len(values)
    if n < 2:
        raise ValueError("a confidence interval over values needs at least 2 of them")
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return t * _sd(values) / math.sqrt(n)


def _win_rate(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        raise ValueError("win rate needs two equally long, non-empty score lists")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def _method_stats(cells: list[dict], method: str) -> dict:
    """Statistics of one method over the cells (seeds) of one noise level."""
    true_means = [_mean(c["methods"][method]["true"]) for c in cells]
    oracle_means = [_mean(c["methods"][method]["oracle"]) for c in cells]
    if len(cells) >= 2:
        ci = ci95_halfwidth(true_means)
    else:
        scores = cells[0]["methods"][method]["true"]
        ci = 1.96 * _sd(scores) / math.sqrt(len(scores))
    wins = [_win_rate(c["methods"][method]["true"], c["methods"]["sft"]["true"]) for c in cells]
    oracle_wins = [_win_rate(c["methods"][method]["oracle"], c["methods"]["sft"]["oracle"]) for c in cells]
    return {
        "true_reward_mean": _mean(true_means),
        "ci95": ci,
        "oracle_reward_mean": _mean(oracle_means),
        "win_rate_vs_sft": _mean(wins),
        "oracle_win_rate_vs_sft": _mean(oracle_wins),
        "true_reward_per_seed": true_means,
        "selected_lr_per_seed": [c["methods"][method].get("selected_lr") for c in cells],
        "training": _mean_dicts([c["methods"][method].get("training") or {} for c in cells]),
    }


def _mean_dicts(dicts: list[dict]) -> dict:
    """Key-wise mean over the dicts that hold the key."""
    keys = sorted({k for d in dicts for k in d})
    return {k: _mean([d[k] for d in dicts if k in d]) for k in keys}


def _paired_diff(cells: list[dict], a: str, b: str) -> dict:
    """Mean over seeds of (true reward of a - of b), with its 95% interval (t over seeds; 1 seed: over prompts)."""
    diffs = [_mean(c["methods"][a]["true"]) - _mean(c["methods"][b]["true"]) for c in cells]
    if len(cells) >= 2:
        ci = ci95_halfwidth(diffs)
    else:
        per_prompt = [x - y for x, y in zip(cells[0]["methods"][a]["true"], cells[0]["methods"][b]["true"])]
        ci = 1.96 * _sd(per_prompt) / math.sqrt(len(per_prompt))
    return {"mean": _mean(diffs), "ci95": ci, "per_seed": diffs}


def summarize(cells: list[dict], settings: dict) -> dict:
    """The report.json object (see the module docstring) from per-(seed, noise) cell results."""
    if not cells:
        raise ValueError("no results to summarize")
    noise_levels = sorted({float(c["noise"]) for c in cells})
    by_noise = {n: sorted([c for c in cells if float(c["noise"]) == n], key=lambda c: c["seed"]) for n in noise_levels}
    order = ["sft"] + [name for name, _ in students(settings)]
    methods = {m: {noise_key(n): _method_stats(by_noise[n], m) for n in noise_levels} for m in order}
    comparisons = {noise_key(n): {f"{a}_minus_{b}": _paired_diff(by_noise[n], a, b) for a, b in _pairs(settings)}
                   for n in noise_levels}
    sweep = {
        m: {noise_key(n): [{"seed": c["seed"], "val_true_reward": c["methods"][m].get("sweep", {})}
                           for c in by_noise[n]] for n in noise_levels}
        for m in order[1:]
    }
    diagnostics = {
        noise_key(n): {
            "label_agreement_with_r_true": _mean([c["label_agreement"] for c in by_noise[n]]),
            "oracle_true_correlation": _mean([c["oracle_true_corr"] for c in by_noise[n]]),
            "seeds": [c["seed"] for c in by_noise[n]],
        }
        for n in noise_levels
    }
    return {"noise_levels": noise_levels, "methods": methods, "comparisons": comparisons, "sweep": sweep,
            "diagnostics": diagnostics, "settings": settings}


def _pairs(settings: dict) -> list[tuple[str, str]]:
    """(a, b) of every paired difference a - b the report holds."""
    names = [name for name, _ in students(settings)]
    drdo_like = [name for name, stage in students(settings) if stage == "drdo"]
    pairs = [(m, b) for m in drdo_like for b in ("dpo", "edpo", "sft", "drdo") if b in names + ["sft"] and b != m]
    return pairs + [(m, "sft") for m in ("dpo", "edpo") if m in names]


def write_report_json(report: dict, path: str) -> str:
    return write_text(path, json.dumps(report, indent=2))


def _fmt_lr(lrs: list) -> str:
    uniq = sorted({lr for lr in lrs if lr is not None})
    return ", ".join(f"{lr:.3g}" for lr in uniq) if uniq else "-"


def _interval(d: dict) -> str:
    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    return f"{d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _verdict(report: dict, key: str, method: str = "drdo") -> str | None:
    """One honest sentence on a DRDO student vs DPO and e-DPO at one noise level (None if neither ran)."""
    parts = []
    name = label(report, method)
    for other in ("dpo", "edpo"):
        d = report["comparisons"][key].get(f"{method}_minus_{other}")
        if d is None:
            continue
        lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
        if lo > 0:
            parts.append(f"{name} beats {LABELS[other]} (difference {_interval(d)})")
        elif hi < 0:
            parts.append(f"{name} does NOT beat {LABELS[other]}: it is worse (difference {_interval(d)})")
        else:
            parts.append(f"{name} does not beat {LABELS[other]} significantly (difference {_interval(d)} "
                         f"includes 0)")
    return "; ".join(parts) + "." if parts else None


def _closest_text(report: dict, key: str, drdo_like: list[str]) -> str | None:
    """Which DRDO student comes closest to DPO (else e-DPO) at one noise level, when there are several."""
    comp = report["comparisons"][key]
    other = next((b for b in ("dpo", "edpo") if any(f"{m}_minus_{b}" in comp for m in drdo_like)), None)
    if other is None or len(drdo_like) < 2:
        return None
    best = max(drdo_like, key=lambda m: comp[f"{m}_minus_{other}"]["mean"])
    return (f"Of the {len(drdo_like)} DRDO students, {label(report, best)} comes closest to {LABELS[other]} "
            f"(difference {_interval(comp[f'{best}_minus_{other}'])}); every student's differences are in the "
            f"paired-differences table below.")


def _main_table(report: dict, order: list[str]) -> list[str]:
    lines = [
        "| noise (flip rate) | method | true reward (95% CI) | win rate vs SFT (true) | Oracle-judged reward | "
        "win rate vs SFT (Oracle-judged) | lr chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in report["noise_levels"]:
        key = noise_key(n)
        for m in order:
            r = report["methods"][m][key]
            lr = "-" if m == "sft" else _fmt_lr(r["selected_lr_per_seed"])
            win = "-" if m == "sft" else f"{r['win_rate_vs_sft']:.1%}"
            owin = "-" if m == "sft" else f"{r['oracle_win_rate_vs_sft']:.1%}"
            lines.append(f"| {n:g} | {label(report, m)} | {r['true_reward_mean']:.3f} ± {r['ci95']:.3f} | {win} | "
                         f"{r['oracle_reward_mean']:+.3f} | {owin} | {lr} |")
    return lines


def _variants_text(report: dict) -> list[str]:
    from drdo.demo.variants import describe

    specs = report["settings"].get("variant_specs") or []
    if not specs:
        return []
    s = report["settings"]
    lines = ["", "## DRDO variants", "",
             f"Each variant is the demo's DRDO (alpha {s['alpha']:g}, gamma {s['gamma']:g}, reward head, "
             f"reward_grad backbone, summed log-probs) with these changes, trained from "
             f"the same SFT start on the same Oracle scores with DRDO's lr grid and {s['steps']} steps unless it sets "
             f"its own `lrs` (given at {s.get('lr_ref_steps', 100)} steps) or `steps`:", ""]
    lines += [f"- `{spec['name']}`: {describe(spec)}" for spec in specs]
    return lines


def _differences_table(report: dict) -> list[str]:
    """Every paired difference of the report, one row per (noise, DRDO student)."""
    drdo_like = [name for name, stage in students(report) if stage == "drdo"]
    if not drdo_like:
        return []
    cols = [b for b in ("dpo", "edpo", "sft", "drdo") if any(
        f"{m}_minus_{b}" in report["comparisons"][noise_key(n)] for m in drdo_like for n in report["noise_levels"])]
    lines = ["", "## Paired differences in true reward (same test prompts; mean over seeds, 95% CI)", "",
             "| noise | method | " + " | ".join(f"minus {LABELS[b]}" for b in cols) + " | per seed, minus "
             + (LABELS[cols[0]] if cols else "-") + " |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for n in report["noise_levels"]:
        comp = report["comparisons"][noise_key(n)]
        for m in drdo_like:
            cells = [_interval(comp[f"{m}_minus_{b}"]) if f"{m}_minus_{b}" in comp else "-" for b in cols]
            first = comp.get(f"{m}_minus_{cols[0]}")
            per_seed = ", ".join(f"{v:+.3f}" for v in first["per_seed"]) if first else "-"
            lines.append(f"| {n:g} | {label(report, m)} | " + " | ".join(cells) + f" | {per_seed} |")
    return lines


def _diagnostics_table(report: dict) -> list[str]:
    """Training readings of the selected runs: why DRDO moves or does not."""
    names = [name for name, _ in students(report)]
    lines = ["", "## Why DRDO moves or does not (training readings of the selected runs)", "",
             f"Means over the logged steps (every {report['settings'].get('diagnostics_every', '?')} steps) and "
             "over seeds; `drdo/training/diagnostics.py` defines each reading. Gradient norms are those of "
             "the batch-mean loss on the LM parameters (every parameter but the reward head), before clipping; "
             "a step is clipped when its total norm exceeds its run's own limit (`max_grad_norm`, in the "
             "column's brackets; 'off': no clipping).", "",
             "| noise | method | " + " | ".join(title for _, title, _ in DIAG_COLUMNS)
             + " | total grad norm | steps clipped |",
             "|---|---|" + "---|" * (len(DIAG_COLUMNS) + 2)]
    for n in report["noise_levels"]:
        for m in names:
            t = report["methods"][m][noise_key(n)].get("training") or {}
            if not t:
                continue
            cells = [format(t[k], f) if k in t else "-" for k, _, f in DIAG_COLUMNS]
            cells += [f"{t['grad_norm_mean']:.2f}", clipped_text(t)]
            lines.append(f"| {n:g} | {label(report, m)} | " + " | ".join(cells) + " |")
    return lines


def clipped_text(training: dict) -> str:
    """'97% (at 1)', or 'off' for a run without clipping; a summary without its limit (written before the
    demo recorded it) shows the share alone."""
    limit = training.get("max_grad_norm")
    if limit is None:
        return f"{training['clipped_share']:.0%}"
    return "off" if limit == 0 else f"{training['clipped_share']:.0%} (at {limit:g})"


def run_time_text(settings: dict) -> str:
    """When the demo ran and how long it took, and how many of its training runs it reused from an earlier
    run into the same directory (then the time is not that of a whole demo). A report written before
    the demo recorded its start and its reused runs gives no time: it cannot say what the time measured."""
    if "started_at" not in settings or "training_runs" not in settings:
        return "the report records neither its date nor which training runs it reused, so no time is given"
    runs = settings["training_runs"]
    total = runs["trained"] + runs["reused"]
    reuse = (f"all {total} training runs trained in this run" if not runs["reused"] else
             f"{runs['reused']} of {total} training runs reused from an earlier run into the same directory, "
             "so this is not the time of a whole demo")
    return (f"started {settings['started_at']}, {settings['elapsed_s']:.0f} s wall clock on a machine with "
            f"{settings.get('cpu_count', '?')} CPU cores, {reuse}")


def write_report_md(report: dict, path: str, *, plot_name: str | None = None) -> str:
    """A table a person reads at a glance, then what it shows (generated from the numbers)."""
    s = report["settings"]
    n_seeds = len(s["seeds"])
    order = list(report["methods"])
    names = order[1:]
    lines = [
        "# drdo demo: noisy preferences with a known true reward",
        "",
        f"Task: the synthetic *letters* task (`drdo/demo/synthetic.py`), true reward r_true in [0, 1]. "
        f"Labels: Bradley-Terry on r_true (temperature {s['bt_temperature']:g}), then each label flipped with "
        f"probability = the noise level. Model: `{s['model']}`. {n_seeds} seed(s): {s['seeds']}; "
        f"{s['train_pairs']} training pairs, {s['test_prompts']} held-out test prompts per seed.",
        "",
    ] + _main_table(report, order)
    lines += _variants_text(report)
    lines += ["", "## What it shows", ""]
    drdo_like = [name for name, stage in students(report) if stage == "drdo"]
    for n in report["noise_levels"]:
        key = noise_key(n)
        diag = report["diagnostics"][key]
        verdict = _verdict(report, key, drdo_like[0]) if drdo_like else None
        closest = _closest_text(report, key, drdo_like)
        lines.append(f"- **noise {n:g}** (labels agree with r_true on {diag['label_agreement_with_r_true']:.1%} "
                     f"of training pairs; Oracle 1 vs r_true correlation over the test samples: "
                     f"{diag['oracle_true_correlation']:.2f}): " + " ".join(
                         t for t in (verdict or "no DRDO vs DPO pair ran.", closest) if t))
    if "drdo" in names:
        lines += ["", _drdo_vs_sft_text(report)]
    lines += ["", inflation_text(report)]
    lines += _differences_table(report)
    lines += _diagnostics_table(report)
    lines += ["", "## The learning-rate grids", ""] + _sweep_table(report)
    ci_text = ("Student-t over the per-seed means" if n_seeds >= 2
               else "1.96 x the standard error over test prompts (one seed: sampling noise only, no seed-to-seed "
                    "variation; run more seeds for a real interval)")
    grids = s.get("lr_grids", {})
    grid_text = "; ".join(f"{LABELS[m]} {{{', '.join(f'{lr:.3g}' for lr in grids[m])}}}" for m in grids
                          if any(stage == m for _, stage in students(report)))
    own = (" (a DRDO variant that sets its own `steps` or `lrs` trains with those)"
           if any("steps" in v or "lrs" in v for v in s.get("variant_specs") or []) else "")
    lines += [
        "",
        "## How it was run",
        "",
        f"- Pipeline per seed and noise level: SFT on the chosen responses of that noise level's labels "
        f"({s['sft_steps']} steps, lr {s['sft_lr']:g}) -> Oracle (paper Eq. 5, alpha_O {s['oracle_alpha']:g}, "
        f"{s['oracle_steps']} steps, lr {s['oracle_lr']:g}, initialised from the SFT model with a fresh reward head) "
        f"-> K = 3 Oracles (head seed and data order differ) score the pairs offline -> students from the same "
        f"SFT start: "
        f"DRDO (Eq. 6, alpha {s['alpha']:g}, gamma {s['gamma']:g}, reward head, distils Oracle 1), "
        f"DPO (beta {s['beta']:g}, reference = SFT) and e-DPO (beta {s['beta']:g}, pessimistic over the 3 Oracles); "
        f"ran here: {', '.join(label(report, m) for m in names)}.",
        f"- Same budget for every student: {s['steps']} steps of {s['batch_size']} pairs{own}. Learning rates: each "
        f"method's grid is given at {s.get('lr_ref_steps', 100)} steps and scaled by "
        f"{s.get('lr_ref_steps', 100)}/{s['steps']}: {grid_text or '-'}; the lr with the highest mean r_true of "
        f"samples on {s['val_prompts']} validation prompts (disjoint from the test prompts) is kept, per student, "
        f"seed and noise level. Hyperparameters other than lr are the paper's defaults, untuned.",
        f"- Generation: one sample per prompt, temperature {s['temperature']:g}, at most {s['max_new_tokens']} "
        f"new tokens. True reward = r_true of the sample; Oracle-judged = Oracle 1's score of the same sample.",
        f"- Interval: {ci_text}.",
        f"- Time: {run_time_text(s)} ({s.get('workers', 1)} worker process(es) x {s.get('threads', 1)} "
        f"thread(s)).",
    ]
    if plot_name:
        lines += ["", f"![true reward vs noise]({plot_name})"]
    return write_text(path, "\n".join(lines) + "\n")


def _drdo_vs_sft_text(report: dict) -> str:
    """Whether DRDO moved its policy away from the SFT start at all (true reward difference)."""
    still, moved = [], []
    for n in report["noise_levels"]:
        d = report["comparisons"][noise_key(n)]["drdo_minus_sft"]
        text = f"noise {n:g}: {d['mean']:+.3f} ± {d['ci95']:.3f}"
        (still if d["mean"] - d["ci95"] <= 0 else moved).append(text)
    if not still:
        return f"DRDO improves on its SFT start at every noise level ({'; '.join(moved)})."
    return (
        f"DRDO vs its SFT start (true reward difference): {'; '.join(still + moved)}. Where the interval includes "
        f"0, DRDO's policy did not improve on SFT. By construction of Eq. 6 the policy's token probabilities "
        f"are trained only by the alpha-weighted focal term "
        f"(alpha {report['settings'].get('alpha', DRDOSpec.alpha):g}); "
        f"the distillation term trains the reward head (and the shared backbone){_share_text(report)}. "
        f"`drdo demo --alpha 1` runs the paper's other alpha."
    )


def _share_text(report: dict) -> str:
    """'; here it made up 91% / 82% of ...' from the default DRDO's gradient readings, if logged."""
    shares = [report["methods"]["drdo"][noise_key(n)].get("training", {}).get("diag_distill_share")
              for n in report["noise_levels"]]
    if any(v is None for v in shares):
        return ""
    return (f"; here the distillation term made up {' / '.join(f'{v:.0%}' for v in shares)} (noise "
            f"{' / '.join(f'{n:g}' for n in report['noise_levels'])}) of the gradient norm on the LM parameters, "
            f"before clipping")


def _sweep_table(report: dict) -> list[str]:
    """Mean validation r_true (over seeds) of every lr each student tried, per noise level."""
    rows = []
    for n in report["noise_levels"]:
        for m in report["sweep"]:
            runs = report["sweep"][m][noise_key(n)]
            lrs = sorted({lr for r in runs for lr in r["val_true_reward"]}, key=float)
            if not lrs:
                continue
            means = [_mean([r["val_true_reward"][lr] for r in runs if lr in r["val_true_reward"]]) for lr in lrs]
            cells = [f"{float(lr):.3g}: {v:.3f}" for lr, v in zip(lrs, means)]
            rows.append(f"| {n:g} | {label(report, m)} | " + "; ".join(cells) + " |")
    if not rows:
        return ["One learning rate per method: no selection was made."]
    return ["Mean r_true of validation samples per learning rate (mean over seeds); the best lr of each seed "
            "is the one kept.", "", "| noise | method | lr: validation r_true |", "|---|---|---|"] + rows


def inflation_text(report: dict) -> str:
    """How an Oracle-judged evaluation differs from the true one (win rates vs SFT)."""
    rows = []
    drdo_like = {name for name, stage in students(report) if stage == "drdo"}
    for n in report["noise_levels"]:
        key = noise_key(n)
        for m in list(report["methods"])[1:]:
            r = report["methods"][m][key]
            rows.append((n, m, r["oracle_win_rate_vs_sft"] - r["win_rate_vs_sft"]))
    worst = max(rows, key=lambda t: t[2])
    drdo_gaps = [g for _, m, g in rows if m in drdo_like]
    other_gaps = [g for _, m, g in rows if m not in drdo_like]
    parts = []
    if drdo_gaps:
        parts.append(f"{_mean(drdo_gaps):+.1%} for the DRDO students on average (which distil that Oracle)")
    if other_gaps:
        parts.append(f"{_mean(other_gaps):+.1%} for DPO/e-DPO")
    return (
        f"Oracle-judged vs true evaluation: the Oracle-judged win rate over SFT minus the true one is "
        f"{' and '.join(parts)}; the largest gap is {worst[2]:+.1%} ({label(report, worst[1])}, noise {worst[0]:g}). "
        f"A positive gap is how much judging with the Oracle inflates the result."
    )


def plot_report(report: dict, path: str) -> str:
    """PNG: true reward vs noise level per method with 95% intervals, and true vs Oracle-judged win rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noise = report["noise_levels"]
    keys = [noise_key(n) for n in noise]
    order = list(report["methods"])
    names = order[1:]
    span = (max(noise) - min(noise)) or 1.0
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11 + 0.6 * max(0, len(names) - 3), 4))
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")  # one colour per method in both panels
    for i, m in enumerate(order):
        stats = [report["methods"][m][k] for k in keys]
        xs = [n + (i - (len(order) - 1) / 2) * 0.012 * span for n in noise]
        ax1.errorbar(xs, [s["true_reward_mean"] for s in stats], yerr=[s["ci95"] for s in stats], marker="o",
                     capsize=4, label=label(report, m).replace("DRDO variant ", "").replace("`", ""), color=cmap(i))
    ax1.set_xlabel("label noise (flip rate)")
    ax1.set_ylabel("true reward r_true of samples")
    ax1.set_title("true reward vs noise (95% CI)")
    ax1.set_xticks(noise)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    width = 0.8 / (2 * len(names))
    for j, m in enumerate(names):
        color = cmap(j + 1)  # the colour of the method in the left panel
        true_w = [report["methods"][m][k]["win_rate_vs_sft"] for k in keys]
        orc_w = [report["methods"][m][k]["oracle_win_rate_vs_sft"] for k in keys]
        base = [i + (2 * j - len(names) + 0.5) * width for i in range(len(keys))]
        short = label(report, m).replace("DRDO variant ", "").replace("`", "")
        ax2.bar(base, true_w, width, color=color, label=f"{short}: true")
        ax2.bar([b + width for b in base], orc_w, width, color=color, alpha=0.4, hatch="//",
                label=f"{short}: Oracle-judged")
    ax2.axhline(0.5, color="gray", lw=1, ls="--")
    ax2.set_ylim(0, 1.25)
    ax2.set_xticks(range(len(keys)))
    ax2.set_xticklabels([f"noise {n:g}" for n in noise])
    ax2.set_ylabel("win rate vs SFT")
    ax2.set_title("true vs Oracle-judged win rate")
    ax2.legend(fontsize=6, ncol=3, loc="upper center")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path
