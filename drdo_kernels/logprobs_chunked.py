"""The ``chunked`` log-prob backend: cuBLAS GEMMs on token chunks, a per-row fold between.

Every function here works on COMPACTED tokens (ignored ones already dropped, all labels
in [0, V)). Per chunk of ``rows`` tokens:

    x  = hidden[chunk] @ weight.T            # cuBLAS, [rows, V] float32 out (fp64 for fp64)
    l  = transform(x + bias)                  # in place, in the same pass as the stats
    lse, target = row_stats(l)                # one read of x (softmax_fold)
    d  = g * (onehot - exp(l - lse)) * dl/dx  # in place (fp32) or into a 16-bit copy
    d_hidden[chunk] = d @ weight              # cuBLAS
    d_weight       += d.T @ hidden[chunk]     # cuBLAS, float32 accumulator

FLOPs: 2·H·V per token for the logits, 2·H·V more for each of d_hidden and d_weight.
Memory: one [rows, V] float32 buffer (plus its 16-bit gradient copy for 16-bit inputs),
sized by :func:`chunk_rows` from :data:`CHUNK_BUDGET_BYTES`, and the float32 d_weight
accumulator. No atomics: chunks run in order, so results are bitwise reproducible on one
machine.

Precision (autocast's rule): the GEMMs run in the 16-bit dtype of ``hidden`` when it is
bf16/fp16 (an fp32 weight is cast once, as autocast does) with fp32 output, else in the
promoted dtype (fp32 GEMMs use TF32 when ``torch.backends.cuda.matmul.allow_tf32`` /
``torch.set_float32_matmul_precision`` allow it). 16-bit inputs with fp32 output use
``torch.mm(..., out_dtype=torch.float32)`` where the device supports it (CUDA, torch >=
2.9, probed once per process); on the CPU the 16-bit operands are upcast exactly to fp32
first (same products, fp32 sums; an fp32 copy of the weight); on CUDA without
``out_dtype`` the GEMMs return 16-bit results that are upcast (see :class:`LMHeadGemms`).
"""
from __future__ import annotations

import functools

import torch

from .logit_transform import IDENTITY, LogitTransform
from .softmax_fold import row_stats, softmax_grad

__all__ = ["CHUNK_BUDGET_BYTES", "chunk_rows", "compute_dtype", "LMHeadGemms", "logprobs_forward",
           "logprobs_backward"]

#: Bytes the per-chunk buffers may take, by device type (other devices use "cpu"): the
#: [rows, V] float32 logits plus, for 16-bit inputs, the 16-bit gradient copy. Assign a
#: new value (e.g. ``CHUNK_BUDGET_BYTES["cuda"] = 1 << 30``) to change the chunk size, or pass
#: ``chunk_tokens`` to a fused function. 2 GiB on CUDA holds 2688 tokens at V = 128256 in bf16: a
#: pair of two 1024-token responses fits whole (one pass, 6·N·H·V FLOPs; a pair larger than a
#: chunk takes two passes, 8·N·H·V).
CHUNK_BUDGET_BYTES = {"cuda": 2 << 30, "cpu": 16 << 20}
#: Chunks of at least this many tokens are a multiple of it: whole 128-row tiles of the GEMMs.
ROW_TILE = 128

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The GEMM dtype: hidden's when it is bf16/fp16 (autocast), else the promoted type."""
    return hidden_dtype if hidden_dtype in _HALF else torch.promote_types(hidden_dtype, weight_dtype)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 GEMMs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(n_vocab: int, dtype: torch.dtype, device: torch.device, budget: int | None = None) -> int:
    """Tokens per chunk: the most whose [rows, V] buffers fit ``budget`` bytes (default
    CHUNK_BUDGET_BYTES[device.type]), rounded down to whole :data:`ROW_TILE` tiles when there is
    room for one (no partial tile in every chunk's GEMMs); at least 1."""
    if budget is None:
        budget = CHUNK_BUDGET_BYTES.get(device.type, CHUNK_BUDGET_BYTES["cpu"])
    per_row = n_vocab * (accumulate_dtype(dtype).itemsize + (dtype.itemsize if dtype in _HALF else 0))
    rows = int(budget) // per_row
    return rows // ROW_TILE * ROW_TILE if rows >= ROW_TILE else max(1, rows)


@functools.lru_cache(maxsize=None)
def _native_out_dtype(device_type: str, dtype: torch.dtype) -> bool:
    """True when ``torch.mm``/``torch.addmm`` take 16-bit inputs with ``out_dtype=float32``
    (writing, or accumulating in place, into an fp32 ``out``) on this device type; probed once."""
    if device_type != "cuda" or dtype not in _HALF:
        return False
    try:
        a = torch.ones(2, 3, dtype=dtype, device=device_type)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device_type)
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
        out = torch.empty(2, 2, dtype=torch.float32, device=device_type)
        torch.mm(a, a.t(), out_dtype=torch.float32, out=out)
        mm = torch.mm(a, a.t(), out_dtype=torch.float32)
        return mm.dtype == torch.float32 and bool((acc == 4).all()) and bool((mm == 3).all()) and bool((out == 3).all())
    except (RuntimeError, TypeError):
        return False


class LMHeadGemms:
    """The three GEMMs of a chunk with the weight [V, H] cast once to the compute dtype.

    ``logits`` returns float32 (float64) results; ``write_d_hidden`` writes them into a given
    buffer; ``accumulate_d_weight`` writes (first chunk) or adds into a float32 (float64) [V, H]
    buffer in place, so it needs no zero fill. For 16-bit inputs, ``mode`` says how fp32
    results are obtained: "native" (``out_dtype=float32``, CUDA, torch >= 2.9), "upcast" (CPU:
    exact fp32 copies of the 16-bit operands), or "half_out" (CUDA without ``out_dtype``:
    16-bit results of fp32-accumulating GEMMs, upcast, so logits are rounded to 16 bits as in
    an unfused model).
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        self.dtype, self.acc = dtype, accumulate_dtype(dtype)
        self.weight = weight.detach().to(dtype).contiguous()
        if dtype == self.acc:
            self.mode = "same"
        elif _native_out_dtype(weight.device.type, dtype):
            self.mode = "native"
        else:
            self.mode = "half_out" if weight.device.type == "cuda" else "upcast"
        self.weight_acc = self.weight.to(self.acc) if self.mode == "upcast" else self.weight

    def _mm(self, a, b, out=None):
        if self.mode == "native":
            return torch.mm(a, b, out_dtype=self.acc, out=out)
        if self.mode == "half_out":
            result = torch.mm(a, b)
            return result.to(self.acc) if out is None else out.copy_(result)
        return torch.mm(a.to(self.acc), b.to(self.acc), out=out)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [c, H] compute dtype -> [c, V] float32 (float64), contiguous."""
        return self._mm(h, self.weight_acc.t())

    def write_d_hidden(self, d: torch.Tensor, out: torch.Tensor) -> None:
        """out [c, H] float32 (float64, contiguous) = d @ W, d: [c, V] gradient of the logits
        (compute dtype)."""
        self._mm(d, self.weight_acc, out=out)

    def accumulate_d_weight(self, acc: torch.Tensor, d: torch.Tensor, h: torch.Tensor, first: bool) -> None:
        """acc [V, H] float32 (float64) = d.T @ h when ``first`` (acc's contents are ignored),
        else acc += d.T @ h; in place."""
        if first:
            self._mm(d.t(), h, out=acc)
        elif self.mode == "native":
            torch.addmm(acc, d.t(), h, out_dtype=self.acc, out=acc)
        elif self.mode == "half_out":
            acc.add_(torch.mm(d.t(), h))
        else:
            acc.addmm_(d.t().to(self.acc), h.to(self.acc))


def _bias_acc(bias, acc):
    return None if bias is None else bias.detach().to(acc)


def logprobs_forward(hidden, labels, gemms: LMHeadGemms, bias, rows: int, use_triton: bool,
                     transform: LogitTransform = IDENTITY):
    """hidden: [M, H] compute dtype; labels: [M] int64 in [0, V); bias: [V] | None; transform:
    the logit transform (:mod:`drdo_kernels.logit_transform`).

    Returns (logp [M], lse [M]) float32 (float64 for float64), logp <= 0.
    """
    m = hidden.shape[0]
    logp = hidden.new_empty(m, dtype=gemms.acc)
    lse = hidden.new_empty(m, dtype=gemms.acc)
    b = _bias_acc(bias, gemms.acc)
    for lo in range(0, m, rows):
        hi = min(m, lo + rows)
        x = gemms.logits(hidden[lo:hi])
        lse[lo:hi], target = row_stats(x, b, labels[lo:hi], use_triton, transform)
        logp[lo:hi] = (target - lse[lo:hi]).clamp_max(0.0)
        del x
    return logp, lse


def logprobs_backward(grad, hidden, labels, lse, gemms: LMHeadGemms, bias, rows: int, use_triton: bool,
                      need_hidden: bool = True, need_weight: bool = True, need_bias: bool = True,
                      transform: LogitTransform = IDENTITY):
    """Recompute each chunk's logits and return the gradients of sum(grad * logp).

    grad, lse: [M]; other args as :func:`logprobs_forward`. Returns float32 (float64)
    (d_hidden [M, H] | None, d_weight [V, H] | None, d_bias [V] | None). The clamp at 0 of the
    forward is treated as the identity (it only removes rounding).
    """
    m, n_hidden = hidden.shape
    acc = gemms.acc
    grad = grad.to(acc)
    b = _bias_acc(bias, acc)
    d_hidden = hidden.new_empty((m, n_hidden), dtype=acc) if need_hidden else None
    d_weight = torch.empty(gemms.weight.shape, dtype=acc, device=hidden.device) if need_weight else None
    d_bias = torch.zeros(gemms.weight.shape[0], dtype=acc, device=hidden.device) if need_bias else None
    for lo in range(0, m, rows):
        hi = min(m, lo + rows)
        x = gemms.logits(hidden[lo:hi])
        if b is not None:
            x.add_(b)
        d = softmax_grad(x, labels[lo:hi], lse[lo:hi], grad[lo:hi], gemms.dtype, use_triton, transform, raw=True)
        del x
        if d_hidden is not None:
            gemms.write_d_hidden(d, d_hidden[lo:hi])
        if d_weight is not None:
            gemms.accumulate_d_weight(d_weight, d, hidden[lo:hi], first=lo == 0)
        if d_bias is not None:
            d_bias += d.sum(0, dtype=acc)
        del d
    if d_weight is not None and m == 0:
        d_weight.zero_()
    return d_hidden, d_weight, d_bias
