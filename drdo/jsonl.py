"""JSON-lines files: the format of scored data, reference log-probs and generations."""
from __future__ import annotations

import json
import os
from typing import Iterable

__all__ = ["write_jsonl", "read_jsonl"]


def write_jsonl(rows: Iterable[dict], path: str) -> str:
    """Write dict rows as JSONL atomically (temporary file + rename; parent folders created); returns path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str) -> list[dict]:
    """Read JSON lines (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
