"""The chunked backend's pieces: the row fold (Triton under TRITON_INTERPRET=1, and torch),
-inf safety, mixed precision, skipped gradients, determinism, one host sync, and the
``backend="auto"`` table. Accuracy of every backend at odd shapes is in
test_kernel_logprobs.py, the losses in test_fused_losses.py."""
import pytest
import torch
import torch.nn.functional as F

import drdo_kernels.logprobs as logprobs_mod
from drdo_kernels import FusedLinearDPOLoss, fused_linear_logprobs, logprobs_chunked, softmax_fold
from drdo_kernels.logprobs import auto_backend
from drdo_kernels.triton_runtime import triton_interpreting

IGNORE = -100
FOLDS = [pytest.param(True, id="triton_fold"), pytest.param(False, id="torch_fold")]


def _rows(n_rows, n_vocab, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, n_vocab, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, n_vocab, (n_rows,), generator=g)
    return x, labels, torch.randn(n_vocab, generator=g, dtype=torch.float64), torch.randn(n_rows, generator=g,
                                                                                           dtype=torch.float64)


def _skip_without_interpreter(use_triton):
    if use_triton and not triton_interpreting():
        pytest.skip("the Triton fold runs on the CPU only under TRITON_INTERPRET=1")


@pytest.mark.parametrize("use_triton", FOLDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fold_matches_float64_over_several_blocks(use_triton, out_dtype):
    """V spans three Triton blocks; the first block of row 0 is all -inf, row 1 is -inf but
    for its label."""
    _skip_without_interpreter(use_triton)
    n_vocab = 2 * softmax_fold.BLOCK + 37
    x, labels, bias, g = _rows(4, n_vocab)
    x[0, : softmax_fold.BLOCK + 5] = float("-inf")
    labels[0] = softmax_fold.BLOCK + 9
    x[1] = float("-inf")
    x[1, labels[1]] = 2.0
    biased = x + bias
    lse_ref = torch.logsumexp(biased, -1)
    tgt_ref = biased.gather(1, labels[:, None]).squeeze(1)
    d_ref = g[:, None] * (F.one_hot(labels, n_vocab) - torch.softmax(biased, -1))

    buf = x.float().contiguous()
    lse, tgt = softmax_fold.row_stats(buf, bias.float(), labels, use_triton)
    torch.testing.assert_close(buf.double(), biased, rtol=1e-6, atol=1e-6)  # bias added in place
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(tgt.double(), tgt_ref, rtol=1e-6, atol=1e-5)
    d = softmax_fold.softmax_grad(buf, labels, lse, g.float(), out_dtype, use_triton)
    assert d.dtype == out_dtype and d.shape == buf.shape and bool(torch.isfinite(d).all())
    if out_dtype == torch.float32:
        assert d.data_ptr() == buf.data_ptr()  # in place
    tol = 1e-6 if out_dtype == torch.float32 else 2.0**-8
    assert (d.double() - d_ref).abs().max().item() <= tol * (1 + d_ref.abs().max().item())


def _logprobs_run(backend, hidden, weight, bias, labels, upstream, chunk_tokens=None):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fused_linear_logprobs(leaves[1], leaves[0], labels, bias=leaves[2], backend=backend,
                                chunk_tokens=chunk_tokens)
    (out * upstream.to(out.dtype)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_minus_inf_bias_blocks_are_finite_and_exact(backend):
    """A -inf bias over a whole vocab block (whole chunks of -inf logits), and over every
    column but the labels: results are finite and equal float64's."""
    n_vocab, n_hidden = 2 * softmax_fold.BLOCK + 37, 8
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, n_hidden, generator=g)
    weight = torch.randn(n_vocab, n_hidden, generator=g) * 0.3
    labels = torch.randint(softmax_fold.BLOCK + 1, n_vocab, (9,), generator=g)
    labels[4] = IGNORE
    upstream = torch.randn(9, generator=g)
    block_bias = torch.zeros(n_vocab)
    block_bias[: softmax_fold.BLOCK + 1] = float("-inf")
    only_labels = torch.full((n_vocab,), float("-inf"))
    only_labels[labels[labels != IGNORE]] = 0.0
    for bias in (block_bias, only_labels):
        ref = _logprobs_run("torch", hidden.double(), weight.double(), bias.double(), labels, upstream.double())
        for chunk_tokens in (None, 2):
            got = _logprobs_run(backend, hidden, weight, bias, labels, upstream, chunk_tokens)
            for name, a, r in zip(("logp", "d_hidden", "d_weight", "d_bias"), got, ref):
                assert bool(torch.isfinite(a).all()), name
                torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_autocast_mixed_precision_logprobs(backend):
    """bf16 hidden, fp32 weight and bias: GEMMs in bf16 (weight cast as autocast does), each
    gradient in its input's dtype, as accurate as the naive autocast-style computation."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 33, generator=g).bfloat16()
    weight = torch.randn(257, 33, generator=g) * 0.35
    bias = torch.randn(257, generator=g)
    labels = torch.randint(0, 257, (37,), generator=g)
    labels[::3] = IGNORE
    upstream = torch.randn(37, generator=g)

    def naive(h, w, b, lab):  # autocast: bf16 GEMM, fp32 log-softmax
        logp = torch.log_softmax(F.linear(h, w.to(h.dtype), b.to(h.dtype)).float(), -1)
        return logp.gather(1, lab.clamp_min(0)[:, None]).squeeze(1) * (lab != IGNORE)

    def exact(h, w, b, lab):  # float64 on the bf16-rounded weight the GEMMs see
        w_seen = w.detach().bfloat16().double() + (w - w.detach())
        logp = torch.log_softmax(F.linear(h, w_seen, b), -1)
        return logp.gather(1, lab.clamp_min(0)[:, None]).squeeze(1) * (lab != IGNORE)

    def run(fn, dtypes):
        leaves = [t.detach().to(dt).requires_grad_() for t, dt in zip((hidden, weight, bias), dtypes)]
        out = fn(*leaves, labels)
        (out * upstream.to(out.dtype)).sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    ours = run(lambda h, w, b, lab: fused_linear_logprobs(w, h, lab, bias=b, backend=backend, chunk_tokens=7),
               (torch.bfloat16, torch.float32, torch.float32))
    assert [t.dtype for t in ours] == [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    base = run(naive, (torch.bfloat16, torch.float32, torch.float32))
    truth = run(exact, (torch.float64,) * 3)
    for name, a, b_, r in zip(("logp", "d_hidden", "d_weight", "d_bias"), ours, base, truth):
        err, err_naive = (a.double() - r).abs().max().item(), (b_.double() - r).abs().max().item()
        assert err <= 3 * err_naive + 1e-6 * (1 + r.abs().max().item()), (name, err, err_naive)
    assert (ours[0].double() - truth[0]).abs().max().item() < 2e-5  # fp32 logits: fp32-accurate log-probs


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_skipped_gradients_do_no_gemm(backend, monkeypatch):
    """No d_hidden GEMM when hidden needs no gradient, no d_weight GEMM when weight needs none."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(12, 16, generator=g), torch.randn(50, 16, generator=g) * 0.3
    labels = torch.randint(0, 50, (12,), generator=g)

    def forbidden(*args, **kwargs):
        raise AssertionError("this GEMM should not run")

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ref = torch.log_softmax(h64 @ w64.T, -1).gather(1, labels[:, None]).sum()
    ref.backward()
    with monkeypatch.context() as m:
        m.setattr(logprobs_chunked.LMHeadGemms, "write_d_hidden", forbidden)
        w = weight.clone().requires_grad_()
        fused_linear_logprobs(w, hidden, labels, backend=backend, chunk_tokens=5).sum().backward()
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)
    with monkeypatch.context() as m:
        m.setattr(logprobs_chunked.LMHeadGemms, "accumulate_d_weight", forbidden)
        h = hidden.clone().requires_grad_()
        fused_linear_logprobs(weight, h, labels, backend=backend, chunk_tokens=5).sum().backward()
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)


def _dpo_batch(seed=4, rows=6, n_pos=9, n_hidden=24, n_vocab=67):
    g = torch.Generator().manual_seed(seed)
    weight = 0.3 * torch.randn(n_vocab, n_hidden, generator=g)
    hidden = torch.randn(rows, n_pos, n_hidden, generator=g)
    labels = torch.randint(0, n_vocab, (rows, n_pos), generator=g)
    labels[:, :2] = IGNORE
    labels[1, 5:] = IGNORE
    return weight, hidden, labels, -20.0 + 3 * torch.randn(rows, generator=g)


def test_pair_loss_hidden_without_grad_skips_d_hidden(monkeypatch):
    weight, hidden, labels, ref_logps = _dpo_batch()
    monkeypatch.setattr(logprobs_chunked.LMHeadGemms, "write_d_hidden",
                        lambda *a: (_ for _ in ()).throw(AssertionError("d_hidden GEMM ran")))
    w = weight.clone().requires_grad_()
    loss, _ = FusedLinearDPOLoss(backend="chunked")(w, hidden, labels, ref_logps)
    loss.backward()
    w64 = weight.double().requires_grad_()
    logits = F.linear(hidden.double(), w64)
    from drdo.losses import dpo_loss, sequence_logprobs

    z, _ = sequence_logprobs(logits, labels)
    dpo_loss(z[:3], z[3:], ref_logps[:3].double(), ref_logps[3:].double(), beta=0.1)[0].backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_chunked_paths_are_deterministic(backend, monkeypatch):
    """Two runs of the same code path (several chunks) give bitwise equal results."""
    monkeypatch.setitem(logprobs_chunked.CHUNK_BUDGET_BYTES, "cpu", 67 * 4 * 10)  # 10 tokens per chunk
    weight, hidden, labels, ref_logps = _dpo_batch(seed=5)

    def run():
        w, h = weight.clone().requires_grad_(), hidden.clone().requires_grad_()
        loss, _ = FusedLinearDPOLoss(backend=backend)(w, h, labels, ref_logps)
        loss.backward()
        logp = fused_linear_logprobs(w, h.detach(), labels, backend=backend, chunk_tokens=4)
        return [loss.detach(), w.grad, h.grad, logp.detach()]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_one_host_sync_per_call(backend, monkeypatch):
    """Device->host reads (tolist/item/bool) per call: one, for the token counts."""
    weight, hidden, labels, ref_logps = _dpo_batch(seed=6)
    w, h = weight.clone().requires_grad_(), hidden.clone().requires_grad_()
    FusedLinearDPOLoss(backend=backend)(w, h, labels, ref_logps)  # warm-up
    calls = []
    for name in ("tolist", "item", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=original, _n=name: calls.append(_n) or _o(self, *a))
    loss, _ = FusedLinearDPOLoss(backend=backend)(w, h, labels, ref_logps)
    loss.backward()
    fused_linear_logprobs(w, h, labels, backend=backend, chunk_tokens=4).sum().backward()
    monkeypatch.undo()
    assert calls == ["tolist", "tolist"], calls


def test_chunk_rows_follow_the_budget():
    cpu = torch.device("cpu")
    assert logprobs_chunked.chunk_rows(1000, torch.float32, cpu, budget=4000 * 7) == 7
    assert logprobs_chunked.chunk_rows(1000, torch.bfloat16, cpu, budget=6000 * 7) == 7  # fp32 buffer + bf16 grad
    assert logprobs_chunked.chunk_rows(1000, torch.float64, cpu, budget=8000 * 7 + 5) == 7
    assert logprobs_chunked.chunk_rows(10**6, torch.float32, cpu, budget=1) == 1
    assert logprobs_chunked.chunk_rows(1000, torch.float32, cpu, budget=4000 * 300) == 256  # whole 128-row tiles
    assert logprobs_chunked.chunk_rows(128256, torch.bfloat16, torch.device("cuda")) == 2688  # a 2 x 1024 pair fits


def test_auto_backend_table(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_backend(cuda, torch.bfloat16, 16384) == "chunked"
    assert auto_backend(cpu, torch.float32, 10) == "torch"
    assert auto_backend(cuda, torch.float64, 10) == "torch"
    rules = (logprobs_mod.AutoRule("cuda", None, (torch.bfloat16,), 0, 4096, "triton"),
             logprobs_mod.AutoRule("cuda", None, None, 2048, 0, "torch"),
             logprobs_mod.AutoRule("cuda", (12, 0), None, 0, 0, "triton"),
             logprobs_mod.AutoRule("cuda", None, None, 0, 0, "chunked"),
             logprobs_mod.AutoRule(None, None, None, 0, 0, "torch"))
    monkeypatch.setattr(logprobs_mod, "AUTO_RULES", rules)
    monkeypatch.setattr(logprobs_mod, "triton_runs_on", lambda device: True)
    monkeypatch.setattr(logprobs_mod, "_capability", lambda device: (9, 0))
    assert auto_backend(cuda, torch.bfloat16, 8192) == "triton"
    assert auto_backend(cuda, torch.bfloat16, 100) == "chunked"
    assert auto_backend(cuda, torch.float16, 8192) == "chunked"
    assert auto_backend(cuda, torch.float16, 8192, hidden=4096) == "torch"  # by hidden size
    monkeypatch.setattr(logprobs_mod, "_capability", lambda device: (12, 0))
    assert auto_backend(cuda, torch.float16, 8192) == "triton"  # by compute capability
    monkeypatch.setattr(logprobs_mod, "triton_runs_on", lambda device: False)
    assert auto_backend(cuda, torch.bfloat16, 8192) == "chunked"  # never a backend that cannot run


def testgroup_chunks_keep_pairs_whole():
    from drdo_kernels.pair_chunked import group_chunks

    assert group_chunks([3, 4, 2, 9, 1], 6) == [(0, 1, 0, 3), (1, 3, 3, 9), (3, 4, 9, 18), (4, 5, 18, 19)]
    assert group_chunks([3, 4], 100) == [(0, 2, 0, 7)]
    assert group_chunks([], 5) == []


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pair_loss_backward_scales_by_the_upstream_gradient(reduction):
    """The gradients stored in the forward are scaled by d(outer)/d(loss) (here -2.5)."""
    from drdo.losses import dpo_loss, sequence_logprobs

    weight, hidden, labels, ref_logps = _dpo_batch(seed=7)
    w, h, r = (t.double().requires_grad_() for t in (weight, hidden, ref_logps))
    loss, _ = FusedLinearDPOLoss(backend="chunked", reduction=reduction)(w, h, labels, r)
    (-2.5 * loss).backward()
    w64, h64, r64 = (t.double().requires_grad_() for t in (weight, hidden, ref_logps))
    z, _ = sequence_logprobs(F.linear(h64, w64), labels)
    ref, _ = dpo_loss(z[:3], z[3:], r64[:3], r64[3:], beta=0.1, reduction=reduction)
    (-2.5 * ref).backward()
    for a, b in ((w, w64), (h, h64), (r, r64)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


_ON_GPU = torch.cuda.is_available() and not triton_interpreting()


@pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA GPU with TRITON_INTERPRET unset")
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_chunked_dpo_matches_float64_and_is_deterministic(weight_dtype, monkeypatch):
    """Compiled fold kernels and cuBLAS GEMMs (several chunks): bf16 hidden, bf16 or fp32
    (autocast) weight, against float64 on the weight the GEMMs see; two runs bitwise equal."""
    from drdo.losses import dpo_loss, sequence_logprobs

    monkeypatch.setitem(logprobs_chunked.CHUNK_BUDGET_BYTES, "cuda", 5003 * 6 * 300)  # 300 tokens per chunk
    weight, hidden, labels, ref_logps = _dpo_batch(seed=8, rows=8, n_pos=171, n_hidden=264, n_vocab=5003)
    weight, hidden, labels, ref_logps = (t.cuda() for t in (weight, hidden, labels, ref_logps))

    def run():
        w = weight.to(weight_dtype).requires_grad_()
        h = hidden.bfloat16().requires_grad_()
        loss, _ = FusedLinearDPOLoss(backend="chunked")(w, h, labels, ref_logps)
        loss.backward()
        return [loss.detach().double(), w.grad.double(), h.grad.double()]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    w64 = weight.bfloat16().double().requires_grad_()
    h64 = hidden.bfloat16().double().requires_grad_()
    z, _ = sequence_logprobs(F.linear(h64, w64), labels)
    ref, _ = dpo_loss(z[:4], z[4:], ref_logps[:4].double(), ref_logps[4:].double(), beta=0.1)
    ref.backward()
    for got, exact in zip(first, (ref.detach(), w64.grad, h64.grad)):
        assert (got - exact).abs().max().item() <= 2e-2 * exact.abs().max().item() + 1e-6
