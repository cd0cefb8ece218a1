"""Named DRDO variants for ``drdo demo --variants FILE.yaml``: readings of Eq. 6 trained side by side.

The file is a YAML list; each entry has a ``name`` and any of the keys in :data:`VARIANT_KEYS`,
which override the demo's DRDO settings for that variant only::

    - name: head-only            # the distillation gradient stops at the reward head's input
      reward_grad: head
    - name: implicit-b0.1        # rhat = beta * z instead of a reward head
      reward: implicit
      beta: 0.1
    - name: token-mean           # z = token-mean log-prob (a departure from the paper)
      length_normalize: true

Every variant is trained from the same SFT start on the same Oracle scores as the demo's own
DRDO, DPO and e-DPO, with DRDO's learning-rate grid, and reported under its name.
"""
from __future__ import annotations

import math
import re

from drdo.config import REWARD_GRADS, REWARDS, UNLIKELIHOODS, ConfigError, read_yaml
from drdo.errors import shown

__all__ = ["VARIANT_KEYS", "RESERVED_NAMES", "load_variants", "validate_variants", "describe"]

#: Keys a variant may set (besides ``name``): the DRDO options of :class:`drdo.config.TrainConfig`.
VARIANT_KEYS = ("reward", "beta", "alpha", "gamma", "unlikelihood", "reward_grad", "length_normalize")
#: Names taken by the demo's own methods.
RESERVED_NAMES = ("sft", "drdo", "dpo", "edpo")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_CHOICES = {"reward": REWARDS, "unlikelihood": UNLIKELIHOODS, "reward_grad": REWARD_GRADS}


def _number(value, key: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {shown(value)}")
    if positive and value <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    return float(value)


def _check_value(key: str, value):
    """The validated value of one key; ValueError with the reason otherwise."""
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise ValueError(f"must be one of {', '.join(_CHOICES[key])}, got {shown(value)}")
        return value
    if key == "length_normalize":
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {shown(value)}")
        return value
    return _number(value, key, positive=key == "beta")


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
        try:
            spec[k] = _check_value(k, value)
        except ValueError as e:
            raise ConfigError(f"{where}, key {key!r}: {e}") from None
    reward = spec.get("reward", "head")
    if "beta" in spec and reward != "implicit":
        raise ConfigError(f"{where}, key 'beta': beta scales the implicit reward only; add 'reward: implicit'")
    if spec.get("reward_grad") == "head" and reward != "head":
        raise ConfigError(f"{where}, key 'reward_grad': 'head' needs the reward head (reward: head)")
    return spec


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
    parts = [f"{k}={spec[k]:g}" if isinstance(spec[k], float) else f"{k}={spec[k]}" for k in VARIANT_KEYS
             if k in spec]
    return ", ".join(parts) if parts else "the demo's DRDO settings"
