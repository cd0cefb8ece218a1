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

import dataclasses
import re

from drdo.config import ConfigError, read_yaml
from drdo.errors import shown
from drdo.losses import DRDOSpec

__all__ = ["VARIANT_KEYS", "RESERVED_NAMES", "load_variants", "validate_variants", "describe"]

#: Keys a variant may set (besides ``name``): the fields of :class:`drdo.losses.DRDOSpec`, which checks them.
VARIANT_KEYS = tuple(f.name for f in dataclasses.fields(DRDOSpec))
#: Names taken by the demo's own methods.
RESERVED_NAMES = ("sft", "drdo", "dpo", "edpo")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
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
        checked = DRDOSpec.build(**{k: v for k, v in spec.items() if k != "name"})
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if "beta" in spec and checked.reward != "implicit":
        raise ConfigError(f"{where}, key 'beta': beta scales the implicit reward only; add 'reward: implicit'")
    return {"name": name, **{k: getattr(checked, k) for k in spec if k != "name"}}


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
