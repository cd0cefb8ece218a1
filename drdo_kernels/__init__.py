"""drdo_kernels: fused LM-head log-probs and DRDO/DPO/EDPO/Oracle losses that never
materialise the [tokens, vocab] logits.

* ``fused_linear_logprobs(lm_head_weight, hidden, labels, bias=None)`` -> per-token log-probs (float32).
  Backends: "chunked" (cuBLAS GEMMs on token chunks sized from
  ``logprobs_chunked.CHUNK_BUDGET_BYTES``, a Triton fold per chunk), "torch" (the same
  with a PyTorch fold), "triton" (tiled Triton kernels), and "auto"
  (``logprobs.auto_backend``: "chunked" on CUDA, "torch" elsewhere).
* ``temperature=``, ``softcap=``, ``logit_scale=`` (every fused function and module) -> the
  model's logit transform (Gemma's soft cap, Cohere's / Granite's scale, a sampling
  temperature), exact on every backend; ``LogitTransform`` holds and checks the three.
* ``drdo_pair_loss`` -> the DRDO loss and its per-pair gradients in one Triton kernel.
* ``FusedLinear*Loss`` -> the losses of ``drdo.losses`` computed straight from the last
  hidden state and ``lm_head.weight`` (on the chunked backends, DRDO / DPO / Oracle
  compute their gradients in the forward on chunks of whole pairs); they take a loss spec
  (``drdo.losses.DRDOSpec``, ...) or its fields; ``fused_objective_loss(spec, ...)`` any of them.
* ``align_labels`` / ``gather_lm_head`` -> inputs from HF/TRL trainers (unshifted labels,
  ``completion_mask``) and FSDP2 (a sharded DTensor LM head).
* ``triton_runtime.triton_interpreting()`` -> whether Triton runs in its CPU interpreter.
"""
from .fused_losses import (
    FusedLinearDPOLoss,
    FusedLinearDRDOLoss,
    FusedLinearEDPOLoss,
    FusedLinearOracleLoss,
    fused_linear_dpo_loss,
    fused_linear_drdo_loss,
    fused_linear_edpo_loss,
    fused_linear_oracle_loss,
    fused_objective_loss,
    row_logprobs,
)
from .inputs import align_labels, gather_lm_head
from .logit_transform import LogitTransform
from .logprobs import auto_backend, fused_linear_logprobs
from .pair_loss import drdo_pair_loss

__all__ = [
    "fused_linear_logprobs",
    "auto_backend",
    "drdo_pair_loss",
    "FusedLinearDRDOLoss",
    "fused_linear_drdo_loss",
    "FusedLinearDPOLoss",
    "FusedLinearEDPOLoss",
    "FusedLinearOracleLoss",
    "fused_linear_dpo_loss",
    "fused_linear_edpo_loss",
    "fused_linear_oracle_loss",
    "fused_objective_loss",
    "row_logprobs",
    "align_labels",
    "gather_lm_head",
    "LogitTransform",
]
