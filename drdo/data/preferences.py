"""Preference data: load, render, tokenize and truncate (prompt, chosen, rejected) pairs.

Each row is checked first by :mod:`drdo.data.row_checks`.

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

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from drdo.data.row_checks import (
    ORACLE_FIELDS,
    EmptyDatasetError,
    InvalidExampleError,
    RowDropper,
    RowExpectations,
    RowProblem,
    check_prompt,
    check_requirements,
    check_row,
)
from drdo.data.sources import load_rows, row_label
from drdo.losses import IGNORE_INDEX
from drdo.tokenizer import TokenizerError

logger = logging.getLogger("drdo.data")

_TOKENIZE_CHUNK = 1024


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
    """TokenizerError (a setup error: the ``drdo`` command reports it in one line) for a tokenizer
    without a chat template, which conversations need."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TokenizerError(
            f"the data holds conversations (lists of messages) but the tokenizer {name} has no chat_template; "
            "use a tokenizer with a chat template (--tokenizer, e.g. the model's instruct version) or plain strings"
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
        raise RowProblem("chat template", f"chat template failed: {type(err).__name__}: {err}") from err


def _parse_row(row, index: int, expect: RowExpectations, tokenizer) -> _Parsed:
    prompt, chosen, rejected, oracle, ref = check_row(row, index, expect)
    is_chat = not isinstance(prompt, str)
    if is_chat:
        _require_chat_template(tokenizer)  # a setup error, not a row problem: never skipped
    texts = _render(tokenizer, prompt, chosen, rejected)
    return _Parsed(index, *texts, is_chat, oracle=oracle, ref=ref)


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
    Raises ``RowProblem`` when a response has no scored token left.
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
            raise RowProblem(
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


def _validate_lengths(max_length: int, max_prompt_length: int | None) -> int:
    """Check the limits; returns the effective max_prompt_length (None -> max_length)."""
    if max_prompt_length is None:
        max_prompt_length = max_length
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return max_prompt_length


def _parse_all(rows, expect: RowExpectations, tokenizer, drop: RowDropper) -> list[_Parsed]:
    """Phase 1: validate and render every row (bad rows go to ``drop``)."""
    parsed = []
    for index, row in enumerate(rows):
        try:
            parsed.append(_parse_row(row, index, expect, tokenizer))
        except RowProblem as problem:
            drop(index, problem)
    return parsed


def _encode_all(parsed: list[_Parsed], tokenizer, drop: RowDropper, max_length: int,
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
        except RowProblem as problem:
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
    expect = RowExpectations.of(rows)
    check_requirements(expect, name, require_oracle, require_ref)
    drop = RowDropper(name, skip_invalid, rows)
    expect.where = drop.where
    parsed = _parse_all(rows, expect, tokenizer, drop)
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
                                dropped_rows=sorted(drop.rows), num_oracles=expect.num_oracles, has_ref=expect.has_ref)
    dataset.identical_pairs = len(identical)
    return dataset


def load_prompts(source, *, split: str = "train") -> list:
    """The ``prompt`` of every row (a string or a list of messages), for generation and evaluation."""
    rows, name = load_rows(source, split)
    prompts = []
    for index, row in enumerate(rows):
        try:
            prompts.append(check_prompt(row))
        except RowProblem as problem:
            raise InvalidExampleError(name, index, problem.reason, problem.detail, row_label(rows, index)) from problem
    if not prompts:
        raise EmptyDatasetError(f"{name}: the data source holds no rows")
    return prompts
