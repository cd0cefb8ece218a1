"""JSON-lines files: the format of scored data, reference log-probs and generations."""
from __future__ import annotations

import json
from typing import Iterable

from drdo.atomic import atomic_write

__all__ = ["write_jsonl", "write_rows", "read_jsonl"]


def write_jsonl(rows: Iterable[dict], path: str) -> str:
    """Write dict rows as JSONL atomically (:mod:`drdo.atomic`; parent folders created); returns path."""
    with atomic_write(path) as f:
        write_rows(f, rows)
    return path


def write_rows(f, rows: Iterable[dict]) -> None:
    """Write dict rows as JSON lines to the open text file ``f``."""
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """Read JSON lines (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
