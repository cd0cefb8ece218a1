"""Triton log-prob kernels (TRITON_INTERPRET=1) at the edges: extreme biases, gradient
filtering, 16-bit hidden with an fp32 weight, TF32, and which gradients are computed.

Every check is against an independent float64 computation, with the error of the
same-dtype PyTorch path (or an explicit analytic bound) as the yardstick.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from drdo_kernels import fused_linear_logprobs, logprobs_triton

pytestmark = pytest.mark.triton
RATIO = 3.0


def _inputs(n, n_hidden, n_vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, n_hidden, generator=gen, dtype=torch.float64)
    weight = torch.randn(n_vocab, n_hidden, generator=gen, dtype=torch.float64) * 2 / n_hidden**0.5
    bias = torch.randn(n_vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, n_vocab, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden, weight, bias, labels, upstream


def _naive(h, w, b, labels):
    """log_softmax(h @ w.T + b)[labels] with the log-softmax in fp32 (float64 for float64 inputs)."""
    logits = F.linear(h, w, b)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)


def _grads(fn, tensors, upstream, dtypes):
    """[logp, *grads] as float64 after backward of sum(upstream * fn(*leaves)); dtypes per tensor."""
    leaves = [t.detach().clone().to(dt).requires_grad_() for t, dt in zip(tensors, dtypes)]
    out = fn(*leaves)
    (out * upstream.to(out.dtype)).sum().backward()
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def _triton(labels, **kw):
    return lambda h, w, b: fused_linear_logprobs(w, h, labels, bias=b, backend="triton", **kw)


def _assert_close_as_naive(fused, naive, ref, what):
    for name, f, n, r in zip(["logp", "d_hidden", "d_weight", "d_bias"], fused, naive, ref):
        assert bool(torch.isfinite(f).all()), f"{what} {name}: non-finite values"
        e_f, e_n = (f - r).abs().max().item(), (n - r).abs().max().item()
        assert e_f <= RATIO * e_n + 1e-6 * (1.0 + r.abs().max().item()), f"{what} {name}: {e_f:.3e} vs naive {e_n:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_bias_with_padded_rows_gives_finite_gradients(dtype):
    """bias[7] = 100: padded rows of a row block must not turn exp(bias - lse) into inf * 0."""
    hidden, weight, bias, labels, upstream = _inputs(4, 24, 200)
    bias[7] = 100.0
    tensors = [t.to(dtype).double() for t in (hidden, weight, bias)]
    ref = _grads(lambda h, w, b: _naive(h, w, b, labels), tensors, upstream, [torch.float64] * 3)
    naive = _grads(lambda h, w, b: _naive(h, w, b, labels), tensors, upstream, [dtype] * 3)
    fused = _grads(_triton(labels), tensors, upstream, [dtype] * 3)
    _assert_close_as_naive(fused, naive, ref, f"bias=100 {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_minus_inf_bias_on_whole_vocab_tiles(dtype):
    """-inf bias on the first 128 and the last 70 of V = 300 columns: whole tiles (and the first
    tile of a split) are -inf; the online log-sum-exp must skip them, not produce NaN."""
    hidden, weight, bias, labels, upstream = _inputs(9, 16, 300, seed=1)
    bias[:128] = float("-inf")
    bias[230:] = float("-inf")
    labels = 128 + labels % 102  # targets among the finite columns
    tensors = [t.to(dtype).double() for t in (hidden, weight, bias)]
    ref = _grads(lambda h, w, b: _naive(h, w, b, labels), tensors, upstream, [torch.float64] * 3)
    naive = _grads(lambda h, w, b: _naive(h, w, b, labels), tensors, upstream, [dtype] * 3)
    fused = _grads(_triton(labels), tensors, upstream, [dtype] * 3)
    assert bool((fused[3][:128] == 0).all()) and bool((fused[3][230:] == 0).all())
    _assert_close_as_naive(fused, naive, ref, f"-inf bias {dtype}")


def _peaked(n=20, n_hidden=16, n_vocab=1000, seed=2):
    """A distribution concentrated on columns 0..7 (bias +12): the other tiles hold only
    probabilities below 2**-12 unless a row's label falls there (rows 0 and 1)."""
    hidden, weight, bias, labels, upstream = _inputs(n, n_hidden, n_vocab, seed)
    bias[:8] += 12.0
    labels = labels % 8
    labels[0], labels[1] = 500, 901
    return hidden, weight * 0.5, bias, labels, upstream


def _skip_bounds(hidden, weight, bias, labels, upstream, eps):
    """Elementwise bounds (float64) on what skipping every entry with e = |p - onehot| < eps can
    change: d_hidden: (|g| e [e < eps]) @ |W|, d_weight: (|g| e [e < eps])^T @ |h|."""
    p = torch.softmax(F.linear(hidden, weight, bias), -1)
    e = (p - F.one_hot(labels, weight.shape[0]).double()).abs()
    small = upstream.abs()[:, None] * e * (e < eps)
    return small @ weight.abs(), small.T @ hidden.abs()


def test_gradient_filter_error_is_bounded_fp32():
    """filter_eps = 2**-12 on fp32: the change against filter_eps = 0 is within the analytic bound
    of the skipped probabilities, and it is not zero (tiles were skipped)."""
    eps = 2.0**-12
    hidden, weight, bias, labels, upstream = _peaked()
    tensors = [hidden, weight, bias]
    exact = _grads(_triton(labels, filter_eps=0.0), tensors, upstream, [torch.float32] * 3)
    filtered = _grads(_triton(labels, filter_eps=eps), tensors, upstream, [torch.float32] * 3)
    ref = _grads(lambda h, w, b: _naive(h, w, b, labels), tensors, upstream, [torch.float64] * 3)
    bound_dh, bound_dw = _skip_bounds(hidden.float().double(), weight.float().double(), bias.float().double(),
                                      labels, upstream, eps)
    for got, want, bound in ((filtered[1], exact[1], bound_dh), (filtered[2], exact[2], bound_dw)):
        assert bool(((got - want).abs() <= bound + 1e-6).all())
    assert max((filtered[i] - exact[i]).abs().max().item() for i in (1, 2)) > 0, "no tile was skipped"
    torch.testing.assert_close(filtered[3], ref[3], rtol=0, atol=1e-5)  # d_bias is never filtered
    for got, r, bound in ((filtered[1], ref[1], bound_dh), (filtered[2], ref[2], bound_dw)):
        assert (got - r).abs().max().item() <= bound.max().item() + 1e-5


def test_gradient_filter_default_bf16_within_bound():
    """bf16 with the default filter_eps (2**-12) against float64: the same-dtype PyTorch error plus
    the skip bound."""
    eps = logprobs_triton.default_filter_eps(torch.bfloat16)
    assert eps == 2.0**-12 and logprobs_triton.default_filter_eps(torch.float16) == 2.0**-15
    assert logprobs_triton.default_filter_eps(torch.float32) == 0.0
    hidden, weight, bias, labels, upstream = _peaked(seed=3)
    tensors = [t.bfloat16().double() for t in (hidden, weight, bias)]
    fused = _grads(_triton(labels), tensors, upstream, [torch.bfloat16] * 3)
    naive = _grads(lambda h, w, b: _naive(h, w, b, labels), tensors, upstream, [torch.bfloat16] * 3)
    ref = _grads(lambda h, w, b: _naive(h, w, b, labels), tensors, upstream, [torch.float64] * 3)
    bound_dh, bound_dw = _skip_bounds(*tensors, labels, upstream, eps)
    for i, bound in ((1, bound_dh), (2, bound_dw)):
        e_f, e_n = (fused[i] - ref[i]).abs().max().item(), (naive[i] - ref[i]).abs().max().item()
        assert e_f <= RATIO * e_n + bound.max().item() + 1e-6


def test_gradient_filter_above_one_skips_every_dot():
    """|softmax - onehot| <= 1 everywhere, so filter_eps = 1.5 skips every tile's gradient dots:
    d_hidden and d_weight are exactly zero while d_bias (never filtered) stays right."""
    hidden, weight, bias, labels, upstream = _inputs(7, 12, 150)
    out = _grads(_triton(labels, filter_eps=1.5), [hidden, weight, bias], upstream, [torch.float32] * 3)
    ref = _grads(lambda h, w, b: _naive(h, w, b, labels), [hidden.float().double(), weight.float().double(),
                                                            bias.float().double()], upstream, [torch.float64] * 3)
    assert bool((out[1] == 0).all()) and bool((out[2] == 0).all())
    torch.testing.assert_close(out[3], ref[3], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="filter_eps"):
        fused_linear_logprobs(weight.float(), hidden.float(), labels, backend="triton", filter_eps=-1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_hidden_with_fp32_weight_computes_in_16bit(dtype):
    """Autocast's rule: the fp32 weight is cast to the 16-bit dtype for the dots; log-probs are fp32,
    d_hidden has hidden's dtype, d_weight and d_bias stay fp32; errors as CPU autocast's."""
    hidden, weight, bias, labels, upstream = _inputs(13, 40, 300, seed=4)
    tensors = [hidden.to(dtype).double(), weight.float().double(), bias.float().double()]
    dtypes = [dtype, torch.float32, torch.float32]
    leaves = [t.detach().clone().to(dt).requires_grad_() for t, dt in zip(tensors, dtypes)]
    out = fused_linear_logprobs(leaves[1], leaves[0], labels, bias=leaves[2], backend="triton", filter_eps=0.0)
    (out * upstream.float()).sum().backward()
    assert out.dtype == torch.float32 and leaves[0].grad.dtype == dtype
    assert leaves[1].grad.dtype == torch.float32 and leaves[2].grad.dtype == torch.float32
    fused = [out.detach().double()] + [t.grad.double() for t in leaves]

    def autocast_naive(h, w, b):
        with torch.autocast("cpu", dtype=dtype):
            logits = F.linear(h, w, b)
        return torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)

    naive = _grads(autocast_naive, tensors, upstream, dtypes)
    ref = _grads(lambda h, w, b: _naive(h, w, b, labels), tensors, upstream, [torch.float64] * 3)
    # the weight's own bf16 rounding sets the log-prob error here, as under autocast
    _assert_close_as_naive(fused, naive, ref, f"{dtype} hidden + fp32 weight")


@pytest.fixture
def tf32_precision():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


def test_fp32_precision_follows_torch(tf32_precision):
    """fp32 uses TF32 dots when PyTorch allows TF32 matmuls, exact fp32 products otherwise;
    16-bit dtypes always use their tensor-core dots."""
    assert logprobs_triton.dot_precision(torch.float32) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert logprobs_triton.dot_precision(torch.float32) == ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
    assert logprobs_triton.dot_precision(torch.bfloat16) == "tf32"


def test_fp32_tf32_accuracy(tf32_precision):
    """fp32 with TF32 allowed: within RATIO x the error of the fp16 PyTorch path (TF32 keeps fp16's
    10-bit mantissa); outputs and gradients keep their fp32 dtypes."""
    hidden, weight, bias, labels, upstream = _inputs(11, 40, 260, seed=5)
    tensors = [hidden.float().double(), weight.float().double(), bias.float().double()]
    fused = _grads(_triton(labels), tensors, upstream, [torch.float32] * 3)
    half = [t.half().double() for t in tensors]
    naive16 = _grads(lambda h, w, b: _naive(h, w, b, labels), half, upstream, [torch.float16] * 3)
    ref = _grads(lambda h, w, b: _naive(h, w, b, labels), tensors, upstream, [torch.float64] * 3)
    _assert_close_as_naive(fused, naive16, ref, "fp32 tf32")


def test_only_needed_gradients_are_computed():
    """hidden frozen: no d_hidden; weight and bias gradients still right."""
    hidden, weight, bias, labels, upstream = _inputs(10, 20, 90, seed=6)
    h = hidden.float()
    w, b = weight.float().requires_grad_(), bias.float().requires_grad_()
    out = fused_linear_logprobs(w, h, labels, bias=b, backend="triton")
    (out * upstream.float()).sum().backward()
    w64, b64 = weight.float().double().requires_grad_(), bias.float().double().requires_grad_()
    (_naive(h.double(), w64, b64, labels) * upstream).sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=0, atol=1e-5)
    d_h, d_w, d_b = logprobs_triton.logprobs_backward(
        upstream.float(), h, w.detach(), b.detach(), labels, torch.logsumexp(F.linear(h, w.detach(), b.detach()), -1),
        False, need_hidden_grad=False, need_bias_grad=True)
    assert d_h is None and d_w is None and d_b is not None


def test_grouped_program_order_is_a_permutation():
    """Every (row block, column) pair is visited exactly once by the grouped order."""
    import triton

    def grouped(pid, num_m, num_n, group_m):  # the formula of _grouped_pid, in Python
        width = group_m * num_n
        first = (pid // width) * group_m
        size = min(num_m - first, group_m)
        return first + (pid % width) % size, (pid % width) // size

    for num_m, num_n, group_m in ((1, 5, 8), (13, 7, 8), (17, 3, 4), (8, 8, 8)):
        seen = {grouped(pid, num_m, num_n, group_m) for pid in range(num_m * num_n)}
        assert seen == {(m, n) for m in range(num_m) for n in range(num_n)}
    assert triton.cdiv(10, 3) == 4


_ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA GPU with TRITON_INTERPRET unset")
def test_cuda_launch_path_never_synchronises():
    hidden, weight, bias, labels, upstream = (t.cuda() for t in _inputs(300, 256, 5000, seed=7))
    h, w, b = hidden.bfloat16(), weight.bfloat16(), bias.float()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logp, lse = logprobs_triton.logprobs_forward(h, w, b, labels)
        logprobs_triton.logprobs_backward(upstream.float(), h, w, b, labels, lse)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(logp).all())
