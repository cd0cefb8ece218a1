"""Lazy access to the peer libraries, each with the reason it cannot run here (or None)."""
from __future__ import annotations

import importlib
import os
import sys

from benchmarks.methods import LIGER_CUTEDSL, LIGER_IMPL_ENV


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


def triton_kernel_reason(ctx: dict, what: str) -> str | None:
    """Why a peer's Triton kernel ``what`` cannot run at ctx (CPU tensors), or None."""
    if ctx["device"] != "cuda":
        return f"{what} is a Triton kernel: it needs CUDA tensors (no CPU path)"
    return None


def liger_impl() -> str:
    """The implementation Liger-Kernel's ops run in this process ("cutedsl" or "triton"), importing
    ``liger_kernel.ops`` (which reads LIGER_KERNEL_IMPL once, on its first import)."""
    ops = importlib.import_module("liger_kernel.ops")
    return LIGER_CUTEDSL if LIGER_CUTEDSL in ops.LigerFusedLinearCrossEntropyFunction.__module__ else "triton"


def liger_flce_reason(ctx: dict, cutedsl: bool) -> str | None:
    """Why Liger's fused linear cross-entropy cannot run at ctx on its Triton (``cutedsl=False``) or
    CuTe DSL kernels, or None. The CuTe DSL path is chosen by LIGER_KERNEL_IMPL=cutedsl before
    liger_kernel is imported: this sets it when liger_kernel is not imported yet, and reports a
    process that already runs the other implementation (run each in its own command). The Triton
    path is tried on any device: on a CPU its first call fails, and the row records why."""
    if cutedsl and ctx["device"] != "cuda":
        return "Liger's CuTe DSL kernels run on CUDA only (Hopper/Blackwell)"
    reason = import_reason("liger_kernel", "liger-kernel")
    if reason:
        return reason
    if cutedsl:
        reason = import_reason("cutlass.cute", "nvidia-cutlass-dsl")
        if reason:
            return reason
        import torch

        if torch.cuda.get_device_capability() < (9, 0):
            return f"Liger's CuTe DSL kernels need Hopper or Blackwell (sm90+), got {torch.cuda.get_device_name()}"
        if "liger_kernel.ops" not in sys.modules:
            os.environ[LIGER_IMPL_ENV] = LIGER_CUTEDSL
    try:
        impl = liger_impl()
    except Exception as exc:  # noqa: BLE001 - an explicit LIGER_KERNEL_IMPL that fails to load raises here
        return f"liger_kernel.ops does not import ({type(exc).__name__}: {str(exc)[:150]})"
    wanted = LIGER_CUTEDSL if cutedsl else "triton"
    if impl != wanted:
        return (f"this process runs Liger's {impl} kernels ({LIGER_IMPL_ENV} is read once, on import): "
                f"run {'liger_flce_cutedsl' if cutedsl else 'liger_flce'} in a command of its own")
    return None


def liger_flce_nll(hidden, weight, labels, ignore_index: int = -100):
    """Liger's fused linear cross-entropy per token (the implementation the process loaded):
    hidden [N, H], weight [V, H], labels [N] -> NLL [N] (0 where ignored)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="none")(weight, hidden, labels)


def trl_entropy_logprobs(hidden, weight, labels, ignore_index: int = -100):
    """Full logits [N, V] in the input dtype (as TRL's trainers build them), then TRL's Triton
    log-prob + entropy kernel (trl.kernels.selective_log_softmax_and_entropy, TRL >= 1.16) with the
    ignored tokens masked: hidden [N, H], weight [V, H], labels [N] -> log-probs [N] float32 (0 where
    ignored). The entropy it also returns is computed and dropped."""
    from trl.kernels import selective_log_softmax_and_entropy

    mask = labels != ignore_index
    logps, _ = selective_log_softmax_and_entropy(hidden @ weight.T, labels.clamp_min(0), row_mask=mask)
    return logps.float()


def trl_entropy_reason(ctx: dict) -> str | None:
    """Why TRL's Triton log-prob + entropy kernel cannot run at ctx, or None."""
    reason = trl_kernels_reason() or triton_kernel_reason(ctx, "trl.kernels.selective_log_softmax_and_entropy")
    if reason is None and not hasattr(importlib.import_module("trl.kernels"), "selective_log_softmax_and_entropy"):
        return "this trl has no trl.kernels.selective_log_softmax_and_entropy (TRL >= 1.16 with Triton)"
    return reason
