"""Process-group setup and FSDP2 wrapping.

Two launch modes:
* plain ``python``: one process, no process group, the model is not wrapped;
* ``torchrun --nproc_per_node N`` (WORLD_SIZE set): a process group (nccl on
  CUDA, gloo on CPU) and FSDP2 (``fully_shard`` on every transformer block and
  on the root), also for N = 1.
Multi-node launch is torchrun's job.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistState:
    """rank / world_size / local_rank of this process, its device, and whether FSDP2 is on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set WORLD_SIZE/RANK in the environment."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(device: str | None = None) -> DistState:
    """Initialise the process group when launched by torchrun; pick the device.

    device: None/"auto" -> cuda:LOCAL_RANK if CUDA is available, else cpu.
    An already initialised group (e.g. made by a test) is reused and not destroyed.
    """
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else str(device).startswith("cuda")
    if not launched_by_torchrun() and not dist.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return DistState(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        atexit.register(_destroy_at_exit)
        owns = True
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistState(dist.get_rank(), dist.get_world_size(), local_rank, dev, True, owns)


def teardown(state: DistState) -> None:
    """End of one training run: synchronise the ranks. The process group stays up for later runs
    in the same process (re-creating it after a destroy can deadlock) and is destroyed at exit."""
    if state.distributed and dist.is_initialized():
        dist.barrier()


def _destroy_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(state: DistState) -> None:
    if state.distributed:
        dist.barrier()


def all_reduce_sum(state: DistState, tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in one process); returns the tensor."""
    if state.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(state: DistState, obj):
    """Rank 0's ``obj`` on every rank."""
    if not state.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_fsdp(root: nn.Module, state: DistState, *, bf16: bool) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block of ``root.policy`` (a PolicyWithRewardHead), then ``root``.

    bf16=True: bf16 compute with fp32 gradient reduction (MixedPrecisionPolicy);
    parameters and optimizer state stay fp32. The root does not cast its floating-point
    forward inputs (Oracle rewards, reference log-probs stay fp32; a bf16 reference
    log-prob of -150.3 would round to -150).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(state.device.type, (state.world_size,))
    block_kwargs, root_kwargs = {"mesh": mesh}, {"mesh": mesh}
    if bf16:
        block_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for block in root.policy.transformer_blocks():
        fully_shard(block, **block_kwargs)
    fully_shard(root, **root_kwargs)
    return root
