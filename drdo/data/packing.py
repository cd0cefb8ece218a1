"""Padding-free batches: the 2B sequences of a preference batch packed into one row.

A packed batch holds no padding token. Its sequences (chosen rows first, then rejected, as in
the padded layout) lie end to end in one row of ``L = sum of lengths`` tokens:

* ``input_ids`` [1, L] int64, ``position_ids`` [1, L] int64 restarting at 0 for each sequence;
* ``labels`` [1, L] int64 ALIGNED (position t predicts ``labels[t]``), ``ignore_index`` at each
  sequence's last token, so no token is ever predicted across a boundary;
* ``cu_seqlens`` [R + 1] int32: sequence r spans ``[cu_seqlens[r], cu_seqlens[r + 1])``
  (flash-attn's varlen convention); ``seq_idx`` [1, L] int64: the sequence of each token.

Attention must not cross sequences. Hugging Face models do that from ``position_ids`` alone
when ``attention_mask`` is None: flash-attn's varlen kernel (``flash_attention_2``), and for
sdpa/eager a block-diagonal causal mask built from the position restarts (transformers >= 4.54).
"""
from __future__ import annotations

import torch

from drdo.losses import IGNORE_INDEX

__all__ = [
    "pack_sequences", "segment_sum", "last_token_index", "packed_attention_supported",
    "PackedPreferenceCollator", "PackedSFTCollator",
]


def pack_sequences(input_ids: list[list[int]], labels: list[list[int]], ignore_index: int = IGNORE_INDEX) -> dict:
    """Pack R sequences into one row.

    Args:
        input_ids: R token lists (each non-empty); labels: R lists of the same lengths, UNSHIFTED
            (``labels[r][t]`` is the token at t when scored, else ``ignore_index``).
    Returns:
        dict of input_ids, position_ids, labels (aligned), seq_idx: [1, L] int64; cu_seqlens [R + 1] int32.
    """
    if not input_ids:
        raise ValueError("cannot pack zero sequences")
    ids, pos, lab, seq = [], [], [], []
    for r, (tokens, row_labels) in enumerate(zip(input_ids, labels, strict=True)):
        if len(tokens) == 0 or len(tokens) != len(row_labels):
            raise ValueError(f"sequence {r}: {len(tokens)} tokens and {len(row_labels)} labels (need equal, > 0)")
        ids += tokens
        pos += range(len(tokens))
        lab += list(row_labels[1:]) + [ignore_index]  # aligned; the last token predicts nothing
        seq += [r] * len(tokens)
    lengths = torch.tensor([len(t) for t in input_ids], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(input_ids) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    as_row = lambda values: torch.tensor(values, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return {"input_ids": as_row(ids), "position_ids": as_row(pos), "labels": as_row(lab),
            "seq_idx": as_row(seq), "cu_seqlens": cu_seqlens}


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of a packed row: values [1, L] or [L] (any float dtype) -> [R], same dtype.
    Differentiable (index_add)."""
    flat = values.reshape(-1)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(flat.device)
    if int(cu_seqlens[-1]) != flat.shape[0]:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the packed row has {flat.shape[0]} tokens")
    index = torch.repeat_interleave(torch.arange(lengths.shape[0], device=flat.device), lengths)
    return flat.new_zeros(lengths.shape[0]).index_add(0, index, flat)


def last_token_index(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[R] int64: the packed position of each sequence's last token."""
    return cu_seqlens[1:].long() - 1


def packed_attention_supported() -> bool:
    """True when this transformers builds the block-diagonal mask from restarting position_ids."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


class PackedPreferenceCollator:
    """The padding-free twin of :class:`drdo.data.PreferenceCollator`: B items -> one packed row.

    Sequences are packed chosen 0..B-1, then rejected 0..B-1 (the padded layout's row order).
    Returns :func:`pack_sequences`'s tensors plus rows [B] int64 and, when present,
    oracle_rewards [2B] / [K, 2B] float32 and ref_logps [2B] float32.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        self.ignore_index = ignore_index

    def __call__(self, items: list[dict]) -> dict:
        from drdo.data.collate import stack_scores
        from drdo.data.row_checks import ORACLE_FIELDS, REF_FIELDS

        if not items:
            raise ValueError("cannot collate an empty batch")
        input_ids = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
        labels = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
        batch = pack_sequences(input_ids, labels, self.ignore_index)
        batch["rows"] = torch.tensor([it["row"] for it in items], dtype=torch.long)
        for key, fields in (("oracle_rewards", ORACLE_FIELDS), ("ref_logps", REF_FIELDS)):
            scores = stack_scores(items, fields)
            if scores is not None:
                batch[key] = scores
        return batch


class PackedSFTCollator:
    """The padding-free twin of :class:`drdo.data.SFTCollator`: the B chosen sequences in one row."""

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        self.ignore_index = ignore_index

    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty batch")
        batch = pack_sequences([it["chosen_input_ids"] for it in items], [it["chosen_labels"] for it in items],
                               self.ignore_index)
        batch["rows"] = torch.tensor([it["row"] for it in items], dtype=torch.long)
        return batch
