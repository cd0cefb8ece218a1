"""torch.compile: every fused function compiles whole (``fullgraph=True``) and matches eager.

Each fused function is one ``drdo::fused`` operator in a compiled graph (drdo_kernels.compiled);
the data-dependent planning runs inside it, so a host synchronisation or any other graph break
in the traced part fails ``fullgraph=True``. Compared with eager: the loss (or log-probs), every
metric and every gradient (LM-head weight, hidden states, the per-row scores), with inductor
(the default backend) on the CPU: each fused function alone, the tiny policy's forward with a
loss (fullgraph and default mode), `drdo train --compile` and DRDOTrainer's torch_compile=True.
The planted graph break compiles with "aot_eager" (Dynamo fails before any code generation).
"""
from __future__ import annotations

import json

import pytest
import torch

import drdo_kernels as dk
import drdo_kernels.compiled as compiled
from drdo.losses import DPOSpec, DRDOSpec

V, H, PAIRS, T = 40, 8, 3, 7


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=g).requires_grad_(True)
    hidden = torch.randn(2 * PAIRS, T, H, generator=g).requires_grad_(True)
    bias = torch.randn(V, generator=g).requires_grad_(True)
    labels = torch.randint(0, V, (2 * PAIRS, T), generator=g)
    labels[:, :2] = -100
    labels[0, -1] = -100
    scores = {"oracle": torch.randn(2 * PAIRS, generator=g), "rewards": torch.randn(2 * PAIRS, generator=g),
              "ref": -torch.rand(2 * PAIRS, generator=g) * 20, "ensemble": torch.randn(3, 2 * PAIRS, generator=g),
              "upstream": torch.randn(2 * PAIRS, T, generator=g)}
    scores["rewards"].requires_grad_(True)
    return weight, hidden, bias, labels, scores


#: name -> f(weight, hidden, bias, labels, scores) -> (scalar to differentiate, metrics or None)
CASES = {
    "logprobs": lambda w, h, b, y, s: ((dk.fused_linear_logprobs(w, h, y, b) * s["upstream"]).sum(), None),
    "logprobs_entropy": lambda w, h, b, y, s: (
        sum((out * s["upstream"] * k).sum() for k, out in zip((1.0, -0.3), dk.fused_linear_logprobs(
            w, h, y, b, return_entropy=True, temperature=0.8))), None),
    "logprobs_softcap": lambda w, h, b, y, s: (
        (dk.fused_linear_logprobs(w, h, y, b, softcap=2.0, temperature=0.7) * s["upstream"]).sum(), None),
    "drdo": lambda w, h, b, y, s: dk.fused_linear_drdo_loss(w, h, y, s["oracle"], s["rewards"], b, alpha=0.5),
    "drdo_implicit_sum": lambda w, h, b, y, s: dk.fused_linear_drdo_loss(
        w, h, y, s["oracle"], None, b, reward="implicit", beta=0.2, reduction="sum", logit_scale=0.5),
    "dpo": lambda w, h, b, y, s: dk.fused_linear_dpo_loss(w, h, y, s["ref"], b, beta=0.1),
    "dpo_per_pair": lambda w, h, b, y, s: (
        (dk.fused_linear_dpo_loss(w, h, y, s["ref"], b, beta=0.1, reduction="none")[0] * s["oracle"][:PAIRS]).sum(),
        None),
    "edpo": lambda w, h, b, y, s: dk.fused_linear_edpo_loss(w, h, y, s["ref"], s["ensemble"], b, beta=0.1),
    "oracle": lambda w, h, b, y, s: dk.fused_linear_oracle_loss(w, h, y, s["rewards"], b, alpha=0.3),
    "objective": lambda w, h, b, y, s: dk.fused_objective_loss(DRDOSpec(alpha=0.2, gamma=1.0), w, h, y, b,
                                                               rewards=s["rewards"], oracle=s["oracle"]),
    "module": lambda w, h, b, y, s: MODULE(w, h, y, s["ref"], b),
}
MODULE = dk.FusedLinearDPOLoss(beta=0.2)


def run(case: str, fn, seed: int = 0):
    w, h, b, y, s = inputs(seed)
    value, metrics = fn(w, h, b, y, s)
    grads = torch.autograd.grad(value, [w, h, b, s["rewards"]], allow_unused=True)
    return value.detach(), metrics, grads


def assert_same(eager, compiled_run, rtol=1e-6):
    (v0, m0, g0), (v1, m1, g1) = eager, compiled_run
    torch.testing.assert_close(v1, v0, rtol=rtol, atol=1e-6)
    if m0 is not None:
        assert m1.keys() == m0.keys()
        for k in m0:
            torch.testing.assert_close(m1[k].float(), m0[k].float(), rtol=rtol, atol=1e-6, msg=k)
    for a, b in zip(g1, g0):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6)


#: Tensor methods and operators that read a tensor on the host.
SYNC_METHODS = ("item", "tolist", "cpu", "nonzero", "numpy")


def checked_backend(graphs: list):
    """inductor, recording each graph Dynamo hands it."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("inductor")(gm, example_inputs)

    return backend


def host_reads(graphs) -> list[str]:
    return [str(node.target) for gm in graphs for node in gm.graph.nodes
            if (node.op == "call_method" and node.target in SYNC_METHODS)
            or "_local_scalar_dense" in str(node.target) or "nonzero" in str(node.target)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fullgraph_matches_eager(case):
    torch._dynamo.reset()
    graphs = []
    fn = CASES[case]
    assert_same(run(case, fn), run(case, torch.compile(fn, fullgraph=True, backend=checked_backend(graphs))))
    assert len(graphs) == 1 and not host_reads(graphs)
    assert any("drdo.fused" in str(node.target) for node in graphs[0].graph.nodes)


def test_no_grad_and_frozen_inputs():
    """Under no_grad the operator computes no gradient; frozen inputs get none."""
    fn = torch.compile(CASES["drdo"], fullgraph=True, backend="aot_eager")
    w, h, b, y, s = inputs()
    with torch.no_grad():
        loss, _ = fn(w, h, b, y, s)
    assert loss.grad_fn is None
    loss, _ = fn(w.detach(), h, None, y, s)
    loss.backward()
    assert h.grad is not None and w.grad is None


def test_planted_host_sync_breaks_fullgraph(monkeypatch):
    """The fullgraph tests catch host synchronisations in the traced part: without the operator
    (the eager body traced as it is, its token plan read on the host) fullgraph=True fails."""
    def body_traced(name, args, kwargs):
        return compiled.COMPILED_FUNCTIONS[name][0](*args, **kwargs)

    monkeypatch.setattr(compiled, "_traced_call", body_traced)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)data-dependent|graph break|unsupported"):
        run("dpo", torch.compile(CASES["dpo"], fullgraph=True, backend="aot_eager"))
    torch._dynamo.reset()


def _policy_step(policy, batch, spec):
    ids, mask, labels, oracle = batch
    out = policy(ids, mask)
    loss, _ = dk.fused_objective_loss(spec, policy.lm_head.weight, out.hidden_states, labels, rewards=out.rewards,
                                      oracle=oracle, **policy.logit_transform)
    return loss


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "default"])
def test_policy_step_compiles_with_inductor(fullgraph):
    """The tiny policy's forward plus the fused DRDO loss, compiled by inductor, equals eager: the
    loss and every parameter's gradient."""
    from drdo.models import PolicyWithRewardHead, build_tiny_causal_lm

    policy = PolicyWithRewardHead(build_tiny_causal_lm(seed=0))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[3, -3:] = 0
    labels = ids.roll(-1, 1).masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    batch = (ids, mask, labels, torch.randn(4, generator=g))
    spec = DRDOSpec(alpha=0.5, gamma=2.0) if fullgraph else DPOSpec(beta=0.1)
    if not fullgraph:
        batch = (ids, mask, labels, None)
        step = lambda p, bt: dk.fused_objective_loss(spec, p.lm_head.weight, p(bt[0], bt[1]).hidden_states, bt[2],
                                                       ref_logps=-torch.ones(4) * 10)[0]
    else:
        step = lambda p, bt: _policy_step(p, bt, spec)
    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, fullgraph=fullgraph)):
        policy.zero_grad()
        loss = fn(policy, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and any("lm_head" in n for n in g0)
    for n in g0:  # inductor fuses the decoder's ops differently: float32 rounding of the forward
        assert float((g1[n] - g0[n]).norm()) <= 1e-4 * max(float(g0[n].norm()), 1e-6), n


def test_training_loop_compile_equals_eager(tmp_path):
    """`drdo train --compile` (the step compiled by inductor) trains as eager: per-step losses and
    the final weights."""
    from safetensors.torch import load_file
    from test_train import cfg, make_rows, write_rows

    from drdo.training.loop import train

    data = write_rows(tmp_path / "pairs.jsonl", make_rows(8))
    runs = {}
    for name, compile_step in (("eager", False), ("compiled", True)):
        torch._dynamo.reset()
        out = tmp_path / name
        train(cfg(data, out, compile=compile_step, backend="auto"))
        losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
        runs[name] = (losses, load_file(str(out / "model.safetensors")))
    (l0, w0), (l1, w1) = runs["eager"], runs["compiled"]
    assert l1 == pytest.approx(l0, rel=1e-5) and len(l0) == 2
    assert w0.keys() == w1.keys()
    assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) < 1e-5


def test_drdo_trainer_torch_compile_equals_eager(tmp_path):
    """DRDOTrainer with TRL's torch_compile=True: two steps, the same losses and weights as eager."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from test_step_gradients import long_rows

    from drdo.integrations.trl import DRDOConfig, DRDOTrainer
    from drdo.models import build_tiny_causal_lm
    from drdo.tokenizer import get_tokenizer

    results = {}
    for compile_model in (False, True):
        torch._dynamo.reset()
        args = DRDOConfig(output_dir=str(tmp_path / f"out{compile_model}"), per_device_train_batch_size=4,
                          max_steps=2, report_to="none", use_cpu=True, seed=0, max_length=96, bf16=False,
                          logging_steps=1, save_strategy="no", torch_compile=compile_model, learning_rate=0.1,
                          optim="sgd")  # SGD: an update proportional to the gradient (Adam amplifies rounding)
        trainer = DRDOTrainer(model=build_tiny_causal_lm(seed=0), args=args,
                              train_dataset=Dataset.from_list(long_rows(8)), processing_class=get_tokenizer("tiny"))
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        weights = {n: p.detach().clone() for n, p in trainer._base_model().named_parameters()}
        results[compile_model] = (losses, weights)
    (l0, w0), (l1, w1) = results[False], results[True]
    assert len(l0) == 2 and l1 == pytest.approx(l0, rel=1e-5)
    assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) < 1e-5
