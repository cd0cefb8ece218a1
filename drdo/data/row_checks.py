"""Checking preference rows before they are rendered: the fields of a row, the errors of a bad one.

The row format (``prompt``, ``chosen``, ``rejected``, optional oracle scores and reference log-probs)
is described in :mod:`drdo.data.preferences`; this module checks a row against it, and the whole
data against what a stage needs (:func:`check_requirements`).

A bad row raises :class:`RowProblem` with a ``reason`` (the key counted when bad rows are skipped);
:class:`RowDropper` turns it into an :class:`InvalidExampleError` naming the source and the row, or
counts it under ``--skip-invalid``.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from drdo.data.sources import BadJSONLine, row_label
from drdo.errors import shown

__all__ = [
    "PAIR_FIELDS",
    "ORACLE_FIELDS",
    "REF_FIELDS",
    "InvalidExampleError",
    "MissingFieldError",
    "EmptyDatasetError",
    "RowProblem",
    "RowExpectations",
    "SCORE_DTYPE",
    "check_oracle_rows",
    "RowDropper",
    "check_row",
    "check_prompt",
    "check_requirements",
]

PAIR_FIELDS = ("prompt", "chosen", "rejected")
ORACLE_FIELDS = ("oracle_chosen", "oracle_rejected")
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
_LOGP_TOLERANCE = 1e-3  # a summed log-prob above this is not a log-prob
#: The dtype the losses compute Oracle scores in (the batches carry them as float32).
SCORE_DTYPE = np.float32


class InvalidExampleError(ValueError):
    """A row that cannot be used; ``.source``, ``.row`` (0-based index), ``.where`` (its line or 1-based
    row number, as shown) and ``.reason`` name the problem; ``hint`` (None: none) ends the message."""

    def __init__(self, source: str, row: int, reason: str, detail: str, where: str | None = None,
                 hint: str | None = "pass --skip-invalid to drop such rows"):
        self.source, self.row, self.reason, self.detail = source, row, reason, detail
        self.where = where or f"row {row + 1} (1-based)"
        super().__init__(f"{source}: {self.where}: {detail}" + (f" ({hint})" if hint else ""))


class MissingFieldError(ValueError):
    """The data lacks a field the requested stage needs (oracle scores, reference log-probs)."""


class EmptyDatasetError(ValueError):
    """The source holds no usable preference pair."""


class RowProblem(Exception):
    """Why one row is unusable. ``reason`` is the key counted in ``dataset.dropped``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_text(field: str, text: str) -> str:
    """``text`` unless it cannot be written as UTF-8 (a lone surrogate such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowProblem("invalid text", f"field {field!r} holds {err.object[err.start:err.end]!r} at character "
                                         f"{err.start}, which is not valid Unicode text (a lone surrogate)") from None
    return text


def _check_messages(field: str, messages: list) -> list[dict]:
    """Validate a list of {role, content} messages; returns copies holding only role and content."""
    if len(messages) == 0:
        raise RowProblem("malformed messages", f"field {field!r} is an empty list of messages")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RowProblem("malformed messages", f"{field}[{i}] is a {type(msg).__name__}, not a message dict")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise RowProblem("malformed messages", f"{field}[{i}] has no string 'role'")
        if not isinstance(content, str):
            raise RowProblem("malformed messages", f"{field}[{i}] has no string 'content'")
        clean.append({"role": _check_text(f"{field}[{i}].role", role),
                      "content": _check_text(f"{field}[{i}].content", content)})
    return clean


def _check_text_field(row: dict, field: str):
    """A pair field: a str or a validated list of messages."""
    value = row.get(field)
    if value is None:
        raise RowProblem("missing field", f"missing field {field!r}")
    if isinstance(value, str):
        return _check_text(field, value)
    if isinstance(value, (list, tuple)):
        return _check_messages(field, list(value))
    kind = type(value).__name__
    raise RowProblem("wrong type", f"field {field!r} must be a string or a list of messages, got {kind}")


def _check_pair(row: dict) -> tuple:
    """(prompt, chosen, rejected): all strings or all message lists, responses not empty."""
    prompt, chosen, rejected = (_check_text_field(row, f) for f in PAIR_FIELDS)
    kinds = {isinstance(v, str) for v in (prompt, chosen, rejected)}
    if len(kinds) > 1:
        raise RowProblem(
            "mixed formats", "prompt, chosen and rejected must be all strings or all lists of messages"
        )
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        text = response if isinstance(response, str) else "".join(m["content"] for m in response)
        if not text.strip():
            raise RowProblem("empty response", f"field {field!r} is an empty response")
    return prompt, chosen, rejected


def _check_score(field: str, value) -> list[float]:
    """A score (float or list of floats) as a non-empty list of finite floats."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise RowProblem("wrong type", f"field {field!r} is an empty list")
    for v in values:
        if not _is_number(v):
            raise RowProblem("wrong type", f"field {field!r} must be a number or a list of numbers, got {shown(v)}")
        try:
            finite = math.isfinite(float(v))
        except OverflowError:  # an int beyond float range, e.g. 10**400
            raise RowProblem("non-finite score", f"field {field!r} holds an integer of {int(v).bit_length()} bits, "
                                                 "beyond the range of a float") from None
        if not finite:
            raise RowProblem("non-finite score", f"field {field!r} holds a non-finite value ({v})")
    return [float(v) for v in values]


def _check_score_range(chosen: list[float], rejected: list[float]) -> None:
    """Every value the losses form from one pair's Oracle scores stays finite in :data:`SCORE_DTYPE`: the
    scores, their sums over the K Oracles, the margins chosen - rejected and the margins squared."""
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    margin = c - r
    formed = {"oracle_chosen": c, "oracle_rejected": r, "the sum of oracle_chosen": c.sum(),
              "the sum of oracle_rejected": r.sum(), "oracle_chosen - oracle_rejected": margin,
              "(oracle_chosen - oracle_rejected)**2": margin * margin}
    limit = float(np.finfo(SCORE_DTYPE).max)
    for name, value in formed.items():
        worst = float(np.max(np.abs(value)))
        if not worst <= limit:
            raise RowProblem("score overflow", f"{name} reaches {worst:.3g}, beyond {limit:.3g}, the largest "
                                               f"{np.dtype(SCORE_DTYPE).name} the losses compute in; rescale the "
                                               "Oracle scores")


def _check_optional_pair(row: dict, fields: tuple[str, str], expected: bool, hint: str):
    """Both fields (as lists of floats) when ``expected``; (None, None) when absent and not expected."""
    present = [row.get(f) is not None for f in fields]
    if not any(present) and not expected:
        return None, None
    for field, here in zip(fields, present):
        if not here and field in row:  # a null, e.g. the value Arrow gives a row that lacks the column
            raise RowProblem("wrong type", f"field {field!r} is None, not a number")
        if not here:
            raise RowProblem("missing field", f"missing field {field!r} ({hint})")
    return tuple(_check_score(f, row[f]) for f in fields)


def _check_oracle(row: dict, expect: RowExpectations, row_index: int):
    """Oracle scores of the row as (chosen, rejected) lists of K floats, or (None, None)."""
    chosen, rejected = _check_optional_pair(row, ORACLE_FIELDS, expect.has_oracle, "other rows have oracle scores")
    if chosen is None:
        return None, None
    if len(chosen) != len(rejected):
        raise RowProblem(
            "inconsistent K", f"oracle_chosen has {len(chosen)} scores but oracle_rejected has {len(rejected)}"
        )
    _check_score_range(chosen, rejected)
    if expect.num_oracles == 0:
        expect.num_oracles, expect.k_row = len(chosen), expect.where(row_index)
    elif len(chosen) != expect.num_oracles:
        raise RowProblem(
            "inconsistent K",
            f"{len(chosen)} oracle scores per response but {expect.k_row} has {expect.num_oracles}",
        )
    return chosen, rejected


def _check_ref(row: dict, expect: RowExpectations):
    """Reference log-probs (chosen, rejected) as floats <= 0, or (None, None)."""
    chosen, rejected = _check_optional_pair(row, REF_FIELDS, expect.has_ref, "other rows have reference log-probs")
    if chosen is None:
        return None, None
    for field, value in zip(REF_FIELDS, (chosen, rejected)):
        if len(value) != 1:
            raise RowProblem("wrong type", f"field {field!r} must be a single number")
        if value[0] > _LOGP_TOLERANCE:
            raise RowProblem("positive log-prob", f"field {field!r} = {value[0]} > 0 is not a log-probability")
    return chosen[0], rejected[0]


def _any_present(rows, field: str) -> bool:
    """Does any row carry a non-null ``field``?"""
    import datasets

    if isinstance(rows, datasets.Dataset):
        return field in rows.column_names and any(v is not None for v in rows[field])
    return any(isinstance(r, dict) and r.get(field) is not None for r in rows)


def check_oracle_rows(rows, source: str) -> None:
    """InvalidExampleError naming the first row (a dict) of ``rows`` whose Oracle scores the losses cannot
    use: missing, not numbers (a string such as "0.5" included), NaN/inf, an empty list, a K that differs
    between fields or rows, or values that overflow :data:`SCORE_DTYPE`. For trainers that read the rows
    themselves (:class:`drdo.integrations.trl.DRDOTrainer`); the checks are those of
    :func:`drdo.data.preferences.load_preference_dataset`."""
    expect = RowExpectations(has_oracle=True, has_ref=False)
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise RowProblem("not a dict", f"a row must be a dict, got {type(row).__name__}")
            _check_oracle(row, expect, index)
        except RowProblem as problem:
            raise InvalidExampleError(source, index, problem.reason, problem.detail, row_label(rows, index),
                                      hint=None) from problem


@dataclass
class RowExpectations:
    """Dataset-wide expectations, settled from all rows before any row is checked."""

    has_oracle: bool
    has_ref: bool
    num_oracles: int = 0  # K, set by the first row with valid oracle scores (row k_row)
    k_row: str = ""
    where: Callable[[int], str] = lambda index: f"row {index + 1} (1-based)"

    @classmethod
    def of(cls, rows) -> "RowExpectations":
        """Oracle scores / reference log-probs are expected when any row carries one."""
        return cls(has_oracle=any(_any_present(rows, f) for f in ORACLE_FIELDS),
                   has_ref=any(_any_present(rows, f) for f in REF_FIELDS))


def _as_dict(row) -> dict:
    """The row itself when it is a dict; a JSONL line that did not parse, or any other value, is a problem."""
    if isinstance(row, BadJSONLine):
        raise RowProblem("invalid JSON", f"not valid JSON ({row.error})")
    if not isinstance(row, dict):
        raise RowProblem("not a dict", f"a row must be a dict, got {type(row).__name__}")
    return row


def check_row(row, index: int, expect: RowExpectations) -> tuple:
    """(prompt, chosen, rejected, oracle, ref) of row ``index``: the texts as strings or message lists;
    oracle ((chosen, rejected) lists of K floats) and ref ((chosen, rejected) floats) or None.
    Raises :class:`RowProblem`."""
    row = _as_dict(row)
    prompt, chosen, rejected = _check_pair(row)
    oracle = _check_oracle(row, expect, index)
    ref = _check_ref(row, expect)
    return (prompt, chosen, rejected, oracle if oracle[0] is not None else None, ref if ref[0] is not None else None)


def check_prompt(row):
    """The ``prompt`` of a row: a string or a list of messages. Raises :class:`RowProblem`."""
    return _check_text_field(_as_dict(row), "prompt")


class RowDropper:
    """Raises on the first bad row, or (skip_invalid) counts reasons for the summary line."""

    def __init__(self, source: str, skip_invalid: bool, rows=None):
        self.source, self.skip_invalid, self._all = source, skip_invalid, rows
        self.counts: Counter = Counter()
        self.rows: list[tuple[int, str]] = []

    def where(self, row: int) -> str:
        return row_label(self._all, row) if self._all is not None else f"row {row + 1} (1-based)"

    def __call__(self, row: int, problem: RowProblem) -> None:
        if not self.skip_invalid:
            raise InvalidExampleError(self.source, row, problem.reason, problem.detail, self.where(row)) from problem
        self.counts[problem.reason] += 1
        self.rows.append((row, problem.detail))

    def summary(self, total: int) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        first_row, first = min(self.rows)
        return (f"{self.source}: dropped {len(self.rows)} of {total} rows with --skip-invalid ({reasons}); "
                f"first: {self.where(first_row)}: {first}")


def check_requirements(expect: RowExpectations, source: str, require_oracle: bool, require_ref: bool) -> None:
    """MissingFieldError when the stage needs oracle scores / reference log-probs the data lacks."""
    if require_oracle and not expect.has_oracle:
        raise MissingFieldError(
            f"{source}: no oracle scores (fields oracle_chosen/oracle_rejected); "
            "run `drdo oracle score` to add them to the data"
        )
    if require_ref and not expect.has_ref:
        raise MissingFieldError(
            f"{source}: no reference log-probs (fields ref_chosen_logps/ref_rejected_logps); "
            "run `drdo reflogps` to add them to the data"
        )
