"""Training configuration: one dataclass for every stage, YAML in and out.

Defaults are the paper's settings (shared/docs/drdo-math.md): AdamW, lr 5e-6
(Oracle 1e-5) with cosine decay after a linear warm-up, weight decay 0.05,
global batch 64 pairs, max_prompt_length 512, max_length 1024, 1000 steps for
the students and one epoch for the Oracle; alpha 0.1, gamma 2, alpha_O 0.01,
DPO beta 0.1.

Precedence when the CLI builds a config: explicit flags > ``--config`` YAML >
these defaults. Fields left at ``None`` are resolved per stage by
:func:`resolve`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

STAGES = ("sft", "oracle", "drdo", "dpo", "edpo")
KERNELS = ("auto", "triton", "torch", "reference")
REWARDS = ("head", "implicit")
UNLIKELIHOODS = ("welleck", "paper")
PRECISIONS = ("auto", "bf16", "fp32")

#: Stage defaults for fields left at None.
_DEFAULT_LR = {"oracle": 1e-5}
_STUDENT_LR = 5e-6
_DEFAULT_MAX_STEPS = {"drdo": 1000, "dpo": 1000, "edpo": 1000}  # sft / oracle: num_epochs
_DEFAULT_BETA = {"dpo": 0.1, "edpo": 0.1, "drdo": 1.0}  # drdo: only used by reward="implicit"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent."""


@dataclass
class TrainConfig:
    """Every knob of one training stage. See the module docstring for defaults."""

    stage: str = "drdo"
    model: str = "tiny"
    tokenizer: str | None = None
    data: str | None = None
    output_dir: str | None = None
    split: str = "train"
    # schedule
    max_steps: int | None = None
    num_epochs: float = 1.0
    batch_size: int = 64
    micro_batch_size: int = 8
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # data
    max_length: int = 1024
    max_prompt_length: int = 512
    shuffle: bool = True
    skip_invalid: bool = False
    # losses
    alpha: float = 0.1
    gamma: float = 2.0
    beta: float | None = None
    reward: str = "head"
    unlikelihood: str = "welleck"
    oracle_alpha: float = 0.01
    pessimistic: bool = True
    kernel: str = "auto"
    # system
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    save_every: int = 0
    save_limit: int = 2  # keep the newest N step checkpoints (0: keep all)
    resume: bool | str = False  # True: latest checkpoint in output_dir; a str: that checkpoint directory
    progress: bool = True
    plot: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))


def from_dict(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a TrainConfig from a mapping; keys may use '-' or '_'. Unknown keys raise ConfigError."""
    clean = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_NAMES:
            raise ConfigError(f"unknown key {key!r} in {source}; known keys: {', '.join(FIELD_NAMES)}")
        clean[name] = value
    return TrainConfig(**clean)


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping of config keys (safe_load; a missing file raises ConfigError)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def save_yaml(config: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML (keys in field order)."""
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill stage-dependent defaults (lr, beta, warm-up) and validate. Returns a new config.

    ``max_steps`` stays None for epoch-based stages; :func:`total_steps` turns
    it into a count once the dataset size is known.
    """
    c = dataclasses.replace(config)
    _check_choice("stage", c.stage, STAGES)
    _check_choice("kernel", c.kernel, KERNELS)
    _check_choice("reward", c.reward, REWARDS)
    _check_choice("unlikelihood", c.unlikelihood, UNLIKELIHOODS)
    _check_choice("precision", c.precision, PRECISIONS)
    if c.lr is None:
        c.lr = _DEFAULT_LR.get(c.stage, _STUDENT_LR)
    if c.beta is None:
        c.beta = _DEFAULT_BETA.get(c.stage, 0.1)
    if c.max_steps is None:
        c.max_steps = _DEFAULT_MAX_STEPS.get(c.stage)
    if c.data is None:
        raise ConfigError("no training data: pass --data (a .jsonl/.json/.parquet file or a hub dataset id)")
    if c.output_dir is None:
        raise ConfigError("no output directory: pass --output-dir")
    _check_positive(c, "batch_size", "micro_batch_size", "max_length", "max_prompt_length")
    if c.max_steps is not None and c.max_steps <= 0:
        raise ConfigError(f"max_steps must be > 0, got {c.max_steps}")
    if c.max_steps is None and not (c.num_epochs > 0 and math.isfinite(c.num_epochs)):
        raise ConfigError(f"num_epochs must be a positive number, got {c.num_epochs}")
    if c.lr <= 0:
        raise ConfigError(f"lr must be > 0, got {c.lr}")
    if not 0.0 <= c.warmup_ratio < 1.0:
        raise ConfigError(f"warmup_ratio must lie in [0, 1), got {c.warmup_ratio}")
    if c.warmup_steps is not None and c.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {c.warmup_steps}")
    if c.max_prompt_length >= c.max_length:
        raise ConfigError(f"max_prompt_length ({c.max_prompt_length}) must be < max_length ({c.max_length})")
    if c.save_every < 0 or c.save_limit < 0:
        raise ConfigError(f"save_every and save_limit must be >= 0, got {c.save_every} and {c.save_limit}")
    if c.gamma < 0:
        raise ConfigError(f"gamma must be >= 0, got {c.gamma}")
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
    """warmup_steps if given, else round(warmup_ratio * steps)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return int(round(config.warmup_ratio * steps))


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
