"""Reading rows from a data source: a local JSONL / JSON / Parquet file, a directory, a hub dataset
id, a ``datasets.Dataset`` or a list of dicts. Rows come back as they are stored; checking them is
:mod:`drdo.data.row_checks`' job."""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LOCAL_SUFFIXES", "DataSourceError", "BadJSONLine", "Rows", "row_label", "load_rows"]

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataSourceError(ValueError):
    """A data source cannot be read at all (unsupported type, not UTF-8, corrupt file)."""


@dataclass
class BadJSONLine:
    """Placeholder row for a JSONL line that does not parse, so that the error names its line."""

    line: int
    error: str


class Rows(list):
    """Rows of a local JSON/JSONL file with where each one came from: ``lines[i]`` is the 1-based line
    of row i in a JSONL file (None: rows are counted from 1 instead, e.g. a JSON array)."""

    def __init__(self, rows, lines: list[int] | None = None):
        super().__init__(rows)
        self.lines = lines


def row_label(rows, index: int) -> str:
    """Where row ``index`` (0-based) is, for messages: "line 7" in a JSONL file, else "row 8 (1-based)"."""
    lines = getattr(rows, "lines", None)
    if lines is not None:
        return f"line {lines[index]}"
    return f"row {index + 1} (1-based)"


# ----------------------------------------------------------------------------- loading


_SLICE = re.compile(r"[^\[]*\[(-?\d*)(%?):(-?\d*)(%?)\]")


def _apply_slice(rows: Rows, split: str) -> Rows:
    """A local file is one split; honour a slice of ``split`` ("x[:10]", "x[10:]", "x[:50%]")."""
    match = _SLICE.fullmatch(split)
    if match is None:
        if "[" in split:
            raise DataSourceError(f"unsupported split slice {split!r}; use e.g. 'train[:100]' or 'train[:50%]'")
        return rows
    n = len(rows)

    def bound(text: str, percent: str):
        if not text:
            return None
        value = int(text)
        return int(round(value * n / 100)) if percent else value

    part = slice(bound(match.group(1), match.group(2)), bound(match.group(3), match.group(4)))
    return Rows(list.__getitem__(rows, part), rows.lines[part] if rows.lines is not None else None)


def decode_utf8(data: bytes, name) -> str:
    """The text of a file's bytes (a leading BOM dropped); DataSourceError naming the file ``name`` and
    the line of the first byte that is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataSourceError(f"{name}: line {line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    return text[1:] if text.startswith("\ufeff") else text


def file_sha256(path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def file_kind(path) -> str:
    """What ``path`` is, for messages: "a FIFO (named pipe)", "a character device", ..., "a directory",
    "a file", or "missing"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    return next((name for test, name in _KINDS if test(mode)), "a file")


def _read_json_file(path: Path) -> Rows:
    """Rows of a JSON array / object or a JSONL file, read with Python's ``json``: values stay exactly
    as written ("42" stays a string, 42 an int); no schema is inferred across rows. A JSONL line
    that is not valid JSON becomes a :class:`BadJSONLine` so that the error names its line."""
    text = decode_utf8(path.read_bytes(), path)
    whole = _parse_json(text)
    if isinstance(whole, BadJSONLine):
        if text.lstrip().startswith("["):
            where = f"line {whole.line}: " if whole.line else ""
            raise DataSourceError(f"{path}: {where}not valid JSON ({whole.error})")
        whole = None
    if isinstance(whole, list):
        return Rows(whole)
    if isinstance(whole, dict):
        return Rows([whole])
    rows, lines = [], []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        parsed = _parse_json(line)
        rows.append(BadJSONLine(line_no, parsed.error) if isinstance(parsed, BadJSONLine) else parsed)
        lines.append(line_no)
    return Rows(rows, lines)


def _parse_json(text: str):
    """``json.loads(text)``, or a :class:`BadJSONLine` (its line within ``text``, 0 when unknown) for text
    that is not JSON, nested deeper than Python's parser goes, or holds an integer of more digits than
    Python converts (``sys.get_int_max_str_digits()``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return BadJSONLine(err.lineno, err.msg)
    except RecursionError:
        return BadJSONLine(0, f"nested more than {sys.getrecursionlimit()} levels deep")
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        return BadJSONLine(0, f"a number of more than {sys.get_int_max_str_digits()} digits")


def _read_parquet(path: Path) -> Rows:
    """Rows of a parquet file as Python values (pyarrow's types, no JSON decoding)."""
    try:
        import pyarrow.parquet as pq

        return Rows(pq.read_table(str(path)).to_pylist())
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a corrupt file
        raise DataSourceError(f"{path}: cannot read the parquet file: {' '.join(str(err).split())}") from None


def _load_local_file(path: Path, split: str) -> Rows:
    """Rows of a local .jsonl/.json/.parquet file (a file is one split; a slice of ``split`` is kept)."""
    builder = LOCAL_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataSourceError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
    if path.stat().st_size == 0:
        return Rows([], [])
    rows = _read_json_file(path) if builder == "json" else _read_parquet(path)
    return _apply_slice(rows, split)


def _load_directory(path: Path, split: str):
    """A ``save_to_disk`` directory, or a directory of data files, through ``datasets``."""
    import datasets

    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(str(path), split=split)
    except Exception as err:  # JSONDecodeError, DatasetGenerationError (files of different columns), KeyError, ...
        raise DataSourceError(f"{path}: cannot read the dataset directory (split {split!r}): {_why(err)}") from err


def _why(err: BaseException) -> str:
    """One line: the error and, when it wraps another (``datasets`` does), the error it wraps."""
    cause = err.__cause__ or err.__context__
    text = f"{type(err).__name__}: {err}" + (f" ({type(cause).__name__}: {cause})" if cause is not None else "")
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:397] + "..."


def _load_hub(name: str, split: str):
    """A hub dataset id (needs network access; fails at once when the hub cannot be reached)."""
    import datasets

    from drdo.hub import require_hub

    if not _cached_dataset(name):
        require_hub(name, "--data")
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataSourceError(
            f"could not load {name!r}: it is not a local file or directory, and loading it as a hub "
            f"dataset (split {split!r}) failed: {err}"
        ) from err


def _cached_dataset(name: str) -> bool:
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == name and r.repo_type == "dataset" for r in scan_cache_dir().repos)
    except Exception:
        return False


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
    if path.exists():
        raise DataSourceError(f"{name} is {file_kind(path)}, not a data file (.jsonl, .json or .parquet)")
    if _looks_like_path(name):
        raise FileNotFoundError(f"preference data file not found: {name}")
    return _load_hub(name, split), f"{name}[{split}]"
