"""Causal LMs with a scalar reward head: the Oracle, and the DRDO student for ``reward="head"``.

* :mod:`.loading`: the tiny built-in model, Hugging Face checkpoints, and the attention they run;
* :mod:`.reward_head`: the head ``nn.Linear(H, 1)``, the rewards it reads off hidden states, its files;
* :mod:`.logit_transform`: what a model's forward does to ``lm_head(hidden)`` (softcap, scale),
  measured once, for the fused kernels;
* :mod:`.policy`: :class:`PolicyWithRewardHead`, the LM and its head as one module, saved and loaded
  as a Hugging Face model directory plus the head's two files.

Every public name of the four is importable from ``drdo.models``.
"""
from drdo.errors import ModelFormatError
from drdo.models.loading import (
    TINY_MODEL_NAME,
    build_tiny_causal_lm,
    check_attn_implementation,
    check_device,
    default_attn_implementation,
    dtype_kwarg,
    flash_attn_available,
    is_tiny_model,
    load_causal_lm,
    set_attn_implementation,
    training_attn_implementation,
    weights_digest,
)
from drdo.models.logit_transform import (
    config_logit_transform,
    model_logit_transform,
    probe_logit_transform,
)
from drdo.models.policy import PolicyOutput, PolicyWithRewardHead, count_parameters, find_transformer_blocks
from drdo.models.reward_head import (
    HEAD_CONFIG_NAME,
    HEAD_WEIGHTS_NAME,
    head_hidden_size,
    head_is_trained,
    head_rewards,
    last_token_indices,
    load_head,
    new_reward_head,
    packed_sequence_rewards,
    save_head,
    sequence_rewards,
)

__all__ = [
    "ModelFormatError",
    # loading
    "TINY_MODEL_NAME",
    "build_tiny_causal_lm",
    "is_tiny_model",
    "load_causal_lm",
    "default_attn_implementation",
    "training_attn_implementation",
    "flash_attn_available",
    "set_attn_implementation",
    "dtype_kwarg",
    "check_device",
    "check_attn_implementation",
    "weights_digest",
    # reward head
    "HEAD_WEIGHTS_NAME",
    "HEAD_CONFIG_NAME",
    "new_reward_head",
    "last_token_indices",
    "sequence_rewards",
    "packed_sequence_rewards",
    "head_rewards",
    "head_hidden_size",
    "save_head",
    "load_head",
    "head_is_trained",
    # logit transform
    "model_logit_transform",
    "probe_logit_transform",
    "config_logit_transform",
    # policy
    "PolicyOutput",
    "PolicyWithRewardHead",
    "count_parameters",
    "find_transformer_blocks",
]
