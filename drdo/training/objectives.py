"""The root training module: the policy plus the loss of one stage, computed in ``forward``.

Computing the loss inside the root module's forward is what makes the fused
kernels safe under FSDP2: while ``forward`` runs, FSDP2 has unsharded the root's
own parameters (embeddings, final norm, LM head, reward head), so the kernel
reads the full [V, H] LM-head weight, and the gradient it returns is
reduce-scattered by FSDP2's post-backward like any other.

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

from drdo import losses as ref_losses
from drdo.policy_logprobs import head_params, policy_sequence_logprobs
from drdo.losses import IGNORE_INDEX
from drdo.models import packed_sequence_rewards, sequence_rewards
from drdo.training import diagnostics

#: Metrics that the losses report as sums (not means) over the micro-batch under reduction="sum".
_SUMMED_METRICS = {"edpo": ("distill_min", "distill_max")}


class StageObjective(nn.Module):
    """Root module for FSDP2: ``policy`` (PolicyWithRewardHead) + the loss of ``config.stage``.

    forward(input_ids [R, T] int64, attention_mask [R, T] int64, labels [R, T] int64 (aligned),
            oracle_rewards [2B] or [K, 2B] float32 | None, ref_logps [2B] float32 | None)
      -> (loss_sum: scalar float32, metrics: dict of detached scalar means over the micro-batch)
    R = 2B rows (chosen then rejected) for every stage but SFT (R = B chosen rows). The sum runs
    over the B pairs (SFT: over the response tokens).

    DRDO options: ``reward_grad="head"`` feeds the reward head a detached hidden state (the
    distillation term then trains the head only); ``length_normalize`` uses token-mean log-probs
    as z; on steps where ``diagnostic_step`` (set by the trainer) is a multiple of
    ``diagnostics_every`` the metrics also hold the ``diag_*`` readings of
    :mod:`drdo.training.diagnostics` (single process only).
    """

    def __init__(self, policy: nn.Module, config):
        super().__init__()
        self.policy = policy
        self.stage = config.stage
        self.kernel_mode = config.kernel
        self.cfg = dict(
            alpha=config.alpha, gamma=config.gamma, beta=config.beta, reward=config.reward,
            unlikelihood=config.unlikelihood, oracle_alpha=config.oracle_alpha, pessimistic=config.pessimistic,
            reward_grad=config.reward_grad, length_normalize=config.length_normalize,
            diagnostics_every=config.diagnostics_every,
        )
        self.diagnostic_step = None  # the trainer sets the 0-based step; DRDO logs diagnostics every N steps
        self.fused = None if self.kernel_mode == "reference" else self._make_fused()

    def _make_fused(self):
        import drdo_kernels as dk

        c, backend = self.cfg, self.kernel_mode
        common = dict(ignore_index=IGNORE_INDEX, backend=backend, reduction="sum")
        if self.stage == "drdo":
            return dk.FusedLinearDRDOLoss(
                c["alpha"], c["gamma"], reward=c["reward"], beta=c["beta"], unlikelihood=c["unlikelihood"],
                length_normalize=c["length_normalize"], **common
            )
        if self.stage == "oracle":
            return dk.FusedLinearOracleLoss(alpha=c["oracle_alpha"], nll_reduction="mean", **common)
        if self.stage == "dpo":
            return dk.FusedLinearDPOLoss(beta=c["beta"], **common)
        if self.stage == "edpo":
            return dk.FusedLinearEDPOLoss(beta=c["beta"], pessimistic=c["pessimistic"], **common)
        return None  # sft uses fused_linear_logprobs directly

    def forward(self, input_ids, attention_mask=None, labels=None, oracle_rewards=None, ref_logps=None,
                position_ids=None, cu_seqlens=None, seq_idx=None):
        if cu_seqlens is not None:  # padding-free: one packed row, sequences delimited by cu_seqlens
            return self._packed(input_ids, labels, oracle_rewards, ref_logps, position_ids, cu_seqlens)
        if self.stage == "sft":
            return self._sft(input_ids, attention_mask, labels)
        reference = self.kernel_mode == "reference"
        out = self.policy(input_ids, attention_mask, return_logits=reference)
        if self.stage == "drdo" and self.cfg["reward_grad"] == "head":  # distillation stops at the head's input
            out = dataclasses.replace(out, rewards=sequence_rewards(
                out.hidden_states.detach(), attention_mask, self.policy.reward_head))
        if reference:
            logps, n_tokens = ref_losses.sequence_logprobs(out.logits, labels, ignore_index=IGNORE_INDEX)
            loss, metrics = self._reference_pair_loss(logps, n_tokens, out.rewards, oracle_rewards, ref_logps)
        else:
            loss, metrics = self._fused_pair_loss(out, labels, oracle_rewards, ref_logps)
        if self.stage == "drdo" and diagnostics.is_diagnostic_step(self.cfg["diagnostics_every"], self.diagnostic_step):
            metrics.update(self._diagnostics(out, labels, oracle_rewards))
        return self._per_pair(loss, metrics, input_ids.shape[0] // 2)

    def _per_pair(self, loss, metrics, n_pairs):
        metrics = {k: v for k, v in metrics.items() if k != "loss"}
        for key in _SUMMED_METRICS.get(self.stage, ()):  # reduction="sum" made these sums over the micro-batch
            if key in metrics:
                metrics[key] = metrics[key] / n_pairs
        return loss.float(), metrics

    # ---- SFT -------------------------------------------------------------------------------------------------
    def _sft(self, input_ids, attention_mask, labels):
        logps, n_tokens, _ = policy_sequence_logprobs(self.policy, input_ids, attention_mask, labels,
                                                      kernel=self.kernel_mode)
        nll_sum = -logps.sum().float()
        return nll_sum, {"nll": (nll_sum / n_tokens.sum().clamp(min=1)).detach()}

    # ---- padding-free ----------------------------------------------------------------------------------------
    def _packed(self, input_ids, labels, oracle_rewards, ref_logps, position_ids, cu_seqlens):
        """input_ids / labels / position_ids: [1, L] (sequences back to back), cu_seqlens: [S + 1] int.
        Per-sequence sums of the packed row, then the same losses as the padded batch."""
        reference = self.kernel_mode == "reference"
        out = self.policy(input_ids, None, position_ids=position_ids, cu_seqlens=cu_seqlens, return_logits=reference)
        if self.stage == "drdo" and self.cfg["reward_grad"] == "head":  # distillation stops at the head's input
            out = dataclasses.replace(out, rewards=packed_sequence_rewards(
                out.hidden_states.detach(), cu_seqlens, self.policy.reward_head))
        logps, n_tokens = self._packed_logps(out, labels, cu_seqlens, reference)
        if self.stage == "sft":
            nll_sum = -logps.sum().float()
            return nll_sum, {"nll": (nll_sum / n_tokens.sum().clamp(min=1)).detach()}
        loss, metrics = self._reference_pair_loss(logps, n_tokens, out.rewards, oracle_rewards, ref_logps)
        return self._per_pair(loss, metrics, (cu_seqlens.numel() - 1) // 2)

    def _packed_logps(self, out, labels, cu_seqlens, reference):
        """Packed row -> (summed response log-probs [S] fp32, response tokens [S]) per sequence."""
        from drdo.data.packing import segment_sum

        if reference:
            logp = torch.log_softmax(out.logits[0].float(), dim=-1)
            mask = labels[0] != IGNORE_INDEX
            token_logp = logp.gather(-1, labels[0].clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        else:
            import drdo_kernels as dk

            w, b = head_params(self.policy.lm_head, out.hidden_states.dtype)
            token_logp = dk.fused_linear_logprobs(out.hidden_states[0], w, labels[0], bias=b,
                                                  ignore_index=IGNORE_INDEX, backend=self.kernel_mode)
        n_tokens = segment_sum((labels[0] != IGNORE_INDEX).long(), cu_seqlens)
        if bool((n_tokens == 0).any()):
            raise ValueError("a packed sequence has no response token; a sequence log-prob needs at least one")
        return segment_sum(token_logp, cu_seqlens), n_tokens

    # ---- preference stages -----------------------------------------------------------------------------------
    def _fused_pair_loss(self, out, labels, oracle_rewards, ref_logps):
        h = out.hidden_states
        w, b = head_params(self.policy.lm_head, h.dtype)
        if self.stage == "drdo":
            oracle = _single_oracle(oracle_rewards)
            policy_rewards = out.rewards if self.cfg["reward"] == "head" else None
            return self.fused(w, h, labels, oracle, policy_rewards, bias=b)
        if self.stage == "oracle":
            return self.fused(w, h, labels, out.rewards, bias=b)
        if self.stage == "dpo":
            return self.fused(w, h, labels, ref_logps, bias=b)
        return self.fused(w, h, labels, ref_logps, _ensemble(oracle_rewards), bias=b)

    def _reference_pair_loss(self, logps, n_tokens, rewards, oracle_rewards, ref_logps):
        c = self.cfg
        n = logps.shape[0] // 2
        if self.stage == "drdo" and c["length_normalize"]:
            logps = logps / n_tokens.to(logps.dtype)
        z_w, z_l = logps[:n], logps[n:]
        if self.stage == "drdo":
            oracle = _single_oracle(oracle_rewards)
            if c["reward"] == "head":
                rhat_w, rhat_l = rewards[:n], rewards[n:]
            else:
                rhat_w, rhat_l = c["beta"] * z_w, c["beta"] * z_l
            return ref_losses.drdo_loss(
                z_w, z_l, rhat_w, rhat_l, oracle[:n], oracle[n:], alpha=c["alpha"], gamma=c["gamma"],
                unlikelihood=c["unlikelihood"], reduction="sum",
            )
        if self.stage == "oracle":
            return ref_losses.oracle_loss(
                rewards[:n], rewards[n:], -z_w, alpha=c["oracle_alpha"], chosen_n_tokens=n_tokens[:n], reduction="sum"
            )
        if self.stage == "dpo":
            return ref_losses.dpo_loss(z_w, z_l, ref_logps[:n], ref_logps[n:], beta=c["beta"], reduction="sum")
        oracle = _ensemble(oracle_rewards)
        return ref_losses.edpo_loss(
            z_w, z_l, ref_logps[:n], ref_logps[n:], oracle[:, :n], oracle[:, n:],
            beta=c["beta"], pessimistic=c["pessimistic"], reduction="sum",
        )


    # ---- DRDO diagnostics (drdo.training.diagnostics) ---------------------------------------------------------
    def _diagnostics(self, out, labels, oracle_rewards) -> dict:
        """Focal, length and gradient-split readings of this micro-batch (recomputes z with its graph)."""
        c = self.cfg
        n_tokens = (labels != IGNORE_INDEX).sum(-1)
        if self.kernel_mode == "reference":
            logps, _ = ref_losses.sequence_logprobs(out.logits, labels, ignore_index=IGNORE_INDEX)
        else:
            import drdo_kernels as dk

            w, b = head_params(self.policy.lm_head, out.hidden_states.dtype)
            logps = dk.fused_linear_logprobs(out.hidden_states, w, labels, bias=b, ignore_index=IGNORE_INDEX,
                                             backend=self.kernel_mode).sum(-1)
        z = logps / n_tokens.to(logps.dtype) if c["length_normalize"] else logps
        rhat = out.rewards if c["reward"] == "head" else c["beta"] * z
        oracle = _single_oracle(oracle_rewards)
        n = z.shape[0] // 2
        result = diagnostics.pair_diagnostics(z[:n], z[n:], n_tokens[:n], n_tokens[n:], gamma=c["gamma"])
        if torch.is_grad_enabled() and not self.policy.is_gradient_checkpointing \
                and not torch.distributed.is_initialized():
            params = [p for name, p in self.policy.named_parameters()
                      if p.requires_grad and not name.startswith("reward_head.")]
            result.update(diagnostics.gradient_split(
                z[:n], z[n:], rhat[:n], rhat[n:], oracle[:n], oracle[n:], params,
                alpha=c["alpha"], gamma=c["gamma"], unlikelihood=c["unlikelihood"]))
        return result


def _single_oracle(oracle_rewards: torch.Tensor) -> torch.Tensor:
    """[2B] Oracle rewards; a [K, 2B] ensemble is averaged over its K members."""
    if oracle_rewards is None:
        raise ValueError("this stage needs Oracle rewards in the batch; run `drdo oracle score` on the data first")
    return oracle_rewards.float().mean(0) if oracle_rewards.dim() == 2 else oracle_rewards.float()


def _ensemble(oracle_rewards: torch.Tensor) -> torch.Tensor:
    """[K, 2B] Oracle rewards (a [2B] tensor is K = 1)."""
    if oracle_rewards is None:
        raise ValueError("e-DPO needs Oracle rewards in the batch; run `drdo oracle score` on the data first")
    return oracle_rewards.float() if oracle_rewards.dim() == 2 else oracle_rewards.float().unsqueeze(0)
