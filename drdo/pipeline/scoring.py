"""Offline Oracle scoring: add ``oracle_chosen`` / ``oracle_rejected`` to every pair.

A reward model is either one of ours (a directory with ``reward_head.safetensors``,
trained by ``drdo oracle train``) or any Hugging Face
``AutoModelForSequenceClassification`` with exactly one output. A head that was never trained as a
reward model (e.g. the SFT output's) is refused unless ``allow_untrained_head``, and a model that
returns a NaN or infinite score is an error naming the row: nothing is written. With K reward
models each response gets a list of K scores (the e-DPO ensemble); with one, a float.
Each model tokenizes the data with its own tokenizer; rows are matched by their
source row number, and a row dropped by any model (``skip_invalid``) is left out.
"""
from __future__ import annotations

import json
import math
import os

import torch

from drdo.data import PreferenceCollator, load_preference_dataset
from drdo.hub import require_model_source
from drdo.jsonl import write_jsonl
from drdo.pipeline.outputs import check_output_file
from drdo.progress import batch_starts

__all__ = ["RewardModelError", "RewardModel", "load_reward_model", "score_dataset", "scored_summary", "pick_device"]


class RewardModelError(ValueError):
    """A reward model cannot be loaded or does not have exactly one output."""


def pick_device(device: str | None = "auto") -> torch.device:
    """"auto"/None -> cuda if available else cpu; anything else -> that device, when this machine has it
    (ConfigError otherwise: :func:`drdo.models.check_device`)."""
    from drdo.models import check_device

    return check_device(device)


class RewardModel:
    """A scalar reward model with its tokenizer. ``score(input_ids, attention_mask) -> [N] float32``
    (right-padded [N, T] int64 batches; the reward of the last non-padding token)."""

    def __init__(self, path: str, model: torch.nn.Module, tokenizer, kind: str, device: torch.device):
        self.path, self.model, self.tokenizer, self.kind, self.device = path, model, tokenizer, kind, device

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if self.kind == "policy":
            return self.model(input_ids, attention_mask).rewards.float().cpu()
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, 0].float().cpu()


def _is_policy_dir(path: str) -> bool:
    from drdo.models import HEAD_WEIGHTS_NAME

    return os.path.isfile(os.path.join(os.path.expanduser(path), HEAD_WEIGHTS_NAME))


def _missing_head(path: str) -> str | None:
    """Why a local directory without reward_head.safetensors is not a reward model, when it is a drdo
    run (reward_head.json) or a plain causal LM (config.json's architectures); None otherwise."""
    from drdo.models import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME

    local = os.path.expanduser(path)
    if os.path.isfile(os.path.join(local, HEAD_CONFIG_NAME)):
        return f"{path} has {HEAD_CONFIG_NAME} but no {HEAD_WEIGHTS_NAME}: the weights of its reward head are missing"
    try:
        with open(os.path.join(local, "config.json"), encoding="utf-8") as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    if architectures and all(str(a).endswith("ForCausalLM") for a in architectures):
        return (f"{path} is a causal LM ({architectures[0]}) without {HEAD_WEIGHTS_NAME}: it has no reward head; "
                "train an Oracle from it with `drdo oracle train`")
    return None


def load_reward_model(path: str, *, device="auto", trust_remote_code: bool = False,
                      allow_untrained_head: bool = False) -> RewardModel:
    """Our Oracle directory, or an HF sequence-classification model with one output (dir or hub id).
    RewardModelError for a causal LM without a reward head, and for a head never trained as a reward
    model unless ``allow_untrained_head``."""
    from drdo.tokenizer import get_tokenizer

    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    missing = None if _is_policy_dir(path) else _missing_head(path)
    if missing:
        raise RewardModelError(missing)
    tokenizer = get_tokenizer(path, trust_remote_code=trust_remote_code)
    if _is_policy_dir(path):
        from drdo.models import HEAD_CONFIG_NAME, PolicyWithRewardHead, head_is_trained

        if head_is_trained(path) is False and not allow_untrained_head:
            raise RewardModelError(f"{path} was not trained as an Oracle (its {HEAD_CONFIG_NAME} says so): its reward "
                                   "head is untrained and its scores are noise; train one with `drdo oracle train`, "
                                   "or pass --allow-untrained-head")
        model = PolicyWithRewardHead.from_pretrained(path, dtype=dtype, device=dev, require_head=True,
                                                     trust_remote_code=trust_remote_code)
        return RewardModel(path, model.eval(), tokenizer, "policy", dev)
    from transformers import AutoModelForSequenceClassification

    from drdo.models import dtype_kwarg

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code, use_safetensors=True, **{dtype_kwarg(): dtype}
        )
    except (OSError, ValueError) as e:
        raise RewardModelError(
            f"{path} is neither a drdo Oracle directory (no reward_head.safetensors) nor a loadable "
            f"sequence-classification reward model: {e}"
        ) from e
    if model.config.num_labels != 1:
        raise RewardModelError(f"{path} has {model.config.num_labels} outputs; a reward model must have exactly one")
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(path, model.to(dev).eval(), tokenizer, "seqcls", dev)


def _score_pairs(rm: RewardModel, dataset, batch_size: int, progress: bool,
                 desc: str) -> dict[int, tuple[float, float]]:
    """{source row: (chosen reward, rejected reward)} for every pair of ``dataset``; RewardModelError
    naming the row when the model returns a score that is not finite."""
    collate = PreferenceCollator(rm.tokenizer.pad_token_id)
    out: dict[int, tuple[float, float]] = {}
    for start in batch_starts(len(dataset), batch_size, progress=progress, desc=desc):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        rewards = rm.score(batch["input_ids"], batch["attention_mask"])
        n = batch["rows"].shape[0]
        for j, row in enumerate(batch["rows"].tolist()):
            out[row] = (float(rewards[j]), float(rewards[n + j]))
            if not all(map(math.isfinite, out[row])):
                raise RewardModelError(f"{rm.path} returned the scores {out[row]} (chosen, rejected) for "
                                       f"{dataset.source}: {dataset.where(row)}; a reward model must return finite "
                                       "scores (is the model diverged or its head corrupt?)")
    return out


def score_dataset(config) -> str:
    """``drdo oracle score``: every pair of ``config.data`` scored by the K reward models of
    ``config.reward_models``, written as JSONL to ``config.output`` (a
    :class:`drdo.config.ScoreConfig`, checked here before anything is loaded or written).

    Each output line is the source row plus ``oracle_chosen`` / ``oracle_rejected``:
    floats for K = 1, lists of K floats (in the order of ``reward_models``) for K > 1.
    Returns ``config.output``.
    """
    from drdo.config import check_options, require

    require(config, "reward_models", "data", "output")
    check_options(config)
    check_output_file(config.output)
    reward_models = config.reward_models
    for name in reward_models:
        require_model_source(name, "--reward-model")
    c = config
    per_model, raw_by_row = [], {}
    for k, path in enumerate(reward_models):
        rm = load_reward_model(path, device=c.device, trust_remote_code=c.trust_remote_code,
                               allow_untrained_head=c.allow_untrained_head)
        ds = load_preference_dataset(c.data, rm.tokenizer, max_length=c.max_length,
                                     max_prompt_length=c.max_prompt_length, split=c.split, skip_invalid=c.skip_invalid)
        if not raw_by_row:
            raw_by_row = {ds[i]["row"]: ds.raw[i] for i in range(len(ds))}
        per_model.append(_score_pairs(rm, ds, c.batch_size, c.progress, f"scoring with {os.path.basename(path)} "
                                                                          f"({k + 1}/{len(reward_models)})"))
        del rm
    rows = []
    for row in sorted(raw_by_row):
        if not all(row in scores for scores in per_model):
            continue
        chosen = [scores[row][0] for scores in per_model]
        rejected = [scores[row][1] for scores in per_model]
        out = dict(raw_by_row[row])
        out["oracle_chosen"] = chosen[0] if len(per_model) == 1 else chosen
        out["oracle_rejected"] = rejected[0] if len(per_model) == 1 else rejected
        rows.append(out)
    return write_jsonl(rows, c.output)


def scored_summary(path: str) -> dict:
    """What a scored JSONL file (the output of :func:`score_dataset`) holds: ``pairs``, ``models`` (K),
    ``mean_margin`` (mean of oracle_chosen - oracle_rejected, over the K models too) and
    ``chosen_preferred`` (fraction of pairs whose margin, averaged over the K models, is > 0).
    Read line by line."""
    pairs, models, margin_sum, preferred = 0, 0, 0.0, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            chosen, rejected = row["oracle_chosen"], row["oracle_rejected"]
            chosen, rejected = (chosen, rejected) if isinstance(chosen, list) else ([chosen], [rejected])
            margin = sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)
            pairs, models = pairs + 1, len(chosen)
            margin_sum += margin
            preferred += margin > 0
    return {"pairs": pairs, "models": models, "mean_margin": margin_sum / pairs if pairs else float("nan"),
            "chosen_preferred": preferred / pairs if pairs else float("nan")}
