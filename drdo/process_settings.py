"""Process-wide settings a command applies while it runs, and gives back afterwards.

Both are context managers, so a caller that runs ``drdo.cli.main`` or :func:`drdo.training.loop.train`
in its own process (a test, a notebook) finds its thread count and progress bars as they were.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

__all__ = ["torch_threads", "quiet_libraries", "disable_library_progress_bars"]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (None: leave PyTorch's choice). Raises
    ValueError for n < 1."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def disable_library_progress_bars() -> list[Callable[[], None]]:
    """Turn off the progress bars of ``transformers`` (loading, saving checkpoints) and ``datasets``
    (reading and mapping files); returns the functions that turn back on those that were on."""
    import datasets
    from transformers.utils import logging as hf_logging

    restore = []
    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        restore.append(hf_logging.enable_progress_bar)
    if datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()
        restore.append(datasets.enable_progress_bars)
    return restore


@contextlib.contextmanager
def quiet_libraries(quiet: bool = True) -> Iterator[None]:
    """No progress bar of ``transformers`` or ``datasets`` inside the block when ``quiet``."""
    restore = disable_library_progress_bars() if quiet else []
    try:
        yield
    finally:
        for enable in restore:
            enable()
