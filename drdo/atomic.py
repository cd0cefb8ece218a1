"""Files replaced whole or not at all, through private temporaries.

Every temporary is created beside its target by :func:`tempfile.mkstemp`: a random name opened
with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so a file or link planted there is never opened. It is
flushed to disk and renamed over the target with :func:`os.replace`, which replaces a link at the
target instead of writing through it. A failure (a full disk at the last flush included) removes the
temporaries and leaves the targets as they were.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_write", "atomic_writes", "write_text", "save_figure", "fresh_directory"]


def _umask() -> int:
    umask = os.umask(0o22)
    os.umask(umask)
    return umask


_UMASK = _umask()  # temporaries get the modes open() and os.makedirs() would give (mkstemp's are private)


def _temporary(path: str, mode: str, newline: str | None) -> tuple[str, IO]:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": newline}
        return tmp, os.fdopen(fd, mode, **text)
    except BaseException:
        os.close(fd)
        os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_writes(paths: list[str], mode: str = "w", newline: str | None = None) -> Iterator[list[IO]]:
    """One open temporary per path (parent folders created). When the block ends without an error,
    every temporary is complete and on disk before the first is renamed over its path (in the
    order given); on an error all are removed and no path is touched."""
    temps: list[str] = []
    files: list[IO] = []
    try:
        for path in paths:
            tmp, f = _temporary(os.fspath(path), mode, newline)
            temps.append(tmp)
            files.append(f)
        yield files
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    except BaseException:
        for f in files:
            _close_quietly(f)
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise


def _close_quietly(f: IO) -> None:
    """Close ``f`` after an error: its buffered bytes are dropped, as its temporary is removed. (A plain
    ``close`` flushes them first, and a disk that is full fails again.)"""
    with contextlib.suppress(Exception):
        f.close()  # closes the descriptor even when the flush fails


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """:func:`atomic_writes` of one path: yields its open temporary."""
    with atomic_writes([path], mode, newline) as (f,):
        yield f


def write_text(path: str, text: str) -> str:
    """Replace ``path`` by ``text`` (UTF-8) atomically; returns path."""
    with atomic_write(path) as f:
        f.write(text)
    return os.fspath(path)


def save_figure(fig, path: str, **savefig_kwargs) -> str:
    """``fig.savefig`` into ``path`` atomically, in the format its suffix names; returns path."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=fmt, **savefig_kwargs)
    return os.fspath(path)


def fresh_directory(parent: str, prefix: str) -> str:
    """A new directory under ``parent`` (created if needed) with a random name starting with ``prefix``
    (:func:`tempfile.mkdtemp`: never one that already exists), with the mode os.makedirs would give it."""
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, 0o777 & ~_UMASK)
    return path
