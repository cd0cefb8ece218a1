"""Where an offline pass (``oracle score``, ``reflogps``, ``eval``) writes its results.

:func:`check_output_file` runs before anything is computed: an output that cannot be written (a
directory, a file where a parent folder should be, a read-only file system or folder) fails at once
in one line instead of after the whole computation. :func:`unique_run_dir` makes the default
directory of a run (``runs/eval-<date>-<time>``) and never hands the same one to two runs started
in the same second.
"""
from __future__ import annotations

import os
import tempfile
import time

from drdo.errors import ConfigError

__all__ = ["check_output_file", "unique_run_dir"]


def _nearest_existing(path: str) -> str:
    """``path`` or its nearest ancestor that exists (a file, a directory or anything else)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_output_file(path: str, flag: str = "--output") -> None:
    """ConfigError naming ``flag`` unless ``path`` can be written as a file: not a directory (".",
    "out/"), no file among its parent folders, and the nearest existing folder accepts a new file (a
    probe file is created there and removed, which also detects a read-only file system)."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a directory; give a file path (e.g. {os.path.join(path, 'out.jsonl')})")
    parent = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory, so nothing can be written under it")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".drdo-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e})") from None


def unique_run_dir(parent: str, prefix: str) -> str:
    """A new directory ``<parent>/<prefix>-<date>-<time>`` (``-2``, ``-3``, ... appended when a run of
    the same second has it), created here so that no other run can take it; ``parent`` is made if needed."""
    os.makedirs(parent, exist_ok=True)
    stamp = os.path.join(parent, f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")
    for n in range(1, 10_000):
        path = stamp if n == 1 else f"{stamp}-{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"{stamp}: 10000 runs in one second; pass --output")
