"""README figures that cannot go stale: the demo table and figure; and the README's length."""
from __future__ import annotations

import json
import pathlib

import pytest

from drdo.demo.readme_table import (
    COMMITTED_PLOT,
    COMMITTED_REPORT,
    END,
    START,
    current_block,
    readme_block,
    replace_block,
    update,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _committed_report() -> dict:
    return json.loads((ROOT / COMMITTED_REPORT).read_text(encoding="utf-8"))


def test_readme_demo_table_is_the_one_the_committed_report_gives():
    assert current_block(README) == readme_block(_committed_report()), (
        "regenerate it: python -m drdo.demo.readme_table --update README.md docs/demo/report.json")


def test_block_reflects_the_report():
    report = _committed_report()
    report["methods"]["drdo"]["0.3"]["true_reward_mean"] = 0.987654
    block = readme_block(report)
    assert "| 0.3 | DRDO | 0.988 ±" in block and block != current_block(README)
    assert "Oracle-judged win rate over SFT minus the true one" in block


def test_update_rewrites_only_the_block_and_copies_report_and_plot(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{START}\nold table\n{END}\n\nafter\n")
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "report.json").write_text((ROOT / COMMITTED_REPORT).read_text())
    (run / "report.png").write_bytes(b"png")
    block = update(str(readme), str(run / "report.json"))
    text = readme.read_text()
    assert text.startswith("# title\n\n") and text.endswith(f"{END}\n\nafter\n") and "old table" not in text
    assert current_block(text) == block
    assert json.loads((tmp_path / COMMITTED_REPORT).read_text()) == _committed_report()
    assert (tmp_path / "docs" / "demo.png").read_bytes() == b"png"
    with pytest.raises(ValueError, match="markers"):
        replace_block("no markers here", block)


def test_readme_is_a_short_page():
    lines = README.count("\n") + (not README.endswith("\n"))
    assert lines <= 200, f"README.md has {lines} lines; move detail to docs/ (at most 200)"
    assert "](docs/demo.png)" in README and (ROOT / COMMITTED_PLOT).is_file()
