"""One TRL ``DPOTrainer`` training step on the benchmark's model, with and without TRL's fused LM head.

TRL 1.16's DPOTrainer always patches the model with its fused head (``add_fused_lm_head``: per-token
log-probs from ``trl.kernels.ChunkedLogProbFunction``, no [tokens x vocab] logits). The three methods:

  trl_dpo_fused  the trainer as it ships: fused head
  trl_dpo        the same trainer, the fused head's function replaced by full logits [N, V] -> float32
                 log_softmax -> gather (what TRL's DPO did before the fused head), for the same loss
  trl_dpo_liger  the trainer with ``use_liger_kernel=True`` (Liger's RMSNorm, RoPE, SwiGLU kernels; TRL keeps
                 its own fused head, since Liger's fused linear cross-entropy would replace it). Triton only.

Reference log-probs are precomputed when the trainer is built (``precompute_ref_log_probs=True``), so a
step holds no reference model, like the DRDO steps it is compared with. The trainer's weight hash (the key
of that cache) is replaced by a random key: see :func:`unhashed_reference_cache`. A step = ``trainer.compute_loss``
(backbone, head, DPO loss) + backward + AdamW, on one batch of B pairs from the trainer's own collator:
prompts of T/2 tokens, responses of T/2 - 1 tokens and EOS (rows of T tokens).
"""
from __future__ import annotations

import contextlib
import random
import tempfile
import uuid

from benchmarks.methods import names

METHODS = tuple(name for name in names("train") if name.startswith("trl_"))


def skip_reason(method: str, ctx: dict) -> str | None:
    """Why ``method`` cannot run at ``ctx``, or None."""
    from benchmarks import peers
    from drdo.tokenizer import TINY_VOCAB_SIZE

    reason = peers.trl_kernels_reason() or peers.import_reason("trl.trainer.dpo_trainer", "trl>=1.16")
    if reason:
        return reason
    if ctx["V"] < TINY_VOCAB_SIZE:
        return f"the trainer's byte tokenizer needs a vocabulary of at least {TINY_VOCAB_SIZE}, got V={ctx['V']}"
    if method == "trl_dpo_liger":
        if ctx["device"] != "cuda":
            return "Liger-Kernel's kernels are Triton-only and need a CUDA device (use_liger_kernel=True)"
        return peers.import_reason("liger_kernel.transformers", "liger-kernel")
    return None


class FullLogitsHead:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction`` with the same arguments and outputs, computed
    from the full logits: hidden [N, H], weight [V, H] -> (log-probs [N] fp32, entropy, log_sum_sq_probs,
    mean_logits, is_top1; each None unless in ``outputs``). The extra outputs feed TRL's metrics only and
    are computed without gradient."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        import torch

        logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logp = torch.log_softmax(logits / temperature, dim=-1)
        token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
            sq = torch.logsumexp(2 * logp, dim=-1) if "log_sum_sq_probs" in outputs else None
            mean = logits.mean(-1) if "mean_logits" in outputs else None
            top1 = logits.argmax(-1) == targets if "is_top1" in outputs else None
        return token, entropy, sq, mean, top1


@contextlib.contextmanager
def full_logits_head():
    """Within the block, models patched by TRL's ``add_fused_lm_head`` compute full logits instead
    (``trl.trainer.utils`` looks the function up at call time)."""
    import trl.trainer.utils as trl_utils

    saved = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = FullLogitsHead
    try:
        yield
    finally:
        trl_utils._ChunkedLogProbFunction = saved


@contextlib.contextmanager
def unhashed_reference_cache():
    """Within the block, a new ``DPOTrainer`` keys its cache of precomputed reference log-probs by a random
    token instead of ``trl.trainer.utils.hash_module``, which copies every weight to the CPU and hashes it
    (it stalled a GPU run for over a minute at a 128k vocabulary). Every trainer gets its own cache entry."""
    import trl.trainer.dpo_trainer as dpo_trainer

    saved = dpo_trainer.hash_module
    dpo_trainer.hash_module = lambda module: uuid.uuid4().hex
    try:
        yield
    finally:
        dpo_trainer.hash_module = saved


def _dataset(pairs: int, t: int, seed: int):
    """B rows of (prompt T/2 letters, chosen and rejected T/2 - 1 letters): byte tokens, rows of T with EOS."""
    from datasets import Dataset

    rng = random.Random(seed)

    def text(n):
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))

    return Dataset.from_list([{"prompt": text(t // 2), "chosen": text(t // 2 - 1), "rejected": text(t // 2 - 1)}
                              for _ in range(pairs)])


def make_trl_step(method: str, ctx: dict, lm, pairs: int):
    """(step(), resident bytes: parameters, optimizer state, batch) for a DPOTrainer around ``lm``, which it
    patches (TRL's fused head; Liger's modules): pass a model no other method uses."""
    import torch
    from datasets.utils.logging import disable_progress_bar
    from trl import DPOConfig, DPOTrainer

    from drdo.tokenizer import get_tokenizer

    disable_progress_bar()
    lm.train()
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl_bench_"), per_device_train_batch_size=pairs,
                     report_to=[], use_cpu=ctx["device"] == "cpu", precompute_ref_log_probs=True, max_length=None,
                     save_strategy="no", logging_steps=10**6, disable_tqdm=True, bf16=False, fp16=False,
                     use_liger_kernel=method == "trl_dpo_liger", seed=ctx["seed"])
    with unhashed_reference_cache():
        trainer = DPOTrainer(model=lm, args=args, train_dataset=_dataset(pairs, ctx["T"], ctx["seed"]),
                             processing_class=get_tokenizer("tiny"))
    batch = {k: v.to(ctx["device"]) for k, v in next(iter(trainer.get_train_dataloader())).items()}
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5)
    scope = full_logits_head if method == "trl_dpo" else contextlib.nullcontext

    def step():
        with scope():
            opt.zero_grad(set_to_none=True)
            trainer.compute_loss(lm, batch).backward()
            opt.step()

    step()  # warm-up: optimizer state, autotune
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    resident = sum(t.numel() * t.element_size() for t in list(lm.parameters()) + state + list(batch.values()))
    return step, resident
