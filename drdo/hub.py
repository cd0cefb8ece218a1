"""Where a model or data name points: a local path, the Hugging Face cache, or the hub.

Loading an unknown name through ``transformers``/``datasets`` without network access retries
for half a minute and then fails with a library message ("Repo id must be in the form ...").
:func:`require_model_source` and :func:`require_hub` check first and fail at once with one line.
"""
from __future__ import annotations

import functools
import os
import re
import socket
from urllib.parse import urlparse

from drdo.errors import ConfigError
from drdo.run_record import model_problem

__all__ = ["looks_like_path", "hub_reachable", "require_hub", "require_model_source"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_path(name: str) -> bool:
    """True for a name that cannot be a hub id ("name" or "org/name"): it starts with ".", "/" or "~",
    has more than one "/", ends with "/", or holds the platform's path separator."""
    return name.startswith(("./", "../", "/", "~", ".")) or name.count("/") > 1 or name.endswith("/") or \
        os.sep != "/" and os.sep in name


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the hub endpoint answers a TCP connection, else why not (offline mode, DNS, refused)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or e})"
    return None


def require_hub(name: str, flag: str) -> None:
    """ConfigError at once when ``name`` would have to come from the hub and the hub cannot be reached."""
    why = hub_reachable()
    if why is not None:
        raise ConfigError(f"{flag} {name}: not a local path and not in the Hugging Face cache, and the hub is "
                          f"unavailable: {why}")


def _cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str) or \
            isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str)
    except Exception:  # invalid id or no huggingface_hub: not cached
        return False


def require_model_source(name: str | None, flag: str = "--model") -> None:
    """ConfigError unless ``name`` is "tiny", an existing directory that may hold a model (not empty,
    not an unfinished drdo run: :func:`drdo.run_record.model_problem`), a cached hub id, or a hub id
    while the hub is reachable (a path that does not exist is never sent to the hub)."""
    if name is None or name == "tiny":
        return
    name = str(name)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        problem = model_problem(path)
        if problem is not None:
            raise ConfigError(f"{flag} {name} {problem}")
        return
    if os.path.exists(path):
        raise ConfigError(f"{flag} {name} is a file; expected a model directory, a hub id or 'tiny'")
    if looks_like_path(name) or not _HUB_ID.match(name):
        raise ConfigError(f"{flag} {name}: no such directory (and not a hub id of the form 'name' or 'org/name')")
    if not _cached(name):
        require_hub(name, flag)
