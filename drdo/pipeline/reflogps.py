"""Reference log-probs for DPO / e-DPO, computed once, offline.

``ref_chosen_logps`` / ``ref_rejected_logps`` are the summed response log-probs
of the reference policy (usually the SFT model), computed with the same
tokenization and the same log-prob path (``kernel``) the trainer uses, so that at
step 0 of DPO the policy and reference log-probs coincide.
"""
from __future__ import annotations

import os

import torch

from drdo.data import PreferenceCollator, load_preference_dataset
from drdo.jsonl import write_jsonl
from drdo.policy_logprobs import policy_sequence_logprobs
from drdo.progress import batch_starts
from drdo.pipeline.scoring import pick_device

__all__ = ["compute_reference_logps"]


def compute_reference_logps(model, data, output: str, *, batch_size: int = 8, max_length: int = 1024,
                            max_prompt_length: int = 512, tokenizer=None, kernel: str = "auto",
                            split: str = "train", skip_invalid: bool = False, trust_remote_code: bool = False,
                            device="auto", seed: int = 0, progress: bool = True) -> str:
    """Write ``data`` plus ref_chosen_logps / ref_rejected_logps (floats) as JSONL to ``output``.

    model: a directory, hub id or "tiny", or a loaded PolicyWithRewardHead (then pass ``tokenizer``).
    tokenizer: None (the model's), a name/path, or a tokenizer object. bf16 autocast on CUDA.
    Returns ``output``.
    """
    from drdo.models import PolicyWithRewardHead
    from drdo.tokenizer import get_tokenizer

    dev = pick_device(device)
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        policy = PolicyWithRewardHead.from_pretrained(name, dtype=torch.float32, device=dev, seed=seed,
                                                      trust_remote_code=trust_remote_code)
        tokenizer = tokenizer if tokenizer is not None else name
    else:
        policy = model.to(dev)
        if tokenizer is None:
            raise ValueError("pass tokenizer= when model is a loaded module")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = get_tokenizer(os.fspath(tokenizer), trust_remote_code=trust_remote_code)
    ds = load_preference_dataset(data, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                 split=split, skip_invalid=skip_invalid)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    policy.eval()
    rows = []
    for start in batch_starts(len(ds), batch_size, progress=progress, desc="reference log-probs"):
        idx = list(range(start, min(start + batch_size, len(ds))))
        batch = {k: v.to(dev) for k, v in collate([ds[i] for i in idx]).items()}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logps = policy_sequence_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                             kernel=kernel)[0].float().cpu()
        n = len(idx)
        for j, i in enumerate(idx):
            row = dict(ds.raw[i])
            row["ref_chosen_logps"] = float(logps[j])
            row["ref_rejected_logps"] = float(logps[n + j])
            rows.append(row)
    return write_jsonl(rows, output)
