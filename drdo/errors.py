"""The errors every layer raises: a bad setting, and a model directory that cannot be loaded.

The ``drdo`` command reports it as one ``drdo: error:`` line (exit status 2). Values read from
files go into such messages through :func:`shown`, which never expands more than a bounded part
of them (a YAML value built from aliases can stand for billions of elements).
"""
from __future__ import annotations

import reprlib

#: The longest rendering of a value in a message.
SHOWN_CHARS = 200

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 3, SHOWN_CHARS, SHOWN_CHARS, SHOWN_CHARS


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent."""


def shown(value) -> str:
    """``repr(value)`` for a message: nested containers cut after a few levels and entries, at most
    :data:`SHOWN_CHARS` characters, whatever the size of ``value``."""
    text = _repr.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


class ModelFormatError(ValueError):
    """A model directory or reward-head file is missing, corrupt or inconsistent."""
