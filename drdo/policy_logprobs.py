"""Summed response log-probs of a policy: the one implementation training and the offline passes share.

z(y) = sum over the response tokens t of log pi(y_t | x, y_<t) (``docs/math.md``). Two paths give it:

* ``kernel="reference"``: the full [R, T, V] logits and :func:`drdo.losses.sequence_logprobs`;
* any :mod:`drdo_kernels` backend (``"auto"``, ``"chunked"``, ``"triton"``, ``"torch"``): the last hidden state and
  the LM-head weight go through :func:`drdo_kernels.fused_linear_logprobs`, which never builds the
  logits and drops the unlabelled tokens itself.
"""
from __future__ import annotations

import torch
from torch import nn

from drdo.losses import IGNORE_INDEX, sequence_logprobs

__all__ = ["KERNELS", "head_params", "hidden_sequence_logprobs", "policy_sequence_logprobs"]

#: Log-prob paths: the fused drdo_kernels backends, or "reference" (full logits).
KERNELS = ("auto", "chunked", "triton", "torch", "reference")


def head_params(head: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LM-head (weight [V, H], bias [V] | None) in ``dtype``, the dtype of the hidden states.

    Under FSDP2 mixed precision both are bf16 already; under single-GPU autocast the fp32
    weight is cast (differentiably) to the bf16 hidden states' dtype.
    """
    weight, bias = head.weight, getattr(head, "bias", None)
    if weight.dtype != dtype:
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return weight, bias


def hidden_sequence_logprobs(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, *,
                             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens of each row, from the last hidden state.

    hidden: [R, T, H] any float dtype; head: the LM head (``.weight`` [V, H], optional ``.bias``);
    labels: [R, T] int64, aligned (position t predicts labels[t]), IGNORE_INDEX where not counted.
    Returns (logps [R] float32 (float64 for float64 inputs), differentiable w.r.t. hidden and the head; n_tokens [R] int64).
    A row with no counted token sums to 0, as :func:`drdo.losses.sequence_logprobs`.
    """
    import drdo_kernels

    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"expected hidden [R, T, H] and labels [R, T], got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    weight, bias = head_params(head, hidden.dtype)
    token_logps = drdo_kernels.fused_linear_logprobs(hidden, weight, labels, bias=bias,  # [R, T], 0 where ignored
                                                     ignore_index=IGNORE_INDEX, backend=backend)
    return token_logps.sum(-1), (labels != IGNORE_INDEX).sum(-1)


def policy_sequence_logprobs(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             labels: torch.Tensor, *, kernel: str = "auto"):
    """Run ``policy`` (a :class:`drdo.models.PolicyWithRewardHead`) once and sum its response log-probs.

    input_ids / attention_mask / labels: [R, T] int64 (labels aligned). kernel: one of :data:`KERNELS`.
    Returns (logps [R] float32 or wider, n_tokens [R] int64, the policy's output: hidden states, rewards,
    and logits for ``kernel="reference"``).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    reference = kernel == "reference"
    out = policy(input_ids, attention_mask, return_logits=reference)
    if reference:
        logps, n_tokens = sequence_logprobs(out.logits, labels, ignore_index=IGNORE_INDEX)
        return logps, n_tokens, out
    logps, n_tokens = hidden_sequence_logprobs(out.hidden_states, policy.lm_head, labels, backend=kernel)
    return logps, n_tokens, out
