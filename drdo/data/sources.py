"""Reading rows from a data source: a local JSONL / JSON / Parquet file, a directory, a hub dataset
id, a ``datasets.Dataset`` or a list of dicts. Rows come back as they are stored; checking them is
:mod:`drdo.data.preferences`' job."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class _BadJSONLine:
    """Placeholder row for a JSONL line that does not parse (fallback reader only)."""

    line: int
    error: str



# ----------------------------------------------------------------------------- loading


def _local_split(split: str) -> str:
    """A local file is one split named "train"; keep the slice of ``split`` ("x[:10]" -> "train[:10]")."""
    match = re.fullmatch(r"[^\[]*(\[.*\])?", split)
    return "train" + ((match.group(1) or "") if match else "")


def _read_json_fallback(path: Path) -> list:
    """Plain-Python reader used when ``datasets`` cannot parse a JSON/JSONL file.

    Returns the rows; a JSONL line that is not valid JSON becomes a :class:`_BadJSONLine`
    so that the error names its row (and line).
    """
    text = path.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        whole = None
    if isinstance(whole, list):
        return whole
    if isinstance(whole, dict):
        return [whole]
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            rows.append(_BadJSONLine(line_no, str(err)))
    return rows


def _load_local_file(path: Path, split: str):
    """Rows of a local .jsonl/.json/.parquet file through ``datasets`` (JSON: Python fallback)."""
    import datasets

    builder = LOCAL_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
    if path.stat().st_size == 0:
        return []
    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split=_local_split(split))
    except Exception as err:  # datasets raises many types (DatasetGenerationError, StopIteration, ...)
        if builder != "json":
            raise ValueError(f"{path}: cannot read the parquet file: {err}") from err
        return _read_json_fallback(path)


def _load_directory(path: Path, split: str):
    """A ``save_to_disk`` directory, or a directory of data files, through ``datasets``."""
    import datasets

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(str(path), split=split)


def _load_hub(name: str, split: str):
    """A hub dataset id (needs network access)."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:
        raise ValueError(
            f"could not load {name!r}: it is not a local file or directory, and loading it as a hub "
            f"dataset (split {split!r}) failed: {err}"
        ) from err


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix.lower() in LOCAL_SUFFIXES or name.startswith(("./", "../", "/", "~"))


def load_rows(source, split: str = "train") -> tuple[Sequence, str]:
    """Rows (a ``datasets.Dataset`` or a list of dicts) and a display name for error messages."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return source[split], f"<DatasetDict[{split}]>"
    if isinstance(source, datasets.Dataset):
        return source, "<Dataset>"
    if isinstance(source, (list, tuple)):
        return list(source), "<list>"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path, a hub id, a datasets.Dataset or a list of dicts, got {type(source)}")
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_file():
        return _load_local_file(path, split), name
    if path.is_dir():
        return _load_directory(path, split), name
    if _looks_like_path(name):
        raise FileNotFoundError(f"preference data file not found: {name}")
    return _load_hub(name, split), f"{name}[{split}]"
