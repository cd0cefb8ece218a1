"""Process-group setup and FSDP2 wrapping.

Two launch modes:
* plain ``python``: one process, no process group, the model is not wrapped;
* ``torchrun --nproc_per_node N`` (WORLD_SIZE set): a process group (nccl on
  CUDA, gloo on CPU) and FSDP2 (``fully_shard`` on every transformer block and
  on the root), also for N = 1.
Multi-node launch is torchrun's job. The ranks wait for each other at start-up for at most
``DRDO_DIST_START_TIMEOUT`` seconds (default 60): WORLD_SIZE and RANK set by hand, without the
other processes, fail in one line (:class:`DistributedStartError`) instead of waiting for ever.
"""
from __future__ import annotations

import atexit
import gc
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

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


#: The environment variable that bounds the start-up wait (seconds), and its default.
START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S = "DRDO_DIST_START_TIMEOUT", 60.0


class DistributedStartError(RuntimeError):
    """The process group cannot start: launcher variables missing or invalid, or the other ranks never came."""


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
        rank, world_size, store = _rendezvous()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world_size)
        atexit.register(_destroy_at_exit)
        owns = True
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistState(dist.get_rank(), dist.get_world_size(), local_rank, dev, True, owns)


def start_timeout() -> float:
    """Seconds the ranks wait for each other at start-up: ``DRDO_DIST_START_TIMEOUT`` or 60."""
    text = os.environ.get(START_TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_START_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise DistributedStartError(f"{START_TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return seconds


def _launch_variables() -> tuple[int, int, str, int]:
    """RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT of the environment; DistributedStartError when one is
    missing or invalid (WORLD_SIZE and RANK set by hand, without torchrun)."""
    hint = "launch with `torchrun --nproc_per_node N -m drdo.cli ...`, or unset WORLD_SIZE and RANK to run in one " \
           "process"
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise DistributedStartError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} and RANK={os.environ['RANK']} are set but "
                                    f"{' and '.join(missing)} not: {hint}")
    try:
        rank, world, port = (int(os.environ[n]) for n in ("RANK", "WORLD_SIZE", "MASTER_PORT"))
    except ValueError:
        given = " ".join(f"{n}={os.environ[n]!r}" for n in ("RANK", "WORLD_SIZE", "MASTER_PORT"))
        raise DistributedStartError(f"RANK, WORLD_SIZE and MASTER_PORT must be integers, got {given}: {hint}") from None
    if not (0 <= rank < world and 0 <= port < 2**16):
        raise DistributedStartError(f"RANK={rank}, WORLD_SIZE={world}, MASTER_PORT={port}: need 0 <= RANK < WORLD_SIZE "
                                    f"and a port below 65536; {hint}")
    return rank, world, os.environ["MASTER_ADDR"], port


def _rendezvous() -> tuple[int, int, dist.Store]:
    """(rank, world size, store) of the process group, as torch's env:// rendezvous makes them (the
    store of torchrun's agent when it hosts one, else one served by rank 0), except that the ranks
    wait for each other for :func:`start_timeout` seconds only; the store then takes torch's default
    timeout for the run."""
    from torch.distributed.constants import default_pg_timeout

    rank, world, host, port = _launch_variables()
    seconds = start_timeout()
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        if rank != 0 or agent:  # a client: wait here, quietly, for the server (torch logs every failed try)
            _wait_for_server(host, port, seconds)
        store = dist.TCPStore(host, port, world, is_master=rank == 0 and not agent, timeout=timedelta(seconds=seconds),
                              **({} if agent else {"multi_tenant": True}))
    except (RuntimeError, OSError) as e:  # DistStoreError / DistNetworkError: a timeout, an unreachable host
        raise DistributedStartError(
            f"rank {rank} of WORLD_SIZE={world}: the other processes did not join at {host}:{port} within "
            f"{seconds:g} s ({type(e).__name__}); launch every rank with torchrun, or unset WORLD_SIZE and RANK "
            f"to run in one process (set {START_TIMEOUT_ENV} to wait longer)") from e
    store.set_timeout(default_pg_timeout)
    return rank, world, store


def _wait_for_server(host: str, port: int, seconds: float) -> None:
    """Return once ``host:port`` accepts a TCP connection; TimeoutError after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=max(min(1.0, deadline - time.monotonic()), 0.01)).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{host}:{port} did not answer") from None
            time.sleep(0.2)


def teardown(state: DistState) -> None:
    """End of one training run: synchronise the ranks. The process group stays up for later runs
    in the same process (re-creating it after a destroy can deadlock) and is destroyed at exit."""
    if state.distributed and dist.is_initialized():
        dist.barrier()


def _destroy_at_exit() -> None:
    """Destroy the group while the interpreter is whole. The FSDP2 modules and their device mesh
    hold it: collect any left in reference cycles first, since a gloo group destructed during
    interpreter shutdown can abort the process after a successful run."""
    if dist.is_initialized():
        gc.collect()
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
