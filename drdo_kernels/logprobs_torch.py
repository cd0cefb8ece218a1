"""The ``torch`` log-prob backend: the chunked backend with its fold in PyTorch ops.

``backend="torch"`` runs :mod:`drdo_kernels.logprobs_chunked` (token chunks sized from
``CHUNK_BUDGET_BYTES``, cuBLAS / CPU BLAS GEMMs) with the per-row fold of
:mod:`drdo_kernels.softmax_fold` done by ``torch.logsumexp`` and in-place elementwise ops
instead of the Triton kernels: no Triton needed, float64 supported (it is the float64
path of every backend). This module only names it; the logic lives in those two files.
"""
from .logprobs_chunked import CHUNK_BUDGET_BYTES, chunk_rows, logprobs_backward, logprobs_forward

__all__ = ["CHUNK_BUDGET_BYTES", "chunk_rows", "logprobs_forward", "logprobs_backward"]
