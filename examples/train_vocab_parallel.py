"""Train the tiny model with FSDP2 on one mesh axis and a vocabulary-parallel LM head on the other.

    torchrun --standalone --nproc_per_node 4 examples/train_vocab_parallel.py --dp 2 --tp 2 --out OUT.json
    python examples/train_vocab_parallel.py --out ONE.json          # one process: the same losses

A 2-D device mesh ("dp", "tp"): the LM head's weight is sharded over the vocabulary on "tp"
(``distribute_tensor(..., [Shard(0)])``), every parameter is sharded by FSDP2 on "dp", and each
"dp" rank reads its own slice of the batch. Inside the FSDP2-managed forward the head arrives
all-gathered over "dp" but still sharded over "tp"; the last hidden state is wrapped as a
``Replicate()`` DTensor on "tp", so ``fused_linear_dpo_loss`` runs vocabulary-parallel: no rank
holds the [tokens, vocab] logits or the whole head. On a CPU the process group is gloo.
The script writes the loss of every step to --out (rank 0); one process gives the same numbers.
"""
from __future__ import annotations

import argparse
import gc
import json
import os

import torch
import torch.distributed as dist
from torch import nn

import drdo_kernels as dk
from drdo.models import build_tiny_causal_lm

PAIRS, LENGTH, PROMPT = 8, 24, 6


def batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids [2B, T], labels [2B, T] (prompt ignored), reference log-probs [2B] of one step."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, vocab, (2 * PAIRS, LENGTH), generator=g)
    ids[PAIRS:, :PROMPT] = ids[:PAIRS, :PROMPT]  # chosen and rejected share their prompt
    labels = torch.full_like(ids, -100)
    labels[:, PROMPT - 1:-1] = ids[:, PROMPT:]
    return ids, labels, -torch.rand(2 * PAIRS, generator=g) * 40


class DPOStep(nn.Module):
    """The model and its loss in one forward, so that FSDP2 gathers the head for the loss."""

    def __init__(self, lm: nn.Module, tp_mesh=None):
        super().__init__()
        self.lm, self.tp_mesh = lm, tp_mesh

    def forward(self, ids, labels, ref_logps):
        hidden, weight = self.lm.model(input_ids=ids).last_hidden_state, self.lm.lm_head.weight
        if self.tp_mesh is not None:
            from torch.distributed.tensor import DTensor, Replicate, Shard

            if not (isinstance(weight, DTensor) and weight.placements == (Shard(0),)):
                raise RuntimeError(f"the LM head should arrive sharded over the vocabulary, got {weight}")
            hidden = DTensor.from_local(hidden, self.tp_mesh, [Replicate()], run_check=False)
        return dk.fused_linear_dpo_loss(weight, hidden, labels, ref_logps, beta=0.1)[0]


def rows_of(t: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    """The pairs of data-parallel rank ``rank``: its slice of the chosen rows and of the rejected rows."""
    chosen, rejected = t[:PAIRS].chunk(ranks)[rank], t[PAIRS:].chunk(ranks)[rank]
    return torch.cat([chosen, rejected])


def build(dp: int, tp: int) -> tuple[DPOStep, int, int]:
    """The step module, sharded on a (dp, tp) mesh when launched by torchrun; (module, dp rank, dp size)."""
    lm = build_tiny_causal_lm(seed=0)
    if dp * tp == 1:
        return DPOStep(lm), 0, 1
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    head = lm.lm_head.weight
    lm.lm_head.weight = nn.Parameter(distribute_tensor(head.detach(), mesh["tp"], [Shard(0)]))
    step = DPOStep(lm, mesh["tp"])
    fully_shard(step, mesh=mesh["dp"])
    return step, mesh["dp"].get_local_rank(), dp


def train(dp: int, tp: int, steps: int) -> list[float]:
    """The loss of every step (the mean over the "dp" ranks)."""
    torch.manual_seed(0)
    step, rank, ranks = build(dp, tp)
    optimizer = torch.optim.SGD(step.parameters(), lr=0.5)
    losses = []
    for i in range(steps):
        ids, labels, ref = batch(i, step.lm.config.vocab_size)
        loss = step(rows_of(ids, rank, ranks), rows_of(labels, rank, ranks), rows_of(ref, rank, ranks))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if ranks > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=1, help="data-parallel ranks (FSDP2)")
    parser.add_argument("--tp", type=int, default=1, help="vocabulary-parallel ranks of the LM head")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", required=True, help="JSON file of the per-step losses")
    args = parser.parse_args()
    if args.dp * args.tp != int(os.environ.get("WORLD_SIZE", "1")):
        parser.error(f"--dp {args.dp} x --tp {args.tp} must equal the number of processes")
    if args.dp * args.tp == 1:
        losses = train(1, 1, args.steps)
    else:
        dist.init_process_group("gloo")
        try:
            losses = train(args.dp, args.tp, args.steps)
        finally:
            # Destroy the group only once the mesh and the sharded module are gone (train has
            # returned): a gloo group still referenced at interpreter exit can abort the process.
            gc.collect()
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "dp": args.dp, "tp": args.tp}, f)
        print(f"losses {['%.6f' % x for x in losses]} written to {args.out}")


if __name__ == "__main__":
    main()
