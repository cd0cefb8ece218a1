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
    """Why our kernels cannot run at ``ctx`` with ``backend`` ("triton" | "chunked" | "torch"), or None.

    Only the import and the Triton-on-CPU case are checked here: a backend this checkout does not have
    fails on its first call, and that row records the exception."""
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


def baseline_reason(ctx: dict, backend: str) -> str | None:
    """Why the kernels of the baseline checkout (``ctx["baseline"]``, a folder holding an older
    ``drdo/`` and ``drdo_kernels/``) cannot run with ``backend``, or None."""
    from pathlib import Path

    folder = ctx.get("baseline")
    if not folder:
        return "no baseline checkout given: pass --baseline DIR (a folder with an older drdo/ and drdo_kernels/)"
    if not (Path(folder) / "drdo_kernels" / "__init__.py").is_file():
        return f"--baseline {folder} holds no drdo_kernels/__init__.py"
    if backend == "triton" and ctx["device"] == "cpu" and not ctx.get("interpret"):
        return "the Triton backend needs CUDA tensors; set TRITON_INTERPRET=1 to run it (slowly) in the interpreter"
    return None


def trl_kernels_reason() -> str | None:
    """None when TRL's fused LM-head log-probs (trl.kernels.ChunkedLogProbFunction, TRL >= 1.16) import."""
    reason = import_reason("trl.kernels", "trl>=1.16")
    if reason is None and not hasattr(importlib.import_module("trl.kernels"), "ChunkedLogProbFunction"):
        return "this trl has no trl.kernels.ChunkedLogProbFunction (TRL >= 1.16); pip install 'trl>=1.16'"
    return reason


#: The vocabulary width of TRL's tiles: what trl.trainer.utils.add_fused_lm_head passes (TRL 1.16).
TRL_VOCAB_CHUNK = 32768


def trl_logprobs(hidden, weight, labels, ignore_index: int = -100):
    """TRL's fused LM-head log-probs as its trainers call them (trl.kernels.ChunkedLogProbFunction, only
    the log-probs requested, valid tokens compacted first): hidden [N, H], weight [V, H] (bf16/fp32),
    labels [N] int64 -> [N] float32, 0 where ignored. Logits tiles of [4096, 32768] in cuBLAS in the
    input dtype, online log-sum-exp in Triton (torch ops on CPU), recomputed in backward."""
    from trl.kernels import ChunkedLogProbFunction

    mask = labels != ignore_index
    logps = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], 1.0, TRL_VOCAB_CHUNK,
                                         None, 1.0, ("log_probs",))[0]
    return logps.float().new_zeros(labels.shape).masked_scatter(mask, logps.float())
