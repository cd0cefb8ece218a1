"""Collators: pad tokenized preference items into the batch layout the losses expect."""
from __future__ import annotations

import torch

from drdo.data.row_checks import ORACLE_FIELDS, REF_FIELDS
from drdo.losses import IGNORE_INDEX

__all__ = ["PreferenceCollator", "SFTCollator", "shift_labels", "stack_scores"]


def _pad(sequences: list[list[int]], value: int, length: int) -> torch.Tensor:
    """[N, length] int64, each sequence padded on the right with ``value``."""
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


def _padded_length(sequences: list[list[int]], multiple: int | None) -> int:
    length = max(len(s) for s in sequences)
    if multiple:
        length = (length + multiple - 1) // multiple * multiple
    return length


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels [N, T] unshifted -> aligned: out[:, t] = labels[:, t + 1], out[:, -1] = ignore_index."""
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def _encode_batch(input_ids: list, labels: list, pad_token_id: int, ignore_index: int, multiple) -> dict:
    length = _padded_length(input_ids, multiple)
    mask = _pad([[1] * len(s) for s in input_ids], 0, length)
    unshifted = _pad([[ignore_index if t == IGNORE_INDEX else t for t in s] for s in labels], ignore_index, length)
    return {"input_ids": _pad(input_ids, pad_token_id, length), "attention_mask": mask,
            "labels": shift_labels(unshifted, ignore_index)}


def stack_scores(items: list[dict], fields: tuple[str, str]) -> torch.Tensor | None:
    """The scores ``fields`` = (chosen field, rejected field) of B items as one tensor, or None when no
    item has them: [2B] float32 (scalars) or [K, 2B] float32 (lists of K) = [chosen scores; rejected scores]."""
    present = [all(f in item for f in fields) for item in items]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"some items carry {fields} and some do not")
    values = [item[fields[0]] for item in items] + [item[fields[1]] for item in items]
    tensor = torch.tensor(values, dtype=torch.float32)
    return tensor.T.contiguous() if tensor.dim() == 2 else tensor


class _PaddingCollator:
    """Shared settings of the collators: the pad id, the ignore index, optional length rounding."""

    def __init__(self, pad_token_id: int, ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; load the tokenizer with drdo.tokenizer.get_tokenizer")
        self.pad_token_id, self.ignore_index, self.pad_to_multiple_of = pad_token_id, ignore_index, pad_to_multiple_of


class PreferenceCollator(_PaddingCollator):
    """Pads right and stacks a list of B items as 2B rows [chosen; rejected].

    Returns input_ids [2B, T] int64, attention_mask [2B, T] int64, labels [2B, T] int64
    ALIGNED (labels[:, t] is the token at t + 1 when it is a response token, else
    ignore_index; last column ignore_index), rows [B] int64, and when present
    oracle_rewards [2B] float32 (K == 1) or [K, 2B] float32 (K > 1), ref_logps [2B] float32.
    """

    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty batch")
        input_ids = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
        labels = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
        batch = _encode_batch(input_ids, labels, self.pad_token_id, self.ignore_index, self.pad_to_multiple_of)
        batch["rows"] = torch.tensor([it["row"] for it in items], dtype=torch.long)
        oracle = stack_scores(items, ORACLE_FIELDS)
        if oracle is not None:
            batch["oracle_rewards"] = oracle
        ref = stack_scores(items, REF_FIELDS)
        if ref is not None:
            batch["ref_logps"] = ref
        return batch


class SFTCollator(_PaddingCollator):
    """Chosen rows only: input_ids, attention_mask, labels (aligned like PreferenceCollator) [B, T] int64, rows [B]."""

    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty batch")
        batch = _encode_batch([it["chosen_input_ids"] for it in items], [it["chosen_labels"] for it in items],
                              self.pad_token_id, self.ignore_index, self.pad_to_multiple_of)
        batch["rows"] = torch.tensor([it["row"] for it in items], dtype=torch.long)
        return batch
