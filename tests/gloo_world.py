"""Run a function on a CPU (gloo) process group that is torn down cleanly.

A gloo group that is still referenced after ``destroy_process_group()`` (by a DeviceMesh, a
DTensor or an FSDP module) is destructed during interpreter shutdown, and with torch 2.13 that
aborts the process ("terminate called without an active exception") about half the time, after
the work has succeeded. So the work runs in its own function, whose frame (and with it every
mesh and DTensor it made) is gone before the group is destroyed.
"""
from __future__ import annotations

import gc
from typing import Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def run_on_gloo(work: Callable[..., T], *args, **init_kwargs) -> T:
    """``dist.init_process_group("gloo", **init_kwargs)``, then ``work(*args)``, then destroy the
    group once nothing the work made still holds it. ``work`` must not return a mesh or DTensor."""
    dist.init_process_group("gloo", **init_kwargs)
    try:
        return work(*args)
    finally:
        gc.collect()  # meshes and DTensors caught in reference cycles
        dist.destroy_process_group()
