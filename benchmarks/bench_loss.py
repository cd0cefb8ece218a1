"""Benchmark: the whole DRDO loss from the last hidden state (LM head + log-probs + pair loss, with backward).

Inputs: weight [V, H], hidden [2B, T, H] (N = 2B*T tokens, rows 0..B-1 chosen), aligned labels [2B, T],
oracle rewards [2B] and policy (reward-head) rewards [2B] float32 with requires_grad. The logits follow
--logits (benchmarks.common.LOGIT_REGIMES); with --margins close (the default) each rejected row repeats its
chosen row with one label changed, so that every row gets a nonzero dL/dz (input_stats counts them).
Methods (the names of benchmarks.methods.REGISTRY that run here; each returns the scalar loss):
  ours_triton        drdo_kernels.FusedLinearDRDOLoss(backend="triton")
  ours_chunked       drdo_kernels.FusedLinearDRDOLoss(backend="chunked")
  ours_torch         drdo_kernels.FusedLinearDRDOLoss(backend="torch")
  ours_auto          drdo_kernels.FusedLinearDRDOLoss(backend="auto") (what users get by default)
  naive              full logits [2B, T, V] -> drdo.losses.sequence_logprobs -> drdo.losses.drdo_loss
  naive_compile      torch.compile(naive)
  liger_dpo          Liger-Kernel LigerFusedLinearDPOLoss(use_ref_model=False): a DPO loss, not DRDO, but the
                     same LM-head work (its chunked-pair log-probs); checked against drdo.losses.dpo_loss
  liger_flce         Liger-Kernel LigerFusedLinearCrossEntropyLoss(reduction="none") per-token NLL -> row sums ->
                     drdo_loss (Triton)
  liger_flce_cutedsl the same on Liger's CuTe DSL kernels (LIGER_KERNEL_IMPL=cutedsl; a command of its own)
  cce                Cut Cross-Entropy linear_cross_entropy(reduction="none", impl="cce") -> row sums -> drdo_loss
  cce_torch_compile  the same with impl="torch_compile"
  torch_lce          torch.nn.functional.linear_cross_entropy(reduction="none") -> row sums -> drdo_loss
  trl_chunked        TRL's fused LM head (trl.kernels.ChunkedLogProbFunction) per-token log-probs -> row sums ->
                     drdo_loss
  trl_logprob_entropy full logits, then TRL's Triton selective_log_softmax_and_entropy -> row sums -> drdo_loss
  base_triton        FusedLinearDRDOLoss of an older checkout (--baseline DIR), triton / chunked / torch backend, in a
  base_chunked       fresh process
  base_torch
The fused losses take no gradient filter: with --filter-eps > 0 the Triton rows are skipped (use bench_logprobs).

Usage: python benchmarks/bench_loss.py --quick --device cpu --output DIR [--seq-len T]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers  # noqa: E402
from benchmarks.heads import (  # noqa: E402
    IGNORE_INDEX,
    close_pairs,
    logit_stats,
    make_head_tensors,
    reference_logprobs,
    rows_and_len,
)
from benchmarks.measure import Inputs, Method  # noqa: E402
from benchmarks.methods import names  # noqa: E402

NAME = "loss"
ALPHA, GAMMA, DPO_BETA = 0.1, 2.0, 0.1
def make_inputs(ctx: dict) -> Inputs:
    """weight [V, H], hidden [2B, T, H], labels [2B, T], oracle_rewards [2B], policy_rewards [2B] (grad)."""
    import torch

    rows, t = rows_and_len(ctx)
    hidden, weight, labels = make_head_tensors(ctx, (rows, t))
    gen = torch.Generator(device=ctx["device"]).manual_seed(int(ctx["seed"]) + 2)
    if ctx.get("margins", "close") == "close":
        hidden, labels = close_pairs(hidden, labels, ctx["V"], gen)
    oracle = torch.randn(rows, device=ctx["device"], generator=gen)
    policy = torch.randn(rows, device=ctx["device"], generator=gen).requires_grad_()
    return Inputs(tensors=dict(weight=weight, hidden=hidden, labels=labels, oracle=oracle, policy=policy),
                  grad=[hidden, weight, policy])


def _drdo_from_logps(logps, oracle, policy):
    """drdo.losses.drdo_loss on row log-probs [2B] (chosen first); returns the scalar loss."""
    from drdo.losses import drdo_loss

    b = logps.shape[0] // 2
    loss, _ = drdo_loss(logps[:b], logps[b:], policy[:b], policy[b:], oracle[:b], oracle[b:], alpha=ALPHA, gamma=GAMMA)
    return loss


def reference(inputs: Inputs, ctx: dict):
    """The DRDO loss from float32 chunked reference log-probs."""
    t = inputs.tensors
    logps = reference_logprobs(t["hidden"], t["weight"], t["labels"]).sum(-1)
    return _drdo_from_logps(logps, t["oracle"], t["policy"].detach())


def input_stats(ctx: dict) -> dict:
    """The inputs at ctx: their logit statistics (benchmarks.heads.logit_stats), T, the margin rule and
    zero_grad_rows, the fraction of rows whose exact dL/dz is 0 (a backward that skips such rows does
    less work on them)."""
    import torch

    inputs = make_inputs(ctx)
    t = inputs.tensors
    z = reference_logprobs(t["hidden"], t["weight"], t["labels"]).sum(-1).requires_grad_()
    with torch.enable_grad():
        (dz,) = torch.autograd.grad(_drdo_from_logps(z, t["oracle"], t["policy"].detach()), z)
    return dict(logit_stats(t["hidden"], t["weight"], t["labels"]), seq_len=rows_and_len(ctx)[1],
                margins=ctx.get("margins", "close"), zero_grad_rows=float((dz == 0).float().mean()))


def _dpo_reference(inputs: Inputs, ctx: dict):
    """Liger's DPO without a reference model: drdo.losses.dpo_loss with zero reference log-probs."""
    import torch

    from drdo.losses import dpo_loss

    t = inputs.tensors
    logps = reference_logprobs(t["hidden"], t["weight"], t["labels"]).sum(-1)
    b = logps.shape[0] // 2
    zeros = torch.zeros_like(logps[:b])
    return dpo_loss(logps[:b], logps[b:], zeros, zeros, beta=DPO_BETA)[0]


def _t(inputs: Inputs):
    t = inputs.tensors
    return t["weight"], t["hidden"], t["labels"], t["oracle"], t["policy"]


def _ours(backend: str):
    def build(inputs, ctx):
        from drdo_kernels import FusedLinearDRDOLoss

        w, h, y, o, p = _t(inputs)
        loss = FusedLinearDRDOLoss(ALPHA, GAMMA, reward="head", ignore_index=IGNORE_INDEX, backend=backend)
        return lambda: loss(w, h, y, o, p)[0]

    return build


def naive_drdo(weight, hidden, labels, oracle, policy):
    """Full logits [2B, T, V] then the reference losses of drdo.losses."""
    from drdo.losses import sequence_logprobs

    logits = hidden @ weight.T
    logps, _ = sequence_logprobs(logits, labels, ignore_index=IGNORE_INDEX)
    return _drdo_from_logps(logps, oracle, policy)


def _naive(inputs, ctx):
    args = _t(inputs)
    return lambda: naive_drdo(*args)


def _naive_compile(inputs, ctx):
    import torch

    args = _t(inputs)
    fn = torch.compile(naive_drdo, dynamic=False)
    return lambda: fn(*args)


def _liger_dpo(inputs, ctx):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    w, h, y, _, _ = _t(inputs)
    loss = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=DPO_BETA, use_ref_model=False,
                                   compiled=not (ctx["device"] == "cpu" and ctx.get("quick")))
    return lambda: loss(w, h, y)[0]


def _per_token(token_nll_fn):
    """Build a DRDO loss on a per-token NLL function f(hidden [N, H], weight, labels [N]) -> nll [N]."""

    def build(inputs, ctx):
        w, h, y, o, p = _t(inputs)
        rows, t = h.shape[0], h.shape[1]

        def run():
            nll = token_nll_fn(h.reshape(rows * t, -1), w, y.reshape(-1))
            return _drdo_from_logps(-nll.float().reshape(rows, t).sum(-1), o, p)

        return run

    return build


def _cce_nll(impl: str):
    def nll(h, w, y):
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="none", impl=impl)

    return nll


def _torch_nll(h, w, y):
    import torch
    import torch.nn.functional as F

    return F.linear_cross_entropy(h, w, y, reduction="none", ignore_index=IGNORE_INDEX,
                                  options=torch.nn.LinearCrossEntropyOptions())


def _trl_nll(h, w, y):
    return -peers.trl_logprobs(h, w, y, IGNORE_INDEX)


def _liger_flce_nll(h, w, y):
    return peers.liger_flce_nll(h, w, y, IGNORE_INDEX)


def _trl_entropy_nll(h, w, y):
    return -peers.trl_entropy_logprobs(h, w, y, IGNORE_INDEX)


def _liger_note(ctx: dict) -> str | None:
    return peers.import_reason("liger_kernel.chunked_loss", "liger-kernel")


def _filter_reason(ctx: dict) -> str | None:
    """The fused losses run exact: a requested gradient filter cannot be applied to them."""
    if float(ctx.get("filter_eps") or 0.0) > 0:
        return ("the fused losses take no filter_eps (they run exact); "
                "bench_logprobs.py --filter-eps measures the filter")
    return None


def _ours_method(backend: str) -> Method:
    """Our FusedLinearDRDOLoss with ``backend``; skipped where it cannot run."""
    name = f"ours_{backend}"

    def skip(ctx):
        return peers.ours_reason(ctx, backend) or (_filter_reason(ctx) if backend in ("triton", "auto") else None)

    return Method(name, "ours", _ours(backend), skip=skip)


def _base_method(backend: str) -> Method:
    """The older checkout's FusedLinearDRDOLoss with ``backend``, in a fresh process."""
    return Method(f"base_{backend}", "base", _ours(backend), baseline=True,
                  skip=lambda ctx: peers.baseline_reason(ctx, backend))


_BUILDS = {
    "naive": Method("naive", "naive", _naive),
    "naive_compile": Method("naive_compile", "naive", _naive_compile, skip=peers.compile_reason),
    "liger_dpo": Method("liger_dpo", "peer", _liger_dpo, skip=_liger_note, reference=_dpo_reference,
                        note="DPO (no reference model) loss, not DRDO; torch.compile'd unless --quick on CPU"),
    "liger_flce": Method("liger_flce", "peer", _per_token(_liger_flce_nll),
                         skip=lambda ctx: peers.liger_flce_reason(ctx, cutedsl=False)),
    "liger_flce_cutedsl": Method("liger_flce_cutedsl", "peer", _per_token(_liger_flce_nll),
                                 skip=lambda ctx: peers.liger_flce_reason(ctx, cutedsl=True)),
    "cce": Method("cce", "peer", _per_token(_cce_nll("cce")),
                  skip=lambda ctx: peers.import_reason("cut_cross_entropy", "cut-cross-entropy")),
    "cce_torch_compile": Method(
        "cce_torch_compile", "peer", _per_token(_cce_nll("torch_compile")),
        skip=lambda ctx: peers.import_reason("cut_cross_entropy", "cut-cross-entropy") or peers.compile_reason(ctx)),
    "torch_lce": Method("torch_lce", "peer", _per_token(_torch_nll), skip=lambda ctx: peers.torch_lce_reason()),
    "trl_chunked": Method("trl_chunked", "peer", _per_token(_trl_nll), skip=lambda ctx: peers.trl_kernels_reason()),
    "trl_logprob_entropy": Method("trl_logprob_entropy", "peer", _per_token(_trl_entropy_nll),
                                  skip=peers.trl_entropy_reason),
}
#: Every method of the registry (benchmarks.methods) that runs here, in its order.
METHODS = {name: _ours_method(name[len("ours_"):]) if name.startswith("ours_")
           else _base_method(name[len("base_"):]) if name.startswith("base_") else _BUILDS[name]
           for name in names(NAME)}


def main(argv: list[str] | None = None) -> Path:
    from benchmarks import bench_loss as this  # the importable module, also when run as a script
    from benchmarks.runner import run_grid

    return run_grid(this, argv, __doc__.splitlines()[0], ("fwd+bwd",))


if __name__ == "__main__":
    main()
