"""The one registry of benchmarked methods: every method is named here once.

A :class:`MethodSpec` says what a method is (its family and one line), which library it comes
from (whose version the results' metadata records), which benchmarks run it, and the path its
FLOPs follow in each benchmark (:mod:`benchmarks.work`). The benchmarks build their callables
for these names only (``bench_logprobs.METHODS``, ``bench_loss.METHODS``, ``bench_train.METHODS``;
a test checks that they match). This module imports nothing of the benchmarks: it is their lowest
layer.

Families: ``ours`` (this checkout's kernels, one method per backend), ``base`` (an older
checkout's kernels, ``--baseline DIR``), ``naive`` (full logits in PyTorch), ``peer`` (another
library's LM-head kernel).
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: The benchmarks that run methods: per-token log-probs, the DRDO loss, a training step.
BENCHES = ("logprobs", "loss", "train")
#: The environment variable and value that switch Liger-Kernel's ops to its CuTe DSL kernels
#: (read once, when ``liger_kernel.ops`` is first imported).
LIGER_IMPL_ENV, LIGER_CUTEDSL = "LIGER_KERNEL_IMPL", "cutedsl"


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked method.

    ``work``: benchmark -> the path its FLOPs follow (a key of ``benchmarks.work.PATHS``, or
    "pairs" / "auto", which ``benchmarks.work`` resolves at a shape); ``benches``: where it runs;
    ``packages``: the distributions whose versions the results record (besides torch)."""

    name: str
    family: str
    summary: str
    benches: tuple[str, ...]
    work: dict = field(default_factory=dict)
    packages: tuple[str, ...] = ()


def _ours(backend: str, family: str = "ours") -> MethodSpec:
    pairs = "recompute" if backend == "triton" else "pairs"
    where = "an older checkout's kernels (--baseline DIR), in a fresh process" if family == "base" else (
        "what users get by default" if backend == "auto" else f"the {backend!r} backend")
    return MethodSpec(
        f"{family}_{backend}", family,
        f"drdo_kernels.fused_linear_logprobs / FusedLinearDRDOLoss(backend={backend!r}): {where}",
        ("logprobs", "loss") if family == "base" else BENCHES,
        {"logprobs": "recompute", "loss": "auto" if backend == "auto" else pairs})


_SPECS = (
    *(_ours(b) for b in ("triton", "chunked", "torch", "auto")),
    *(_ours(b, "base") for b in ("triton", "chunked", "torch")),
    MethodSpec("naive", "naive", "full logits [N, V] -> float32 log_softmax -> gather (-> drdo.losses.drdo_loss)",
               BENCHES, {"logprobs": "full_logits", "loss": "full_logits"}),
    MethodSpec("naive_compile", "naive", "torch.compile(naive)", ("logprobs", "loss"),
               {"logprobs": "full_logits", "loss": "full_logits"}),
    MethodSpec("torch_lce", "peer", "torch.nn.functional.linear_cross_entropy(reduction='none', "
               "options=LinearCrossEntropyOptions()), torch's chunked LM-head loss (torch >= 2.13)",
               ("logprobs", "loss"), {"logprobs": "recompute", "loss": "recompute"}),
    MethodSpec("liger_flce", "peer", "Liger-Kernel LigerFusedLinearCrossEntropyLoss(reduction='none'), negated "
               "(Triton)", ("logprobs", "loss"), {"logprobs": "grads_in_forward", "loss": "grads_in_forward"},
               ("liger-kernel",)),
    MethodSpec("liger_flce_cutedsl", "peer", f"liger_flce on Liger's CuTe DSL kernels ({LIGER_IMPL_ENV}="
               f"{LIGER_CUTEDSL}, set before liger_kernel is imported; Hopper/Blackwell, nvidia-cutlass-dsl)",
               ("logprobs", "loss"), {"logprobs": "grads_in_forward", "loss": "grads_in_forward"},
               ("liger-kernel", "nvidia-cutlass-dsl")),
    MethodSpec("liger_dpo", "peer", "Liger-Kernel LigerFusedLinearDPOLoss(use_ref_model=False): a DPO loss, not "
               "DRDO, on the same LM-head work", ("loss", "train"), {"loss": "grads_in_forward"}, ("liger-kernel",)),
    MethodSpec("cce", "peer", "Cut Cross-Entropy linear_cross_entropy(reduction='none', impl='cce'), negated "
               "(Triton)", ("logprobs", "loss", "train"), {"logprobs": "recompute", "loss": "recompute"},
               ("cut-cross-entropy",)),
    MethodSpec("cce_torch_compile", "peer", "the same with impl='torch_compile' (CCE's CPU path)",
               ("logprobs", "loss"), {"logprobs": "full_logits", "loss": "full_logits"}, ("cut-cross-entropy",)),
    MethodSpec("trl_chunked", "peer", "TRL's fused LM head trl.kernels.ChunkedLogProbFunction (TRL >= 1.16), "
               "as its trainers call it", ("logprobs", "loss"), {"logprobs": "recompute", "loss": "recompute"},
               ("trl",)),
    MethodSpec("trl_logprob_entropy", "peer", "full logits, then TRL's Triton log-prob + entropy kernel "
               "trl.kernels.selective_log_softmax_and_entropy (what its trainers run on logits)",
               ("logprobs", "loss"), {"logprobs": "full_logits", "loss": "full_logits"}, ("trl",)),
    MethodSpec("trl_dpo_fused", "peer", "TRL's DPOTrainer step as it ships (its fused LM head), a DPO loss",
               ("train",), packages=("trl",)),
    MethodSpec("trl_dpo", "peer", "TRL's DPOTrainer step with full logits instead of its fused head",
               ("train",), packages=("trl",)),
    MethodSpec("trl_dpo_liger", "peer", "TRL's DPOTrainer step with use_liger_kernel=True (Triton only)",
               ("train",), packages=("trl", "liger-kernel")),
)

#: name -> spec, every method once.
REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}


def names(bench: str) -> tuple[str, ...]:
    """The methods benchmark ``bench`` ("logprobs" | "loss" | "train") runs, in registry order."""
    if bench not in BENCHES:
        raise ValueError(f"bench must be one of {BENCHES}, got {bench!r}")
    return tuple(name for name, spec in REGISTRY.items() if bench in spec.benches)


def family(name: str) -> str:
    """The family of method ``name`` (ValueError naming it when it is not registered)."""
    return spec_of(name).family


def spec_of(name: str) -> MethodSpec:
    """The spec of method ``name``; ValueError naming it when it is not registered."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def packages() -> tuple[str, ...]:
    """Every distribution a registered method comes from, sorted (for the results' versions)."""
    return tuple(sorted({p for spec in REGISTRY.values() for p in spec.packages}))
