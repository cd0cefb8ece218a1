"""The CPU benchmark table of docs/kernels.md, generated from a committed results folder.

Reads ``loss.csv`` (time and peak memory per method, one shape) and, when present, ``paired_loss.csv``
(the drift-robust time ratios) of a results folder, and writes the markdown table between the
``<!-- cpu-loss-table -->`` and ``<!-- /cpu-loss-table -->`` markers of docs/kernels.md:

    python -m benchmarks.docs_table benchmarks/results/2026-12-06-cpu [--check]

``--check`` writes nothing and exits 1 when the page differs from what the CSVs give.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import ROOT, read_csv
from benchmarks.methods import REGISTRY

START, END = "<!-- cpu-loss-table -->", "<!-- /cpu-loss-table -->"
DOC = ROOT / "docs" / "kernels.md"


def _ms(value: str) -> str:
    v = float(value)
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.1f} ms"


def _paired(folder: Path, shape: tuple[str, str, str]) -> dict[tuple[str, str], str]:
    """(ours, peer) -> "median [p20, p80]" of the paired ratios at ``shape`` (N, H, V), if measured."""
    path = folder / "paired_loss.csv"
    if not path.is_file():
        return {}
    return {(r["ours"], r["peer"]): f"{float(r['ratio_median']):.2f} [{float(r['ratio_p20']):.2f}, "
            f"{float(r['ratio_p80']):.2f}]" for r in read_csv(path)
            if (r["N"], r["H"], r["V"]) == shape and r["rounds"] not in ("", "0")}


def table(folder: Path) -> str:
    """The markdown table of ``folder``'s loss.csv: one row per method, fastest first (methods that did
    not run last, with their reason), time, time vs naive, peak memory, and the paired ratio ours_auto /
    method when paired_loss.csv has it."""
    rows = [r for r in read_csv(folder / "loss.csv") if r["mode"] == "fwd+bwd"]
    shapes = {(r["N"], r["H"], r["V"]) for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"{folder}/loss.csv must hold one shape for the docs table, got {sorted(shapes)}")
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: float(r["median_ms"]))
    naive = next((float(r["median_ms"]) for r in ok if r["method"] == "naive"), None)
    paired = _paired(folder, next(iter(shapes)))
    lines = ["| method | time (median) | vs naive | peak memory | ours_auto / method, paired |",
             "|---|---|---|---|---|"]
    for r in ok:
        ratio = f"{float(r['median_ms']) / naive:.2f}×" if naive else "–"
        lines.append(f"| `{r['method']}` | {_ms(r['median_ms'])} | {ratio} | {float(r['peak_mem_mb']):.0f} MB | "
                     f"{paired.get(('ours_auto', r['method']), '–')} |")
    for r in rows:
        if r["status"] != "ok":
            reason = r["note"].replace("|", "/").splitlines()[0][:110] if r["note"] else r["status"]
            lines.append(f"| `{r['method']}` | {r['status']}: {reason} | – | – | – |")
    unknown = [r["method"] for r in rows if r["method"] not in REGISTRY]
    if unknown:
        raise ValueError(f"{folder}/loss.csv has unregistered methods {unknown}")
    return "\n".join(lines)


def render(text: str, folder: Path) -> str:
    """``text`` (docs/kernels.md) with the part between the markers replaced by :func:`table`."""
    if START not in text or END not in text:
        raise ValueError(f"{DOC.name} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(folder)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a results folder with loss.csv (and paired_loss.csv)")
    p.add_argument("--check", action="store_true", help="exit 1 when docs/kernels.md differs; write nothing")
    args = p.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    new = render(text, args.folder)
    if args.check:
        return 0 if new == text else 1
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
