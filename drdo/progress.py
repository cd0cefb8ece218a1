"""Batched passes over data with an optional progress bar (scoring, reference log-probs, generation)."""
from __future__ import annotations

from typing import Iterable

__all__ = ["batch_starts"]


def batch_starts(n: int, batch_size: int, *, progress: bool, desc: str) -> Iterable[int]:
    """The first index of each batch of ``batch_size`` out of ``n`` items, behind a tqdm bar if ``progress``
    (ValueError unless ``batch_size`` is a positive integer: a pass over no batch would write nothing)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    starts = range(0, n, batch_size)
    if not progress:
        return starts
    from tqdm.auto import tqdm

    return tqdm(starts, desc=desc, total=len(starts))
