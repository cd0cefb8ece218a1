"""Experiment trackers beside metrics.jsonl: ``--report-to none|tensorboard|wandb`` (TRL's names).

Each optimizer step's metrics row (the line written to metrics.jsonl) goes to the tracker as
scalars ``train/<name>`` at that step, from rank 0 only. TensorBoard event files go to
``<output_dir>/tensorboard``; wandb runs in ``<output_dir>`` under the project ``$WANDB_PROJECT``
(default "drdo"), offline when ``WANDB_MODE=offline``.
"""
from __future__ import annotations

import math
import os

REPORT_TO = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"


class Reporter:
    """No tracker: ``log`` and ``close`` do nothing (also on ranks other than 0)."""

    def log(self, row: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row, as ``train/<name>`` (the step itself is the x axis)."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"train/{key}"] = float(value)
    return out


class TensorBoardReporter(Reporter):
    def __init__(self, output_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("--report-to tensorboard needs the tensorboard package: "
                              f"pip install tensorboard ({err})") from err
        self.writer = SummaryWriter(log_dir=os.path.join(output_dir, TENSORBOARD_DIR))

    def log(self, row: dict, step: int) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    def __init__(self, output_dir: str, config: dict):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(f"--report-to wandb needs the wandb package: pip install wandb ({err})") from err
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "drdo"), dir=output_dir, config=config,
                              name=os.path.basename(os.path.normpath(output_dir)))

    def log(self, row: dict, step: int) -> None:
        self.run.log(_scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


def make_reporter(report_to: str, output_dir: str, config: dict, *, enabled: bool = True) -> Reporter:
    """The tracker named by ``report_to`` ("none" | "tensorboard" | "wandb"); a no-op when not ``enabled``."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}; got {report_to!r}")
    if not enabled or report_to == "none":
        return Reporter()
    if report_to == "tensorboard":
        return TensorBoardReporter(output_dir)
    return WandbReporter(output_dir, config)
