"""The record a training run keeps in its output directory, as every loader of a model reads it.

``run.json`` names the run that owns the directory (written by :mod:`drdo.training.rundir`) and
says ``"complete": true`` only once the run's final model is exported whole; ``.drdo.lock`` is the
run's lock. A directory holding ``run.json`` without that flag (a run still going, stopped, or
killed, perhaps mid-export beside an older run's files) holds no model to load (:func:`model_problem`).
"""
from __future__ import annotations

import json
import os

__all__ = ["RUN_FILE", "LOCK_FILE", "read_run_file", "model_problem"]

RUN_FILE = "run.json"
LOCK_FILE = ".drdo.lock"


def read_run_file(path: str) -> dict | None:
    """The contents of a run.json, or None when it is unreadable or not a run record."""
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and isinstance(run.get("config"), dict) else None


def model_problem(directory: str) -> str | None:
    """Why the directory ``directory`` holds no model to load: it is empty, or it is the output
    directory of a drdo run whose run.json does not record a complete final model. None for any
    other directory (a finished run, a checkpoint, a model written by other tools)."""
    try:
        entries = set(os.listdir(directory)) - {LOCK_FILE}
    except OSError:
        return None  # the loader says why it cannot be read
    if not entries:
        return "is an empty directory: it holds no model"
    if RUN_FILE not in entries:
        return None
    run = read_run_file(os.path.join(directory, RUN_FILE))
    if run is not None and run.get("complete") is True:
        return None
    return ("is the output directory of a drdo run that has not finished (it is still running, or it stopped "
            "before its final model was complete); let it finish or continue it with --resume, or load one of "
            "its checkpoints (checkpoints/step-*)")
