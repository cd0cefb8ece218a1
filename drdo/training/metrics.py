"""metrics.jsonl: one JSON line per optimizer step, written by rank 0."""
from __future__ import annotations

import json
import math
import os
import resource
import statistics

import torch

from drdo.jsonl import write_jsonl
from drdo.run_record import RUN_FILE, read_run_file


class MetricsLog:
    """Append-only JSONL log. ``truncate_after(step)`` drops lines of later steps (used on resume)."""

    def __init__(self, path: str, *, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Keep the lines of steps <= ``step`` (rewritten atomically). A line that does not parse (a
        crash mid-write leaves half a line) is dropped, as are lines after it."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if not isinstance(row, dict) or not isinstance(row.get("step"), int) or row["step"] > step:
                    break
                kept.append(row)
        write_jsonl(kept, self.path)

    def reset(self) -> None:
        if self.enabled and os.path.exists(self.path):
            os.remove(self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")


def read_metrics(path: str) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on ``device``, else this process's peak RSS (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def training_summary(run_dir: str) -> dict:
    """From a finished run's record and metrics.jsonl: its clipping limit ``max_grad_norm`` (its own
    run.json; 0: no clipping), mean total grad norm (before clipping), the share of steps clipped
    (norm > that limit; 0 without clipping) and the mean of every ``diag_*`` reading over the steps
    that logged it (DRDO; see :mod:`drdo.training.diagnostics`)."""
    run = read_run_file(os.path.join(run_dir, RUN_FILE))
    if run is None or "max_grad_norm" not in run["config"]:
        raise RuntimeError(f"{run_dir} holds no run record with its max_grad_norm ({RUN_FILE})")
    limit = float(run["config"]["max_grad_norm"])
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    norms = [r["grad_norm"] for r in rows]
    clipped = [float(limit > 0 and n > limit) for n in norms]
    out = {"max_grad_norm": limit, "grad_norm_mean": statistics.fmean(norms),
           "clipped_share": statistics.fmean(clipped)}
    for key in sorted({k for r in rows for k in r if k.startswith("diag_")}):
        out[key] = statistics.fmean([r[key] for r in rows if key in r])
    return out
