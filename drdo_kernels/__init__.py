"""drdo_kernels: fused LM-head log-probs and DRDO/DPO/EDPO/Oracle losses that never
materialise the [tokens, vocab] logits.

* ``fused_linear_logprobs(hidden, weight, labels)`` -> per-token log-probs (float32),
  Triton kernels on CUDA (or under ``TRITON_INTERPRET=1``), a chunked PyTorch path elsewhere.
* ``drdo_pair_loss`` -> the DRDO loss and its per-pair gradients in one Triton kernel.
* ``FusedLinear*Loss`` -> the losses of ``drdo.losses`` computed straight from the last
  hidden state and ``lm_head.weight``.
* ``align_labels`` / ``gather_lm_head`` -> inputs from HF/TRL trainers (unshifted labels,
  ``completion_mask``) and FSDP2 (a sharded DTensor LM head).
"""
from .inputs import align_labels, gather_lm_head
from .logprobs import fused_linear_logprobs
from .pair_loss import drdo_pair_loss
from .fused_losses import (
    FusedLinearDPOLoss,
    FusedLinearDRDOLoss,
    FusedLinearEDPOLoss,
    FusedLinearOracleLoss,
    fused_linear_dpo_loss,
    fused_linear_drdo_loss,
    fused_linear_edpo_loss,
    fused_linear_oracle_loss,
    row_logprobs,
)

__all__ = [
    "fused_linear_logprobs",
    "drdo_pair_loss",
    "FusedLinearDRDOLoss",
    "fused_linear_drdo_loss",
    "FusedLinearDPOLoss",
    "FusedLinearEDPOLoss",
    "FusedLinearOracleLoss",
    "fused_linear_dpo_loss",
    "fused_linear_edpo_loss",
    "fused_linear_oracle_loss",
    "row_logprobs",
    "align_labels",
    "gather_lm_head",
]
