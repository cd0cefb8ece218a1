"""Inputs from other trainers: HF/TRL label conventions (align_labels) and an FSDP2-sharded
(DTensor) LM head read OUTSIDE the forward of the module that owns it (2 gloo ranks on CPU)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from drdo.data.collate import shift_labels
from drdo.losses import drdo_loss, sequence_logprobs
from drdo_kernels import FusedLinearDRDOLoss, align_labels, fused_linear_logprobs, gather_lm_head

IGNORE = -100


# ----------------------------------------------------------------------------- label conventions


def test_align_labels_from_hf_labels_and_trl_completion_mask():
    input_ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]])
    completion_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    hf_labels = input_ids.masked_fill(completion_mask == 0, IGNORE)
    expected = torch.tensor([[IGNORE, 7, 8, IGNORE, IGNORE], [10, 11, IGNORE, IGNORE, IGNORE]])
    assert torch.equal(align_labels(input_ids, completion_mask=completion_mask), expected)
    assert torch.equal(align_labels(input_ids, labels=hf_labels), expected)
    assert torch.equal(align_labels(input_ids, labels=hf_labels), shift_labels(hf_labels))
    # HF's own loss on unshifted labels = the fused kernel on the aligned ones
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(13, 8, dtype=torch.float64)
    hf = -torch.nn.functional.cross_entropy((hidden @ weight.T)[:, :-1].reshape(-1, 13),
                                            hf_labels[:, 1:].reshape(-1), reduction="sum")
    fused = fused_linear_logprobs(weight, hidden, align_labels(input_ids, labels=hf_labels), backend="torch").sum()
    assert torch.allclose(fused, hf, rtol=1e-12, atol=1e-12)


def test_align_labels_packed_rows_never_cross_a_boundary():
    # two sequences packed in one row: [p p c c | p c c]; the first token of the second sequence
    # is a completion token here on purpose: it must not be predicted from the first sequence
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    completion_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    out = align_labels(input_ids, completion_mask=completion_mask, position_ids=position_ids)
    assert out.tolist() == [[IGNORE, 3, 4, IGNORE, 6, 7, IGNORE]]


def test_align_labels_rejects_bad_input():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        align_labels(ids)
    with pytest.raises(ValueError, match="exactly one"):
        align_labels(ids, labels=ids, completion_mask=ids)
    with pytest.raises(ValueError, match="must match"):
        align_labels(ids, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        align_labels(ids, labels=ids.float())


def test_gather_lm_head_passes_plain_tensors_through():
    w, b = torch.randn(4, 3), torch.randn(4)
    gw, gb = gather_lm_head(w, b)
    assert gw is w and gb is b


# ----------------------------------------------------------------------------- FSDP2 DTensor head


def _batch(n_pairs: int = 4, seq: int = 9, vocab: int = 264, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2 * n_pairs, seq), generator=g)
    completion = torch.zeros(2 * n_pairs, seq, dtype=torch.long)
    for r in range(2 * n_pairs):
        start = 2 + r % 3
        completion[r, start:seq - r % 2] = 1
    oracle = torch.randn(2 * n_pairs, generator=g)
    return {"input_ids": input_ids, "completion_mask": completion, "oracle": oracle}


def _rows(batch: dict, rows: list[int]) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def _step(policy, batch: dict, loss_fn):
    """Forward of the policy (FSDP2 root), then the fused loss OUTSIDE any forward."""
    attention = torch.ones_like(batch["input_ids"])
    out = policy(batch["input_ids"], attention)
    labels = align_labels(batch["input_ids"], completion_mask=batch["completion_mask"])
    weight = policy.lm_head.weight
    loss, _ = loss_fn(weight, out.hidden_states, labels, batch["oracle"], out.rewards)
    loss.backward()
    return loss.detach()


def _worker(rank: int, world: int, port: int, result_path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from gloo_world import run_on_gloo

    result = run_on_gloo(_fsdp2_step, rank, world, rank=rank, world_size=world)
    if rank == 0:
        torch.save(result, result_path)


def _fsdp2_step(rank: int, world: int) -> dict:
    """One fused DRDO step of the tiny policy under FSDP2 on this rank's pairs: the mean loss and
    the full gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from drdo.models import PolicyWithRewardHead

    mesh = init_device_mesh("cpu", (world,))
    policy = PolicyWithRewardHead.from_pretrained("tiny").train()
    for block in policy.transformer_blocks():
        fully_shard(block, mesh=mesh)
    fully_shard(policy.lm_head, mesh=mesh)  # its own unit: outside lm_head's forward it stays sharded
    fully_shard(policy, mesh=mesh)
    batch = _batch()
    n = batch["input_ids"].shape[0] // 2
    share = n // world
    pairs = list(range(rank * share, (rank + 1) * share))
    mine = _rows(batch, pairs + [n + p for p in pairs])
    assert isinstance(policy.lm_head.weight, DTensor)
    loss = _step(policy, mine, FusedLinearDRDOLoss(alpha=0.5, gamma=2.0, backend="torch"))
    assert isinstance(policy.lm_head.weight.grad, DTensor)
    dist.all_reduce(loss)
    grads = {name: p.grad.full_tensor() for name, p in policy.named_parameters()}
    return {"loss": loss / world, "grads": grads}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dtensor_lm_head_outside_forward_equals_one_process(tmp_path):
    result = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), result), nprocs=2, join=True)
    dist_out = torch.load(result)

    from drdo.models import PolicyWithRewardHead

    policy = PolicyWithRewardHead.from_pretrained("tiny").train()
    batch = _batch()
    loss = _step(policy, batch, FusedLinearDRDOLoss(alpha=0.5, gamma=2.0, backend="torch"))
    # the plain reference on the same batch (full logits), independently of the kernels
    with torch.no_grad():
        out = policy(batch["input_ids"], torch.ones_like(batch["input_ids"]), return_logits=True)
        logps, _ = sequence_logprobs(out.logits,
                                     align_labels(batch["input_ids"], completion_mask=batch["completion_mask"]))
        z_w, z_l = logps.chunk(2)
        r_w, r_l = out.rewards.chunk(2)
        o_w, o_l = batch["oracle"].chunk(2)
        ref, _ = drdo_loss(z_w, z_l, r_w, r_l, o_w, o_l, alpha=0.5, gamma=2.0)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    assert float(dist_out["loss"]) == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
    for name, p in policy.named_parameters():
        got = dist_out["grads"][name]
        scale = p.grad.abs().max().clamp(min=1e-8)
        assert ((got - p.grad).abs().max() / scale) < 1e-4, name
    assert dist_out["grads"]["lm.lm_head.weight"].abs().sum() > 0


def test_gather_lm_head_failure_says_what_to_do():
    from unittest import mock

    import drdo_kernels.inputs as inputs

    weight = mock.MagicMock()
    weight.device_mesh.ndim = 1
    weight.placements = ("Shard(dim=0)",)
    weight.redistribute.side_effect = RuntimeError("Default process group has not been initialized")
    with mock.patch.object(inputs, "is_dtensor", return_value=True):
        with pytest.raises(RuntimeError, match="inside the forward of the module that owns the LM head"):
            gather_lm_head(weight)
