"""Fault injection around run directories and written files: a run never takes a directory through a
side door, a reader never loads an unfinished run, no writer follows a planted link, SIGTERM keeps
progress, and `drdo eval` / `drdo demo` check their inputs before writing anything.

Tiny model, 1-4 steps (helpers from tests/test_faults.py).
"""
from __future__ import annotations

import os

import pytest

from drdo.atomic import atomic_writes
from drdo.jsonl import write_jsonl as drdo_write_jsonl


# ----------------------------------------------------------------------------- files written whole, never through a planted link


def test_writers_never_follow_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out.jsonl"
    os.symlink(victim, str(target) + ".tmp")  # at the name a writer might pick for its temporary
    drdo_write_jsonl([{"a": 1}], str(target))
    os.symlink(victim, tmp_path / "again.jsonl")  # at the target itself: replaced, not written through
    drdo_write_jsonl([{"a": 2}], str(tmp_path / "again.jsonl"))
    assert not os.path.islink(tmp_path / "again.jsonl") and not os.path.islink(target)
    assert victim.read_text() == "precious"


def test_a_failed_write_of_several_files_leaves_all_as_they_were(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    b.write_text("old b")
    with pytest.raises(RuntimeError):
        with atomic_writes([str(a), str(b)]) as (fa, fb):
            fa.write("new a")
            raise RuntimeError("disk gone")
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]
