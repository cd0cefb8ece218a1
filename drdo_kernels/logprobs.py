"""``fused_linear_logprobs``: per-token log-probs of the LM head without [N, V] logits.

    logp[t] = log_softmax(transform(hidden[t] @ weight.T + bias))[labels[t]]   (0.0 where ignored)

``transform`` is the model's logit transform (``temperature``, ``softcap``, ``logit_scale``:
:mod:`drdo_kernels.logit_transform`); every backend applies it exactly, with exact gradients,
and the identity (the default) costs nothing.

Ignored tokens (``labels == ignore_index``) are dropped before any matmul (one host
synchronisation per call counts them and checks the labels); the valid ones go through
a ``torch.autograd.Function`` whose forward saves only the inputs and one float32
log-sum-exp per token, and whose backward recomputes the logits. Backends:

* ``"chunked"`` (:mod:`drdo_kernels.logprobs_chunked`): cuBLAS GEMMs on token chunks
  sized from a memory budget, a Triton fold of each chunk (PyTorch ops on the CPU
  without the Triton interpreter, and for float64).
* ``"torch"``: the same chunks with the fold in PyTorch ops (no Triton at all).
* ``"triton"`` (:mod:`drdo_kernels.logprobs_triton`): tiled Triton kernels end to end.
* ``"reference"``: plain PyTorch on the full [N, V] logits (the ground truth, for comparisons).
* ``"auto"``: :func:`auto_backend`, a table by device, dtype and size.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch

from drdo.errors import shown

from . import logprobs_chunked as chunked
from .inputs import gather_lm_head
from .logit_transform import IDENTITY, LogitTransform, logit_transform
from .triton_runtime import triton_available, triton_interpreting, triton_runs_on

__all__ = ["fused_linear_logprobs", "resolve_backend", "auto_backend", "check_backend", "AutoRule", "AUTO_RULES",
           "BACKENDS"]

#: Every backend, one list for the library, the command line, YAML, the TRL config and the reports;
#: "reference" is plain PyTorch on the full [N, V] logits (the ground truth, for comparisons).
BACKENDS = ("auto", "chunked", "triton", "torch", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

class AutoRule(NamedTuple):
    """A row of :data:`AUTO_RULES`: the conditions (None: any) and the backend they pick."""

    device: str | None
    min_capability: tuple[int, int] | None  # CUDA compute capability, e.g. (9, 0) for Hopper
    dtypes: tuple | None  # compute dtypes
    min_hidden: int  # H at least
    min_tokens: int  # valid tokens at least
    backend: str


#: What ``backend="auto"`` runs, first matching row wins, keyed by device, compute capability,
#: compute dtype, hidden size and valid tokens. Every row is a measurement: on an H200 (torch 2.11,
#: one run, benchmarks/results/2026-11-28-gpu-h200/) the DRDO loss fwd+bwd at N=16384, H=4096,
#: V=128256 bf16 took 83.0 ms on "chunked", 135.6 ms on "triton" (92.6 ms for full logits):
#: "chunked" on CUDA. A training step at H=1024 ran faster on "triton" (21.9 vs 32.3 ms, with the
#: gradient filter then on by default), which is no measurement of the loss alone: rows by H (and
#: N) come from ``benchmarks/gpu_suite.sh``'s loss stage at H = 1024, 2048 and 4096. On the CPU
#: the chunked path with its PyTorch fold. Edit the table from measurements.
AUTO_RULES: tuple[AutoRule, ...] = (
    AutoRule("cuda", None, None, 0, 0, "chunked"),
    AutoRule(None, None, None, 0, 0, "torch"),
)


def _capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" and torch.cuda.is_available() else None


def auto_backend(device: torch.device, dtype: torch.dtype | None = None, n_tokens: int = 0, hidden: int = 0) -> str:
    """The backend ``"auto"`` picks for tensors on ``device`` computing in ``dtype`` with
    ``n_tokens`` valid tokens of hidden size ``hidden``: the first row of :data:`AUTO_RULES` that
    matches. A Triton backend is never picked where Triton cannot run; float64 always gets "torch"."""
    if dtype == torch.float64:
        return "torch"
    for rule in AUTO_RULES:
        if rule.device not in (None, device.type) or (rule.dtypes is not None and dtype not in rule.dtypes):
            continue
        if hidden < rule.min_hidden or n_tokens < rule.min_tokens:
            continue
        if rule.min_capability is not None and (_capability(device) or (0, 0)) < rule.min_capability:
            continue
        if rule.backend == "triton" and not triton_runs_on(device):
            continue
        return rule.backend
    return "torch"


def check_backend(backend: str) -> str:
    """``backend`` must be one of :data:`BACKENDS`; returns it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {shown(backend)}")
    return backend


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None, n_tokens: int = 0,
                    hidden: int = 0) -> str:
    """Validate ``backend`` and resolve "auto" with :func:`auto_backend`.

    "triton" on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported);
    "chunked" and "torch" run anywhere.
    """
    check_backend(backend)
    if backend == "auto":
        return auto_backend(device, dtype, n_tokens, hidden)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the `triton` package; install it or use backend='chunked'")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"backend='triton' got {device.type} tensors: Triton runs on CUDA, or on the CPU only with "
                "TRITON_INTERPRET=1 set before triton is imported; use backend='chunked' (or 'auto') instead"
            )
    return backend


def uses_triton_fold(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """The chunked backend folds with Triton where Triton runs and the buffer is float32."""
    return backend == "chunked" and chunked.accumulate_dtype(dtype) == torch.float32 and triton_runs_on(device)


def check_chunk_tokens(chunk_tokens) -> None:
    """``chunk_tokens`` must be None (from the memory budget) or a positive int."""
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None (from the memory budget), got {chunk_tokens!r}")


#: Appended to a shape error that a call in the old (hidden, weight, labels) order would cause.
ORDER_HINT = "; did you pass hidden first? the order is (lm_head_weight, hidden, labels)"


def check_inputs(hidden, weight, labels, bias) -> None:
    """Types, shapes and devices of fused_linear_logprobs' arguments (no host sync)."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor, "
                            f"got {getattr(t, 'dtype', type(t))}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [*, H]")
    if weight.dim() != 2:
        hint = ORDER_HINT if hidden.dim() == 2 else ""
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}{hint}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [*, {hidden.shape[-1]}] and weight {tuple(weight.shape)} disagree on H")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be non-empty, got {tuple(weight.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        hint = ORDER_HINT if tuple(labels.shape) == tuple(weight.shape[:-1]) else ""
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}{hint}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOAT_DTYPES:
            raise TypeError("bias must be a float tensor [V] or None")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} must be [V] = ({weight.shape[0]},)")
    tensors = [hidden, weight, labels] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device, got {[str(t.device) for t in tensors]}")


class TokenPlan(NamedTuple):
    """Which tokens are valid, from ONE host synchronisation.

    row_counts: valid tokens per row of labels [rows, T] (host ints); n_valid: their sum;
    index: [n_valid] int64 flat positions of the valid tokens, in ``order``'s order;
    counts: row_counts as an int64 tensor on the labels' device.
    """

    row_counts: list[int]
    n_valid: int
    index: torch.Tensor
    counts: torch.Tensor


def plan_tokens(labels: torch.Tensor, n_vocab: int, ignore_index: int, order: torch.Tensor | None = None) -> TokenPlan:
    """labels: [rows, T] integer (a 1-D tensor is one row). Counts the valid tokens per row
    and the out-of-range labels in one device->host copy; raises ValueError on bad labels.

    ``order`` ([rows * T] int64, a permutation of the flat positions) sets the order of
    ``index`` (default: row-major). No other synchronisation (no ``nonzero``).
    """
    lab = labels.reshape(1, -1) if labels.dim() == 1 else labels.reshape(labels.shape[0], -1)
    valid = lab != ignore_index
    bad = valid & ((lab < 0) | (lab >= n_vocab))
    counts = valid.sum(1)
    host = torch.cat([counts, bad.sum().reshape(1)]).tolist()
    row_counts, n_bad = host[:-1], host[-1]
    if n_bad:
        examples = lab[bad][:5].tolist()
        raise ValueError(f"labels must be in [0, {n_vocab}) or equal ignore_index={ignore_index}; got e.g. {examples}")
    n_valid = sum(row_counts)
    flat_valid = valid.reshape(-1) if order is None else valid.reshape(-1)[order]
    keys = (~flat_valid).to(torch.uint8)
    pick = torch.sort(keys, stable=True).indices[:n_valid]  # valid positions first, order kept
    index = pick if order is None else order[pick]
    return TokenPlan(row_counts, n_valid, index, counts)


def check_rows_scored(plan: TokenPlan, ignore_index: int) -> None:
    """ValueError naming the rows of ``plan`` with no valid token: a sequence log-prob needs one."""
    empty = [r for r, n in enumerate(plan.row_counts) if n == 0]
    if empty:
        raise ValueError(f"rows {empty[:8]} have no response token (every label is ignore_index={ignore_index}); "
                         "a sequence log-prob needs at least one token")


class _TritonLogprobs(torch.autograd.Function):
    """hidden [M, H], weight [V, H], bias [V] | None, labels [M] int64 (all valid) -> logp [M] fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, filter_eps, transform):
        from . import logprobs_triton

        logp, lse = logprobs_triton.logprobs_forward(hidden, weight, bias, labels, transform=transform)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.filter_eps, ctx.transform = filter_eps, transform
        return logp

    @staticmethod
    def backward(ctx, grad):
        from . import logprobs_triton

        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1]
        if hidden.shape[0] == 0:
            d_h = torch.zeros_like(hidden)
            d_w = torch.zeros_like(weight) if need_w else None
            d_b = torch.zeros_like(bias) if bias is not None else None
        else:
            d_h, d_w, d_b = logprobs_triton.logprobs_backward(
                grad, hidden, weight, bias, labels, lse, need_w, need_hidden_grad=ctx.needs_input_grad[0],
                need_bias_grad=ctx.needs_input_grad[2], filter_eps=ctx.filter_eps, transform=ctx.transform)
        return (d_h if ctx.needs_input_grad[0] else None, d_w,
                d_b if ctx.needs_input_grad[2] else None, None, None, None)


class _ChunkedLogprobs(torch.autograd.Function):
    """hidden [M, H] (compute dtype), weight [V, H] (any float), bias [V] | None, labels [M]
    (all valid) -> logp [M] float32 (float64); backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, use_triton, transform):
        gemms = chunked.LMHeadGemms(weight, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # the GEMMs' precision is LMHeadGemms' choice
            logp, lse = chunked.logprobs_forward(hidden, labels, gemms, bias, rows, use_triton, transform)
        ctx.save_for_backward(hidden, bias, labels, lse)
        ctx.gemms, ctx.rows, ctx.use_triton, ctx.weight_dtype = gemms, rows, use_triton, weight.dtype
        ctx.transform = transform
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(hidden.device.type, enabled=False):
            d_h, d_w, d_b = chunked.logprobs_backward(grad, hidden, labels, lse, ctx.gemms, bias, ctx.rows,
                                                      ctx.use_triton, need_h, need_w, need_b, ctx.transform)
        return (None if d_h is None else d_h.to(hidden.dtype), None if d_w is None else d_w.to(ctx.weight_dtype),
                None if d_b is None else d_b.to(bias.dtype), None, None, None, None)


def _full_logits_logprobs(hidden, weight, labels, bias, dtype, transform: LogitTransform) -> torch.Tensor:
    """The "reference" backend: log_softmax of the full [M, V] logits (computed in ``dtype``, as
    an unfused model does; the transform and the log-softmax in float32 at least, in plain torch
    ops: :meth:`LogitTransform.apply`), gathered at the labels."""
    b = None if bias is None else bias.to(dtype)
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), b)
    logits = transform.apply(logits if logits.dtype == torch.float64 else logits.float())
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)


def valid_logprobs(hidden, weight, labels, bias, backend: str, rows: int | None = None,
                   filter_eps: float = 0.0, transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """The log-probs of compacted tokens: hidden [M, H] (any float), labels [M] int64 all
    valid, backend already resolved, ``transform`` the logit transform -> [M] float32 (float64),
    differentiable."""
    dtype = chunked.compute_dtype(hidden.dtype, weight.dtype)
    if backend == "reference":
        return _full_logits_logprobs(hidden, weight, labels, bias, dtype, transform)
    if backend == "triton":
        if dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float16/bfloat16/float32 inputs, got {dtype}")
        # 16-bit hidden with an fp32 weight: the kernels cast weight tiles on load; d_weight stays fp32
        keep_fp32_weight = dtype != torch.float32 and weight.dtype == torch.float32
        w = weight if keep_fp32_weight else weight.to(dtype)
        return _TritonLogprobs.apply(hidden.to(dtype).contiguous(), w.contiguous(), bias, labels, filter_eps,
                                     transform)
    rows = rows or chunked.chunk_rows(weight.shape[0], dtype, hidden.device)
    use_triton = uses_triton_fold(backend, hidden.device, dtype)
    return _ChunkedLogprobs.apply(hidden.to(dtype).contiguous(), weight, bias, labels, rows, use_triton, transform)


def _old_weight_keyword(fn):
    """Accept the old spelling ``weight=`` (the old order was (hidden, weight, labels)) with a
    FutureWarning: it names ``lm_head_weight``, and a lone positional argument is then hidden."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "weight" in kwargs:
            warnings.warn("fused_linear_logprobs(weight=...) is deprecated; the order is now "
                          "fused_linear_logprobs(lm_head_weight, hidden, labels, bias=None, ...)",
                          FutureWarning, stacklevel=2)
            if "lm_head_weight" in kwargs:
                raise TypeError("fused_linear_logprobs got both weight= and lm_head_weight=")
            kwargs["lm_head_weight"] = kwargs.pop("weight")
            if len(args) == 1 and "hidden" not in kwargs:  # the old fused_linear_logprobs(hidden, weight=...)
                kwargs["hidden"], args = args[0], ()
        return fn(*args, **kwargs)
    return wrapper


@_old_weight_keyword
def fused_linear_logprobs(
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_tokens: int | None = None,
    filter_eps: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token log-probs of the LM head, never materialising the [N, V] logits.

    Args:
        lm_head_weight: [V, H] (e.g. ``lm_head.weight``; deprecated keyword: ``weight=``).
            With 16-bit hidden and an fp32 weight (autocast training) the GEMMs run in hidden's
            dtype; otherwise in the promoted dtype. Gradients come back in each input's dtype.
        hidden: [N, H] or [*, H], float16 / bfloat16 / float32 / float64 (float64: not "triton").
        labels: [N] or [*] integer, ALIGNED with hidden (position t predicts labels[t]);
            each entry in [0, V) or ``ignore_index``.
        bias: optional [V] (positional or keyword, as ``F.linear_cross_entropy``'s linear_bias).
        backend: "auto" (:func:`auto_backend`), "chunked", "torch" or "triton".
        chunk_tokens: chunked/torch backends: tokens per chunk, i.e. the [chunk_tokens, V]
            float32 buffer (None: from ``drdo_kernels.logprobs_chunked.CHUNK_BUDGET_BYTES``).
        filter_eps: triton backend only, opt-in: skip the backward's gradient dots for vocab
            tiles whose |softmax - onehot| entries are all below it (0, the default: exact;
            ``logprobs_triton.default_filter_eps(dtype)`` is a sensible value). The bound on
            the error it adds is in :mod:`drdo_kernels.logprobs_triton`.
        chunk_size: deprecated spelling of ``chunk_tokens``.
        temperature, softcap, logit_scale: the model's logit transform, applied to
            x = hidden @ weight.T + bias before the log-softmax (every backend, exact gradients)::

                l = logit_scale * x;  l = softcap * tanh(l / softcap) (softcap set);  l = l / temperature

            (Gemma 2/3: ``softcap=config.final_logit_softcapping``; Cohere:
            ``logit_scale=config.logit_scale``; Granite: ``logit_scale=1 / config.logits_scaling``).
            temperature finite > 0, softcap None or finite > 0, logit_scale finite and non-zero.

    Returns:
        logp: labels.shape, float32 (float64 for float64 inputs), <= 0, 0.0 at ignored
        positions; differentiable w.r.t. hidden, weight and bias.
    """
    if chunk_size is not None:
        warnings.warn("fused_linear_logprobs(chunk_size=...) is deprecated; use chunk_tokens=...",
                      FutureWarning, stacklevel=2)
        chunk_tokens = chunk_tokens or chunk_size
    transform = logit_transform(temperature, softcap, logit_scale)
    weight, bias = gather_lm_head(lm_head_weight, bias)  # an FSDP2-sharded (DTensor) head is all-gathered
    check_inputs(hidden, weight, labels, bias)
    check_chunk_tokens(chunk_tokens)
    if not (isinstance(filter_eps, (int, float)) and filter_eps >= 0):
        raise ValueError(f"filter_eps must be a float >= 0, got {filter_eps!r}")
    check_backend(backend)
    n_vocab, n_hidden = weight.shape
    plan = plan_tokens(labels.reshape(-1), n_vocab, ignore_index)
    backend = resolve_backend(backend, hidden.device, chunked.compute_dtype(hidden.dtype, weight.dtype), plan.n_valid,
                              n_hidden)
    flat_labels = labels.reshape(-1)
    logp_valid = valid_logprobs(
        hidden.reshape(-1, n_hidden).index_select(0, plan.index), weight,
        flat_labels.index_select(0, plan.index).long(), bias, backend, chunk_tokens, filter_eps, transform,
    )
    out = logp_valid.new_zeros(flat_labels.shape[0]).index_copy(0, plan.index, logp_valid)
    return out.reshape(labels.shape)
