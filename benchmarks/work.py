"""The work model: FLOPs each benchmarked method does, in units of N·H·V, by the path it takes.

A method's TFLOP/s (and its fraction of the measured GEMM peak) is the work it actually does over
its time, so a method that skips a recompute is not credited with FLOPs it never ran:

- ``grads_in_forward``: logits, d_hidden and d_weight GEMMs all in the forward (6 NHV), the
  backward only scales them: our pair losses on chunks of whole pairs, Liger's chunked losses.
- ``two_pass_in_forward``: our pair losses when a pair holds more tokens than a chunk: the
  log-sum-exps first, then recomputed logits and both gradient GEMMs, all in the forward (8 NHV).
- ``recompute``: the forward keeps one log-sum-exp per token, the backward recomputes the logits
  (2 + 6 NHV): plain log-probs on every backend of ours, our Triton backend, CCE, TRL's fused head,
  torch's chunked ``linear_cross_entropy`` with ``reduction="none"``.
- ``full_logits``: the [N, V] logits kept for the backward (2 + 4 NHV): naive and its compiled forms.

:data:`WORK` maps every method of ``bench_loss`` / ``bench_logprobs`` (each method's ``work`` in
:mod:`benchmarks.methods`) to a path or to a resolver
("pairs": decided by the chunk size this checkout's ``drdo_kernels`` picks; "auto": the backend
``auto_backend`` picks). Baseline rows (``base_*``) are modelled with this checkout's chunk sizes.
"""
from __future__ import annotations

from benchmarks.methods import REGISTRY

#: path -> (forward, backward) FLOPs in units of N·H·V
PATHS = {
    "grads_in_forward": (6, 0),
    "two_pass_in_forward": (8, 0),
    "recompute": (2, 6),
    "full_logits": (2, 4),
}

#: bench -> method -> path or resolver, read from the method registry (benchmarks.methods).
WORK = {bench: {name: spec.work[bench] for name, spec in REGISTRY.items() if bench in spec.work}
        for bench in ("loss", "logprobs")}


def chunk_tokens(ctx: dict) -> int:
    """Tokens per chunk of our chunked backends at ctx's V, dtype and device (this checkout's rule)."""
    import torch

    from benchmarks.common import torch_dtype
    from drdo_kernels.logprobs_chunked import chunk_rows

    return chunk_rows(ctx["V"], torch_dtype(ctx["dtype"]), torch.device(ctx["device"]))


def pair_path(ctx: dict) -> str:
    """Our chunked pair losses: one pass if a pair's tokens (2T, T from benchmarks.heads.rows_and_len) fit a chunk."""
    from benchmarks.heads import rows_and_len

    pair_tokens = 2 * rows_and_len(ctx)[1] * (1.0 - float(ctx.get("ignore_frac", 0.0)))
    return "grads_in_forward" if pair_tokens <= chunk_tokens(ctx) else "two_pass_in_forward"


def auto_choice(ctx: dict) -> str:
    """The backend ``backend="auto"`` runs at ctx (all N tokens labelled)."""
    import torch

    from benchmarks.common import torch_dtype
    from drdo_kernels import auto_backend

    return auto_backend(torch.device(ctx["device"]), torch_dtype(ctx["dtype"]), int(ctx["N"]), int(ctx["H"]))


def path(bench: str, method: str, ctx: dict) -> str:
    """The path (a key of :data:`PATHS`) ``method`` of benchmark ``bench`` takes at ctx."""
    kind = WORK[bench][method]
    if kind == "auto":
        return path(bench, f"ours_{auto_choice(ctx)}", ctx)
    return pair_path(ctx) if kind == "pairs" else kind


def nhv(bench: str, method: str, mode: str, ctx: dict) -> tuple[float, str]:
    """(FLOPs / (N·H·V) of one call in ``mode`` "fwd" | "bwd" | "fwd+bwd", the path)."""
    name = path(bench, method, ctx)
    fwd, bwd = PATHS[name]
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode], name
