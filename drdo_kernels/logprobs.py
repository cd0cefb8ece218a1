"""``fused_linear_logprobs``: per-token log-probs of the LM head without [N, V] logits.

    logp[t] = log_softmax(hidden[t] @ weight.T + bias)[labels[t]]   (0.0 where ignored)

Ignored tokens (``labels == ignore_index``) are dropped before any matmul; the
valid ones go through a ``torch.autograd.Function`` whose forward saves only the
inputs and one float32 log-sum-exp per token, and whose backward recomputes the
logits tile by tile. Two backends implement that Function with the same
semantics: Triton kernels (:mod:`drdo_kernels.logprobs_triton`) and chunked
PyTorch (:mod:`drdo_kernels.logprobs_torch`).
"""
from __future__ import annotations

import os

import torch

from . import logprobs_torch
from .inputs import gather_lm_head

__all__ = ["fused_linear_logprobs", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA tensors (when triton imports), else "torch".

    "triton" on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the `triton` package; install it or use backend='torch'")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"backend='triton' got {device.type} tensors: Triton runs on CUDA, or on the CPU only with "
                "TRITON_INTERPRET=1 set before triton is imported; use backend='torch' (or 'auto') instead"
            )
    return backend


def _check_inputs(hidden, weight, labels, bias) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor, got {getattr(t, 'dtype', type(t))}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [*, H]")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [*, {hidden.shape[-1]}] and weight {tuple(weight.shape)} disagree on H")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be non-empty, got {tuple(weight.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOAT_DTYPES:
            raise TypeError("bias must be a float tensor [V] or None")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} must be [V] = ({weight.shape[0]},)")
    tensors = [hidden, weight, labels] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device, got {[str(t.device) for t in tensors]}")


def _check_labels(labels: torch.Tensor, n_vocab: int, ignore_index: int) -> None:
    """labels: compacted [M] int64 (ignored tokens already removed)."""
    if labels.numel() and bool(((labels < 0) | (labels >= n_vocab)).any()):
        bad = labels[(labels < 0) | (labels >= n_vocab)][:5].tolist()
        raise ValueError(f"labels must be in [0, {n_vocab}) or equal ignore_index={ignore_index}; got e.g. {bad}")


class _FusedLinearLogprobs(torch.autograd.Function):
    """hidden [M, H], weight [V, H], bias [V] | None, labels [M] int64 (all valid) -> logp [M] float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, backend, chunk_size):
        if backend == "triton":
            from . import logprobs_triton

            logp, lse = logprobs_triton.logprobs_forward(hidden, weight, bias, labels)
        else:
            logp, lse = logprobs_torch.logprobs_forward(hidden, weight, bias, labels, chunk_size)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.backend, ctx.chunk_size = backend, chunk_size
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1]
        if hidden.shape[0] == 0:
            d_h = torch.zeros_like(hidden)
            d_w = torch.zeros_like(weight) if need_w else None
            d_b = torch.zeros_like(bias) if bias is not None else None
        elif ctx.backend == "triton":
            from . import logprobs_triton

            d_h, d_w, d_b = logprobs_triton.logprobs_backward(grad, hidden, weight, bias, labels, lse, need_w)
        else:
            d_h, d_w, d_b = logprobs_torch.logprobs_backward(
                grad, hidden, weight, bias, labels, lse, ctx.chunk_size, need_w
            )
        if not ctx.needs_input_grad[0]:
            d_h = None
        if not ctx.needs_input_grad[2]:
            d_b = None
        return d_h, d_w, d_b, None, None, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token log-probs of the LM head, never materialising the [N, V] logits.

    Args:
        hidden: [N, H] or [*, H], float16 / bfloat16 / float32 (float64: torch backend only).
        weight: [V, H] (e.g. ``lm_head.weight``); a dtype different from hidden's is
            promoted to the common type (e.g. bf16 hidden + fp32 weight -> fp32 math).
        labels: [N] or [*] integer, ALIGNED with hidden (position t predicts labels[t]);
            each entry in [0, V) or ``ignore_index``.
        bias: optional [V].
        backend: "auto" (Triton on CUDA tensors, else torch), "triton", or "torch".
        chunk_size: torch backend only: tokens per logits slab (default: 8 MiB float32 slab).

    Returns:
        logp: labels.shape, float32 (float64 for float64 inputs), <= 0, 0.0 at ignored
        positions; differentiable w.r.t. hidden, weight and bias.
    """
    weight, bias = gather_lm_head(weight, bias)  # an FSDP2-sharded (DTensor) head is all-gathered
    _check_inputs(hidden, weight, labels, bias)
    backend = resolve_backend(backend, hidden.device)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if backend == "triton" and dtype not in _TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float16/bfloat16/float32 inputs, got {dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n_vocab, n_hidden = weight.shape
    out_shape = labels.shape
    flat_hidden = hidden.reshape(-1, n_hidden).to(dtype)
    flat_labels = labels.reshape(-1).long()
    index = (flat_labels != ignore_index).nonzero().squeeze(1)
    valid_labels = flat_labels.index_select(0, index)
    _check_labels(valid_labels, n_vocab, ignore_index)
    logp_valid = _FusedLinearLogprobs.apply(
        flat_hidden.index_select(0, index).contiguous(),
        weight.to(dtype).contiguous(),
        bias,
        valid_labels.contiguous(),
        backend,
        chunk_size or logprobs_torch.default_chunk_size(n_vocab),
    )
    out = logp_valid.new_zeros(flat_labels.shape[0]).index_copy(0, index, logp_valid)
    return out.reshape(out_shape)
