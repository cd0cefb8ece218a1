"""The README's demo table, generated from a demo's report.json so that it cannot go stale.

    python -m drdo.demo.readme_table runs/demo/report.json                    # print the block
    python -m drdo.demo.readme_table --update README.md runs/demo/report.json # rewrite it in place

``--update`` also copies the report to ``docs/demo/report.json`` and its plot (report.png next to
it) to ``docs/demo.png``, the files the README shows; the block between the markers
``<!-- demo-table:start -->`` and ``<!-- demo-table:end -->`` is replaced.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from drdo.atomic import atomic_write, write_text
from drdo.demo.report import LABELS, METHODS, inflation_text, noise_key, run_time_text

__all__ = ["START", "END", "COMMITTED_REPORT", "COMMITTED_PLOT", "readme_block", "current_block",
           "replace_block", "update"]

START = "<!-- demo-table:start -->"
END = "<!-- demo-table:end -->"
#: Where the report behind the README's table is kept (paths relative to the repository root).
COMMITTED_REPORT = "docs/demo/report.json"
COMMITTED_PLOT = "docs/demo.png"


def _run_line(settings: dict) -> str:
    command = "drdo demo --quick" if settings.get("quick") else "drdo demo"
    seeds = len(settings["seeds"])
    noise = ", ".join(f"{n:g}" for n in settings["noise"])
    return (f"From `{COMMITTED_REPORT}`, written by `{command}` (model `{settings['model']}`, {seeds} seed(s), "
            f"noise {noise}, {settings['train_pairs']} training pairs and {settings['test_prompts']} test prompts "
            f"per seed, {settings['steps']} student steps; {run_time_text(settings)}):")


def readme_block(report: dict) -> str:
    """The markdown between the markers: what run it is, the table, the Oracle-inflation sentence."""
    lines = [_run_line(report["settings"]), "",
             "| noise (flip rate) | method | true reward (95% CI) | win vs SFT (true) | win vs SFT (Oracle-judged) |",
             "|---|---|---|---|---|"]
    for n in report["noise_levels"]:
        for m in METHODS:
            r = report["methods"][m][noise_key(n)]
            win = "–" if m == "sft" else f"{r['win_rate_vs_sft']:.1%}"
            owin = "–" if m == "sft" else f"{r['oracle_win_rate_vs_sft']:.1%}"
            lines.append(f"| {n:g} | {LABELS[m]} | {r['true_reward_mean']:.3f} ± {r['ci95']:.3f} | {win} | {owin} |")
    lines += ["", inflation_text(report)]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with everything between the START and END markers replaced by ``block``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {START} ... {END} markers (in that order)")
    return text[: start + len(START)] + "\n" + block + "\n" + text[end:]


def current_block(text: str) -> str:
    """What stands between the markers now (without the surrounding newlines)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {START} ... {END} markers (in that order)")
    return text[start + len(START): end].strip("\n")


def update(readme: str, report_path: str) -> str:
    """Copy the report (and its report.png) next to the README under docs/, rewrite the README's block.
    Returns the block."""
    root = os.path.dirname(os.path.abspath(readme))
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    target = os.path.join(root, *COMMITTED_REPORT.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.abspath(report_path) != target:
        _copy(report_path, target)
    plot = os.path.join(os.path.dirname(os.path.abspath(report_path)), "report.png")
    if os.path.isfile(plot):
        _copy(plot, os.path.join(root, *COMMITTED_PLOT.split("/")))
    block = readme_block(report)
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    write_text(readme, replace_block(text, block))
    return block


def _copy(source: str, target: str) -> None:
    """Copy a file's bytes over ``target`` atomically."""
    with open(source, "rb") as src, atomic_write(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drdo.demo.readme_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="a demo's report.json")
    parser.add_argument("--update", metavar="README.md", help="rewrite this README's table (and copy the report to "
                                                              "docs/) instead of printing it")
    args = parser.parse_args(argv)
    if args.update:
        update(args.update, args.report)
        print(f"updated {args.update} and {COMMITTED_REPORT} from {args.report}")
    else:
        with open(args.report, encoding="utf-8") as f:
            print(readme_block(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
