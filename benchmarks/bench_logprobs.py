"""Benchmark: per-token log-probs of an LM head, log_softmax(hidden @ weight.T)[labels].

Methods (all return logp [N] float32; their backward takes a random upstream gradient [N]; the logits
follow --logits, benchmarks.heads.LOGIT_REGIMES; ours and base pass --filter-eps, which only the Triton
backend uses):
  ours_triton        drdo_kernels.fused_linear_logprobs(backend="triton")  (CUDA, or TRITON_INTERPRET=1)
  ours_chunked       drdo_kernels.fused_linear_logprobs(backend="chunked") (cuBLAS logits chunks + Triton fold)
  ours_torch         drdo_kernels.fused_linear_logprobs(backend="torch")   (chunked PyTorch)
  ours_auto          drdo_kernels.fused_linear_logprobs(backend="auto")    (what users get by default)
  naive              full logits [N, V], float32 log_softmax, gather
  naive_compile      torch.compile(naive)
  liger_flce         Liger-Kernel LigerFusedLinearCrossEntropyLoss(reduction="none"), negated
  cce                Cut Cross-Entropy linear_cross_entropy(reduction="none", impl="cce"), negated
  cce_torch_compile  the same with impl="torch_compile" (its CPU path)
  torch_lce          torch.nn.functional.linear_cross_entropy(reduction="none") with LinearCrossEntropyOptions()
  trl_chunked        TRL's fused LM head: trl.kernels.ChunkedLogProbFunction (TRL >= 1.16), as its trainers call it
  base_triton        the triton / chunked / torch backends of an older checkout (--baseline DIR), in a fresh
  base_chunked       process
  base_torch

Usage: python benchmarks/bench_logprobs.py --quick --device cpu --output DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers  # noqa: E402
from benchmarks.heads import IGNORE_INDEX, logit_stats, make_head_tensors, naive_logprobs, reference_logprobs  # noqa: E402
from benchmarks.measure import Inputs, Method  # noqa: E402

NAME = "logprobs"


def make_inputs(ctx: dict) -> Inputs:
    """hidden [N, H], weight [V, H] (ctx dtype, requires grad), labels [N], upstream gradient [N] float32."""
    import torch

    hidden, weight, labels = make_head_tensors(ctx, (ctx["N"],))
    gen = torch.Generator(device=ctx["device"]).manual_seed(int(ctx["seed"]) + 1)
    upstream = torch.randn(ctx["N"], device=ctx["device"], generator=gen)
    return Inputs(tensors=dict(hidden=hidden, weight=weight, labels=labels), grad=[hidden, weight], upstream=upstream)


def reference(inputs: Inputs, ctx: dict):
    t = inputs.tensors
    return reference_logprobs(t["hidden"], t["weight"], t["labels"])


def input_stats(ctx: dict) -> dict:
    """The logit statistics of the inputs at ctx (benchmarks.heads.logit_stats)."""
    hidden, weight, labels = make_head_tensors(ctx, (ctx["N"],))
    return logit_stats(hidden, weight, labels)


def _args(inputs: Inputs):
    t = inputs.tensors
    return t["hidden"], t["weight"], t["labels"]


def _ours(backend: str):
    def build(inputs, ctx):
        from drdo_kernels import fused_linear_logprobs

        h, w, y = _args(inputs)
        eps = float(ctx.get("filter_eps") or 0.0)
        return lambda: fused_linear_logprobs(w, h, y, ignore_index=IGNORE_INDEX, backend=backend, filter_eps=eps)

    return build


def _trl(inputs, ctx):
    h, w, y = _args(inputs)
    return lambda: peers.trl_logprobs(h, w, y, IGNORE_INDEX)


def _naive(inputs, ctx):
    h, w, y = _args(inputs)
    return lambda: naive_logprobs(h, w, y)


def _naive_compile(inputs, ctx):
    import torch

    h, w, y = _args(inputs)
    fn = torch.compile(naive_logprobs, dynamic=False)
    return lambda: fn(h, w, y)


def _liger(inputs, ctx):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    h, w, y = _args(inputs)
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")
    return lambda: -loss(w, h, y).float()


def _cce(impl: str):
    def build(inputs, ctx):
        from cut_cross_entropy import linear_cross_entropy

        h, w, y = _args(inputs)
        return lambda: -linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="none", impl=impl).float()

    return build


def _torch_lce(inputs, ctx):
    import torch
    import torch.nn.functional as F

    h, w, y = _args(inputs)
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda: -F.linear_cross_entropy(h, w, y, reduction="none", ignore_index=IGNORE_INDEX,
                                           options=options).float()


def _ours_method(backend: str) -> Method:
    """fused_linear_logprobs with ``backend``; skipped where it cannot run."""
    return Method(f"ours_{backend}", "ours", _ours(backend), skip=lambda ctx: peers.ours_reason(ctx, backend))


def _base_method(backend: str) -> Method:
    """The older checkout's fused_linear_logprobs with ``backend``, in a fresh process."""
    return Method(f"base_{backend}", "base", _ours(backend), baseline=True,
                  skip=lambda ctx: peers.baseline_reason(ctx, backend))


METHODS = {
    **{f"ours_{b}": _ours_method(b) for b in ("triton", "chunked", "torch", "auto")},
    "naive": Method("naive", "naive", _naive),
    "naive_compile": Method("naive_compile", "naive", _naive_compile, skip=peers.compile_reason),
    "liger_flce": Method("liger_flce", "peer", _liger,
                         skip=lambda ctx: peers.import_reason("liger_kernel.transformers", "liger-kernel")),
    "cce": Method("cce", "peer", _cce("cce"),
                  skip=lambda ctx: peers.import_reason("cut_cross_entropy", "cut-cross-entropy")),
    "cce_torch_compile": Method(
        "cce_torch_compile", "peer", _cce("torch_compile"),
        skip=lambda ctx: peers.import_reason("cut_cross_entropy", "cut-cross-entropy") or peers.compile_reason(ctx)),
    "torch_lce": Method("torch_lce", "peer", _torch_lce, skip=lambda ctx: peers.torch_lce_reason()),
    "trl_chunked": Method("trl_chunked", "peer", _trl, skip=lambda ctx: peers.trl_kernels_reason()),
    **{f"base_{b}": _base_method(b) for b in ("triton", "chunked", "torch")},
}


def main(argv: list[str] | None = None) -> Path:
    from benchmarks import bench_logprobs as this  # the importable module, also when run as a script
    from benchmarks.runner import run_grid

    return run_grid(this, argv, __doc__.splitlines()[0], ("fwd", "bwd", "fwd+bwd"))


if __name__ == "__main__":
    main()
