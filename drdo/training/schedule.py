"""Learning-rate schedule: linear warm-up, then cosine decay.

The schedule is a pure function of the optimizer step, so resuming needs only
the step number (no scheduler state to save).
"""
from __future__ import annotations

import math

import torch

#: The paper's learning rates (a student, and the Oracle) for 7B models.
STUDENT_LR, ORACLE_LR = 5e-6, 1e-5
#: The built-in tiny model barely moves at the paper's rates (SFT loss 5.57 -> 5.56 in 30 steps of 8
#: pairs at 5e-6; 1.64 at 3e-3), so it (and every model trained from it) gets its own.
TINY_LR = {"sft": 5e-3, "oracle": 1e-3, "drdo": 1e-3, "dpo": 1e-3, "edpo": 1e-3}


def default_lr(stage: str, model: str) -> float:
    """The learning rate of a ``stage`` run on ``model`` when --lr is not given: the paper's (5e-6,
    1e-5 for the Oracle), or :data:`TINY_LR` for the tiny model and models trained from it."""
    from drdo.models import is_tiny_model

    if is_tiny_model(model):
        return TINY_LR.get(stage, TINY_LR["drdo"])
    return ORACLE_LR if stage == "oracle" else STUDENT_LR


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warm-up: base_lr * (step + 1) / (warmup_steps + 1) for step < warmup_steps
    (never exactly 0, so the first step moves). Then cosine from base_lr towards
    base_lr * min_lr_ratio, reached one step after the last (so the last step still moves).
    """
    if step < 0 or total_steps <= 0:
        raise ValueError(f"need step >= 0 and total_steps > 0, got step={step}, total_steps={total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
