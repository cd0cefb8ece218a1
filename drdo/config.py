"""Training configuration: one dataclass for every stage, YAML in and out.

Each field is declared once with :func:`option`: its default, help, choices and the stages that
use it. The command line is built from these declarations (``drdo.cli``), so a subcommand
accepts and shows only the flags of its own stage.

Defaults are the paper's settings: AdamW with cosine decay after a linear warm-up, weight
decay 0.05, global batch 64 pairs, max_prompt_length 512, max_length 1024, 1000 steps for the
students and one epoch for the Oracle. The loss hyperparameters (alpha, gamma, beta, ...) are
the fields of the loss specs of :mod:`drdo.losses` (``DRDOSpec``, ``OracleSpec``, ...), which
declare their defaults and check their values; :meth:`TrainConfig.loss_spec` builds the
stage's spec, and only it. The learning rate left at None is the trainer's stage default
(:func:`drdo.training.schedule.default_lr`).

Precedence when the CLI builds a config: explicit flags > ``--config`` YAML >
these defaults. Fields left at ``None`` are resolved per stage by
:func:`resolve`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from drdo.atomic import atomic_write
from drdo.errors import ConfigError, shown
from drdo.losses import (
    REWARD_GRADS,
    REWARDS,
    UNLIKELIHOOD_SIGN,
    DPOSpec,
    DRDOSpec,
    EDPOSpec,
    LossSpec,
    OracleSpec,
    SFTSpec,
)
from drdo.policy_logprobs import BACKENDS, DEPRECATED_BACKEND_NAME, check_backend

STAGES = ("sft", "oracle", "drdo", "dpo", "edpo")
PRECISIONS = ("auto", "bf16", "fp32")
#: The loss spec of each stage (:meth:`TrainConfig.loss_spec`).
STAGE_SPECS = {"sft": SFTSpec, "oracle": OracleSpec, "drdo": DRDOSpec, "dpo": DPOSpec, "edpo": EDPOSpec}

_DEFAULT_MAX_STEPS = {"drdo": 1000, "dpo": 1000, "edpo": 1000}  # sft / oracle: num_epochs


STUDENT_STAGES = ("drdo", "dpo", "edpo")


#: --backend shows its choices; check_backend refuses a bad one with the message every entry point gives.
_BACKEND_CHOICES = "{" + ",".join(BACKENDS) + "}"


def option(default: Any, help: str, *, stages: tuple[str, ...] = STAGES, choices: tuple | None = None,
           type: Callable | None = None, flag: str | None = None, deprecated_flag: str | None = None,
           **argparse_kwargs: Any) -> Any:
    """A config field with everything the command line needs, defined once.

    ``help`` and ``choices`` become the flag's help and choices; ``stages`` lists the
    training stages that use the field (a subcommand shows only the flags of its stages);
    ``type`` converts the flag's string (default: the default's type); ``flag`` names the flag
    when it is not ``--field-name``; ``deprecated_flag`` is an old name still accepted (on the
    command line and as a YAML key) with a warning; further keyword
    arguments go to ``argparse.add_argument`` (``nargs``, ``metavar``, ``const``).
    A list default is copied for every instance.
    """
    metadata = {"help": help, "stages": stages, "choices": choices, "type": type, "flag": flag,
                "deprecated_flag": deprecated_flag, "argparse": argparse_kwargs}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def derived_option(cls, name: str, **changes: Any) -> Any:
    """A field declared like ``cls``'s field ``name`` (its default, help, choices, type, flags), with
    ``changes`` (e.g. ``default=``, ``help=``) applied: another config composes it instead of
    declaring it again."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = dict(f.metadata)
    default = changes.pop("default", f.default)
    help_text = changes.pop("help", meta.pop("help"))
    argparse_kwargs = meta.pop("argparse", {})
    return option(default, help_text, **{**meta, **changes}, **argparse_kwargs)


def threads_option() -> Any:
    """The ``--threads`` field every command's config carries (applied by :mod:`drdo.process_settings`)."""
    return option(None, "CPU threads for PyTorch (torch.set_num_threads; default: PyTorch's choice)", type=int)


@dataclass
class TrainConfig:
    """Every knob of one training stage: default, help, choices and the stages that use it."""

    stage: str = option("drdo", "training stage", choices=STAGES)
    model: str = option("tiny", "policy to train: a local directory, a hub id, or 'tiny' (built-in tiny model)")
    tokenizer: str | None = option(None, "tokenizer to use (default: the one of --model)", type=str)
    data: str | None = option(None, "preference data: .jsonl/.json/.parquet file or hub dataset id", type=str)
    output_dir: str | None = option(
        None, "where the checkpoint, metrics.jsonl, config.yaml and training_curves.png go", type=str)
    split: str = option("train", "dataset split (hub datasets)")
    # schedule
    max_steps: int | None = option(
        None, "optimizer steps (default: 1000 for train; one epoch via --num-epochs for sft/oracle)", type=int)
    num_epochs: float = option(1.0, "epochs when --max-steps is not given")
    batch_size: int = option(64, "GLOBAL pairs per optimizer step (all ranks, all accumulation steps)")
    micro_batch_size: int = option(8, "pairs per rank per forward pass")
    lr: float | None = option(None, "peak learning rate (default: 5e-6, 1e-5 for oracle train; for the tiny "
                              "model and models trained from it: 5e-3 for sft, 1e-3 otherwise)", type=float)
    weight_decay: float = option(0.05, "AdamW weight decay (matrices only)")
    warmup_steps: int | None = option(
        None, "linear warm-up steps (default: --warmup-ratio of the steps)", type=int)
    warmup_ratio: float = option(0.1, "warm-up fraction of the steps when --warmup-steps is not given")
    min_lr_ratio: float = option(0.0, "cosine floor as a fraction of --lr")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: no clipping)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    # data
    max_length: int = option(1024, "max tokens of prompt + response")
    max_prompt_length: int = option(512, "max prompt tokens (left-truncated)")
    shuffle: bool = option(True, "shuffle the data each epoch")
    skip_invalid: bool = option(False, "drop invalid rows instead of failing")
    padding_free: bool = option(False, "pack each micro-batch's sequences into one row without padding "
                                "(flash-attn varlen on CUDA, a block-diagonal causal mask elsewhere)")
    # losses: the fields of the stage's loss spec (drdo.losses), defaults read from there
    alpha: float = option(DRDOSpec.alpha, "DRDO weight of the focal preference term", stages=("drdo",))
    gamma: float = option(DRDOSpec.gamma, "DRDO focal exponent", stages=("drdo",))
    beta: float | None = option(None, f"DPO/e-DPO beta (default {DPOSpec.beta}); DRDO --reward implicit scale "
                                f"(default {DRDOSpec.beta})", stages=STUDENT_STAGES, type=float)
    reward: str = option(DRDOSpec.reward, "DRDO student reward: a linear 'head' or the 'implicit' beta*log pi",
                         stages=("drdo",), choices=REWARDS)
    unlikelihood: str = option(DRDOSpec.unlikelihood, "DRDO unlikelihood term: 'welleck' (lowers pi(y_l)) or 'paper' "
                               "(the sign as printed)", stages=("drdo",), choices=tuple(UNLIKELIHOOD_SIGN))
    reward_grad: str = option(
        DRDOSpec.reward_grad, "DRDO --reward head: 'backbone' (the paper: the distillation gradient reaches the "
        "shared layers) or 'head' (the head reads a detached hidden state: distillation trains the head only)",
        stages=("drdo",), choices=REWARD_GRADS)
    length_normalize: bool = option(
        DRDOSpec.length_normalize, "DRDO: z = token-MEAN response log-prob instead of the sum (a departure from "
        "the paper)", stages=("drdo",))
    diagnostics_every: int = option(
        20, "DRDO: every N steps log focal-gate, length and gradient-share diagnostics to metrics.jsonl "
            "(two extra backward passes on those steps; 0: off)", stages=("drdo",))
    oracle_alpha: float = option(OracleSpec.alpha, "Oracle LM-regulariser weight alpha_O", stages=("oracle",))
    pessimistic: bool = option(EDPOSpec.pessimistic, "e-DPO: max over ensemble members (else mean); with gradient "
                               "accumulation the max is taken per micro-batch", stages=("edpo",))
    backend: str = option("auto", "loss path: 'auto' picks the fastest fused drdo_kernels backend for the device; "
                          "'reference' computes the full logits", metavar=_BACKEND_CHOICES,
                          deprecated_flag=DEPRECATED_BACKEND_NAME)
    # system
    seed: int = option(0, "random seed (model head init, data order)")
    precision: str = option("auto", "'auto': bf16 mixed precision on GPU, fp32 on CPU; 'bf16' needs CUDA",
                            choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, "recompute activations in backward")
    compile: bool = option(False, "torch.compile the training step (policy forward and loss; each fused loss is one "
                           "opaque operator); turns the DRDO diagnostics off")
    attn_implementation: str | None = option(
        None, "attention implementation passed to transformers: eager, sdpa, flash_attention_2 (CUDA, flash-attn "
              "installed), ... (default: flash_attention_2 on CUDA when flash-attn imports, else sdpa)", type=str)
    trust_remote_code: bool = option(False, "allow model code from the hub (off by default)")
    save_every: int = option(0, "write a resumable checkpoint every N steps (0: only the final model)")
    save_limit: int = option(2, "keep only the newest N step checkpoints (0: keep all)")
    resume: bool | str = option(
        False, "continue from the latest checkpoint in --output-dir, or from the given checkpoint directory",
        nargs="?", const=True, metavar="CHECKPOINT_DIR")
    progress: bool = option(True, "show progress bars (--no-progress also hides those of transformers and datasets)")
    plot: bool = option(True, "write training_curves.png at the end")
    overwrite: bool = option(False, "start a new run in a non-empty --output-dir that holds other files or a run "
                             "of another config (files of other runs are kept unless overwritten)")
    allow_config_change: bool = option(False, "--resume a checkpoint written with other settings (by default "
                                       "the differing fields are named and the run refused)")
    threads: int | None = threads_option()
    report_to: str = option("none", "also send each step's metrics to tensorboard (<output-dir>/tensorboard) or "
                            "wandb, beside metrics.jsonl", choices=("none", "tensorboard", "wandb"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def loss_spec(self) -> LossSpec:
        """The stage's loss spec (:mod:`drdo.losses`), built from this config's loss fields; the
        spec checks them (ValueError, with the spec's message)."""
        options = {"oracle": dict(alpha=self.oracle_alpha),
                   "drdo": dict(alpha=self.alpha, gamma=self.gamma, reward=self.reward, beta=self.beta,
                                unlikelihood=self.unlikelihood, reward_grad=self.reward_grad,
                                length_normalize=self.length_normalize),
                   "dpo": dict(beta=self.beta),
                   "edpo": dict(beta=self.beta, pessimistic=self.pessimistic)}.get(self.stage, {})
        return STAGE_SPECS[self.stage].build(**options)


@dataclass
class InferenceConfig:
    """Settings shared by the offline passes over a preference data set (``oracle score``, ``reflogps``)."""

    data: str | None = option(None, "preference data: .jsonl/.json/.parquet file or hub dataset id", type=str)
    output: str | None = option(None, "output JSONL (the rows plus the computed columns)", type=str)
    batch_size: int = option(8, "pairs per forward pass")
    max_length: int = option(1024, "max tokens of prompt + response")
    max_prompt_length: int = option(512, "max prompt tokens (left-truncated)")
    split: str = option("train", "dataset split (hub datasets)")
    skip_invalid: bool = option(False, "drop invalid rows instead of failing")
    trust_remote_code: bool = option(False, "allow model code from the hub")
    device: str = option("auto", "'auto', 'cpu', 'cuda', 'cuda:1', ...")
    progress: bool = option(True, "show progress bars (--no-progress also hides those of transformers and datasets)")
    threads: int | None = threads_option()


@dataclass
class ScoreConfig(InferenceConfig):
    """``drdo oracle score``: every pair scored by one or more reward models."""

    reward_models: list | None = option(
        None, "reward model(s): our Oracle directory or any HF sequence-classification model with one output; "
              "K models give K scores per response (e-DPO)", type=str, flag="--reward-model", nargs="+",
        action="extend")
    allow_untrained_head: bool = option(
        False, "score with a reward head that was never trained as a reward model (its scores are noise)")


@dataclass
class RefLogpsConfig(InferenceConfig):
    """``drdo reflogps``: the reference policy's summed response log-probs, for DPO and e-DPO."""

    model: str = option("tiny", "reference policy (usually the SFT model): dir, hub id or 'tiny'")
    tokenizer: str | None = option(None, "tokenizer (default: the model's)", type=str)
    backend: str = option("auto", "log-prob path (use the one you train with)", metavar=_BACKEND_CHOICES,
                          deprecated_flag=DEPRECATED_BACKEND_NAME)
    seed: int = option(0, "seed of the tiny model")


@dataclass
class EvalConfig:
    """``drdo eval``: sample from policies, score with a judge, report rewards and win rates."""

    policies: list | None = option(
        None, "a policy to evaluate (repeat for several); PATH alone uses its basename as name", type=str,
        flag="--policy", action="append", metavar="NAME=PATH")
    prompts: str | None = option(None, "data file whose 'prompt' fields are used", type=str)
    judge: str | None = option(
        None, "reward-model directory, or 'path/to/file.py:function' or 'module:function' taking "
              "(prompts, responses) -> scores", type=str)
    num_prompts: int | None = option(None, "use the first N prompts (default: all)", type=int)
    max_new_tokens: int = option(64, "generation length")
    temperature: float = option(1.0, "sampling temperature (0: greedy)")
    top_p: float = option(1.0, "nucleus sampling")
    seed: int = option(0, "sampling seed")
    batch_size: int = option(16, "prompts per generation batch")
    max_prompt_length: int = option(512, "max prompt tokens (left-truncated)")
    split: str = option("train", "dataset split (hub datasets)")
    output: str | None = option(
        None, "write the report (JSON) here and the generations to <output>.generations.jsonl "
              "(default: runs/eval-<date>-<time>[-N]/report.json, a new directory per run)", type=str)
    trust_remote_code: bool = option(False, "allow model code from the hub")
    allow_untrained_head: bool = option(
        False, "judge with a reward head that was never trained as a reward model (its scores are noise)")
    device: str = option("auto", "'auto', 'cpu', 'cuda', ...")
    progress: bool = option(True, "show progress bars (--no-progress also hides those of transformers and datasets)")
    threads: int | None = threads_option()


def fields_for(cls, stages: tuple[str, ...] | None = None) -> list[dataclasses.Field]:
    """The fields of a config dataclass used by any of ``stages`` (all fields when None)."""
    return [f for f in dataclasses.fields(cls)
            if stages is None or set(f.metadata.get("stages", STAGES)) & set(stages)]


def add_config_flags(parser: argparse.ArgumentParser, cls, stages: tuple[str, ...] | None = None) -> None:
    """One flag per field of the config dataclass ``cls`` used by ``stages``, from the field's
    :func:`drdo.config.option` metadata (help, choices, type); booleans get ``--x/--no-x``."""
    defaults = cls()
    for f in fields_for(cls, stages):
        if f.name == "stage":
            continue
        meta, default = f.metadata, getattr(defaults, f.name)
        kwargs = {"default": default, "help": meta.get("help", f.name), **meta.get("argparse", {})}
        if "action" in kwargs or "const" in kwargs:
            pass
        elif isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta.get("type") or type(default)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, **kwargs)
        if meta.get("deprecated_flag"):
            old = "--" + meta["deprecated_flag"]
            kwargs.update(action=DeprecatedFlag, default=argparse.SUPPRESS, help=f"deprecated alias of {flag}",
                          new_flag=flag)
            parser.add_argument(old, dest=f.name, **kwargs)


class DeprecatedFlag(argparse.Action):
    """An old flag name still accepted for one release: stores like the new flag, and warns."""

    def __init__(self, option_strings, dest, new_flag: str = "", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag = new_flag

    def warning(self, used: str | None = None) -> str:
        """The warning line; ``used``: how the old name was given (default: the flag itself)."""
        return (f"drdo: warning: {used or self.option_strings[0]} is a deprecated alias of {self.new_flag} and "
                "will be removed in the next release")

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.warning(), file=sys.stderr)
        setattr(namespace, self.dest, values)


def unused_settings(config: TrainConfig) -> list[str]:
    """Fields set away from their default that ``config.stage`` does not use (e.g. --alpha for dpo)."""
    return [f.name for f in dataclasses.fields(config)
            if config.stage not in f.metadata.get("stages", STAGES) and getattr(config, f.name) != f.default]


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))


#: The largest YAML file read (``--config``, ``--variants``): such a file holds a few dozen settings.
MAX_YAML_BYTES = 1 << 20


def read_yaml(path: str, what: str = "config file") -> Any:
    """The parsed content of a YAML file (safe_load) of at most :data:`MAX_YAML_BYTES`; a missing,
    non-regular, too large, non-UTF-8 or invalid file raises ConfigError (DataSourceError for bad
    UTF-8) naming ``what`` (e.g. "--variants file"). Aliases are not expanded here: a value built
    from them is one shared object until someone walks it (see :func:`drdo.errors.shown`)."""
    import yaml

    from drdo.data.sources import decode_utf8, file_kind

    kind = file_kind(path)
    if kind == "missing":
        raise ConfigError(f"{what} not found: {path}")
    if kind != "a file":
        raise ConfigError(f"{what} {path} is {kind}, not a file")
    with open(path, "rb") as f:
        data = f.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_YAML_BYTES // 1024} KiB; it should hold a few settings")
    try:
        return yaml.safe_load(decode_utf8(data, path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {shown(str(e))}") from None


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping of config keys (a missing or invalid file raises ConfigError)."""
    values = read_yaml(path)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def save_yaml(config: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML (keys in field order), atomically."""
    import yaml

    with atomic_write(path) as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill stage-dependent defaults (beta, max_steps) and validate. Returns a new config.

    The loss fields are checked by the stage's spec (:meth:`TrainConfig.loss_spec`). ``lr`` may
    stay None (the trainer's stage default). ``max_steps`` stays None for epoch-based stages;
    :func:`total_steps` turns it into a count once the dataset size is known.
    """
    c = dataclasses.replace(config)
    _check_choice("stage", c.stage, STAGES)
    unused = unused_settings(c)
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        raise ConfigError(f"{flags} not used by the {c.stage} stage; remove it")
    _check_types(c)
    try:
        check_backend(c.backend)
        spec = c.loss_spec()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c.beta is None and hasattr(spec, "beta"):
        c.beta = spec.beta
    if c.diagnostics_every < 0:
        raise ConfigError(f"diagnostics_every must be >= 0, got {c.diagnostics_every}")
    _check_choice("precision", c.precision, PRECISIONS)
    _check_machine(c)
    if c.max_steps is None:
        c.max_steps = _DEFAULT_MAX_STEPS.get(c.stage)
    if c.data is None:
        raise ConfigError("no training data: pass --data (a .jsonl/.json/.parquet file or a hub dataset id)")
    if c.output_dir is None:
        raise ConfigError("no output directory: pass --output-dir")
    check_path_text(c.output_dir, "--output-dir")
    _check_positive(c, "batch_size", "micro_batch_size", "max_length", "max_prompt_length")
    _check_numbers(c)
    if c.max_steps is not None and c.max_steps <= 0:
        raise ConfigError(f"max_steps must be > 0, got {c.max_steps}")
    if c.max_steps is None and not (c.num_epochs > 0 and math.isfinite(c.num_epochs)):
        raise ConfigError(f"num_epochs must be a positive number, got {c.num_epochs}")
    if not 0.0 <= c.warmup_ratio < 1.0:
        raise ConfigError(f"warmup_ratio must lie in [0, 1), got {c.warmup_ratio}")
    if c.warmup_steps is not None and c.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {c.warmup_steps}")
    if c.max_prompt_length >= c.max_length:
        raise ConfigError(f"max_prompt_length ({c.max_prompt_length}) must be < max_length ({c.max_length})")
    if c.save_every < 0 or c.save_limit < 0:
        raise ConfigError(f"save_every and save_limit must be >= 0, got {c.save_every} and {c.save_limit}")
    check_seed(c.seed)
    check_threads(c.threads)
    return c


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """batch / (micro x world); raises ConfigError unless it divides exactly."""
    per_pass = micro_batch_size * world_size
    if batch_size % per_pass != 0:
        raise ConfigError(
            f"batch_size ({batch_size}) must be a multiple of micro_batch_size x world_size "
            f"({micro_batch_size} x {world_size} = {per_pass})"
        )
    return batch_size // per_pass


def total_steps(config: TrainConfig, num_pairs: int) -> int:
    """Optimizer steps of the run: max_steps, or floor(num_epochs * pairs / batch) for epoch-based stages."""
    if config.max_steps is not None:
        return config.max_steps
    steps = int(config.num_epochs * num_pairs // config.batch_size)
    if steps < 1:
        raise ConfigError(
            f"the dataset has {num_pairs} usable pairs, fewer than one global batch of {config.batch_size} "
            f"for {config.num_epochs} epoch(s); lower --batch-size or pass --max-steps"
        )
    return steps


def warmup_steps_for(config: TrainConfig, steps: int) -> int:
    """warmup_steps if given (ConfigError when it exceeds the run's ``steps``: the learning rate would
    never reach --lr), else round(warmup_ratio * steps)."""
    if config.warmup_steps is None:
        return int(round(config.warmup_ratio * steps))
    if config.warmup_steps > steps:
        raise ConfigError(f"warmup_steps ({config.warmup_steps}) exceeds the run's {steps} optimizer steps: the "
                          "learning rate would never reach --lr; lower --warmup-steps or raise --max-steps")
    return config.warmup_steps


#: Largest accepted seed: every random generator drdo seeds (torch, numpy, the data order) takes it.
MAX_SEED = 2**32 - 1
#: Largest accepted learning rate. AdamW moves every weight by about lr per step whatever the
#: gradient's scale, so lr > 1 can only destroy a pretrained model (and 1e38 overflows to inf).
MAX_LR = 1.0


def _check_types(config) -> None:
    """Each field of a config dataclass holds its declared type: bool fields real booleans (YAML
    ``progress: "no"`` is an error, not True), int fields ints, float fields numbers, str fields
    strings, list fields lists of strings."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        if value is None and "None" in kind:
            continue
        if f.name == "resume":
            ok = isinstance(value, (bool, str))
        elif kind.startswith("bool"):
            ok = isinstance(value, bool)
        elif kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind.startswith("str"):
            ok = isinstance(value, str)
        elif kind.startswith("list"):
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = True
        if not ok:
            want = kind.split(" ")[0].replace("bool", "true or false").replace("list", "a list of strings")
            raise ConfigError(f"{f.name} must be {want}, got {shown(value)} ({type(value).__name__})")


def _check_numbers(c: TrainConfig) -> None:
    """Ranges of the numeric settings; NaN and inf are refused everywhere."""
    for name in ("weight_decay", "warmup_ratio", "min_lr_ratio", "max_grad_norm", "adam_beta1", "adam_beta2",
                 "adam_eps", "num_epochs") + (("lr",) if c.lr is not None else ()):
        if not math.isfinite(getattr(c, name)):
            raise ConfigError(f"{name} must be a finite number, got {getattr(c, name)}")
    if c.lr is not None and not 0 < c.lr <= MAX_LR:
        raise ConfigError(f"lr must lie in (0, {MAX_LR:g}], got {c.lr:g} "
                          "(AdamW moves each weight by about lr per step)")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ConfigError(f"{name} must lie in [0, 1), got {getattr(c, name)}")
    for name in ("adam_eps",):
        if getattr(c, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(c, name)}")
    for name in ("weight_decay", "max_grad_norm"):
        if getattr(c, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(c, name)}")
    if not 0.0 <= c.min_lr_ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio must lie in [0, 1], got {c.min_lr_ratio}")


def _check_machine(c: TrainConfig) -> None:
    """--precision bf16 and --attn-implementation on this machine (:mod:`drdo.models.loading`)."""
    import torch

    from drdo.models import check_attn_implementation

    if c.precision == "bf16" and not torch.cuda.is_available():
        raise ConfigError("--precision bf16 needs a CUDA device, and CUDA is not available on this machine; use "
                          "--precision fp32 (or auto) on a CPU")
    check_attn_implementation(c.attn_implementation)


def check_path_text(path: str, flag: str) -> None:
    """ConfigError when ``path`` cannot be written as UTF-8 text (bytes that are not UTF-8 in a file
    name): the run records its paths in UTF-8 files and messages, so it is refused before anything is made."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{flag} {os.fsencode(path)!r} holds bytes that are not UTF-8; use a UTF-8 name") from None


def check_threads(threads: int | None) -> None:
    """None or a positive integer; raises ConfigError otherwise."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {shown(threads)}")


def check_seed(seed: int) -> None:
    """An integer in [0, :data:`MAX_SEED`]; raises ConfigError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, 2**32 - 1], got {shown(seed)}")


def check_options(config) -> None:
    """Types and ranges of the options of ``oracle score``, ``reflogps`` or ``eval`` (a
    :class:`ScoreConfig`, :class:`RefLogpsConfig` or :class:`EvalConfig`), and an ``output`` that is
    the command's own input; ConfigError naming the option. Runs before anything is loaded or written."""
    _check_types(config)
    names = {f.name for f in dataclasses.fields(config)}
    if "backend" in names:
        try:
            check_backend(config.backend)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check_positive(config, *sorted(names & {"batch_size", "max_length", "max_prompt_length", "max_new_tokens"}))
    if getattr(config, "num_prompts", None) is not None:
        _check_positive(config, "num_prompts")
    if "seed" in names:
        check_seed(config.seed)
    if "temperature" in names and not (math.isfinite(config.temperature) and config.temperature >= 0):
        raise ConfigError(f"temperature must be a finite number >= 0 (0: greedy), got {config.temperature}")
    if "top_p" in names and not 0 < config.top_p <= 1:
        raise ConfigError(f"top_p must lie in (0, 1], got {config.top_p}")
    check_threads(config.threads)
    if "device" in names:
        from drdo.models import check_device

        check_device(config.device)
    if config.output:
        check_path_text(config.output, "--output")
    source = getattr(config, "data", None) or getattr(config, "prompts", None)
    if config.output and source and os.path.exists(config.output) and os.path.exists(source) \
            and os.path.samefile(config.output, source):
        raise ConfigError(f"--output {config.output} is the input file {source}: writing it would replace the data "
                          "being read; choose another --output")


def require(config, *names: str) -> None:
    """ConfigError naming the flags of the fields of ``config`` that are empty (None, "" or [])."""
    missing = []
    for name in names:
        if not getattr(config, name):
            f = next(f for f in dataclasses.fields(config) if f.name == name)
            missing.append(f.metadata.get("flag") or "--" + name.replace("_", "-"))
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {shown(value)}")


def _check_positive(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {shown(value)}")
