"""``fused_linear_logprobs(..., return_entropy=True)``: the per-token entropy of the transformed
distribution, and the gradients through it, on every backend, against float64 formulas written here.

Generated calls (odd sizes, chunks of a few tokens, ignored tokens, a bias or none, every logit
transform, float32 / bfloat16 / float16 / float64) compare the log-probs, the entropy and the
gradient of hidden, weight and bias under random upstream gradients on BOTH outputs with the
float64 definition H = LSE - sum_v p_v l_v. Tolerances follow the gradient harness
(``tests/test_gradients.py``): an error is measured against the size of what was summed (a
"magnitude" run propagating |d loss / d logits| through |W| and |hidden|; for the per-token
values, 1 + max_v |l_v|), and must be within RATIO times the error of the yardsticks (the plain
PyTorch path in the call's dtype, and float64 with the logits' gradient rounded to it) or within
the dtype's FLOOR, never above CAP.

Run as a script under ``torch.distributed.run`` this file is the worker of the vocabulary-parallel
check (:func:`test_vocabulary_parallel_entropy`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import gradient_reference as reference
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import drdo_kernels as dk
from drdo_kernels.triton_runtime import triton_interpreting

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu")
IGNORED = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
TRANSFORMS = {"none": {}, "temperature": dict(temperature=0.7),
              "softcap": dict(softcap=3.0, logit_scale=2.0, temperature=0.8)}
RATIO = 4.0
FLOOR = {"fp32": 1e-5, "bf16": 2.0**-7, "fp16": 2.0**-10, "fp64": 1e-10}
CAP = 0.1
#: "backend dtype" -> the largest relative error of the entropy seen in this run (printed at the end with -s).
WORST: dict[str, float] = {}


@dataclasses.dataclass(frozen=True)
class Call:
    """One generated call: labels [rows, positions] over a vocabulary of ``n_vocab``, a fraction
    ``ignored`` of them ignore_index, logits of standard deviation about ``spread``."""

    n_rows: int
    n_pos: int
    n_hidden: int
    n_vocab: int
    ignored: float
    bias: bool
    transform: str
    dtype: str
    chunk_tokens: int | None
    spread: float
    seed: int


@st.composite
def calls(draw, dtypes=tuple(DTYPES)) -> Call:
    return Call(n_rows=draw(st.integers(1, 4)), n_pos=draw(st.integers(1, 7)), n_hidden=draw(st.integers(1, 24)),
                n_vocab=draw(st.integers(2, 300)), ignored=draw(st.sampled_from([0.0, 0.3, 1.0])),
                bias=draw(st.booleans()), transform=draw(st.sampled_from(list(TRANSFORMS))),
                dtype=draw(st.sampled_from(dtypes)), chunk_tokens=draw(st.sampled_from([1, 2, 3, 7, None])),
                spread=draw(st.sampled_from([0.3, 1.0, 4.0])), seed=draw(st.integers(0, 2**31 - 1)))


def inputs(call: Call) -> dict:
    """float64 tensors, the LM head's already rounded to the call's dtype (every path sees the same values)."""
    gen = torch.Generator().manual_seed(call.seed)
    dtype = DTYPES[call.dtype]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    labels = torch.randint(0, call.n_vocab, (call.n_rows, call.n_pos), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < call.ignored] = IGNORED
    return dict(labels=labels,
                weight=(randn(call.n_vocab, call.n_hidden) * call.spread / math.sqrt(call.n_hidden)).to(dtype).double(),
                hidden=randn(call.n_rows, call.n_pos, call.n_hidden).to(dtype).double(),
                bias=randn(call.n_vocab).to(dtype).double() if call.bias else None,
                up_logp=randn(call.n_rows, call.n_pos), up_entropy=randn(call.n_rows, call.n_pos))


# ------------------------------------------------------------------------------------ the formulas


def logp_and_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, T] log p[label] and the entropy (0 where ignored), in logits' dtype, differentiable: the
    formulas of tests/gradient_reference.py."""
    return reference.token_logprobs(logits, labels), reference.token_entropy(logits, labels)


# ------------------------------------------------------------------------------------ the paths


def _leaves(data: dict, dtype: torch.dtype, device) -> dict:
    return {k: None if data[k] is None else data[k].to(device=device, dtype=dtype, copy=True).requires_grad_()
            for k in ("hidden", "weight", "bias")}


def evaluate(call: Call, data: dict, mode: str, backend: str = "torch") -> dict:
    """{"logp", "entropy", "hidden", "weight", "bias"} of one path, float64 on the CPU. mode:
    "fused" (``backend``, the call's dtype), "reference" (float64 formulas), "plain" (the formulas
    on logits in the call's dtype, float32 at least), "rounded" (float64, the logits' gradient
    rounded to the call's dtype), "magnitude" (|d loss / d logits| through |W| and |hidden|)."""
    dtype = DTYPES[call.dtype]
    kw = TRANSFORMS[call.transform]
    labels = data["labels"]
    leaves = _leaves(data, dtype if mode in ("fused", "plain") else torch.float64,
                     DEVICE if mode == "fused" else "cpu")
    h, w, b = leaves["hidden"], leaves["weight"], leaves["bias"]
    if mode == "fused":
        logp, entropy = dk.fused_linear_logprobs(w, h, labels.to(DEVICE), b, backend=backend,
                                                 chunk_tokens=call.chunk_tokens, return_entropy=True, **kw)
        assert logp.dtype == entropy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    else:
        x = F.linear(h, w, b)
        if mode == "plain" and x.dtype != torch.float64:
            x = x.float()
        if mode == "magnitude":
            size = F.linear(h.abs(), w.abs(), b)
            x = x.detach() + (size - size.detach())
        if mode in ("rounded", "magnitude"):
            x.register_hook((lambda g: g.to(dtype).to(g.dtype)) if mode == "rounded" else torch.abs)
        logp, entropy = logp_and_entropy(reference.transform_logits(x, **kw), labels)
    up_logp, up_entropy = data["up_logp"].to(logp), data["up_entropy"].to(logp)
    ((logp * up_logp).sum() + (entropy * up_entropy).sum()).backward()
    out = dict(logp=logp.detach().cpu().double(), entropy=entropy.detach().cpu().double())
    for name, leaf in leaves.items():
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype, name
            out[name] = leaf.grad.cpu().double()
    return out


def value_sizes(call: Call, data: dict) -> torch.Tensor:
    """[R, T] 1 + max_v |l_v|: the size of the terms a per-token log-prob or entropy sums."""
    x = F.linear(data["hidden"], data["weight"], data["bias"])
    return 1.0 + reference.transform_logits(x, **TRANSFORMS[call.transform]).abs().amax(-1)


def value_error(got: torch.Tensor, want: torch.Tensor, size: torch.Tensor) -> float:
    return float(((got - want).abs() / size).max()) if got.numel() else 0.0


def grad_error(got: torch.Tensor, want: torch.Tensor, size: torch.Tensor) -> float:
    """The harness's measure: 2-norm of the error relative to the larger of the result and the
    magnitude of what it sums."""
    scale = max(float(want.norm()), float(size.norm()))
    return float((got - want).norm()) / scale if scale > 0 else float(got.norm())


def check_call(call: Call, backend: str) -> dict:
    """Every output and gradient of ``backend`` within tolerance; returns {name: relative error}."""
    data = inputs(call)
    fused = evaluate(call, data, "fused", backend)
    ref, plain, rounded, magnitude = (evaluate(call, data, mode) for mode in ("reference", "plain", "rounded",
                                                                            "magnitude"))
    scored = data["labels"] != IGNORED
    assert (fused["logp"][~scored] == 0).all() and (fused["entropy"][~scored] == 0).all()
    assert (fused["entropy"] >= -1e-6).all()
    errors = {}
    sizes = value_sizes(call, data)
    for name in ("logp", "entropy"):
        err, err_plain = (value_error(r[name], ref[name], sizes) for r in (fused, plain))
        errors[name] = err
        tol = min(max(RATIO * err_plain, FLOOR[call.dtype]), CAP)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.3e} (plain {err_plain:.3e})\n{call}"
    for name in ("hidden", "weight", "bias"):
        if name not in ref:
            continue
        want = ref[name]
        if grad_error(want.to(DTYPES[call.dtype]).double(), want, magnitude[name]) > CAP:  # the dtype cannot hold it
            want = want.to(DTYPES[call.dtype]).double()
        err = grad_error(fused[name], want, magnitude[name])
        err_plain = max(grad_error(y[name], want, magnitude[name]) for y in (plain, rounded))
        errors[name] = err
        tol = min(max(RATIO * err_plain, FLOOR[call.dtype]), CAP)
        assert err <= tol, f"d_{name}: relative error {err:.3e} > {tol:.3e} (yardstick {err_plain:.3e})\n{call}"
    key = f"{backend} {call.dtype}"
    WORST[key] = max(WORST.get(key, 0.0), errors["entropy"])
    return errors


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    if WORST:
        print("\nlargest entropy error (relative to 1 + max|l|) per backend and dtype: "
              + ", ".join(f"{k} {v:.2e}" for k, v in sorted(WORST.items())))


SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("backend", ["torch", "chunked"])
@settings(max_examples=60, **SETTINGS)
@given(call=calls())
def test_chunked_backends_match_float64(backend, call):
    """"torch" (the PyTorch fold) and "chunked" (the Triton fold where Triton runs)."""
    check_call(call, backend)


@settings(max_examples=30, **SETTINGS)
@given(call=calls())
def test_reference_backend_matches_float64(call):
    check_call(call, "reference")


@pytest.mark.triton
@settings(max_examples=30, **SETTINGS)
@given(call=calls(dtypes=("fp32", "bf16", "fp16")))
def test_triton_backend_matches_float64(call):
    """The tiled Triton kernels (no float64)."""
    check_call(call, "triton")


# ------------------------------------------------------------------------------------ fixed cases


def _head(n_vocab=50, n_hidden=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_vocab, n_hidden, generator=g, dtype=dtype)
    hidden = torch.randn(3, 5, n_hidden, generator=g, dtype=dtype)
    labels = torch.randint(0, n_vocab, (3, 5), generator=g)
    labels[0, :2] = IGNORED
    return weight, hidden, labels


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton", "reference"])
def test_return_entropy_returns_a_pair_and_the_default_one_tensor(backend):
    weight, hidden, labels = _head()
    logp = dk.fused_linear_logprobs(weight, hidden, labels, backend=backend)
    assert isinstance(logp, torch.Tensor)
    pair = dk.fused_linear_logprobs(weight, hidden, labels, backend=backend, return_entropy=True)
    assert isinstance(pair, tuple) and len(pair) == 2
    got_logp, entropy = pair
    torch.testing.assert_close(got_logp, logp, rtol=0, atol=1e-5)
    assert entropy.shape == labels.shape and entropy.dtype == torch.float32
    assert (entropy[labels == IGNORED] == 0).all()
    scored = entropy[labels != IGNORED]
    assert (scored > 0).all() and (scored <= math.log(weight.shape[0]) + 1e-5).all()


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton", "reference"])
def test_uniform_logits_have_entropy_log_v_and_a_sharp_one_almost_zero(backend):
    """Equal logits (a zero head): H = log V under any transform. One logit 60 above the others: H ~ 0."""
    n_vocab = 37
    weight, hidden, labels = _head(n_vocab)
    _, entropy = dk.fused_linear_logprobs(torch.zeros_like(weight), hidden, labels, backend=backend,
                                          return_entropy=True, softcap=2.0, temperature=0.5)
    torch.testing.assert_close(entropy[labels != IGNORED], torch.full_like(entropy[labels != IGNORED],
                                                                           math.log(n_vocab)), rtol=1e-6, atol=1e-5)
    bias = torch.zeros(n_vocab)
    bias[3] = 60.0
    _, entropy = dk.fused_linear_logprobs(torch.zeros_like(weight), hidden, labels, bias, backend=backend,
                                          return_entropy=True)
    assert entropy[labels != IGNORED].max() < 1e-20


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton", "reference"])
def test_negative_infinite_logits_add_nothing_and_stay_finite(backend):
    """Vocabulary entries with a -inf bias have p = 0: the entropy and every gradient equal those of
    the head without them (no NaN from 0 * -inf), and their weight rows get no gradient."""
    weight, hidden, labels = _head(40, seed=4)
    labels[labels >= 30] = 5  # the labels avoid the masked entries
    bias = torch.randn(40, generator=torch.Generator().manual_seed(1))
    bias[30:] = float("-inf")
    up = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2))

    def run(w, b):
        w, h, b = w.clone().requires_grad_(), hidden.clone().requires_grad_(), b.clone().requires_grad_()
        logp, entropy = dk.fused_linear_logprobs(w, h, labels, b, backend=backend, chunk_tokens=4,
                                                 return_entropy=True, temperature=0.7)  # a softcap bounds -inf
        ((logp * up[0]).sum() + (entropy * up[1]).sum()).backward()
        return entropy, w.grad, h.grad, b.grad

    masked = run(weight, bias)
    kept = run(weight[:30], bias[:30])
    assert all(torch.isfinite(t).all() for t in masked[:3])
    torch.testing.assert_close(masked[0], kept[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(masked[1][:30], kept[1], rtol=0, atol=1e-5)
    assert (masked[1][30:] == 0).all()
    torch.testing.assert_close(masked[2], kept[2], rtol=0, atol=1e-5)
    torch.testing.assert_close(masked[3][:30], kept[3], rtol=0, atol=1e-5)


@pytest.mark.triton
def test_the_gradient_filter_keeps_tiles_that_only_the_entropy_needs():
    """An upstream gradient on the entropy alone (g = 0 on every log-prob): the Triton backward's
    opt-in tile filter must not skip its tiles (the entropy term is tested against filter_eps too)."""
    weight, hidden, labels = _head(300, seed=6)
    up = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    grads = []
    for eps in (0.0, 1e-6):
        w, h = weight.clone().requires_grad_(), hidden.clone().requires_grad_()
        _, entropy = dk.fused_linear_logprobs(w, h, labels, backend="triton", filter_eps=eps, return_entropy=True)
        (entropy * up).sum().backward()
        grads.append((w.grad, h.grad))
    assert grads[0][1].abs().max() > 1e-2
    for exact, filtered in zip(*grads):
        torch.testing.assert_close(filtered, exact, rtol=0, atol=1e-4)


def test_return_entropy_must_be_a_bool():
    weight, hidden, labels = _head()
    with pytest.raises(TypeError, match="return_entropy must be a bool, got 1"):
        dk.fused_linear_logprobs(weight, hidden, labels, return_entropy=1)


def test_aot_dry_run_launches_the_entropy_variants():
    """The ahead-of-time dry run (the launchers themselves, on meta tensors) reaches an entropy and
    a plain variant of every kernel that computes the entropy, so CI compiles both."""
    pytest.importorskip("triton")
    from drdo_kernels import aot

    variants = aot.launched_variants(90, vocab_sizes=(32000,), hidden_sizes=(4096,))
    for kernel in ("logprobs_fwd", "logprobs_bwd", "row_stats", "softmax_grad"):
        flags = {"ENTROPY" in v.summary().split() for v in variants if v.kernel == kernel}
        assert flags == {True, False}, kernel


# ------------------------------------------------------------------------------------ the GRPO example


def _docs_example() -> str:
    text = (ROOT / "docs" / "kernels.md").read_text(encoding="utf-8")
    section = text[text.index("## Per-token log-probs and entropy (`return_entropy`)"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_grpo_example_in_the_docs_runs_as_written_and_is_right():
    """docs/kernels.md's GRPO-style block, run as written; its loss and gradients equal the same
    loss from float64 full logits."""
    scope: dict = {}
    exec(compile(_docs_example(), "docs/kernels.md", "exec"), scope)  # noqa: S102 - the documented example
    hidden, lm_head, ids = scope["hidden"], scope["lm_head"], scope["completion_ids"]
    assert torch.isfinite(scope["loss"]) and hidden.grad is not None and lm_head.weight.grad is not None

    h64 = hidden.detach().double().requires_grad_()
    w64 = lm_head.weight.detach().double().requires_grad_()
    logps, entropy = logp_and_entropy(reference.transform_logits(h64 @ w64.T, temperature=scope["temperature"]), ids)
    ratio = torch.exp(logps - scope["old_logps"].double())
    adv = scope["advantages"].double()[:, None]
    eps = scope["clip_eps"]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv) - scope["entropy_coef"] * entropy
    mask = scope["mask"]
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    assert abs(scope["loss"].item() - loss.item()) < 1e-5
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lm_head.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ vocabulary-parallel


def test_vocabulary_parallel_entropy(tmp_path):
    """Over 2 CPU ranks (gloo): the entropy and every gradient of a vocabulary-sharded head (uneven
    shards, a bias, a softcap) equal one float64 process."""
    out = tmp_path / "errors.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(out.read_text())
    assert len(errors) == 4
    for key, worst in errors.items():
        limit = 1e-12 if "float64" in key else 2e-5
        assert all(err <= limit for err in worst.values()), (key, worst)


def _vocab_parallel_errors() -> dict:
    """On every rank of a gloo group: the worst relative errors of the sharded head's log-probs,
    entropies and gradients against the float64 reference."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for dtype in (torch.float64, torch.float32):
        for n_vocab in (9, 16):
            call = Call(n_rows=3, n_pos=5, n_hidden=8, n_vocab=n_vocab, ignored=0.3, bias=True, transform="softcap",
                        dtype="fp64" if dtype == torch.float64 else "fp32", chunk_tokens=4, spread=3.0, seed=n_vocab)
            data = inputs(call)
            ref = evaluate(call, data, "reference")
            h, w, b = (distribute_tensor(data[k].to(dtype), mesh, [p]).requires_grad_()
                       for k, p in (("hidden", Replicate()), ("weight", Shard(0)), ("bias", Shard(0))))
            logp, entropy = dk.fused_linear_logprobs(w, h, data["labels"], b, chunk_tokens=4, return_entropy=True,
                                                     **TRANSFORMS["softcap"])
            ((logp * data["up_logp"].to(dtype)).sum() + (entropy * data["up_entropy"].to(dtype)).sum()).backward()
            got = dict(logp=logp, entropy=entropy, hidden=h.grad.full_tensor(), weight=w.grad.full_tensor(),
                       bias=b.grad.full_tensor())
            results[f"V={n_vocab}/{dtype}"] = {
                k: float((got[k].double() - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)) for k in got}
    return results


if __name__ == "__main__":  # one rank of test_vocabulary_parallel_entropy (torchrun); rank 0 writes argv[1]
    from gloo_world import run_on_gloo

    errors = run_on_gloo(_vocab_parallel_errors)
    if int(os.environ["RANK"]) == 0:
        pathlib.Path(sys.argv[1]).write_text(json.dumps(errors))
