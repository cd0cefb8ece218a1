"""Preference data: load, validate, tokenize, truncate and collate (prompt, chosen, rejected) pairs.

Sources (read through the ``datasets`` library): a local ``.jsonl`` / ``.json`` /
``.parquet`` file, a directory (``save_to_disk`` output or data files), a hub dataset
id (needs network; tests never use one), a ``datasets.Dataset``, or a list of dicts.
Local JSON/JSONL files are read with Python's ``json`` (values stay exactly as written: the
string "42" is never turned into a number) and Parquet with pyarrow. Rows are indexed from 0 in
source order (blank JSONL lines are not rows) and every item keeps that index in ``item["row"]``;
messages name a JSONL row by its 1-based line number and other rows by their 1-based position
("row 3 (1-based)"). For a local file the split name is ignored (a file is one split) but a
slice such as ``"train[:100]"`` is honoured.

Row fields:
  - ``prompt``, ``chosen``, ``rejected``: either all strings, or all TRL-style
    conversations (lists of ``{"role": str, "content": str}``): ``prompt`` the
    conversation so far, ``chosen``/``rejected`` the assistant message(s) that follow.
    Conversations are rendered with the tokenizer's chat template (a tokenizer
    without one is an error): prompt text = template(prompt, add_generation_prompt=True),
    response text = template(prompt + response) minus that prefix. Only ``role``
    and ``content`` of each message are passed to the template.
  - optional ``oracle_chosen`` / ``oracle_rejected``: a float each, or a list of K
    floats each (an ensemble of K oracles, e-DPO); the same K in every row.
  - optional ``ref_chosen_logps`` / ``ref_rejected_logps``: floats (<= 0), the reference
    model's summed response log-probs (they must come from this same tokenization).
  If any row carries oracle scores (or reference log-probs), every row must.

Tokenization: prompt and response are tokenized separately and concatenated (no
separator). A string prompt gets the special tokens the tokenizer itself puts in
front of a single sequence (e.g. Llama's BOS; none for the byte tokenizer);
a rendered chat prompt is tokenized as is (the template carries its own specials).
The response is tokenized without special tokens and EOS is appended (unless the
rendered response already ends with EOS). Labels (unshifted) are -100 on prompt
tokens and the token id on response tokens, EOS included.

Truncation policy (prompt shared by the pair, each response truncated on its own):
  1. a prompt longer than ``max_prompt_length`` keeps its LAST ``max_prompt_length``
     tokens (cut from the left: the end of the prompt is what the response answers;
     ``max_prompt_length=None`` means ``max_length``);
  2. then, if prompt + response (EOS included) exceeds ``max_length``, the response
     keeps its FIRST ``max_length - len(prompt)`` tokens (its tail is cut). EOS is
     the last token, so it is kept only if the whole response fits: a cut response
     has no EOS and never teaches the model to stop where it was cut;
  3. a response left with no scored token is an invalid row (when the prompt fills
     ``max_length``; a response token at position 0, i.e. after an empty prompt
     without BOS, is never predicted and does not count).
  Choose ``max_prompt_length < max_length`` to leave every response room.

Before tokenizing, a text is cut to a generous number of characters (prompts keep their end,
responses their start): at least 4 x the token limit x the longest token of the vocabulary, so
the kept tokens are unchanged while one huge row cannot take gigabytes. Rows whose chosen and
rejected responses are identical carry no preference; they are counted
(``dataset.identical_pairs``) and reported in one warning.

Bad rows (missing field, wrong type, mixed formats, malformed messages, empty or
whitespace-only response, nothing left after truncation, NaN/inf score, positive
log-prob, inconsistent K, invalid JSON line, chat template failure) raise
:class:`InvalidExampleError` naming the source, the row and the problem. With
``skip_invalid=True`` they are dropped instead, counted per reason in
``dataset.dropped`` and summarised in one warning line of the ``drdo.data`` logger.
A source with no usable row raises :class:`EmptyDatasetError`. Rows are checked in
two passes (fields and rendering, then tokenization and truncation), so the error
raised first is the first bad row of the first pass that finds one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drdo.data.sources import _BadJSONLine, load_rows, row_label
from drdo.errors import shown
from drdo.losses import IGNORE_INDEX

logger = logging.getLogger("drdo.data")

PAIR_FIELDS = ("prompt", "chosen", "rejected")
ORACLE_FIELDS = ("oracle_chosen", "oracle_rejected")
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
_TOKENIZE_CHUNK = 1024
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


class _RowProblem(Exception):
    """Internal: why one row is unusable. ``reason`` is the key counted in ``dataset.dropped``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail



# ----------------------------------------------------------------------------- row validation


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_text(field: str, text: str) -> str:
    """``text`` unless it cannot be written as UTF-8 (a lone surrogate such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _RowProblem("invalid text", f"field {field!r} holds {err.object[err.start:err.end]!r} at character "
                                          f"{err.start}, which is not valid Unicode text (a lone surrogate)") from None
    return text


def _check_messages(field: str, messages: list) -> list[dict]:
    """Validate a list of {role, content} messages; returns copies holding only role and content."""
    if len(messages) == 0:
        raise _RowProblem("malformed messages", f"field {field!r} is an empty list of messages")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _RowProblem("malformed messages", f"{field}[{i}] is a {type(msg).__name__}, not a message dict")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise _RowProblem("malformed messages", f"{field}[{i}] has no string 'role'")
        if not isinstance(content, str):
            raise _RowProblem("malformed messages", f"{field}[{i}] has no string 'content'")
        clean.append({"role": _check_text(f"{field}[{i}].role", role),
                      "content": _check_text(f"{field}[{i}].content", content)})
    return clean


def _check_text_field(row: dict, field: str):
    """A pair field: a str or a validated list of messages."""
    value = row.get(field)
    if value is None:
        raise _RowProblem("missing field", f"missing field {field!r}")
    if isinstance(value, str):
        return _check_text(field, value)
    if isinstance(value, (list, tuple)):
        return _check_messages(field, list(value))
    kind = type(value).__name__
    raise _RowProblem("wrong type", f"field {field!r} must be a string or a list of messages, got {kind}")


def _check_pair(row: dict) -> tuple:
    """(prompt, chosen, rejected): all strings or all message lists, responses not empty."""
    prompt, chosen, rejected = (_check_text_field(row, f) for f in PAIR_FIELDS)
    kinds = {isinstance(v, str) for v in (prompt, chosen, rejected)}
    if len(kinds) > 1:
        raise _RowProblem(
            "mixed formats", "prompt, chosen and rejected must be all strings or all lists of messages"
        )
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        text = response if isinstance(response, str) else "".join(m["content"] for m in response)
        if not text.strip():
            raise _RowProblem("empty response", f"field {field!r} is an empty response")
    return prompt, chosen, rejected


def _check_score(field: str, value) -> list[float]:
    """A score (float or list of floats) as a non-empty list of finite floats."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise _RowProblem("wrong type", f"field {field!r} is an empty list")
    for v in values:
        if not _is_number(v):
            raise _RowProblem("wrong type", f"field {field!r} must be a number or a list of numbers, got {shown(v)}")
        try:
            finite = math.isfinite(float(v))
        except OverflowError:  # an int beyond float range, e.g. 10**400
            raise _RowProblem("non-finite score", f"field {field!r} holds an integer of {int(v).bit_length()} bits, "
                                                  "beyond the range of a float") from None
        if not finite:
            raise _RowProblem("non-finite score", f"field {field!r} holds a non-finite value ({v})")
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
            raise _RowProblem("score overflow", f"{name} reaches {worst:.3g}, beyond {limit:.3g}, the largest "
                                                f"{np.dtype(SCORE_DTYPE).name} the losses compute in; rescale the "
                                                "Oracle scores")


def _check_optional_pair(row: dict, fields: tuple[str, str], expected: bool, hint: str):
    """Both fields (as lists of floats) when ``expected``; (None, None) when absent and not expected."""
    present = [row.get(f) is not None for f in fields]
    if not any(present) and not expected:
        return None, None
    for field, here in zip(fields, present):
        if not here:
            raise _RowProblem("missing field", f"missing field {field!r} ({hint})")
    return tuple(_check_score(f, row[f]) for f in fields)


def _check_oracle(row: dict, spec: "_Spec", row_index: int):
    """Oracle scores of the row as (chosen, rejected) lists of K floats, or (None, None)."""
    chosen, rejected = _check_optional_pair(row, ORACLE_FIELDS, spec.has_oracle, "other rows have oracle scores")
    if chosen is None:
        return None, None
    if len(chosen) != len(rejected):
        raise _RowProblem(
            "inconsistent K", f"oracle_chosen has {len(chosen)} scores but oracle_rejected has {len(rejected)}"
        )
    _check_score_range(chosen, rejected)
    if spec.num_oracles == 0:
        spec.num_oracles, spec.k_row = len(chosen), spec.where(row_index)
    elif len(chosen) != spec.num_oracles:
        raise _RowProblem(
            "inconsistent K",
            f"{len(chosen)} oracle scores per response but {spec.k_row} has {spec.num_oracles}",
        )
    return chosen, rejected


def check_oracle_rows(rows, source: str) -> None:
    """InvalidExampleError naming the first row (a dict) of ``rows`` whose Oracle scores the losses cannot
    use: missing, not numbers (a string such as "0.5" included), NaN/inf, an empty list, a K that differs
    between fields or rows, or values that overflow :data:`SCORE_DTYPE`. For trainers that read the rows
    themselves (:class:`drdo.integrations.trl.DRDOTrainer`); the checks are those of
    :func:`load_preference_dataset`."""
    spec = _Spec(has_oracle=True, has_ref=False)
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise _RowProblem("not a dict", f"a row must be a dict, got {type(row).__name__}")
            _check_oracle(row, spec, index)
        except _RowProblem as problem:
            raise InvalidExampleError(source, index, problem.reason, problem.detail, row_label(rows, index),
                                      hint=None) from problem


def _check_ref(row: dict, spec: "_Spec"):
    """Reference log-probs (chosen, rejected) as floats <= 0, or (None, None)."""
    chosen, rejected = _check_optional_pair(row, REF_FIELDS, spec.has_ref, "other rows have reference log-probs")
    if chosen is None:
        return None, None
    for field, value in zip(REF_FIELDS, (chosen, rejected)):
        if len(value) != 1:
            raise _RowProblem("wrong type", f"field {field!r} must be a single number")
        if value[0] > _LOGP_TOLERANCE:
            raise _RowProblem("positive log-prob", f"field {field!r} = {value[0]} > 0 is not a log-probability")
    return chosen[0], rejected[0]


@dataclass
class _Spec:
    """Dataset-wide expectations, settled from all rows before any row is checked."""

    has_oracle: bool
    has_ref: bool
    num_oracles: int = 0  # K, set by the first row with valid oracle scores (row k_row)
    k_row: str = ""
    where: Callable[[int], str] = lambda index: f"row {index + 1} (1-based)"


@dataclass
class _Parsed:
    """One validated row, rendered to text."""

    row: int
    prompt_text: str
    chosen_text: str
    rejected_text: str
    is_chat: bool
    oracle: tuple | None
    ref: tuple | None


@dataclass
class _Encoded:
    """One tokenized, truncated pair: prompt int32[P], chosen int32[C], rejected int32[R] (EOS included
    when kept), the source row, oracle scores ((chosen, rejected) lists of K floats) and ref log-probs."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    row: int
    oracle: tuple | None
    ref: tuple | None


# ----------------------------------------------------------------------------- rendering


def _require_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the data holds conversations (lists of messages) but the tokenizer has no chat_template; "
            "use a tokenizer with a chat template (e.g. drdo.tokenizer.build_byte_tokenizer()) or plain strings"
        )


def render_prompt(tokenizer, prompt) -> str:
    """The prompt as text: a string as is; messages via the chat template with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    _require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def render_response(tokenizer, prompt, response, *, prompt_text: str | None = None) -> str:
    """The response as text: a string as is; messages as template(prompt + response) minus the prompt text.

    ``prompt_text`` (optional) is ``render_prompt(tokenizer, prompt)`` when already computed.
    """
    if isinstance(response, str):
        return response
    if prompt_text is None:
        prompt_text = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError("the chat template's rendering of prompt + response does not start with the rendered prompt")
    return full[len(prompt_text):]


def _render(tokenizer, prompt, chosen, rejected) -> tuple[str, str, str]:
    try:
        prompt_text = render_prompt(tokenizer, prompt)
        return (
            prompt_text,
            render_response(tokenizer, prompt, chosen, prompt_text=prompt_text),
            render_response(tokenizer, prompt, rejected, prompt_text=prompt_text),
        )
    except Exception as err:  # the prefix check, or jinja errors raised by the template itself
        raise _RowProblem("chat template", f"chat template failed: {type(err).__name__}: {err}") from err


def _parse_row(row, index: int, spec: _Spec, tokenizer) -> _Parsed:
    if isinstance(row, _BadJSONLine):
        raise _RowProblem("invalid JSON", f"not valid JSON ({row.error})")
    if not isinstance(row, dict):
        raise _RowProblem("not a dict", f"a row must be a dict, got {type(row).__name__}")
    prompt, chosen, rejected = _check_pair(row)
    oracle = _check_oracle(row, spec, index)
    ref = _check_ref(row, spec)
    is_chat = not isinstance(prompt, str)
    if is_chat:
        _require_chat_template(tokenizer)  # a setup error, not a row problem: never skipped
    texts = _render(tokenizer, prompt, chosen, rejected)
    return _Parsed(index, *texts, is_chat,
                   oracle=oracle if oracle[0] is not None else None, ref=ref if ref[0] is not None else None)


def _any_present(rows, field: str) -> bool:
    """Does any row carry a non-null ``field``?"""
    import datasets

    if isinstance(rows, datasets.Dataset):
        return field in rows.column_names and any(v is not None for v in rows[field])
    return any(isinstance(r, dict) and r.get(field) is not None for r in rows)


# ----------------------------------------------------------------------------- tokenization


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts in front of a single sequence when adding special tokens (e.g. [BOS])."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode_prompt(tokenizer, prompt, max_prompt_length: int | None = None) -> list[int]:
    """Token ids of one prompt exactly as the dataset builds them (for generation/evaluation).

    String prompt: the tokenizer's leading special tokens + its ids; messages: the rendered
    chat prompt (generation prompt included). Keeps the last ``max_prompt_length`` ids.
    """
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    if isinstance(prompt, str):
        ids = _special_prefix(tokenizer) + list(ids)
    return list(ids)[-max_prompt_length:] if max_prompt_length else list(ids)


def _batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (batched through the fast tokenizer)."""
    out: list[list[int]] = []
    for i in range(0, len(texts), _TOKENIZE_CHUNK):
        out.extend(tokenizer(texts[i:i + _TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"])
    return out


def _char_limit(tokenizer, max_tokens: int) -> int:
    """Characters that always hold more than ``max_tokens`` tokens: 4 x max_tokens x the longest
    token string of the vocabulary (at least 4 characters). One token never covers more characters
    than its string, so cutting a text there keeps its first (or last) max_tokens tokens."""
    longest = getattr(tokenizer, "_drdo_longest_token", None)
    if longest is None:
        try:
            longest = max((len(t) for t in tokenizer.get_vocab()), default=0)
        except Exception:  # a tokenizer without get_vocab: assume long tokens
            longest = 64
        try:
            tokenizer._drdo_longest_token = longest
        except Exception:
            pass
    return 4 * max_tokens * max(longest, 4)


def _truncate_pair(prompt_ids, chosen_ids, rejected_ids, *, eos_token_id: int, max_length: int,
                   max_prompt_length: int):
    """Apply the module's truncation policy; returns (prompt, chosen + EOS, rejected + EOS) lists.

    ``chosen_ids``/``rejected_ids`` come without EOS; EOS is appended unless already last.
    Raises ``_RowProblem`` when a response has no scored token left.
    """
    prompt = list(prompt_ids)[-max_prompt_length:]
    budget = max_length - len(prompt)
    responses = []
    for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        ids = list(ids)
        if not ids or ids[-1] != eos_token_id:
            ids.append(eos_token_id)
        ids = ids[:max(budget, 0)]
        if len(ids) - (1 if not prompt else 0) < 1:
            raise _RowProblem(
                "no tokens after truncation",
                f"the {name} response has no token left after truncation "
                f"(prompt {len(prompt)} tokens after max_prompt_length={max_prompt_length}, max_length={max_length})",
            )
        responses.append(ids)
    return prompt, responses[0], responses[1]


# ----------------------------------------------------------------------------- dataset


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized preference pairs; ``dataset[i]`` is a dict of python lists/floats (see ``__getitem__``).

    Attributes: ``raw`` (``raw[i]`` is the original row of item i, a dict), ``source``
    (str), ``dropped`` (reason -> count), ``dropped_rows`` (list of (row, message)),
    ``num_oracles`` (K, 0 without oracle scores), ``has_ref`` (bool).
    """

    def __init__(self, encoded: list[_Encoded], rows: Sequence, kept: list[int], *, source: str,
                 dropped: dict, dropped_rows: list, num_oracles: int, has_ref: bool):
        self._encoded = encoded
        self.raw = _RowView(rows, kept)
        self.source = source
        self.dropped = dict(dropped)
        self.dropped_rows = list(dropped_rows)
        self.num_oracles = num_oracles
        self.has_ref = has_ref

    def __len__(self) -> int:
        return len(self._encoded)

    def where(self, row: int) -> str:
        """Where source row ``row`` (0-based) is, for messages: "line 7" of a JSONL file, else "row 8 (1-based)"."""
        return row_label(self.raw._rows, row)

    def __getitem__(self, index: int) -> dict:
        """chosen/rejected ``_input_ids`` and UNSHIFTED ``_labels`` (list[int]), ``row`` (int), and when
        present ``oracle_chosen``/``oracle_rejected`` (float, or list of K floats when K > 1) and
        ``ref_chosen_logps``/``ref_rejected_logps`` (float)."""
        enc = self._encoded[index]
        prompt_list = enc.prompt.tolist()
        item = {"row": enc.row}
        for name, response in (("chosen", enc.chosen), ("rejected", enc.rejected)):
            response_list = response.tolist()
            item[f"{name}_input_ids"] = prompt_list + response_list
            item[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt_list) + response_list
        if enc.oracle is not None:
            for field, scores in zip(ORACLE_FIELDS, enc.oracle):
                item[field] = scores[0] if self.num_oracles == 1 else list(scores)
        if enc.ref is not None:
            item["ref_chosen_logps"], item["ref_rejected_logps"] = enc.ref
        return item


class _RowView(Sequence):
    """``view[i]`` = original row ``kept[i]`` of the source, as a dict (decoded lazily)."""

    def __init__(self, rows: Sequence, kept: list[int]):
        self._rows, self._kept = rows, kept

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return dict(self._rows[self._kept[index]])


class _Dropper:
    """Raises on the first bad row, or (skip_invalid) counts reasons for the summary line."""

    def __init__(self, source: str, skip_invalid: bool, rows=None):
        self.source, self.skip_invalid, self._all = source, skip_invalid, rows
        self.counts: Counter = Counter()
        self.rows: list[tuple[int, str]] = []

    def where(self, row: int) -> str:
        return row_label(self._all, row) if self._all is not None else f"row {row + 1} (1-based)"

    def __call__(self, row: int, problem: _RowProblem) -> None:
        if not self.skip_invalid:
            raise InvalidExampleError(self.source, row, problem.reason, problem.detail, self.where(row)) from problem
        self.counts[problem.reason] += 1
        self.rows.append((row, problem.detail))

    def summary(self, total: int) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        first_row, first = min(self.rows)
        return (f"{self.source}: dropped {len(self.rows)} of {total} rows with --skip-invalid ({reasons}); "
                f"first: {self.where(first_row)}: {first}")


def _validate_lengths(max_length: int, max_prompt_length: int | None) -> int:
    """Check the limits; returns the effective max_prompt_length (None -> max_length)."""
    if max_prompt_length is None:
        max_prompt_length = max_length
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return max_prompt_length


def _check_requirements(spec: _Spec, source: str, require_oracle: bool, require_ref: bool) -> None:
    """MissingFieldError when the stage needs oracle scores / reference log-probs the data lacks."""
    if require_oracle and not spec.has_oracle:
        raise MissingFieldError(
            f"{source}: no oracle scores (fields oracle_chosen/oracle_rejected); "
            "run `drdo oracle score` to add them to the data"
        )
    if require_ref and not spec.has_ref:
        raise MissingFieldError(
            f"{source}: no reference log-probs (fields ref_chosen_logps/ref_rejected_logps); "
            "run `drdo reflogps` to add them to the data"
        )


def _parse_all(rows, spec: _Spec, tokenizer, drop: _Dropper) -> list[_Parsed]:
    """Phase 1: validate and render every row (bad rows go to ``drop``)."""
    parsed = []
    for index, row in enumerate(rows):
        try:
            parsed.append(_parse_row(row, index, spec, tokenizer))
        except _RowProblem as problem:
            drop(index, problem)
    return parsed


def _encode_all(parsed: list[_Parsed], tokenizer, drop: _Dropper, max_length: int,
                max_prompt_length: int) -> list[_Encoded]:
    """Phase 2: batch-tokenize the rendered texts, add BOS/EOS, truncate (bad rows go to ``drop``)."""
    prefix = _special_prefix(tokenizer)
    limit = _char_limit(tokenizer, max_length)
    prompts = _batch_ids(tokenizer, [p.prompt_text[-limit:] for p in parsed])
    chosen = _batch_ids(tokenizer, [p.chosen_text[:limit] for p in parsed])
    rejected = _batch_ids(tokenizer, [p.rejected_text[:limit] for p in parsed])
    encoded = []
    for p, prompt_ids, chosen_ids, rejected_ids in zip(parsed, prompts, chosen, rejected):
        if not p.is_chat:
            prompt_ids = prefix + prompt_ids
        try:
            ids = _truncate_pair(prompt_ids, chosen_ids, rejected_ids, eos_token_id=tokenizer.eos_token_id,
                                max_length=max_length, max_prompt_length=max_prompt_length)
        except _RowProblem as problem:
            drop(p.row, problem)
            continue
        arrays = tuple(np.asarray(x, dtype=np.int32) for x in ids)
        encoded.append(_Encoded(*arrays, row=p.row, oracle=p.oracle, ref=p.ref))
    return encoded


def load_preference_dataset(source, tokenizer, *, max_length: int = 1024, max_prompt_length: int | None = 512,
                            split: str = "train", skip_invalid: bool = False, require_oracle: bool = False,
                            require_ref: bool = False) -> PreferenceDataset:
    """Load, validate, render, tokenize and truncate preference pairs (policy: module docstring).

    Raises InvalidExampleError (bad row, unless skip_invalid), MissingFieldError
    (require_oracle / require_ref not met), EmptyDatasetError (no usable row).
    """
    max_prompt_length = _validate_lengths(max_length, max_prompt_length)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; use drdo.tokenizer.get_tokenizer to load it")
    rows, name = load_rows(source, split)
    if len(rows) == 0:
        raise EmptyDatasetError(f"{name}: the data source holds no rows")
    spec = _Spec(has_oracle=any(_any_present(rows, f) for f in ORACLE_FIELDS),
                 has_ref=any(_any_present(rows, f) for f in REF_FIELDS))
    _check_requirements(spec, name, require_oracle, require_ref)
    drop = _Dropper(name, skip_invalid, rows)
    spec.where = drop.where
    parsed = _parse_all(rows, spec, tokenizer, drop)
    encoded = _encode_all(parsed, tokenizer, drop, max_length, max_prompt_length)
    if drop.rows:
        logger.warning(drop.summary(len(rows)))
    kept = {e.row for e in encoded}
    identical = [p.row for p in parsed if p.row in kept and p.chosen_text == p.rejected_text]
    if identical:
        logger.warning("%s: %d of %d rows have identical chosen and rejected responses (no preference signal; "
                       "first: %s)", name, len(identical), len(rows), drop.where(identical[0]))
    if not encoded:
        raise EmptyDatasetError(f"{name}: no usable preference pair; " + (drop.summary(len(rows)) if drop.rows else ""))
    dataset = PreferenceDataset(encoded, rows, [e.row for e in encoded], source=name, dropped=drop.counts,
                                dropped_rows=sorted(drop.rows), num_oracles=spec.num_oracles, has_ref=spec.has_ref)
    dataset.identical_pairs = len(identical)
    return dataset


def load_prompts(source, *, split: str = "train") -> list:
    """The ``prompt`` of every row (a string or a list of messages), for generation and evaluation."""
    rows, name = load_rows(source, split)
    prompts = []
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise _RowProblem("not a dict", f"a row must be a dict, got {type(row).__name__}")
            prompts.append(_check_text_field(row, "prompt"))
        except _RowProblem as problem:
            raise InvalidExampleError(name, index, problem.reason, problem.detail, row_label(rows, index)) from problem
    if not prompts:
        raise EmptyDatasetError(f"{name}: the data source holds no rows")
    return prompts
