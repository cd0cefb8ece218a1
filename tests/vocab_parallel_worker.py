"""One rank of the vocabulary-parallel checks (run by tests/test_vocab_parallel.py under torchrun).

Every rank builds the same inputs from one seed, shards the LM head over the vocabulary
(``Shard(0)``, uneven when V is not a multiple of the ranks) and replicates the hidden states,
runs the fused log-probs and every loss forward and backward, and compares the loss and every
gradient with a single-process float64 computation on the full logits by the formulas of
tests/gradient_reference.py (nothing from drdo, whose losses the fused objectives call). Rank 0
writes the worst relative error of each case to the JSON file named by argv[1]; any rank fails
loudly if the head was gathered.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import gradient_reference as reference
import torch
import torch.distributed as dist
from gloo_world import run_on_gloo
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import drdo_kernels as dk
import drdo_kernels.vocab_parallel as vp
from drdo.losses import DPOSpec, DRDOSpec, EDPOSpec, OracleSpec

R, T, H = 6, 9, 16  # 3 pairs of 9 positions


def inputs(n_vocab: int, dtype, bias: bool):
    g = torch.Generator().manual_seed(n_vocab)
    hidden = torch.randn(R, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(n_vocab, H, generator=g, dtype=torch.float64) * 2.0
    b = torch.randn(n_vocab, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, n_vocab, (R, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    scores = {"oracle": torch.randn(R, generator=g, dtype=torch.float64),
              "rewards": torch.randn(R, generator=g, dtype=torch.float64),
              "ref_logps": -torch.rand(R, generator=g, dtype=torch.float64) * 30,
              "ensemble": torch.randn(3, R, generator=g, dtype=torch.float64),
              "upstream": torch.randn(R, T, generator=g, dtype=torch.float64)}
    return [t if t is None else t.to(dtype) for t in (hidden, weight, b)], labels, scores


def full_logits(hidden, weight, bias, transform_kw: dict) -> torch.Tensor:
    """[R, T, V] float64 logits of the whole head, through the logit transform."""
    x = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    return reference.transform_logits(x, **transform_kw)


#: loss -> (spec, {fused keyword: which score})
LOSSES = {
    "drdo": (DRDOSpec(alpha=0.5, gamma=2.0), {"oracle": "oracle", "rewards": "rewards"}),
    "drdo_implicit": (DRDOSpec(alpha=0.3, gamma=1.0, reward="implicit", beta=0.2), {"oracle": "oracle"}),
    "dpo": (DPOSpec(beta=0.1), {"ref_logps": "ref_logps"}),
    "edpo": (EDPOSpec(beta=0.1), {"ref_logps": "ref_logps", "oracle": "ensemble"}),
    "oracle": (OracleSpec(alpha=0.2), {"rewards": "rewards"}),
}


def reference_loss(name: str, logits: torch.Tensor, labels: torch.Tensor, scores: dict) -> torch.Tensor:
    """The mean loss by the formulas of tests/gradient_reference.py (nothing from drdo) on full logits."""
    spec, _ = LOSSES[name]
    o = dict(dataclasses.asdict(spec), reduction="mean")
    z, counts = reference.sequence_logprobs(logits, labels)
    if name.startswith("drdo"):
        return reference.drdo(z, counts, scores["rewards"] if o["reward"] == "head" else None, scores["oracle"], **o)
    if name == "dpo":
        return reference.dpo(z, scores["ref_logps"], **o)
    if name == "edpo":
        return reference.edpo(z, scores["ref_logps"], scores["ensemble"], **o)
    n = z.shape[0] // 2  # the Oracle scores the chosen rows
    return reference.oracle_loss(z[:n], counts[:n], scores["rewards"], **o)


def fused_loss(name, weight, hidden, bias, labels, scores, **transform_kw):
    spec, reads = LOSSES[name]
    named = {k: scores[v] for k, v in reads.items()}
    return dk.fused_objective_loss(spec, weight, hidden, labels, bias, **named, **transform_kw)[0]


def relative(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).abs().max() / exact.abs().max().clamp(min=1e-30))


def run_case(mesh, n_vocab, dtype, bias, transform_kw, what):
    (h, w, b), labels, scores = inputs(n_vocab, dtype, bias)
    h_dt = distribute_tensor(h, mesh, [Replicate()]).requires_grad_(True)
    w_dt = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_(True)
    b_dt = None if b is None else distribute_tensor(b, mesh, [Shard(0)]).requires_grad_(True)
    ref = [t if t is None else t.detach().double().requires_grad_(True) for t in (h, w, b)]
    logits = full_logits(*ref, transform_kw)
    if what == "logprobs":
        got = dk.fused_linear_logprobs(w_dt, h_dt, labels, bias=b_dt, **transform_kw)
        exact = reference.token_logprobs(logits, labels)
        (got * scores["upstream"].to(got.dtype)).sum().backward()
        (exact * scores["upstream"]).sum().backward()
    else:
        got = fused_loss(what, w_dt, h_dt, b_dt, labels, {k: v.to(dtype) for k, v in scores.items()},
                         **transform_kw)
        exact = reference_loss(what, logits, labels, scores)
        got.backward()
        exact.backward()
    errors = {"value": relative(got.detach(), exact.detach()),
              "hidden": relative(h_dt.grad.full_tensor(), ref[0].grad),
              "weight": relative(w_dt.grad.full_tensor(), ref[1].grad)}
    if b_dt is not None:
        errors["bias"] = relative(b_dt.grad.full_tensor(), ref[2].grad)
    assert w_dt.grad.placements == (Shard(0),) and h_dt.grad.placements == (Replicate(),)
    return errors


def all_errors() -> dict:
    """On every rank of a gloo group: the bad-input checks, then the worst relative error of
    every case, keyed ``what/V=../dtype/transform/bias=..``."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    def no_gather(*_a, **_k):
        raise AssertionError("a vocabulary-parallel call gathered the LM head")

    vp.gather_lm_head = no_gather  # no rank may hold the whole weight
    (h, w, _), labels, _ = inputs(8 * world, torch.float32, False)
    for bad_hidden, message in ((distribute_tensor(h, mesh, [Shard(0)]), "Replicate"),):
        try:
            dk.fused_linear_logprobs(distribute_tensor(w, mesh, [Shard(0)]), bad_hidden, labels)
        except ValueError as err:
            assert message in str(err), err
        else:
            raise AssertionError("a sharded hidden state was accepted")
    try:
        dk.fused_linear_logprobs(distribute_tensor(w, mesh, [Shard(0)]), distribute_tensor(h, mesh, [Replicate()]),
                                 labels, backend="triton")
    except ValueError as err:
        assert "vocabulary-parallel" in str(err), err
    else:
        raise AssertionError("backend='triton' was accepted for a vocabulary-parallel head")
    results = {}
    softcap = {"softcap": 3.0, "logit_scale": 0.5, "temperature": 0.8}
    for n_vocab in (4 * world + 1, 8 * world):  # uneven and even shards
        for what in ("logprobs", *LOSSES):
            for dtype, transform_kw, bias in ((torch.float64, {}, True), (torch.float64, softcap, False),
                                              (torch.float32, softcap, True)):
                key = f"{what}/V={n_vocab}/{str(dtype)[6:]}/{'softcap' if transform_kw else 'plain'}/bias={bias}"
                results[key] = run_case(mesh, n_vocab, dtype, bias, transform_kw, what)
    return results


def compiled_step_errors() -> dict:
    """``torch.compile`` of a step around fused calls on a sharded head (an op on the hidden states
    before them, the log-probs' and DRDO's sum after), in three settings: "default" and "fullgraph"
    (vocabulary-parallel: each call is one operator in the graph), and "gathered" (a Shard(0)
    weight with plain hidden states, as FSDP2 leaves a head outside its forward: the calls run
    eagerly between graphs). Returns, for each, the worst relative errors of the loss and every
    gradient against the float64 reference and Dynamo's graph-break reasons."""
    from torch._dynamo.utils import counters

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    n_vocab = 4 * dist.get_world_size() + 1  # uneven shards: the ranks' graphs differ in shape
    (h, w, b), labels, scores = inputs(n_vocab, torch.float32, True)
    softcap = {"softcap": 3.0}
    spec, _ = LOSSES["drdo"]

    def step(weight, hidden, bias, oracle, rewards, upstream):
        hidden = torch.tanh(hidden) * 2.0
        logp = dk.fused_linear_logprobs(weight, hidden, labels, bias, **softcap)
        drdo, _ = dk.fused_linear_drdo_loss(weight, hidden, labels, oracle, rewards, bias, spec=spec, **softcap)
        return (logp * upstream).sum() + drdo

    ref = [t.detach().double().requires_grad_(True) for t in (h, w, b)]
    logits = full_logits(torch.tanh(ref[0]) * 2.0, ref[1], ref[2], softcap)
    exact = (reference.token_logprobs(logits, labels) * scores["upstream"]).sum() + \
        reference_loss("drdo", logits, labels, scores)
    exact.backward()
    floats = [scores[k].float() for k in ("oracle", "rewards", "upstream")]
    result = {}
    settings = (("default", {}, True), ("fullgraph", {"fullgraph": True}, True), ("gathered", {}, False))
    for mode, options, vocab_parallel in settings:
        torch._dynamo.reset()
        counters.clear()
        weight, bias = (distribute_tensor(t, mesh, [Shard(0)]).requires_grad_(True) for t in (w, b))
        hidden = (distribute_tensor(h, mesh, [Replicate()]) if vocab_parallel else h.clone()).requires_grad_(True)
        loss = torch.compile(step, **options)(weight, hidden, bias, *floats)
        loss.backward()
        d_hidden = hidden.grad.full_tensor() if vocab_parallel else hidden.grad
        result[mode] = {"value": relative(loss.detach(), exact.detach()),
                        "weight": relative(weight.grad.full_tensor(), ref[1].grad),
                        "hidden": relative(d_hidden, ref[0].grad),
                        "bias": relative(bias.grad.full_tensor(), ref[2].grad),
                        "graph_breaks": sorted(counters["graph_break"])}
    return result


def main(out_path: str, what: str = "errors") -> None:
    results = run_on_gloo(compiled_step_errors if what == "compile" else all_errors)
    if int(os.environ["RANK"]) == 0:
        with open(out_path, "w") as f:
            json.dump({"world": int(os.environ["WORLD_SIZE"]), "pid": os.getpid(), "errors": results}, f)


if __name__ == "__main__":  # argv: the JSON file rank 0 writes, then "compile" for the compiled step
    main(*sys.argv[1:3])
