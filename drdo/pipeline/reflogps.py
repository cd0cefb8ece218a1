"""Reference log-probs for DPO / e-DPO, computed once, offline.

``ref_chosen_logps`` / ``ref_rejected_logps`` are the summed response log-probs
of the reference policy (usually the SFT model), computed with the same
tokenization and the same log-prob path (``backend``) the trainer uses, so that at
step 0 of DPO the policy and reference log-probs coincide.

Every row also records what its log-probs were computed with
(:data:`drdo.policy_logprobs.REF_SETTINGS_FIELD`, see :func:`drdo.policy_logprobs.reference_settings`): the
model (its path and a digest of its weights), the tokenizer, the chat template, ``max_length`` and
``max_prompt_length``. ``drdo train --loss dpo|edpo`` refuses log-probs whose record differs from
its own settings: they would not be the log-probs of the pairs it trains on.
"""
from __future__ import annotations

import os

import torch

from drdo.data import PreferenceCollator, load_preference_dataset
from drdo.jsonl import write_jsonl
from drdo.pipeline.outputs import check_output_file
from drdo.pipeline.scoring import pick_device
from drdo.policy_logprobs import REF_SETTINGS_FIELD, policy_sequence_logprobs, reference_settings
from drdo.progress import batch_starts

__all__ = ["compute_reference_logps"]


def compute_reference_logps(config, *, policy=None, tokenizer=None) -> str:
    """``drdo reflogps``: ``config.data`` plus ref_chosen_logps / ref_rejected_logps (floats) and
    their record (:data:`drdo.policy_logprobs.REF_SETTINGS_FIELD`), written as JSONL to ``config.output``
    (a :class:`drdo.config.RefLogpsConfig`, checked here before anything is loaded or written).

    policy: a loaded PolicyWithRewardHead to use instead of ``config.model`` (then pass
    ``tokenizer``, a name/path or a tokenizer object). bf16 autocast on CUDA. Returns the output path.
    """
    from drdo.config import check_options, require
    from drdo.hub import require_model_source
    from drdo.models import PolicyWithRewardHead
    from drdo.tokenizer import get_tokenizer

    c = config
    require(c, "data", "output")
    check_options(c)
    check_output_file(c.output)
    model = c.model if policy is None else policy
    if policy is None:
        require_model_source(c.model, "--model")
        require_model_source(c.tokenizer, "--tokenizer")
        tokenizer = c.tokenizer
    dev = pick_device(c.device)
    if policy is None:
        policy = PolicyWithRewardHead.from_pretrained(c.model, dtype=torch.float32, device=dev, seed=c.seed,
                                                      trust_remote_code=c.trust_remote_code)
        tokenizer = tokenizer if tokenizer is not None else c.model
    else:
        policy = policy.to(dev)
        if tokenizer is None:
            raise ValueError("pass tokenizer= with a loaded policy")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = get_tokenizer(os.fspath(tokenizer), trust_remote_code=c.trust_remote_code)
    ds = load_preference_dataset(c.data, tokenizer, max_length=c.max_length, max_prompt_length=c.max_prompt_length,
                                 split=c.split, skip_invalid=c.skip_invalid)
    settings = reference_settings(model, tokenizer, max_length=c.max_length, max_prompt_length=c.max_prompt_length,
                                  seed=c.seed)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    policy.eval()
    rows = []
    for start in batch_starts(len(ds), c.batch_size, progress=c.progress, desc="reference log-probs"):
        idx = list(range(start, min(start + c.batch_size, len(ds))))
        batch = {k: v.to(dev) for k, v in collate([ds[i] for i in idx]).items()}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logps = policy_sequence_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                             backend=c.backend)[0].float().cpu()
        n = len(idx)
        for j, i in enumerate(idx):
            row = dict(ds.raw[i])
            row["ref_chosen_logps"] = float(logps[j])
            row["ref_rejected_logps"] = float(logps[n + j])
            row[REF_SETTINGS_FIELD] = settings
            rows.append(row)
    return write_jsonl(rows, c.output)
