"""Round-to-nearest-even casts from float32 to 16 bits inside Triton kernels.

On a GPU, ``x.to(tl.bfloat16)`` rounds to nearest, ties to even (``cvt.rn``). Triton's CPU
interpreter (3.9) truncates instead, which biases every bf16 operand and made interpreted
kernels less accurate than the compiled ones they stand for. :func:`to_16bit` rounds the bf16
mantissa by hand first when ``EMULATE`` is set (the kernels set it under the interpreter only),
so the interpreter computes what the GPU computes. float16 casts round correctly in both.
"""
from __future__ import annotations

from .triton_runtime import triton_available, triton_interpreting

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["to_16bit", "emulate_rounding"]


def emulate_rounding(out_dtype, device) -> bool:
    """Whether a kernel casting to ``out_dtype`` (torch dtype) on ``device`` must round by hand:
    bf16 under the interpreter (or on a CPU tensor)."""
    import torch

    return out_dtype == torch.bfloat16 and (triton_interpreting() or device.type != "cuda")


if triton is not None:

    @triton.jit
    def to_16bit(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
        """x (any float) -> dtype (bf16 / fp16 / fp32), round to nearest even."""
        if EMULATE:
            x = x.to(tl.float32)
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        return x.to(dtype)
