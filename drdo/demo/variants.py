"""Named DRDO variants for ``drdo demo --variants FILE.yaml``: readings of Eq. 6 trained side by side.

The file is a YAML list; each entry has a ``name`` and any of the keys in :data:`VARIANT_KEYS`,
which override the demo's DRDO settings for that variant only: the loss (:data:`SPEC_KEYS`, the
fields of :class:`drdo.losses.DRDOSpec`) and the student's training (:data:`TRAINING_KEYS`)::

    - name: head-only            # the distillation gradient stops at the reward head's input
      reward_grad: head
    - name: implicit-b0.1        # rhat = beta * z instead of a reward head
      reward: implicit
      beta: 0.1
    - name: token-mean           # z = token-mean log-prob (a departure from the paper)
      length_normalize: true
    - name: no-clip              # the student's gradient is not clipped (0 = off; the default is 1)
      max_grad_norm: 0
    - name: long-small-lr        # 300 steps, its own grid (given at --lr-ref-steps, as --drdo-lrs)
      steps: 300
      lrs: [1.0e-4, 3.0e-4]

Every variant is trained from the same SFT start on the same Oracle scores as the demo's own
DRDO, DPO and e-DPO, with DRDO's learning-rate grid and step count unless it sets ``lrs`` /
``steps``, and reported under its name.
"""
from __future__ import annotations

import dataclasses
import math
import re

from drdo.config import ConfigError, read_yaml
from drdo.errors import shown
from drdo.losses import DRDOSpec

__all__ = ["SPEC_KEYS", "TRAINING_KEYS", "VARIANT_KEYS", "RESERVED_NAMES", "load_variants", "validate_variants",
           "describe", "spec_overrides"]

#: Loss keys a variant may set: the fields of :class:`drdo.losses.DRDOSpec`, which checks them.
SPEC_KEYS = tuple(f.name for f in dataclasses.fields(DRDOSpec))
#: Training keys a variant may set: the gradient-clipping norm of its student (0: no clipping), its
#: learning-rate grid (given at ``--lr-ref-steps`` steps, as ``--drdo-lrs``) and its optimizer steps.
TRAINING_KEYS = ("max_grad_norm", "lrs", "steps")
#: Every key a variant may set (besides ``name``).
VARIANT_KEYS = SPEC_KEYS + TRAINING_KEYS
#: Names taken by the demo's own methods.
RESERVED_NAMES = ("sft", "drdo", "dpo", "edpo")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_training(key: str, value, where: str):
    """A training key's value, checked (``where`` names the variant); ConfigError names the key and value."""
    if key == "max_grad_norm":
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where}, key 'max_grad_norm': must be a finite number >= 0 (0: no clipping), "
                              f"got {shown(value)}")
        return float(value)
    if key == "steps":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}, key 'steps': must be an integer >= 1, got {shown(value)}")
        return value
    if (not isinstance(value, list) or not value
            or any(not _is_number(lr) or not math.isfinite(lr) or lr <= 0 for lr in value)):
        raise ConfigError(f"{where}, key 'lrs': must be a non-empty list of positive numbers, got {shown(value)}")
    return [float(lr) for lr in value]


def _check_entry(entry, index: int, seen: set, source: str) -> dict:
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: entry {index + 1} must be a mapping with a 'name', got {shown(entry)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{source}: entry {index + 1} needs a 'name' of letters, digits and _.+- "
                          f"(at most 64, not starting with a symbol), got {shown(name)}")
    where = f"{source}: variant {name!r}"
    if name in RESERVED_NAMES or name in seen:
        taken = "is taken by the demo's own methods" if name in RESERVED_NAMES else "appears twice"
        raise ConfigError(f"{where}: the name {taken}; choose another")
    seen.add(name)
    spec = {"name": name}
    for key, value in entry.items():
        if key == "name":
            continue
        k = str(key).replace("-", "_")
        if k not in VARIANT_KEYS:
            raise ConfigError(f"{where}: unknown key {shown(key)}; known keys: name, {', '.join(VARIANT_KEYS)}")
        spec[k] = value
    try:
        checked = DRDOSpec.build(**spec_overrides(spec))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if "beta" in spec and checked.reward != "implicit":
        raise ConfigError(f"{where}, key 'beta': beta scales the implicit reward only; add 'reward: implicit'")
    return {"name": name, **{k: getattr(checked, k) if k in SPEC_KEYS else _check_training(k, spec[k], where)
                             for k in spec if k != "name"}}


def spec_overrides(variant: dict) -> dict:
    """The loss keys of a variant (those of :data:`SPEC_KEYS`)."""
    return {k: v for k, v in variant.items() if k in SPEC_KEYS}


def validate_variants(entries, source: str = "variants") -> list[dict]:
    """[{"name": str, <key>: value, ...}] from the parsed YAML; ConfigError names the variant and key."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"{source} must hold a YAML list of variants (- name: ...), got {type(entries).__name__}")
    seen: set = set()
    return [_check_entry(entry, i, seen, source) for i, entry in enumerate(entries)]


def load_variants(path: str | None) -> list[dict]:
    """Read and validate a variants YAML file (None: no variants)."""
    if not path:
        return []
    return validate_variants(read_yaml(path, "--variants file"), source=f"--variants {path}")


def describe(spec: dict) -> str:
    """'reward_grad=head, alpha=1' (the overrides of a variant), or 'the demo's DRDO settings'."""
    parts = [f"{k}={_shown_value(spec[k])}" for k in VARIANT_KEYS if k in spec]
    return ", ".join(parts) if parts else "the demo's DRDO settings"


def _shown_value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_shown_value(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
