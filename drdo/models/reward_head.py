"""The reward head: ``nn.Linear(H, 1)`` in float32, the rewards it reads off hidden states, and its files.

A head reads the final hidden state of a sequence's last token: :func:`sequence_rewards` for padded
rows, :func:`packed_sequence_rewards` for sequences packed into one row.

On disk it sits beside a Hugging Face model directory as ``reward_head.safetensors`` (tensors ``weight``
[1, H] and ``bias`` [1], float32) and ``reward_head.json`` (``{"format": "drdo-reward-head",
"version": 1, "hidden_size": H, "trained": true}``; ``trained`` says whether the head was trained as a
reward model, see :func:`head_is_trained`).
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from drdo.atomic import write_text
from drdo.errors import ModelFormatError, shown

__all__ = [
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
]

#: File names of the reward head inside a saved model directory.
HEAD_WEIGHTS_NAME = "reward_head.safetensors"
HEAD_CONFIG_NAME = "reward_head.json"
_HEAD_FORMAT = "drdo-reward-head"
_HEAD_VERSION = 1


def new_reward_head(hidden_size: int, *, seed: int = 0, device: torch.device | str | None = None) -> nn.Linear:
    """``nn.Linear(hidden_size, 1)`` in float32: weight ~ N(0, 1/(H+1)), bias 0, seeded."""
    head = nn.Linear(hidden_size, 1, dtype=torch.float32, device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weight = torch.randn(1, hidden_size, generator=generator, dtype=torch.float32) / math.sqrt(hidden_size + 1)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
    return head


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, T] (0/1 or bool) -> [B] int64 index of the last position where it is 1.
    Works for right and left padding. Raises ValueError if a row has no token."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1)
    if torch.compiler.is_compiling():  # no host sync in a compiled graph: checked on the device
        torch._assert_async((last >= 0).all(), "an attention_mask row has no token; a reward needs >= 1 token")
    elif bool((last < 0).any()):
        rows = (last < 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} have no token (all padding); a reward needs >= 1 token")
    return last


def sequence_rewards(hidden: torch.Tensor, attention_mask: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """Reward of each row: ``head(hidden[b, last non-padding position of b])``.

    hidden: [B, T, H] any float dtype; attention_mask: [B, T]; head: nn.Linear(H, 1).
    Returns [B] float32 (the head runs in float32 whatever the dtypes of hidden and head)."""
    if hidden.dim() != 3 or hidden.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"hidden must be [B, T, H] matching attention_mask [B, T]; got {tuple(hidden.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    last = last_token_indices(attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head_rewards(hidden[rows, last.to(hidden.device)], head)


def packed_sequence_rewards(hidden: torch.Tensor, cu_seqlens: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """Reward of each packed sequence: ``head`` at its last token.

    hidden: [1, L, H] any float dtype (sequences back to back); cu_seqlens: [R + 1] int boundaries.
    Returns [R] float32."""
    from drdo.data.packing import last_token_index

    return head_rewards(hidden[0, last_token_index(cu_seqlens).to(hidden.device)], head)


def head_rewards(h_last: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """h_last: [R, H] any float dtype -> head(h_last) [R] float32 (the head runs in float32)."""
    bias = head.bias.float() if head.bias is not None else None
    return F.linear(h_last.float(), head.weight.float(), bias).squeeze(-1)


def head_hidden_size(lm: nn.Module) -> int:
    """Width of the final hidden state = in_features of the LM head (differs from
    config.hidden_size for e.g. OPT-350m, which projects down before the head)."""
    out = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[1])
    return int(lm.config.hidden_size)


def save_head(head: nn.Linear, directory: str, *, trained: bool | None = None) -> None:
    """Write reward_head.safetensors and reward_head.json (with ``trained`` when it is known)."""
    from safetensors.torch import save_file

    tensors = {"weight": head.weight.detach().float().cpu().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().float().cpu().contiguous()
    save_file(tensors, os.path.join(directory, HEAD_WEIGHTS_NAME), metadata={"format": _HEAD_FORMAT})
    meta = {"format": _HEAD_FORMAT, "version": _HEAD_VERSION, "hidden_size": int(head.in_features), "dtype": "float32"}
    if trained is not None:
        meta["trained"] = bool(trained)
    write_text(os.path.join(directory, HEAD_CONFIG_NAME), json.dumps(meta, indent=2))


def head_is_trained(directory: str | os.PathLike) -> bool | None:
    """Whether the reward head saved in ``directory`` was trained as a reward model (by ``drdo oracle
    train``, or ``drdo train --loss drdo`` with a head). Read from ``trained`` in reward_head.json;
    a file written before that key existed falls back to the ``stage`` in the directory's
    config.yaml. None when neither says (no head, a head of unknown origin, or not a directory)."""
    directory = os.path.expanduser(os.fspath(directory))
    meta_path = os.path.join(directory, HEAD_CONFIG_NAME)
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                trained = json.load(f).get("trained")
        except (OSError, ValueError, AttributeError):
            trained = None
        if isinstance(trained, bool):
            return trained
    config_path = os.path.join(directory, "config.yaml")
    if not os.path.isfile(os.path.join(directory, HEAD_WEIGHTS_NAME)) or not os.path.isfile(config_path):
        return None
    import yaml

    with open(config_path) as f:
        saved = yaml.safe_load(f)
    if not isinstance(saved, dict) or "stage" not in saved:
        return None
    return saved["stage"] == "oracle" or (saved["stage"] == "drdo" and saved.get("reward") == "head")


def load_head(directory: str, hidden_size: int) -> nn.Linear:
    """Read reward_head.safetensors (+ reward_head.json when present); raises ModelFormatError."""
    from safetensors.torch import load_file

    path = os.path.join(directory, HEAD_WEIGHTS_NAME)
    try:
        tensors = load_file(path)
    except Exception as err:  # safetensors raises its own error types for a bad header or truncated file
        raise ModelFormatError(f"reward head file {path} is corrupt or unreadable: {err}") from err
    weight = tensors.get("weight")
    if weight is None or tuple(weight.shape) != (1, hidden_size):
        got = None if weight is None else tuple(weight.shape)
        raise ModelFormatError(f"{path}: expected tensor 'weight' of shape (1, {hidden_size}), got {got}")
    bias = tensors.get("bias")
    if bias is not None and tuple(bias.shape) != (1,):
        raise ModelFormatError(f"{path}: expected tensor 'bias' of shape (1,), got {tuple(bias.shape)}")
    meta_path = os.path.join(directory, HEAD_CONFIG_NAME)
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ModelFormatError(f"{meta_path} is not valid JSON: {err}") from err
        if not isinstance(meta, dict):
            raise ModelFormatError(f"{meta_path} must hold a JSON object, got {type(meta).__name__} {shown(meta)}")
        if meta.get("hidden_size") != hidden_size or isinstance(meta.get("hidden_size"), bool):
            raise ModelFormatError(f"{meta_path} says hidden_size {shown(meta.get('hidden_size'))}, but the model's "
                                   f"is {hidden_size}")
    head = nn.Linear(hidden_size, 1, bias=bias is not None, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if bias is not None:
            head.bias.copy_(bias.float())
    return head
