"""The root training module: the policy plus the loss of one stage, computed in ``forward``.

Computing the loss inside the root module's forward is what makes the fused
kernels safe under FSDP2: while ``forward`` runs, FSDP2 has unsharded the root's
own parameters (embeddings, final norm, LM head, reward head), so the kernel
reads the full [V, H] LM-head weight, and the gradient it returns is
reduce-scattered by FSDP2's post-backward like any other.

A stage is a small strategy object (:data:`STAGES`): what the batch must hold and how the
forward's outputs become the loss and metrics. The loss itself is the stage's spec
(``config.loss_spec()``, :mod:`drdo.losses`) applied by one function per path:
:func:`drdo.losses.objective_loss` on sequence log-probs (full logits, ``backend="reference"``,
and padding-free batches) or :func:`drdo_kernels.fused_objective_loss` on the last hidden state.

Every stage returns the SUM of its per-pair losses over the micro-batch (SFT:
the sum of token NLLs); the trainer divides by the global pair (token) count of
the optimizer step, so results do not depend on the micro-batch size or the
number of ranks. Exception: e-DPO's pessimistic max over ensemble members is
taken per micro-batch (each member's summed loss over the micro-batch, then the
max), so with K > 1 and gradient accumulation it is a max of partial sums, not
the max of the full-batch sums.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from drdo.losses import IGNORE_INDEX, DRDOSpec, objective_loss, sequence_logprobs
from drdo.models import packed_sequence_rewards, sequence_rewards
from drdo.policy_logprobs import head_params, policy_sequence_logprobs
from drdo.training import diagnostics

#: What a batch field is, for the error when a stage needs it and the data lacks it.
_MISSING = {"oracle_rewards": "Oracle rewards; run `drdo oracle score` on the data first",
            "ref_logps": "reference log-probs; run `drdo reflogps` on the data first"}


@dataclasses.dataclass(frozen=True)
class SFTStage:
    """Supervised fine-tuning: the summed NLL of the response tokens."""

    name: str = "sft"

    def loss(self, root: "StageObjective", input_ids, attention_mask, labels, position_ids=None, cu_seqlens=None,
             **_):
        if cu_seqlens is not None:
            out = root.policy(input_ids, None, position_ids=position_ids, cu_seqlens=cu_seqlens)
            logps, n_tokens = root.packed_logps(out, labels, cu_seqlens)
        else:
            logps, n_tokens, _ = policy_sequence_logprobs(root.policy, input_ids, attention_mask, labels,
                                                          backend=root.backend)
        nll_sum = -logps.sum().float()
        return nll_sum, {"nll": (nll_sum / n_tokens.sum().clamp(min=1)).detach()}


@dataclasses.dataclass(frozen=True)
class PairStage:
    """A loss over preference pairs (rows: B chosen, then B rejected).

    needs: the batch fields the loss reads; summed_metrics: metrics the losses report as sums
    over the micro-batch under reduction="sum" (divided back to means); diagnostics: whether
    the DRDO readings of :mod:`drdo.training.diagnostics` are logged."""

    name: str
    needs: tuple[str, ...] = ()
    summed_metrics: tuple[str, ...] = ()
    diagnostics: bool = False

    def loss(self, root: "StageObjective", input_ids, attention_mask=None, labels=None, oracle_rewards=None,
             ref_logps=None, position_ids=None, cu_seqlens=None):
        batch = {"oracle_rewards": oracle_rewards, "ref_logps": ref_logps}
        for field in self.needs:
            if batch[field] is None:
                raise ValueError(f"the {self.name} stage needs {_MISSING[field]}")
        packed = cu_seqlens is not None
        out = root.policy(input_ids, attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens,
                          return_logits=root.reference and not packed)
        out = root.detach_reward_input(out, attention_mask, cu_seqlens)
        scores = dict(rewards=out.rewards, oracle=_float(oracle_rewards), ref_logps=ref_logps)
        if packed:
            logps, n_tokens = root.packed_logps(out, labels, cu_seqlens)
            loss, metrics = objective_loss(root.spec, logps, n_tokens, reduction="sum", **scores)
        elif root.reference:
            logps, n_tokens = sequence_logprobs(out.logits, labels, ignore_index=IGNORE_INDEX)
            loss, metrics = objective_loss(root.spec, logps, n_tokens, reduction="sum", **scores)
        else:
            import drdo_kernels as dk

            w, b = head_params(root.policy.lm_head, out.hidden_states.dtype)
            loss, metrics = dk.fused_objective_loss(root.spec, w, out.hidden_states, labels, b, **scores,
                                                    ignore_index=IGNORE_INDEX, backend=root.backend, reduction="sum")
        if self.diagnostics and not packed and root.diagnostic_due():
            metrics.update(root.diagnostics(out, labels, scores["oracle"]))
        n_pairs = (cu_seqlens.numel() - 1 if packed else input_ids.shape[0]) // 2
        metrics = {k: v / n_pairs if k in self.summed_metrics else v for k, v in metrics.items() if k != "loss"}
        return loss.float(), metrics


#: The strategy of each training stage.
STAGES = {
    "sft": SFTStage(),
    "oracle": PairStage("oracle"),
    "drdo": PairStage("drdo", needs=("oracle_rewards",), diagnostics=True),
    "dpo": PairStage("dpo", needs=("ref_logps",)),
    "edpo": PairStage("edpo", needs=("oracle_rewards", "ref_logps"), summed_metrics=("distill_min", "distill_max")),
}


def _float(oracle_rewards: torch.Tensor | None) -> torch.Tensor | None:
    return None if oracle_rewards is None else oracle_rewards.float()


class StageObjective(nn.Module):
    """Root module for FSDP2: ``policy`` (PolicyWithRewardHead) + the loss of ``config.stage``.

    forward(input_ids [R, T] int64, attention_mask [R, T] int64, labels [R, T] int64 (aligned),
            oracle_rewards [2B] or [K, 2B] float32 | None, ref_logps [2B] float32 | None)
      -> (loss_sum: scalar float32, metrics: dict of detached scalar means over the micro-batch)
    R = 2B rows (chosen then rejected) for every stage but SFT (R = B chosen rows). The sum runs
    over the B pairs (SFT: over the response tokens). Padding-free batches give input_ids,
    labels, position_ids [1, L] and cu_seqlens [S + 1] instead.

    DRDO options come with the spec: ``reward_grad="head"`` feeds the reward head a detached
    hidden state (the distillation term then trains the head only); ``length_normalize`` uses
    token-mean log-probs as z. On steps where ``diagnostic_step`` (set by the trainer) is a
    multiple of ``diagnostics_every`` the metrics also hold the ``diag_*`` readings of
    :mod:`drdo.training.diagnostics` (single process only).
    """

    def __init__(self, policy: nn.Module, config):
        super().__init__()
        self.policy = policy
        self.stage = STAGES[config.stage]
        self.spec = config.loss_spec()
        self.backend = config.backend
        self.reference = config.backend == "reference"
        self.diagnostics_every = config.diagnostics_every
        self.diagnostic_step = None  # the trainer sets the 0-based step; DRDO logs diagnostics every N steps

    def forward(self, input_ids, attention_mask=None, labels=None, oracle_rewards=None, ref_logps=None,
                position_ids=None, cu_seqlens=None, seq_idx=None):
        return self.stage.loss(self, input_ids, attention_mask=attention_mask, labels=labels,
                               oracle_rewards=oracle_rewards, ref_logps=ref_logps, position_ids=position_ids,
                               cu_seqlens=cu_seqlens)

    # ---- pieces the stages share
    def detach_reward_input(self, out, attention_mask, cu_seqlens):
        """With DRDO's reward_grad="head", the rewards recomputed from a detached hidden state."""
        if not (isinstance(self.spec, DRDOSpec) and self.spec.reward_grad == "head"):
            return out
        hidden, head = out.hidden_states.detach(), self.policy.reward_head
        rewards = (sequence_rewards(hidden, attention_mask, head) if cu_seqlens is None
                   else packed_sequence_rewards(hidden, cu_seqlens, head))
        return dataclasses.replace(out, rewards=rewards)

    def packed_logps(self, out, labels, cu_seqlens):
        """Packed row -> (summed response log-probs [S] fp32, response tokens [S]) per sequence: the
        per-token log-probs of the LM head (full logits for backend="reference") summed per sequence."""
        import drdo_kernels as dk
        from drdo.data.packing import segment_sum

        w, b = head_params(self.policy.lm_head, out.hidden_states.dtype)
        token_logp = dk.fused_linear_logprobs(w, out.hidden_states[0], labels[0], bias=b, ignore_index=IGNORE_INDEX,
                                              backend=self.backend)
        n_tokens = segment_sum((labels[0] != IGNORE_INDEX).long(), cu_seqlens)
        if bool((n_tokens == 0).any()):
            raise ValueError("a packed sequence has no response token; a sequence log-prob needs at least one")
        return segment_sum(token_logp, cu_seqlens), n_tokens

    # ---- DRDO diagnostics (drdo.training.diagnostics)
    def diagnostic_due(self) -> bool:
        return diagnostics.is_diagnostic_step(self.diagnostics_every, self.diagnostic_step)

    def diagnostics(self, out, labels, oracle_rewards) -> dict:
        """Focal, length and gradient-split readings of this micro-batch (recomputes z with its graph)."""
        spec = self.spec
        n_tokens = (labels != IGNORE_INDEX).sum(-1)
        if self.reference:
            logps, _ = sequence_logprobs(out.logits, labels, ignore_index=IGNORE_INDEX)
        else:
            import drdo_kernels as dk

            w, b = head_params(self.policy.lm_head, out.hidden_states.dtype)
            logps = dk.fused_linear_logprobs(w, out.hidden_states, labels, bias=b, ignore_index=IGNORE_INDEX,
                                             backend=self.backend).sum(-1)
        z = logps / n_tokens.to(logps.dtype) if spec.length_normalize else logps
        rhat = out.rewards if spec.reward == "head" else spec.beta * z
        oracle = oracle_rewards.mean(0) if oracle_rewards.dim() == 2 else oracle_rewards
        n = z.shape[0] // 2
        result = diagnostics.pair_diagnostics(z[:n], z[n:], n_tokens[:n], n_tokens[n:], gamma=spec.gamma)
        if torch.is_grad_enabled() and not self.policy.is_gradient_checkpointing \
                and not torch.distributed.is_initialized():
            params = [p for name, p in self.policy.named_parameters()
                      if p.requires_grad and not name.startswith("reward_head.")]
            result.update(diagnostics.gradient_split(z[:n], z[n:], rhat[:n], rhat[n:], oracle[:n], oracle[n:],
                                                     params, spec=spec))
        return result
