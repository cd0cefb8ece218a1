"""Where Triton kernels can run: one place that reads ``TRITON_INTERPRET``.

Triton compiles for CUDA GPUs; on the CPU its interpreter runs the same kernels
(slowly) when ``TRITON_INTERPRET=1`` is set before ``triton`` is imported, which is
how the tests exercise every kernel without a GPU.
"""
from __future__ import annotations

import os

import torch

__all__ = ["triton_interpreting", "triton_available", "triton_runs_on"]


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set to anything but "" or "0"."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """True when a Triton kernel can be launched on tensors of ``device``: CUDA, or
    the CPU under the interpreter (and triton imports)."""
    return (device.type == "cuda" or triton_interpreting()) and triton_available()
