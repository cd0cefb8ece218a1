"""docs/ pages that cannot go stale: the layout table, the `auto` rule, the GPU benchmark figures,
the links, and the name of the loss-path option."""
from __future__ import annotations

import csv
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _text(path: pathlib.Path) -> str:
    return path.read_text(encoding="utf-8")


def _table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after ``heading`` (header and separator rows dropped)."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_layout_table_lists_every_module_once():
    rows = _table_after(_text(DOCS / "architecture.md"), "## Layout")
    listed = [m for row in rows for m in re.findall(r"`((?:drdo|drdo_kernels)/[\w/]+\.py)`", row[0])]
    modules = {p.relative_to(ROOT).as_posix() for pkg in ("drdo", "drdo_kernels") for p in (ROOT / pkg).rglob("*.py")
               if p.name != "__init__.py"}
    assert not modules - set(listed), f"add to docs/architecture.md's layout table: {sorted(modules - set(listed))}"
    assert not set(listed) - modules, f"docs/architecture.md's layout table names missing files: " \
                                      f"{sorted(set(listed) - modules)}"
    several = [row[0] for row in rows if len(re.findall(r"\.py`", row[0])) > 1]
    assert not several and len(listed) == len(set(listed)), f"one module per row: {several}"


def test_auto_rule_table_is_auto_rules():
    from drdo_kernels.logprobs import AUTO_RULES

    def cell(value) -> str:
        return "any" if value is None else f"`{value}`" if isinstance(value, str) else str(value)

    rows = _table_after(_text(DOCS / "kernels.md"), "### The `auto` rule")
    expected = [[cell(r.device), "any" if r.min_capability is None else ".".join(map(str, r.min_capability)),
                 "any" if r.dtypes is None else ", ".join(str(d).removeprefix("torch.") for d in r.dtypes),
                 str(r.min_hidden), str(r.min_tokens), f"`{r.backend}`"] for r in AUTO_RULES]
    assert rows == expected, "docs/kernels.md's `auto` rule table differs from drdo_kernels.logprobs.AUTO_RULES"


#: docs/kernels.md's GPU table rows -> the method in the committed loss.csv.
_GPU_METHODS = {
    "torch.compile of naive": "naive_compile",
    "ours, `chunked` (`auto`)": "ours_chunked",
    "naive PyTorch (full logits)": "naive",
    "Liger fused linear DPO": "liger_dpo",
    "TRL's fused LM head + DRDO": "trl_chunked",
    "ours, `torch`": "ours_torch",
    "ours, `triton`": "ours_triton",
    "Cut Cross-Entropy": "cce",
    "ours before this version, `triton`": "base_triton",
}
GPU_RUN = ROOT / "benchmarks" / "results" / "2026-11-28-gpu-h200"


def _gpu_loss() -> dict[str, tuple[str, str, str]]:
    """(time, vs naive, peak memory) of each method of the committed H200 loss run, as the docs print them."""
    with open(GPU_RUN / "loss.csv", encoding="utf-8") as f:
        rows = {r["method"]: r for r in csv.DictReader(f) if r["status"] == "ok"}
    naive = float(rows["naive"]["median_ms"])
    return {m: (f"{float(r['median_ms']):.1f} ms", f"{float(r['median_ms']) / naive:.2f}×",
                f"{float(r['peak_mem_mb']) / 1000:.1f} GB") for m, r in rows.items()}


def test_gpu_benchmark_figures_are_the_committed_run():
    measured = _gpu_loss()
    rows = _table_after(_text(DOCS / "kernels.md"), "<!-- gpu-loss-table -->")
    assert [r[0].strip("*") for r in rows] == list(_GPU_METHODS), "a row of the GPU table has no method in loss.csv"
    for label, time, ratio, memory in rows:
        assert (time.strip("*"), ratio.strip("*"), memory.strip("*")) == measured[_GPU_METHODS[label.strip("*")]], label
    readme = _text(ROOT / "README.md")
    for method in ("ours_chunked", "naive"):
        time, _, memory = measured[method]
        assert time in readme and memory in readme, f"the README's kernel figures differ from loss.csv ({method})"


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", _text(page)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name} links to a missing {target}"
        if anchor and file.suffix == ".md":
            anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", _text(file), flags=re.M)}
            assert anchor in anchors, f"{page.name} links to {target}: no such heading"


def test_the_loss_path_is_called_backend():
    for page in PAGES:
        text = _text(page)
        assert "kernel_backend" not in text, f"{page.name}: the TRL field is `backend`"
        mentions = re.findall(r"--kernel\b", text)
        assert not mentions or (page.name == "training.md" and len(mentions) == 1
                                and "deprecated alias" in text), f"{page.name}: the flag is --backend"


#: A measured time written by hand: "2 min 35 s", "25 s", "151 seconds", "3 minutes", "1 h".
_TIME = re.compile(r"\b\d+(?:\.\d+)?\s*(?:s|secs?|seconds?|mins?|minutes?|h|hours?)\b")


def _without_generated_blocks(text: str) -> str:
    """``text`` less the blocks a script writes: the demo table, and benchmark tables between
    ``<!-- name -->`` and ``<!-- /name -->`` (their dated run is named beside them)."""
    from drdo.demo.readme_table import END, START

    text = re.sub(re.escape(START) + ".*?" + re.escape(END), "", text, flags=re.S)
    return re.sub(r"<!-- ([\w-]+) -->.*?<!-- /\1 -->", "", text, flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_hand_written_times(page):
    """Times are measured and dated by the run that wrote them (a demo's report, the README's generated
    table), never written by hand: a hand-written time goes stale with the code and the machine."""
    found = _TIME.findall(_without_generated_blocks(_text(page)))
    assert not found, f"{page.name} states a time by hand ({found[0]!r}); quote a dated, generated report instead"


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]], ids=["drdo", "drdo demo"])
def test_help_states_no_time(argv, capsys):
    from drdo.cli import main

    try:
        main(argv)
    except SystemExit:
        pass
    out = " ".join(capsys.readouterr().out.split())
    assert "demo" in out and not _TIME.findall(out), _TIME.findall(out)


def test_shipped_sample_is_the_letters_task_and_fits_the_defaults():
    """docs/examples/ holds what docs/training.md says: 64 pairs of build_preference_pairs(64, seed=0), at least one
    default batch, and held-out prompts of the same task."""
    import json

    from drdo.config import TrainConfig
    from drdo.demo.bradley_terry import build_preference_pairs
    from drdo.demo.synthetic import true_rewards

    def rows(name):
        return [json.loads(line) for line in (DOCS / "examples" / name).read_text(encoding="utf-8").splitlines()]

    pairs, prompts = rows("prefs.jsonl"), rows("prompts.jsonl")
    expected = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in build_preference_pairs(64, seed=0)]
    assert pairs == expected and len(pairs) >= TrainConfig().batch_size
    assert "build_preference_pairs(64, seed=0)" in " ".join(_text(DOCS / "training.md").split())
    held_out = [p["prompt"] for p in prompts]
    assert len(set(held_out)) == len(held_out) >= 8 and not set(held_out) & {p["prompt"] for p in pairs}
    assert all(0.0 <= r <= 1.0 for r in true_rewards(held_out, ["x"] * len(held_out)))
