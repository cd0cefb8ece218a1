"""Write what a benchmark measured: CSV, ratios to every peer, PNG plots, markdown, metadata.
Every text file goes through :func:`benchmarks.common.portable` (no machine paths).

``python -m benchmarks.report DIR [--rebuild] [--scrub]`` rebuilds DIR/results.md from the *_meta.json
and *.md files the benchmarks wrote there (``--rebuild``: the ratios, markdown and plots from the CSVs
first; ``--scrub``: rewrites every text file of DIR without machine paths first).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from importlib import metadata
from pathlib import Path

from benchmarks.common import portable, read_csv, write_csv
from benchmarks.methods import LIGER_IMPL_ENV, packages
from drdo.atomic import save_figure, write_text

RATIO_COLUMNS = ["bench", "ours", "peer", "device", "dtype", "N", "H", "V", "mode",
                 "time_ratio", "mem_ratio", "time_ratio_p20", "ours_ms", "peer_ms", "ours_mb", "peer_mb"]
#: The distributions whose versions a run records: torch, triton, every registered method's library
#: (benchmarks.methods.packages(): liger-kernel, nvidia-cutlass-dsl for Liger's CuTe DSL path, CCE, trl), and the rest.
PACKAGES = ["torch", "triton", *packages(), "transformers", "numpy", "matplotlib"]
TEXT_SUFFIXES = (".csv", ".md", ".json", ".log", ".txt", ".xml")


def write_portable(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` with every machine path made portable."""
    return write_text(path, portable(text))


# ---------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device: str, gemm: dict, started: float, isolate: bool) -> dict:
    """Machine, versions and command of this run."""
    import torch

    meta = {
        "date_utc": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "python"] + sys.argv[1:]),
        "device": device,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "liger_kernel_impl": os.environ.get(LIGER_IMPL_ENV, ""),
        "torch_version": torch.__version__,
        "gemm_peak_tflops": gemm,
        "isolated_subprocess_per_point": isolate,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    return meta


# ---------------------------------------------------------------- ratios
def _key(r: dict) -> tuple:
    return (r["dtype"], int(r["N"]), int(r["H"]), int(r["V"]), r["mode"])


def num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def ratios(rows: list[dict]) -> list[dict]:
    """ours/peer time and memory ratios for every ours_* method vs every other method at the same point."""
    ok = defaultdict(dict)
    for r in rows:
        if r.get("status") == "ok":
            ok[_key(r)][r["method"]] = r
    out = []
    for key, by_method in ok.items():
        for ours, o in by_method.items():
            if not ours.startswith("ours_"):
                continue
            for peer, p in by_method.items():
                if peer == ours:
                    continue
                out.append(dict(bench=o["bench"], ours=ours, peer=peer, device=o["device"], dtype=key[0], N=key[1],
                                H=key[2], V=key[3], mode=key[4],
                                time_ratio=num(o["median_ms"]) / num(p["median_ms"]),
                                mem_ratio=num(o["peak_mem_mb"]) / num(p["peak_mem_mb"]),
                                time_ratio_p20=num(o["p20_ms"]) / num(p["p20_ms"]),
                                ours_ms=num(o["median_ms"]), peer_ms=num(p["median_ms"]),
                                ours_mb=num(o["peak_mem_mb"]), peer_mb=num(p["peak_mem_mb"])))
    return out


# ---------------------------------------------------------------- markdown
def _f(v, digits: int = 3) -> str:
    x = num(v)
    return "" if x != x else f"{x:.{digits}g}"


def _percent(v) -> str:
    x = num(v)
    return "" if x != x else f"{x * 100:.0f}%"


def _inputs_line(meta: dict) -> str:
    """The input regime and timing of a run, from its metadata (absent in runs before 2026-12)."""
    if "logits" not in meta:
        return ""
    margins = f", pair margins `{meta['margins']}`" if "margins" in meta else ""
    return (f"inputs: logits `{meta['logits']}`{margins}, Triton gradient filter_eps {meta['filter_eps']:g}; at least "
            f"{meta['reps']} timed repetitions per point; TFLOP/s count the work each method does (work x N·H·V, "
            "benchmarks/work.py)")


def markdown(rows: list[dict], ratio_rows: list[dict], name: str, meta: dict) -> str:
    commands = meta.get("commands", [meta["command"]])
    lines = [f"## {name}", "", f"device `{meta['device']}`" + (f" ({meta.get('gpu')})" if meta.get("gpu") else "")
             + f", {meta['date_utc']}, command: " + "; ".join(f"`{c}`" for c in commands), ""]
    lines += [x for x in (_inputs_line(meta), meta.get("stopped", "")) if x]
    lines += ["", "| method | dtype | N | H | V | mode | median ms | p20-p80 ms | n | peak MB | work (x NHV) | TFLOP/s "
              "| of GEMM peak | max abs err |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") == "ok":
            lines.append(f"| {r['method']} | {r['dtype']} | {r['N']} | {r['H']} | {r['V']} | {r['mode']} | "
                         f"{_f(r['median_ms'])} | {_f(r['p20_ms'])}-{_f(r['p80_ms'])} | {r.get('n_samples', '')} | "
                         f"{_f(r['peak_mem_mb'], 4)} | {_f(r.get('work_nhv'))} | {_f(r.get('tflops'))} | "
                         f"{_percent(r.get('peak_frac'))} | {_f(r.get('max_abs_err'), 2)} |")
    if ratio_rows:
        lines += ["", "Ratios (ours / peer, same run; < 1 means ours is faster / smaller):", "",
                  "| ours | peer | dtype | N | H | V | mode | time ratio (medians) | time ratio (p20s) "
                  "| memory ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for q in ratio_rows:
            lines.append(f"| {q['ours']} | {q['peer']} | {q['dtype']} | {q['N']} | {q['H']} | {q['V']} | {q['mode']} | "
                         f"{_f(q['time_ratio'])} | {_f(q['time_ratio_p20'])} | {_f(q['mem_ratio'])} |")
    not_ok = {}
    for r in rows:
        if r.get("status") != "ok":
            not_ok.setdefault((r["method"], r["status"], str(r.get("note", ""))), []).append(
                f"{r['dtype']} {r['N']}x{r['H']}x{r['V']} {r['mode']}")
    if not_ok:
        lines += ["", "Not measured (status and the reason, verbatim):", ""]
        for (method, status, note), where in not_ok.items():
            lines.append(f"- **{method}** {status} at {len(where)} point(s) (e.g. {where[0]}): {note}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots
def plot_vs_n(rows: list[dict], out_dir: Path, name: str) -> list[Path]:
    """One PNG per (dtype, mode, H, V) with >= 2 values of N: time and memory vs N, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("status") == "ok":
            groups[(r["dtype"], r["mode"], int(r["H"]), int(r["V"]))][r["method"]].append(r)
    paths = []
    for (dtype, mode, h, v), by_method in sorted(groups.items()):
        if len({int(r["N"]) for rs in by_method.values() for r in rs}) < 2:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for method, rs in sorted(by_method.items()):
            rs = sorted(rs, key=lambda r: int(r["N"]))
            n = [int(r["N"]) for r in rs]
            style = "-o" if method.startswith("ours_") else "--s"
            ax_t.plot(n, [num(r["median_ms"]) for r in rs], style, label=method)
            ax_m.plot(n, [num(r["peak_mem_mb"]) for r in rs], style, label=method)
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak memory (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{name}: {dtype} {mode}, H={h}, V={v} ({rows[0]['device']})")
        fig.tight_layout()
        path = out_dir / f"{name}_{dtype}_{mode.replace('+', '-')}_H{h}_V{v}.png"
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- files
def write_bench(rows: list[dict], out_dir: Path, name: str, meta: dict, *, plots: bool = True) -> None:
    """<name>.csv, <name>_ratios.csv, <name>.md, <name>_meta.json and PNG plots in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / f"{name}.csv")
    ratio_rows = ratios(rows)
    write_csv(ratio_rows, out_dir / f"{name}_ratios.csv", RATIO_COLUMNS)
    write_portable(out_dir / f"{name}.md", markdown(rows, ratio_rows, name, meta))
    write_portable(out_dir / f"{name}_meta.json", json.dumps(meta, indent=2, default=str))
    if plots:
        try:
            plot_vs_n(rows, out_dir, name)
        except ImportError as exc:
            print(f"[{name}] no plots: {exc}", flush=True)


#: the project's targets: (bench, device, ours, peer, mode, max time ratio, max memory ratio)
TARGETS = [
    ("loss", "cpu", "ours_torch", "naive", "fwd+bwd", 1.3, 0.25),
    ("logprobs", "cpu", "ours_torch", "naive", "fwd+bwd", 1.3, 0.25),
    ("loss", "cuda", "ours_auto", "naive_compile", "fwd+bwd", 0.97, float("inf")),
    ("logprobs", "cuda", "ours_auto", "trl_chunked", "fwd+bwd", 0.95, float("inf")),
    ("train", "cuda", "ours_auto", "trl_dpo_fused", "train_step", 1 / 1.3, float("inf")),
    ("loss", "cuda", "ours_chunked", "liger_dpo", "fwd+bwd", 1 / 3, float("inf")),
]


def targets_md(out_dir: Path) -> str:
    """A table of the project's targets against the ratios found in out_dir (met / missed per point)."""
    lines = []
    for bench, device, ours, peer, mode, max_t, max_m in TARGETS:
        path = out_dir / f"{bench}_ratios.csv"
        if not path.exists():
            continue
        for q in read_csv(path):
            if (q["device"], q["ours"], q["peer"], q["mode"]) != (device, ours, peer, mode):
                continue
            t, m = num(q["time_ratio"]), num(q["mem_ratio"])
            met = "met" if t <= max_t and m <= max_m else "missed"
            mem_target = "" if max_m == float("inf") else f", memory <= {max_m:g}x"
            lines.append(f"| {bench} | {ours} vs {peer} | {q['dtype']} {q['N']}x{q['H']}x{q['V']} {mode} | "
                         f"time <= {max_t:.3g}x{mem_target} | {t:.3g}x / {m:.3g}x | {met} |")
    roof = out_dir / "loss.csv"
    if roof.exists():
        for r in read_csv(roof):
            if (r["device"] == "cuda" and r["method"] in ("ours_auto", "ours_triton", "ours_chunked")
                    and r["status"] == "ok"):
                frac = num(r["peak_frac"])
                lines.append(f"| loss | {r['method']} roofline | "
                             f"{r['dtype']} {r['N']}x{r['H']}x{r['V']} {r['mode']} | "
                             f">= 70% of the GEMM peak for its work ({_f(r.get('work_nhv'))} NHV) | "
                             f"{frac * 100:.1f}% | {'met' if frac >= 0.7 else 'missed'} |")
    if not lines:
        return ""
    head = ["## Targets (measured here; CI asserts none)", "",
            "| bench | comparison | point | target | measured time / memory ratio | |", "|---|---|---|---|---|---|"]
    return "\n".join(head + lines) + "\n"


def write_results_md(out_dir: Path) -> Path:
    """results.md: the machine and versions, then every benchmark's section found in out_dir."""
    metas = sorted(out_dir.glob("*_meta.json"))
    lines = ["# Benchmark results", ""]
    if metas:
        meta = json.loads(metas[0].read_text(encoding="utf-8"))
        lines += [f"- date: {meta['date_utc']}",
                  f"- device: {meta['device']}" + (f" ({meta['gpu']})" if meta.get("gpu") else ""),
                  f"- CPU: {meta['cpu']} ({meta['cpu_count']} cores visible, torch threads {meta['torch_threads']})",
                  f"- Python {meta['python']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
                  f"- measured GEMM peak (TFLOP/s): {json.dumps(meta['gemm_peak_tflops'])}",
                  "- load average (1, 5, 15 min) when each benchmark ended: "
                  + "; ".join(f"{m.name[:-len('_meta.json')]} "
                              f"{json.loads(m.read_text(encoding='utf-8')).get('load_average_at_end')}"
                              for m in metas), ""]
    targets = targets_md(out_dir)
    if targets:
        lines.append(targets)
    for m in metas:
        section = out_dir / (m.name[: -len("_meta.json")] + ".md")
        if section.exists():
            lines.append(section.read_text(encoding="utf-8"))
    for extra in sorted(out_dir.glob("paired_*.md")) + sorted(out_dir.glob("profile.md")):
        lines.append(extra.read_text(encoding="utf-8"))
    if metas and json.loads(metas[0].read_text(encoding="utf-8")).get("device") == "cuda":
        from benchmarks import model

        lines.append(model.compare_md(out_dir))
    path = out_dir / "results.md"
    write_portable(path, "\n".join(lines))
    return path


def scrub(out_dir: Path) -> list[Path]:
    """Rewrite every text file in ``out_dir`` (recursively) without machine paths; returns the changed ones."""
    changed = []
    for path in sorted(out_dir.rglob("*")):
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8")
            if portable(text) != text:
                write_portable(path, text)
                changed.append(path)
    return changed


def rebuild(out_dir: Path, names: tuple[str, ...] = ("logprobs", "loss")) -> None:
    """Rewrite ratios, markdown and plots of grid benchmarks from their CSV and metadata (e.g. after a
    run was stopped part-way: the CSV is written after every method)."""
    for name in names:
        csv_path, meta_path = out_dir / f"{name}.csv", out_dir / f"{name}_meta.json"
        if csv_path.exists() and meta_path.exists():
            rows = [{k: (int(v) if k in ("N", "H", "V") else v) for k, v in r.items()} for r in read_csv(csv_path)]
            write_bench(rows, out_dir, name, json.loads(meta_path.read_text(encoding="utf-8")))


if __name__ == "__main__":
    target = Path(sys.argv[1])
    if "--scrub" in sys.argv[2:]:
        scrub(target)
    if "--rebuild" in sys.argv[2:]:
        rebuild(target)
    print(write_results_md(target))
