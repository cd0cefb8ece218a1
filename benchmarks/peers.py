"""Lazy access to the peer libraries, each with the reason it cannot run here (or None)."""
from __future__ import annotations

import importlib


def import_reason(module: str, pip_name: str) -> str | None:
    """None when ``module`` imports, else why not (with the install line)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - an import may fail in many ways; all are reported
        return f"{pip_name} not importable ({type(exc).__name__}: {str(exc)[:150]}); pip install {pip_name}"
    return None


def ours_reason(ctx: dict, backend: str) -> str | None:
    """Why our kernels cannot run at ``ctx`` with ``backend`` ("triton" | "torch"), or None."""
    try:
        importlib.import_module("drdo_kernels")
    except Exception as exc:  # noqa: BLE001
        return f"drdo_kernels not importable ({type(exc).__name__}: {str(exc)[:150]})"
    if backend == "triton" and ctx["device"] == "cpu" and not ctx.get("interpret"):
        return "the Triton backend needs CUDA tensors; set TRITON_INTERPRET=1 to run it (slowly) in the interpreter"
    return None


def compile_reason(ctx: dict) -> str | None:
    """torch.compile warm-up costs 15-30 s per shape on a 2-core CPU: left out of --quick there."""
    if ctx["device"] == "cpu" and ctx.get("quick"):
        return "torch.compile warm-up (15-30 s per shape on this CPU) does not fit --quick; run without --quick"
    return None


def torch_lce_reason() -> str | None:
    import torch
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (chunked; torch >= 2.13)"
    return None
