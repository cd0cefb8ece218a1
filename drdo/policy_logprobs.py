"""Summed response log-probs of a policy: the one implementation training and the offline passes share.

z(y) = sum over the response tokens t of log pi(y_t | x, y_<t) (``docs/math.md``). Two paths give it:

* ``backend="reference"``: the full [R, T, V] logits and :func:`drdo.losses.sequence_logprobs`;
* any other :mod:`drdo_kernels` backend (``"auto"``, ``"chunked"``, ``"triton"``, ``"torch"``): the last
  hidden state and the LM-head weight go through :func:`drdo_kernels.fused_linear_logprobs`, which never
  builds the logits and drops the unlabelled tokens itself.

Reference log-probs computed offline (``drdo reflogps``) carry a record of the model and the
tokenization they come from (:func:`reference_settings`); training refuses them when its own
settings differ (:func:`check_reference_settings`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from torch import nn

from drdo.errors import ConfigError
from drdo.losses import IGNORE_INDEX, sequence_logprobs
from drdo_kernels.logprobs import BACKENDS, check_backend

__all__ = ["BACKENDS", "DEPRECATED_BACKEND_NAME", "check_backend", "REF_SETTINGS_FIELD", "head_params",
           "hidden_sequence_logprobs", "policy_sequence_logprobs", "reference_settings", "check_reference_settings"]

logger = logging.getLogger("drdo.policy_logprobs")

#: The old name of the ``backend`` setting (``--kernel``, ``kernel:`` in YAML), accepted for one release.
DEPRECATED_BACKEND_NAME = "kernel"


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
    Returns (logps [R] float32 (float64 for float64 inputs), differentiable w.r.t. hidden and the head;
    n_tokens [R] int64).
    A row with no counted token sums to 0, as :func:`drdo.losses.sequence_logprobs`.
    """
    import drdo_kernels

    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(f"expected hidden [R, T, H] and labels [R, T], got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    weight, bias = head_params(head, hidden.dtype)
    token_logps = drdo_kernels.fused_linear_logprobs(weight, hidden, labels, bias=bias,  # [R, T], 0 where ignored
                                                     ignore_index=IGNORE_INDEX, backend=backend)
    return token_logps.sum(-1), (labels != IGNORE_INDEX).sum(-1)


def policy_sequence_logprobs(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             labels: torch.Tensor, *, backend: str = "auto"):
    """Run ``policy`` (a :class:`drdo.models.PolicyWithRewardHead`) once and sum its response log-probs.

    input_ids / attention_mask / labels: [R, T] int64 (labels aligned). backend: one of :data:`BACKENDS`.
    Returns (logps [R] float32 or wider, n_tokens [R] int64, the policy's output: hidden states, rewards,
    and logits for ``backend="reference"``).
    """
    reference = check_backend(backend) == "reference"
    out = policy(input_ids, attention_mask, return_logits=reference)
    if reference:
        logps, n_tokens = sequence_logprobs(out.logits, labels, ignore_index=IGNORE_INDEX)
        return logps, n_tokens, out
    logps, n_tokens = hidden_sequence_logprobs(out.hidden_states, policy.lm_head, labels, backend=backend)
    return logps, n_tokens, out


# ----------------------------------------------------------------------------- reference log-probs


#: The row field in which ``drdo reflogps`` records what the reference log-probs were computed with.
REF_SETTINGS_FIELD = "ref_logps_settings"


def reference_settings(model, tokenizer, *, max_length: int, max_prompt_length: int, seed: int = 0) -> dict:
    """The record of what reference log-probs are computed with. ``model``: a directory, hub id or
    "tiny" (a loaded module is recorded as None: it cannot be named)."""
    from drdo.models import weights_digest
    from drdo.tokenizer import tokenizer_digest

    named = isinstance(model, (str, os.PathLike))
    name = os.fspath(model) if named else None
    local = named and os.path.isdir(os.path.expanduser(name))
    template = getattr(tokenizer, "chat_template", None)
    return {
        "model": os.path.abspath(os.path.expanduser(name)) if local else name,
        "model_weights": weights_digest(name, seed) if named else None,
        "tokenizer": "sha256:" + tokenizer_digest(tokenizer),
        "chat_template": None if template is None else "sha256:" + hashlib.sha256(str(template).encode()).hexdigest(),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
    }


def _recorded(dataset) -> dict | None:
    """The one settings record the rows carry; None when none does; ConfigError when rows differ."""
    first: dict[str, int] = {}
    for i in range(len(dataset)):
        key = json.dumps(dataset.raw[i].get(REF_SETTINGS_FIELD), sort_keys=True)
        first.setdefault(key, dataset[i]["row"])
    if len(first) > 1:
        (_, a), (_, b) = list(first.items())[:2]
        raise ConfigError(f"{dataset.source}: the reference log-probs of {dataset.where(a)} and {dataset.where(b)} "
                          "were computed with different settings; recompute them all with one `drdo reflogps`")
    return json.loads(next(iter(first)))


def check_reference_settings(dataset, settings: dict) -> None:
    """ConfigError, naming both values of every difference, unless the reference log-probs of
    ``dataset`` were computed with ``settings`` (:func:`reference_settings` of this run). The model
    is compared by its weights when both records have a digest, else by name. Log-probs without a
    record (written before drdo kept one) are used with a warning."""
    recorded = _recorded(dataset)
    if recorded is None:
        logger.warning("%s: the reference log-probs carry no record of the model and tokenization they were "
                       "computed with; they are used as they are", dataset.source)
        return
    keys = ["tokenizer", "chat_template", "max_length", "max_prompt_length"]
    keys += ["model_weights"] if recorded.get("model_weights") and settings["model_weights"] else ["model"]
    diffs = [f"{key} {recorded.get(key)} (reference log-probs) vs {settings[key]} (this run)"
             for key in keys if recorded.get(key) != settings[key] and (key != "model" or recorded.get(key))]
    if diffs:
        raise ConfigError(f"{dataset.source}: the reference log-probs were computed with other settings: "
                          f"{'; '.join(diffs)}; recompute them with `drdo reflogps` and this run's --model, "
                          "--tokenizer, --max-length and --max-prompt-length")
