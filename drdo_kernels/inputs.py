"""Inputs from other trainers: Hugging Face / TRL label conventions and FSDP2 (DTensor) LM heads.

The fused kernels take labels ALIGNED with the hidden states (position t predicts
``labels[t]``) and a plain [V, H] LM-head weight. Two things differ in the wild:

* **Labels.** Hugging Face models and TRL pass UNSHIFTED labels (``labels[t]`` is the token
  at t, -100 for prompt and padding; the model shifts them), or a ``completion_mask``
  (1 on response tokens) beside ``input_ids``. :func:`align_labels` turns either into the
  aligned labels the kernels read; it is the one place where the shift happens.
* **FSDP2.** Outside the forward of the module that owns it, a ``fully_shard``-ed
  ``lm_head.weight`` is a sharded ``DTensor``. :func:`gather_lm_head` all-gathers it
  differentiably (``redistribute`` to Replicate, then ``to_local`` with an averaged
  ``Partial`` gradient), so the backward reduce-scatters the weight gradient, averaged over
  ranks like every other FSDP2 gradient, back into the sharded ``DTensor`` parameter.
"""
from __future__ import annotations

import torch

__all__ = ["align_labels", "gather_lm_head", "is_dtensor"]

IGNORE_INDEX = -100


def align_labels(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Aligned labels for the fused kernels, from Hugging Face / TRL conventions.

    Args:
        input_ids: [N, T] int64.
        labels: [N, T] int, UNSHIFTED (HF: ``labels[t]`` is the token at t; ``ignore_index`` =
            not scored). Give exactly one of ``labels`` and ``completion_mask``.
        completion_mask: [N, T] 0/1 or bool (TRL: 1 on response tokens, 0 on prompt and padding);
            the scored tokens are ``input_ids`` where it is 1.
        position_ids: [N, T] optional, for packed rows (several sequences per row, positions
            restarting at 0): a token is never predicted from the previous sequence's last token.
    Returns:
        [N, T] int64 aligned labels: ``out[:, t]`` = the scored token at t + 1, else ``ignore_index``;
        the last column is ``ignore_index``.
    """
    if (labels is None) == (completion_mask is None):
        raise ValueError("align_labels needs exactly one of labels (unshifted, HF) and completion_mask (TRL)")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, T], got shape {tuple(input_ids.shape)}")
    given = labels if labels is not None else completion_mask
    name = "labels" if labels is not None else "completion_mask"
    if tuple(given.shape) != tuple(input_ids.shape):
        raise ValueError(f"{name} {tuple(given.shape)} must match input_ids {tuple(input_ids.shape)}")
    if labels is None:
        unshifted = input_ids.long().masked_fill(~completion_mask.bool(), ignore_index)
    else:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        unshifted = labels.long()
    out = torch.full_like(unshifted, ignore_index)
    out[:, :-1] = unshifted[:, 1:]
    if position_ids is not None:
        if tuple(position_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        starts_next = torch.zeros_like(out, dtype=torch.bool)
        starts_next[:, :-1] = position_ids[:, 1:] == 0
        out = out.masked_fill(starts_next, ignore_index)
    return out


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (False when torch.distributed is unavailable)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _gather(t: torch.Tensor, name: str) -> torch.Tensor:
    from torch.distributed.tensor import Partial, Replicate

    mesh_dims = t.device_mesh.ndim
    try:
        full = t.redistribute(placements=[Replicate()] * mesh_dims)
        return full.to_local(grad_placements=[Partial("avg")] * mesh_dims)
    except Exception as err:  # an uninitialised process group, an unsupported placement, ...
        raise RuntimeError(
            f"cannot all-gather the FSDP2-sharded {name} ({t.placements}) for the fused kernel: {err}. "
            "Call the loss inside the forward of the module that owns the LM head (so FSDP2 unshards it), "
            "or pass a plain tensor (e.g. weight.full_tensor())."
        ) from err


def gather_lm_head(
    weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head as plain tensors: DTensor (FSDP2-sharded) weight [V, H] / bias [V] are all-gathered.

    The gather is differentiable: the gradient of the returned plain tensors is averaged over the
    ranks and reduce-scattered back into the DTensors' ``.grad`` (FSDP2's convention), so an
    optimizer over the sharded parameters steps as if the loss had run inside the FSDP2 forward.
    Plain tensors pass through unchanged (no copy). Raises RuntimeError with what to do when the
    gather is impossible.
    """
    if is_dtensor(weight):
        weight = _gather(weight, "LM-head weight")
    if bias is not None and is_dtensor(bias):
        bias = _gather(bias, "LM-head bias")
    return weight, bias
