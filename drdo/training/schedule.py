"""Learning-rate schedule: linear warm-up, then cosine decay.

The schedule is a pure function of the optimizer step, so resuming needs only
the step number (no scheduler state to save).
"""
from __future__ import annotations

import math

import torch


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
