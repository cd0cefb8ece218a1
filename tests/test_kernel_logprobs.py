"""fused_linear_logprobs (every backend; Triton kernels under TRITON_INTERPRET=1) vs float64.

Bound in the style of Cut Cross-Entropy's tests: on the same rounded inputs, the error of
each backend against the float64 reference must be at most RATIO x the error of the plain
same-dtype PyTorch computation (logits in the input dtype, log-softmax in fp32, autograd)
plus a tiny epsilon; log-probs must moreover be fp32-accurate for every input dtype
(fp32 accumulation). Values and gradients (hidden, weight, bias) under a non-uniform
upstream gradient.
"""

import pytest
import torch
import torch.nn.functional as F

from drdo_kernels import fused_linear_logprobs, logprobs_triton
from drdo_kernels.logprobs import resolve_backend
from drdo_kernels.triton_runtime import triton_interpreting

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RATIO = 3.0
IGNORE = -100


def _inputs(shape, n_hidden, n_vocab, dtype, bias, ignored, seed=0):
    """hidden [*shape, H], weight [V, H], bias [V] | None (dtype), labels [*shape] with ignored tokens."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, n_hidden, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(n_vocab, n_hidden, generator=gen, dtype=torch.float64) * 2 / n_hidden**0.5).to(dtype)
    b = torch.randn(n_vocab, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    labels = torch.randint(0, n_vocab, shape, generator=gen)
    if ignored == "half":
        labels[torch.rand(shape, generator=gen) < 0.5] = IGNORE
    elif ignored == "row":  # one fully ignored sequence plus prompt tokens elsewhere
        labels[0] = IGNORE
        labels[..., :2] = IGNORE
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    return hidden, weight, b, labels, upstream


def _reference(hidden, weight, bias, labels):
    """Full-logits log_softmax gather on the given inputs (float64 when they are)."""
    logits = F.linear(hidden, weight, bias)
    logp = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    valid = labels != IGNORE
    return logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid


def _run(fn, hidden, weight, bias, labels, upstream, dtype):
    """[logp, d_hidden, d_weight, (d_bias)] as float64 after backward of sum(upstream * logp)."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fn(leaves[0], leaves[1], leaves[2], labels)
    (out * upstream.to(out.dtype)).sum().backward()
    return [out.detach().double()] + [t.grad.double() for t in leaves if t is not None]


def _errors(results, ref):
    return [(r - e).abs().max().item() for r, e in zip(results, ref)]


def _check_against_naive(backend, shape, n_hidden, n_vocab, dtype, bias, ignored, chunk_tokens=None):
    hidden, weight, b, labels, upstream = _inputs(shape, n_hidden, n_vocab, dtype, bias, ignored)
    ref = _run(_reference, hidden, weight, b, labels, upstream, torch.float64)
    naive = _run(_reference, hidden, weight, b, labels, upstream, dtype)
    fused = _run(lambda h, w, bb, lab: fused_linear_logprobs(w, h, lab, bias=bb, backend=backend,
                                                             chunk_tokens=chunk_tokens),
                 hidden, weight, b, labels, upstream, dtype)
    assert fused[0].dtype == torch.float64 and fused[0].shape == labels.shape
    assert bool((fused[0] <= 0).all())
    assert bool((fused[0][labels == IGNORE] == 0).all())
    # fp32 logits accumulation: log-probs are fp32-accurate whatever the input dtype
    logp_err = (fused[0] - ref[0]).abs().max().item()
    assert logp_err <= 2e-5 * (1.0 + ref[0].abs().max().item()), f"{backend} {dtype} logp err {logp_err:.3e}"
    names = ["logp", "d_hidden", "d_weight", "d_bias"]
    for name, e_fused, e_naive, r in zip(names, _errors(fused, ref), _errors(naive, ref), ref):
        eps = 1e-6 * (1.0 + r.abs().max().item())
        assert e_fused <= RATIO * e_naive + eps, f"{backend} {dtype} {name}: err {e_fused:.3e} vs naive {e_naive:.3e}"
    return fused, ref


@pytest.mark.triton
@pytest.mark.parametrize("ignored", ["none", "half", "row"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference(dtype, bias, ignored):
    _check_against_naive("triton", (3, 8), 40, 300, dtype, bias, ignored)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_odd_shape(dtype):
    _check_against_naive("triton", (37,), 33, 257, dtype, True, "half")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_single_token_h96(dtype):
    _check_against_naive("triton", (1,), 96, 129, dtype, False, "none")


@pytest.mark.triton
def test_triton_single_vocab_split(monkeypatch):
    """All vocab tiles looped inside one program (TILES_PER_SPLIT > 1)."""
    monkeypatch.setattr(logprobs_triton, "_target_programs", lambda device: 1)
    fwd = logprobs_triton.CONFIGS[torch.float32][0]
    n_tiles = -(-300 // fwd.block_n)
    assert n_tiles > 1 and logprobs_triton._vocab_splits(20, 300, fwd, torch.device("cpu")) == (1, n_tiles)
    _check_against_naive("triton", (20,), 40, 300, torch.float32, True, "half")


@pytest.mark.parametrize("ignored", ["half", "row"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_chunked_backends_match_reference(backend, dtype, bias, ignored):
    """Several chunks (5 tokens each: chunk boundaries inside sequences) and one chunk."""
    _check_against_naive(backend, (3, 8), 40, 300, dtype, bias, ignored, chunk_tokens=5)
    _check_against_naive(backend, (37,), 33, 257, dtype, bias, ignored, chunk_tokens=5)
    _check_against_naive(backend, (37,), 33, 257, dtype, bias, ignored)


def test_torch_backend_gpt2_vocab_single_token():
    """V = 50257, H = 96, N = 1 (odd sizes; the interpreter is too slow for this V with Triton)."""
    _check_against_naive("torch", (1,), 96, 50257, torch.bfloat16, True, "none")


def test_torch_backend_chunking_is_invisible():
    hidden, weight, b, labels, _ = _inputs((30,), 16, 50, torch.float32, True, "half")
    whole = fused_linear_logprobs(weight, hidden, labels, bias=b, backend="torch", chunk_tokens=1000)
    for chunk in (1, 7):
        torch.testing.assert_close(fused_linear_logprobs(weight, hidden, labels, bias=b, backend="torch",
                                                         chunk_tokens=chunk), whole, rtol=0, atol=1e-6)


def test_torch_backend_gradcheck_float64():
    hidden, weight, b, labels, _ = _inputs((6,), 5, 11, torch.float64, True, "half")
    args = tuple(t.clone().requires_grad_() for t in (hidden, weight, b))
    fn = lambda h, w, bb: fused_linear_logprobs(w, h, labels, bias=bb, backend="torch", chunk_tokens=2)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend", ["triton", "chunked", "torch"])
def test_logprobs_never_positive(backend):
    """A near-certain token: exact log-prob ~ -1e-30, rounding must not make it positive."""
    weight = torch.eye(16, 16) * 60.0
    hidden = torch.eye(16)[:8] + 1e-3
    labels = torch.arange(8)
    logp = fused_linear_logprobs(weight, hidden, labels, backend=backend)
    assert bool((logp <= 0).all()) and float(logp.min()) > -1e-6


@pytest.mark.parametrize("backend", ["triton", "chunked", "torch"])
@pytest.mark.parametrize("n_tokens", [0, 5])
def test_empty_and_all_ignored_give_zeros(backend, n_tokens):
    hidden = torch.randn(n_tokens, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    bias = torch.randn(20, requires_grad=True)
    labels = torch.full((n_tokens,), IGNORE)
    logp = fused_linear_logprobs(weight, hidden, labels, bias=bias, backend=backend)
    assert logp.shape == (n_tokens,) and logp.dtype == torch.float32 and bool((logp == 0).all())
    logp.sum().backward()
    for t in (hidden, weight, bias):
        assert t.grad is not None and bool((t.grad == 0).all())


@pytest.mark.triton
def test_frozen_weight_triton():
    """weight without grad: d_hidden still right, no weight gradient computed."""
    hidden, weight, _, labels, upstream = _inputs((12,), 24, 70, torch.float32, False, "half")
    h = hidden.clone().requires_grad_()
    out = fused_linear_logprobs(weight, h, labels, backend="triton")
    (out * upstream.float()).sum().backward()
    h64 = hidden.double().requires_grad_()
    (_reference(h64, weight.double(), None, labels) * upstream).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=0, atol=1e-5)


def test_mixed_dtypes_run_in_hidden_dtype():
    """bf16 hidden with an fp32 weight (autocast training): the GEMMs see the weight cast to
    bf16, as autocast does; the weight gradient comes back in fp32."""
    hidden, weight, _, labels, _ = _inputs((10,), 16, 40, torch.float32, False, "none")
    w = weight.clone().requires_grad_()
    out = fused_linear_logprobs(w, hidden.bfloat16(), labels, backend="torch")
    ref = _reference(hidden.bfloat16().double(), weight.bfloat16().double(), None, labels)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    out.sum().backward()
    assert w.grad.dtype == torch.float32


def test_bad_inputs_raise(monkeypatch):
    hidden, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, IGNORE])
    with pytest.raises(ValueError, match="backend"):
        fused_linear_logprobs(weight, hidden, labels, backend="cuda")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        fused_linear_logprobs(weight, hidden, torch.tensor([1, 2, 10, 0]), backend="torch")
    with pytest.raises(ValueError, match="disagree on H"):
        fused_linear_logprobs(torch.randn(10, 7), hidden, labels)
    with pytest.raises(ValueError, match="labels shape"):
        fused_linear_logprobs(weight, hidden, labels[:3])
    with pytest.raises(TypeError, match="integer"):
        fused_linear_logprobs(weight, hidden, labels.float())
    with pytest.raises(ValueError, match="bias shape"):
        fused_linear_logprobs(weight, hidden, labels, bias=torch.randn(9))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_linear_logprobs(weight, hidden, labels, backend="triton")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.triton
@pytest.mark.triton
def test_triton_refuses_float64():
    hidden, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, IGNORE])
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        fused_linear_logprobs(weight.double(), hidden.double(), labels, backend="triton")


_ON_GPU = torch.cuda.is_available() and not triton_interpreting()


@pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA GPU with TRITON_INTERPRET unset")
@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernels_match_reference(dtype, bias, backend):
    """Compiled kernels on a GPU, larger odd shape (several K steps, splits and row blocks;
    several chunks for the chunked backend)."""
    hidden, weight, b, labels, upstream = _inputs((3, 171), 264, 5003, dtype, bias, "half")
    cuda = [t.cuda() if t is not None else None for t in (hidden, weight, b, labels, upstream)]
    hidden, weight, b, labels, upstream = cuda
    ref = _run(_reference, hidden, weight, b, labels, upstream, torch.float64)
    naive = _run(_reference, hidden, weight, b, labels, upstream, dtype)
    fused = _run(lambda h, w, bb, lab: fused_linear_logprobs(w, h, lab, bias=bb, backend=backend, chunk_tokens=100),
                 hidden, weight, b, labels, upstream, dtype)
    assert bool((fused[0] <= 0).all())
    for e_fused, e_naive, r in zip(_errors(fused, ref), _errors(naive, ref), ref):
        assert e_fused <= RATIO * e_naive + 1e-6 * (1.0 + r.abs().max().item())
