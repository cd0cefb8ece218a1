"""DRDO as a TRL trainer: :class:`DRDOConfig` and :class:`DRDOTrainer`, used as ``DPOConfig`` /
``DPOTrainer`` are::

    trainer = DRDOTrainer(model="sft_dir", args=DRDOConfig(output_dir="drdo_out"),
                          train_dataset=scored, processing_class=tokenizer)
    trainer.train()

What differs from DPO:

* the rows need ``oracle_chosen`` / ``oracle_rejected`` (a float, or K floats whose mean is
  distilled), written by ``drdo oracle score``; TRL's plain and conversational formats both work;
* no reference model is created or used (``trainer.ref_model is None``);
* ``reward="head"`` attaches a float32 reward head (``model.drdo_reward_head``, nn.Linear(H, 1))
  that trains with the model; :meth:`DRDOTrainer.save_model` writes it beside the HF weights as
  ``reward_head.safetensors``, so ``drdo.models.PolicyWithRewardHead.from_pretrained(output_dir)``
  loads the result (and ``AutoModelForCausalLM`` loads the LM alone);
* the loss runs inside the model's forward (as TRL's own fused head does): the backbone's last
  hidden state goes to :func:`drdo_kernels.fused_linear_logprobs` with ``lm_head.weight`` (the
  [tokens, vocab] logits are never built), then :func:`drdo_kernels.drdo_pair_loss`;
* ``padding_free=True`` packs each batch into one row (:mod:`drdo.data.packing`).

DRDO's metrics go through TRL's own logging (``logps/chosen``, ``rewards/accuracies``,
``drdo/distill``, ...), to every ``report_to`` backend.
"""
from __future__ import annotations

import types
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from drdo.data.packing import last_token_index, pack_sequences, segment_sum
from drdo.data.row_checks import ORACLE_FIELDS, check_oracle_rows
from drdo.losses import IGNORE_INDEX, REWARD_GRADS, REWARDS, UNLIKELIHOOD_SIGN, DRDOSpec, objective_loss
from drdo.models import last_token_indices, new_reward_head, save_head
from drdo.policy_logprobs import BACKENDS, check_backend

__all__ = ["DRDOConfig", "DRDOTrainer", "DRDODataCollator", "REWARD_HEAD_ATTR"]

#: Name of the reward-head submodule attached to the trained model.
REWARD_HEAD_ATTR = "drdo_reward_head"

#: The pair-loss kernel's backend for each log-prob backend ("chunked" and "auto": its own auto rule).
_PAIR_LOSS_BACKEND = {"triton": "triton", "torch": "torch"}
_METRIC_NAMES = {
    "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected",
    "reward_acc": "rewards/accuracies", "reward_margin": "rewards/margins",
}


def _spec_field(name: str, help_text: str, **metadata):
    """A DRDOConfig field of :class:`drdo.losses.DRDOSpec`'s ``name``: its default read from the
    spec, which also checks the value (in ``DRDOConfig.__post_init__``)."""
    return field(default=getattr(DRDOSpec, name), metadata={"help": help_text, **metadata})


@dataclass
class DRDOConfig(DPOConfig):
    """TRL's ``DPOConfig`` plus DRDO's settings: the fields of :class:`drdo.losses.DRDOSpec` (the
    paper's defaults; ``.drdo_spec`` holds the checked spec) and ``backend``. ``beta`` (DPOConfig's)
    is the scale of the implicit reward (``reward="implicit"``: rhat = beta * log pi(y|x)); unused
    with a head. The DPO-only fields (``loss_type``, reference-model settings, ...) are ignored."""

    alpha: float = _spec_field("alpha", "Weight of DRDO's focal preference term.")
    gamma: float = _spec_field("gamma", "Focal exponent (>= 0).")
    reward: str = _spec_field("reward", "Student reward: a linear 'head' on the last hidden state, or the "
                              "'implicit' beta * log pi.", choices=list(REWARDS))
    unlikelihood: str = _spec_field("unlikelihood", "'welleck' (lowers pi(y_l)) or 'paper' (the sign as printed).",
                                    choices=list(UNLIKELIHOOD_SIGN))
    reward_grad: str = _spec_field("reward_grad", "Where the distillation gradient goes: 'backbone' (head and "
                                   "shared layers) or 'head' (the hidden state fed to the reward head is detached).",
                                   choices=list(REWARD_GRADS))
    length_normalize: bool = _spec_field("length_normalize", "Use the mean response log-prob per token instead of "
                                         "the sum.")
    backend: str = field(default="auto", metadata={
        "help": "Fused LM-head backend: 'auto' (by device, dtype and size: drdo_kernels.logprobs.AUTO_RULES), "
                "'chunked' (cuBLAS chunks, a Triton fold on CUDA), 'triton' (tiled Triton kernels), 'torch' (chunks, "
                "PyTorch fold) or 'reference' (full logits).", "choices": list(BACKENDS)})
    kernel_backend: str | None = field(default=None, metadata={"help": "Deprecated name of backend."})

    def __post_init__(self):
        super().__post_init__()
        if self.kernel_backend is not None:
            warnings.warn("DRDOConfig(kernel_backend=...) is deprecated; use backend=...", FutureWarning, stacklevel=3)
            self.backend, self.kernel_backend = self.kernel_backend, None
        check_backend(self.backend)
        self.drdo_spec = DRDOSpec(alpha=self.alpha, gamma=self.gamma, reward=self.reward, beta=self.beta,
                                  unlikelihood=self.unlikelihood, reward_grad=self.reward_grad,
                                  length_normalize=self.length_normalize)


def _mean_score(value) -> float:
    """An Oracle score: a float, or a list of K floats (an ensemble), whose mean DRDO distils."""
    if isinstance(value, (list, tuple)):
        return float(sum(value)) / len(value)
    return float(value)


def _oracle_rewards(examples: list[dict]) -> torch.Tensor:
    """[2B] float32: Oracle scores of the chosen rows, then of the rejected rows (checked again here:
    the rows of an IterableDataset are seen first in a batch)."""
    check_oracle_rows(examples, "a DRDOTrainer batch")
    chosen = [_mean_score(ex[ORACLE_FIELDS[0]]) for ex in examples]
    rejected = [_mean_score(ex[ORACLE_FIELDS[1]]) for ex in examples]
    return torch.tensor(chosen + rejected, dtype=torch.float32)


@dataclass
class DRDODataCollator:
    """TRL's ``DataCollatorForPreference`` plus ``oracle_rewards`` [2B] float32; with
    ``padding_free`` the 2B sequences are packed into one row instead (input_ids, position_ids,
    aligned labels [1, L]; cu_seqlens [2B + 1]; see :mod:`drdo.data.packing`)."""

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    padding_free: bool = False

    def __call__(self, examples: list[dict]) -> dict:
        if self.padding_free:
            batch = self._packed(examples)
        else:
            batch = DataCollatorForPreference(
                pad_token_id=self.pad_token_id, max_length=self.max_length,
                truncation_mode=self.truncation_mode, pad_to_multiple_of=self.pad_to_multiple_of,
            )(examples)
        batch["oracle_rewards"] = _oracle_rewards(examples)
        return batch

    def _packed(self, examples: list[dict]) -> dict:
        ids, labels = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                seq = list(ex["prompt_ids"]) + list(ex[key])
                lab = [IGNORE_INDEX] * len(ex["prompt_ids"]) + list(ex[key])
                if self.max_length is not None:
                    cut = (slice(None, self.max_length) if self.truncation_mode == "keep_start"
                           else slice(-self.max_length, None))
                    seq, lab = seq[cut], lab[cut]
                ids.append(seq)
                labels.append(lab)
        return pack_sequences(ids, labels)


def _check_oracle_columns(dataset, name: str) -> None:
    """ValueError unless every dataset has both Oracle columns; InvalidExampleError naming the first row
    of a map-style dataset whose scores the loss cannot use (see :func:`check_oracle_rows`)."""
    if dataset is None:
        return
    datasets = dataset.items() if isinstance(dataset, dict) else [(name, dataset)]
    for label, ds in datasets:
        columns = getattr(ds, "column_names", None)
        if columns is None:  # an IterableDataset without known features: look at the first row
            columns = list(next(iter(ds)).keys())
        missing = [f for f in ORACLE_FIELDS if f not in columns]
        if missing:
            raise ValueError(
                f"DRDOTrainer: the {name} dataset has no {' / '.join(missing)} column(s): DRDO distils an Oracle's "
                "scores of each pair. Score the pairs first: `drdo oracle score --reward-model ORACLE_DIR "
                "--data prefs.jsonl --output scored.jsonl`, then load scored.jsonl."
            )
        if hasattr(ds, "__len__"):
            rows = ds.select_columns(list(ORACLE_FIELDS)) if hasattr(ds, "select_columns") else ds
            check_oracle_rows(rows, f"DRDOTrainer: the {label} dataset")


class DRDOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with the DRDO loss (see the module docstring). Same arguments, except
    that ``args`` must be a :class:`DRDOConfig` and ``ref_model`` must be None."""

    _tag_names = ["trl", "drdo"]
    _name = "DRDO"

    def __init__(self, model, ref_model=None, args: DRDOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        if ref_model is not None:
            raise ValueError("DRDOTrainer uses no reference model: pass ref_model=None")
        if args is None:
            args = DRDOConfig(output_dir="drdo-output")
        if not isinstance(args, DRDOConfig):
            raise TypeError(f"args must be a DRDOConfig, got {type(args).__name__}")
        _check_oracle_columns(train_dataset, "train")
        _check_oracle_columns(eval_dataset, "eval")
        # DPOTrainer builds no reference model when told that reference log-probs are precomputed; our
        # _precompute_ref_logps computes nothing. It also disables padding_free, which we honour ourselves.
        saved = args.precompute_ref_log_probs, args.padding_free
        args.precompute_ref_log_probs, args.padding_free = True, False
        try:
            super().__init__(model, None, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)
        finally:
            args.precompute_ref_log_probs, args.padding_free = saved
        self.precompute_ref_logps = False
        self.ref_model = None
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        if data_collator is None:
            self.data_collator = DRDODataCollator(
                self._tokenizer.pad_token_id, args.max_length, args.truncation_mode, args.pad_to_multiple_of,
                padding_free=args.padding_free,
            )
        self._attach_reward_head()
        _patch_forward(self._base_model(), self)

    # ---- model
    def _base_model(self) -> nn.Module:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _attach_reward_head(self) -> None:
        base = self._base_model()
        if self.args.reward != "head" or hasattr(base, REWARD_HEAD_ATTR):
            return
        hidden_size = base.get_output_embeddings().weight.shape[1]
        device = base.get_output_embeddings().weight.device
        base.add_module(REWARD_HEAD_ATTR, new_reward_head(hidden_size, seed=self.args.seed, device=device))

    @property
    def reward_head(self) -> nn.Linear | None:
        """The trained reward head (reward="head"), else None."""
        return getattr(self._base_model(), REWARD_HEAD_ATTR, None)

    # ---- TRL hooks
    def _precompute_ref_logps(self, dataset, name, batch_size):
        return dataset  # DRDO has no reference model

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [f for f in ORACLE_FIELDS
                                                                   if f not in self._signature_columns]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        out = model(drdo_batch=inputs)
        gather = self.accelerator.gather_for_metrics
        for key, value in out["metrics"].items():
            self._metrics[mode][_METRIC_NAMES.get(key, f"drdo/{key}")].append(
                gather(value.detach()).float().mean().item())
        for key, value in (("rewards/chosen", out["chosen_rewards"]), ("rewards/rejected", out["rejected_rewards"])):
            self._metrics[mode][key].append(gather(value.detach()).float().mean().item())
        if mode == "train":
            n_tokens = inputs["input_ids"].numel() if "cu_seqlens" in inputs else inputs["attention_mask"].sum()
            self._total_train_tokens += int(gather(torch.as_tensor(n_tokens, device=self.accelerator.device)).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (out["loss"], out) if return_outputs else out["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- saving
    def _save(self, output_dir: str | None = None, state_dict=None):
        """The HF model without the head's tensors, then reward_head.safetensors (main process)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        _check_finite(state_dict, output_dir)
        head_state = {k.rsplit(".", 1)[-1]: v for k, v in state_dict.items() if f"{REWARD_HEAD_ATTR}." in k}
        lm_state = {k: v for k, v in state_dict.items() if f"{REWARD_HEAD_ATTR}." not in k}
        super()._save(output_dir, state_dict=lm_state)
        if head_state:
            head = nn.Linear(head_state["weight"].shape[1], 1, bias="bias" in head_state)
            head.load_state_dict({k: v.float().cpu() for k, v in head_state.items()})
            save_head(head, output_dir)


def _check_finite(state_dict: dict, output_dir: str) -> None:
    """RuntimeError, before anything is written to ``output_dir``, when a tensor holds NaN or inf."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise RuntimeError(f"DRDOTrainer: not saving to {output_dir}: {len(bad)} of {len(state_dict)} tensors "
                               f"hold NaN or inf (first: {bad[0]}); training diverged")


# --------------------------------------------------------------------------- the loss, inside the forward


def _patch_forward(model: nn.Module, trainer: DRDOTrainer) -> None:
    """``model(drdo_batch=batch)`` returns the DRDO loss; any other call is the model's own forward.
    Running the loss inside the forward keeps FSDP/DeepSpeed wrappers' hooks in charge of the LM head."""
    original_forward = model.forward

    def forward(self, *args, drdo_batch=None, **kwargs):
        if drdo_batch is None:
            return original_forward(*args, **kwargs)
        return drdo_forward(self, drdo_batch, trainer.args)

    model.forward = types.MethodType(forward, model)


def drdo_forward(model: nn.Module, batch: dict, args: DRDOConfig) -> dict:
    """The DRDO loss of one collated batch (padded TRL layout or packed).

    Padded batches go through :func:`drdo_kernels.fused_objective_loss` (every LM-head gradient in the
    forward, the logits never built); packed ones through the fused per-token log-probs, summed per
    sequence, and :func:`drdo.losses.objective_loss` with the DRDO pair kernel. ``backend="reference"``
    (full logits) is one of the kernels' backends. Returns dict(loss: scalar float32, metrics:
    drdo_loss's metrics, chosen_rewards / rejected_rewards: [B] reward-head outputs, or the mean
    implicit rewards).
    """
    import drdo_kernels as dk

    spec, packed = args.drdo_spec, "cu_seqlens" in batch
    backbone = getattr(model, model.base_model_prefix)
    input_ids = batch["input_ids"]
    if packed:
        out = backbone(input_ids=input_ids, position_ids=batch["position_ids"], attention_mask=None, use_cache=False)
        labels = batch["labels"]
    else:
        out = backbone(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False)
        labels = dk.align_labels(input_ids, completion_mask=batch["completion_mask"])
    hidden = out.last_hidden_state  # [R, T, H] (packed: [1, L, H])
    lm_head = model.get_output_embeddings()
    rewards = _head_rewards(model, hidden, batch, packed, spec) if spec.reward == "head" else None
    oracle = batch["oracle_rewards"].to(hidden.device)
    if packed:
        z, n_tokens = _packed_logprobs(hidden, lm_head, labels, batch["cu_seqlens"], args.backend)
        loss, metrics = objective_loss(spec, z, n_tokens, rewards=rewards, oracle=oracle, reduction="mean",
                                       drdo_fn=_pair_kernel(args.backend))
    else:
        loss, metrics = dk.fused_objective_loss(spec, lm_head.weight, hidden, labels, lm_head.bias, rewards=rewards,
                                                oracle=oracle, ignore_index=IGNORE_INDEX, backend=args.backend,
                                                reduction="mean")
    metrics = {k: v for k, v in metrics.items() if k != "loss"}
    if rewards is None:  # implicit: beta * z, reported as its means
        chosen, rejected = spec.beta * metrics["logps_chosen"], spec.beta * metrics["logps_rejected"]
    else:
        n = rewards.shape[0] // 2
        chosen, rejected = rewards[:n], rewards[n:]
    return {"loss": loss, "metrics": metrics, "chosen_rewards": chosen, "rejected_rewards": rejected}


def _head_rewards(model, hidden, batch, packed: bool, spec: DRDOSpec) -> torch.Tensor:
    """[2B] reward-head outputs on each sequence's last hidden state (detached for reward_grad="head")."""
    if packed:
        h_last = hidden[0, last_token_index(batch["cu_seqlens"]).to(hidden.device)]
    else:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h_last = hidden[rows, last_token_indices(batch["attention_mask"]).to(hidden.device)]
    if spec.reward_grad == "head":
        h_last = h_last.detach()
    with torch.autocast(hidden.device.type, enabled=False):
        return getattr(model, REWARD_HEAD_ATTR)(h_last.float()).squeeze(-1)


def _packed_logprobs(hidden, lm_head, labels, cu_seqlens, backend: str):
    """Summed response log-probs and token counts per sequence of a packed row (hidden [1, L, H],
    labels [1, L]): the fused per-token log-probs (full logits for backend="reference") summed
    per sequence of ``cu_seqlens``."""
    import drdo_kernels as dk

    token_logps = dk.fused_linear_logprobs(lm_head.weight, hidden, labels, bias=lm_head.bias,
                                           ignore_index=IGNORE_INDEX, backend=backend)
    scored = (labels != IGNORE_INDEX).to(token_logps.dtype)
    z, n_tokens = segment_sum(token_logps, cu_seqlens), segment_sum(scored, cu_seqlens)
    if bool((n_tokens == 0).any()):
        raise ValueError("a response has no token left after truncation; raise max_length")
    return z, n_tokens


def _pair_kernel(backend: str):
    """The DRDO pair loss for ``backend``: the pair kernel of drdo_kernels (its own auto rule for
    "auto" and "chunked"), or drdo.losses.drdo_loss for full logits."""
    if backend == "reference":
        return None

    def pair_loss(*pair, spec, reduction):
        import drdo_kernels as dk

        return dk.drdo_pair_loss(*pair, spec=spec, reduction=reduction, backend=_PAIR_LOSS_BACKEND.get(backend, "auto"))

    return pair_loss
