"""``PolicyWithRewardHead``: a causal LM and a scalar reward head as one module, and its save / load.

:class:`PolicyWithRewardHead` wraps any Hugging Face ``AutoModelForCausalLM`` (``.lm``) and adds
``.reward_head = nn.Linear(H, 1)`` (float32). Its forward pass runs the decoder stack only
(``lm.base_model``, the module the CausalLM itself calls before its LM head) and returns

* ``hidden_states`` [B, T, H] in the model dtype: the final hidden states, after the last norm,
  exactly what ``lm.lm_head`` would receive;
* ``rewards`` [B] float32: the head applied to the hidden state of the last non-padding token;
* ``logits`` [B, T, V]: only with ``return_logits=True``. By default the [B, T, V] logits are never
  built: the fused kernels in :mod:`drdo_kernels` compute log-probs from ``hidden_states`` and
  ``lm_head.weight`` chunk by chunk.

On disk a policy is a plain Hugging Face model directory (``config.json`` + ``model.safetensors``,
loadable by ``AutoModelForCausalLM.from_pretrained`` in any HF tool) plus the two files of its
reward head (:mod:`drdo.models.reward_head`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from drdo.errors import ModelFormatError
from drdo.models.loading import TINY_MODEL_NAME, load_causal_lm
from drdo.models.logit_transform import model_logit_transform
from drdo.models.reward_head import (
    HEAD_WEIGHTS_NAME,
    head_hidden_size,
    head_is_trained,
    load_head,
    new_reward_head,
    packed_sequence_rewards,
    save_head,
    sequence_rewards,
)
from drdo_kernels.logit_transform import logit_transform

__all__ = ["PolicyOutput", "PolicyWithRewardHead", "count_parameters", "find_transformer_blocks"]

logger = logging.getLogger(__name__)

#: Dotted paths (from the CausalLM) of the list of decoder layers, tried in order.
_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.language_model.layers",  # multimodal wrappers
)


@dataclass
class PolicyOutput:
    """Result of :meth:`PolicyWithRewardHead.forward`.

    hidden_states: [B, T, H] model dtype, final hidden states (after the last norm).
    rewards: [B] float32, reward head on the last non-padding token of each row.
    logits: [B, T, V] model dtype, or None unless ``return_logits=True``.
    """

    hidden_states: torch.Tensor
    rewards: torch.Tensor
    logits: torch.Tensor | None = None


def _get_attr_path(root: nn.Module, path: str):
    """``root.a.b.c`` for ``path`` "a.b.c", or None where a link is missing."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def find_transformer_blocks(lm: nn.Module) -> list[nn.Module]:
    """The decoder layers of a CausalLM (Llama/Qwen/Mistral ``model.layers``, OPT
    ``model.decoder.layers``, GPT-2 ``transformer.h``, GPT-NeoX ``gpt_neox.layers``), in order.
    Falls back to the single ``nn.ModuleList`` of length ``config.num_hidden_layers``."""
    for path in _BLOCK_PATHS:
        blocks = _get_attr_path(lm, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return list(blocks)
    n_layers = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
    candidates = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if n_layers and len(candidates) == 1:
        return list(candidates[0])
    raise ValueError(
        f"cannot find the transformer blocks of {type(lm).__name__}: none of {', '.join(_BLOCK_PATHS)} exists "
        "and no unique nn.ModuleList has config.num_hidden_layers entries"
    )


class PolicyWithRewardHead(nn.Module):
    """A causal LM (``.lm``) plus a scalar reward head (``.reward_head``, nn.Linear(H, 1), float32).

    Module tree: ``lm`` (the HF CausalLM, untouched) and ``reward_head``. ``backbone`` is
    ``lm.base_model`` (the decoder stack incl. the final norm), ``lm_head`` the LM's output
    embedding, ``transformer_blocks()`` its decoder layers (for FSDP2 ``fully_shard``).
    ``logit_transform`` holds the keywords (logit_scale, softcap) that the fused kernels need to
    reproduce the model's own logits from ``lm_head(hidden)`` (Gemma 2 / 3, Cohere, Granite, ...).
    ``head_trained`` (True, False, or None: unknown) is written to reward_head.json on save: a
    fresh head is False; whoever trains the head as a reward model sets it to True.
    """

    def __init__(self, lm: nn.Module, reward_head: nn.Linear | None = None, *, seed: int = 0,
                 head_trained: bool | None = None):
        super().__init__()
        hidden_size = head_hidden_size(lm)
        self.head_trained = head_trained
        if reward_head is None:
            self.head_trained = False
            device = next(lm.parameters()).device
            reward_head = new_reward_head(hidden_size, seed=seed, device=device)
        if not isinstance(reward_head, nn.Linear) or reward_head.out_features != 1:
            raise ValueError(f"reward_head must be nn.Linear(H, 1), got {reward_head!r}")
        if reward_head.in_features != hidden_size:
            raise ValueError(
                f"reward_head takes {reward_head.in_features} features but the LM's hidden size is {hidden_size}"
            )
        self.lm = lm
        self.reward_head = reward_head
        self.config = lm.config
        #: The fused kernels' keywords that reproduce the model's own logits from lm_head(hidden)
        #: ({"logit_scale": float, "softcap": float | None}; :mod:`drdo.models.logit_transform`).
        self.logit_transform = model_logit_transform(lm)

    # ---- structure
    @property
    def backbone(self) -> nn.Module:
        """The decoder stack the CausalLM calls before its LM head (``lm.base_model``, e.g. lm.model)."""
        return self.lm.base_model

    @property
    def lm_head(self) -> nn.Module:
        """The output embedding (``lm.get_output_embeddings()``); ``.weight`` is [V, H]."""
        return self.lm.get_output_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.reward_head.in_features

    def transformer_blocks(self) -> list[nn.Module]:
        """The decoder layers, in order (see :func:`find_transformer_blocks`)."""
        return find_transformer_blocks(self.lm)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Activation checkpointing of the decoder layers (non-reentrant by default)."""
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.lm, "activation_checkpointing_disable", None) or self.lm.gradient_checkpointing_disable
        disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.lm.modules())

    # ---- compute
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> PolicyOutput:
        """input_ids [B, T] int64, attention_mask [B, T] (1 = token, 0 = padding; None = all tokens).

        Returns :class:`PolicyOutput`: hidden_states [B, T, H] model dtype, rewards [B] float32,
        logits [B, T, V] only when ``return_logits``. Hidden states at padding positions are
        unspecified. ``position_ids`` None: positions count the row's tokens (cumsum of the mask
        minus 1, like HF generation), so a left-padded row gives the same hidden states and reward
        as the same row right-padded; for right padding this equals the default 0..T-1.

        Packed (padding-free) input: ``cu_seqlens`` [R + 1] int (sequence r spans
        ``[cu_seqlens[r], cu_seqlens[r + 1])`` of the single row input_ids [1, L]), ``position_ids``
        [1, L] restarting at 0 per sequence, no attention_mask (see :mod:`drdo.data.packing`);
        rewards [R] are read at each sequence's last token.
        """
        if cu_seqlens is not None:
            return self._packed_forward(input_ids, attention_mask, position_ids, cu_seqlens, return_logits)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out[0]
        rewards = sequence_rewards(hidden, attention_mask, self.reward_head)
        logits = self.logits(hidden) if return_logits else None
        return PolicyOutput(hidden_states=hidden, rewards=rewards, logits=logits)

    def _packed_forward(self, input_ids, attention_mask, position_ids, cu_seqlens, return_logits) -> PolicyOutput:
        from drdo.data.packing import packed_attention_supported

        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or attention_mask is not None or position_ids is None:
            raise ValueError("packed input is input_ids [1, L] with position_ids [1, L], cu_seqlens [R + 1] and no "
                             f"attention_mask; got input_ids {tuple(input_ids.shape)}, attention_mask "
                             f"{attention_mask is not None}, position_ids {position_ids is not None}")
        impl = getattr(self.config, "_attn_implementation", None)
        if impl != "flash_attention_2" and not packed_attention_supported():
            raise RuntimeError(f"packed sequences with {impl} attention need transformers >= 4.54 "
                               "(block-diagonal masks from position_ids), or flash_attention_2")
        out = self.backbone(input_ids=input_ids, attention_mask=None, position_ids=position_ids, use_cache=False)
        hidden = out[0]
        rewards = packed_sequence_rewards(hidden, cu_seqlens, self.reward_head)
        logits = self.logits(hidden) if return_logits else None
        return PolicyOutput(hidden_states=hidden, rewards=rewards, logits=logits)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> the model's own logits [..., V] (model dtype): ``lm_head(hidden)``
        with the model's :attr:`logit_transform` applied, as its forward returns them."""
        return logit_transform(**self.logit_transform).apply(self.lm_head(hidden))

    # ---- persistence
    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> str:
        """Write an HF model directory (config.json, model.safetensors, generation config) plus
        reward_head.safetensors / reward_head.json, and the tokenizer when given. Returns the path."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.lm.save_pretrained(directory)
        save_head(self.reward_head, directory, trained=self.head_trained)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory_or_name: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | int | None = None,
        trust_remote_code: bool = False,
        require_head: bool = False,
        attn_implementation: str | None = None,
        seed: int = 0,
    ) -> "PolicyWithRewardHead":
        """Load a policy saved by :meth:`save_pretrained`, or wrap any causal LM (``"tiny"``, an HF
        directory or hub id). The LM gets ``dtype`` (None = as saved); the head stays float32.
        Without reward_head.safetensors (only local directories are searched) the head is fresh
        (seeded by ``seed``), or, with ``require_head=True``, a :class:`ModelFormatError` is raised.
        A missing directory raises FileNotFoundError; corrupt files raise ModelFormatError."""
        name = os.fspath(directory_or_name)
        lm = load_causal_lm(
            name, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, seed=seed,
        )
        hidden_size = head_hidden_size(lm)
        local = os.path.expanduser(name)
        trained = False
        if os.path.isfile(os.path.join(local, HEAD_WEIGHTS_NAME)):
            head = load_head(local, hidden_size)
            trained = head_is_trained(local)
        elif require_head:
            raise ModelFormatError(
                f"{name} has no reward head ({HEAD_WEIGHTS_NAME}); train one with `drdo oracle train` "
                "or pass require_head=False for a fresh head"
            )
        else:
            if name != TINY_MODEL_NAME:
                logger.info("%s has no %s: using a fresh reward head (seed %d)", name, HEAD_WEIGHTS_NAME, seed)
            head = new_reward_head(hidden_size, seed=seed)
        if device is not None:
            head = head.to(device)
        return cls(lm, head, seed=seed, head_trained=trained)
