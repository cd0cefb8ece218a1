"""drdo_kernels.FusedLinear*Loss == drdo.losses composed on full logits.

The ground truth is the reference composition (logits -> sequence_logprobs -> loss) in
float64 on the very same (dtype-exact) inputs. Each fused run (every backend; Triton
kernels through the CPU interpreter) must be within a small multiple of the error of the same
composition run in the tested dtype (the naive PyTorch path a trainer would use).
"""
import pytest
import torch
import torch.nn.functional as F

import drdo_kernels
from drdo.losses import dpo_loss, drdo_loss, edpo_loss, oracle_loss, sequence_logprobs
from drdo_kernels.fused_losses import (
    FusedLinearDPOLoss,
    FusedLinearDRDOLoss,
    FusedLinearEDPOLoss,
    FusedLinearOracleLoss,
    fused_linear_drdo_loss,
    row_logprobs,
)

N_PAIRS, T, H, V = 2, 7, 24, 67
#: A one-ulp error in a row's z moves the loss gradient through focal and log1mexp, so
#: the ratio varies with each path's per-row luck: worst over 15 seeds was 6.5 (Triton, fp32).
ERR_FACTOR = 8.0
ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _batch(seed=0, bias=True, k_oracles=3):
    """float32 inputs: weight [V, H], hidden [2B, T, H], labels [2B, T] (prompt and padding
    ignored), bias [V], row scores. The last rejected row has one response token whose
    logit dominates, so z_l is about -0.03 and the unlikelihood term matters."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * N_PAIRS
    weight = 0.3 * torch.randn(V, H, generator=g)
    hidden = torch.randn(rows, T, H, generator=g)
    labels = torch.randint(0, V, (rows, T), generator=g)
    for r in range(rows):
        prompt = int(torch.randint(1, 3, (1,), generator=g))
        pad = int(torch.randint(0, 2, (1,), generator=g))
        labels[r, :prompt] = -100
        labels[r, T - pad:] = -100
    labels[-1] = -100
    labels[-1, 3] = 5
    hidden[-1, 3] = 2.0 * weight[5]
    return dict(
        weight=weight,
        hidden=hidden,
        labels=labels,
        bias=0.1 * torch.randn(V, generator=g) if bias else None,
        oracle=torch.randn(rows, generator=g),
        policy_rewards=torch.randn(rows, generator=g),
        ref_logps=-20.0 + 3 * torch.randn(rows, generator=g),
        oracle_k=torch.randn(k_oracles, rows, generator=g),
    )


def _leaves(batch, dtype):
    """weight/hidden/bias in `dtype`, requiring grad; scores stay float32 (float64 for the ground
    truth); policy rewards require grad."""
    out = dict(batch)
    for name in ("weight", "hidden", "bias"):
        if batch[name] is not None:
            out[name] = batch[name].detach().to(dtype).clone().requires_grad_()
    if dtype == torch.float64:  # the ground truth: scores in float64 too
        for name in ("oracle", "policy_rewards", "ref_logps", "oracle_k"):
            out[name] = batch[name].double()
    out["policy_rewards"] = out["policy_rewards"].detach().clone().requires_grad_()
    return out


def _evaluate(loss_fn, batch, dtype):
    """Run loss_fn(leaves) -> (loss, metrics); backward; everything returned as float64."""
    leaves = _leaves(batch, dtype)
    loss, metrics = loss_fn(leaves)
    loss.backward()
    out = {"loss": loss.detach().double().reshape(1),
           "metrics": torch.stack([v.double() for v in metrics.values()])}
    for name in ("weight", "hidden", "bias", "policy_rewards"):
        t = leaves[name]
        if t is not None and t.grad is not None:
            out["d_" + name] = t.grad.double()
    return out, list(metrics)


def _ref_logps(b):
    """Reference z [2B] from full logits in b's dtype (sequence_logprobs upcasts to >= fp32)."""
    logits = F.linear(b["hidden"], b["weight"], b["bias"])
    return sequence_logprobs(logits, b["labels"])


def _err(x, ref):
    """Max abs error over the tensor relative to its largest reference entry (a bug in any
    entry shows as >> 1e-6; float32 rounding of the individual entries does not)."""
    return ((x - ref).abs().max() / (ref.abs().max() + 1e-30)).item()


def _assert_matches(fused_fn, ref_fn, batch, dtype):
    """fused vs float64 reference, bounded by the same-dtype reference's error."""
    exact = {k: (v.to(dtype).double() if k in ("weight", "hidden", "bias") and v is not None else v)
             for k, v in batch.items()}
    truth, keys = _evaluate(ref_fn, exact, torch.float64)
    naive, _ = _evaluate(ref_fn, batch, dtype)
    fused, fused_keys = _evaluate(fused_fn, batch, dtype)
    assert fused_keys == keys
    assert set(fused) == set(truth)
    ratios = {}
    for name, ref in truth.items():
        e_naive, e_fused = _err(naive[name], ref), _err(fused[name], ref)
        assert torch.isfinite(fused[name]).all(), name
        assert e_fused <= ERR_FACTOR * max(e_naive, ULP[dtype]), (name, dtype, e_fused, e_naive)
        ratios[name] = e_fused / max(e_naive, ULP[dtype])
    return ratios


def _beta(reward: str, beta: float) -> dict:
    """beta for an implicit reward; a reward head takes none (another value than the default is refused)."""
    return {"beta": beta} if reward == "implicit" else {}


def _drdo_pair(reward, unlikelihood, beta=0.5, alpha=0.5, gamma=2.0):
    kw = dict(alpha=alpha, gamma=gamma, unlikelihood=unlikelihood)

    def ref(b):
        z, _ = _ref_logps(b)
        rhat = b["policy_rewards"] if reward == "head" else beta * z
        o = b["oracle"]
        return drdo_loss(z[:N_PAIRS], z[N_PAIRS:], rhat[:N_PAIRS], rhat[N_PAIRS:], o[:N_PAIRS], o[N_PAIRS:], **kw)

    def fused(backend):
        module = FusedLinearDRDOLoss(reward=reward, **_beta(reward, beta), backend=backend, **kw)
        return lambda b: module(b["weight"], b["hidden"], b["labels"], b["oracle"],
                                b["policy_rewards"] if reward == "head" else None, b["bias"])

    return fused, ref


@pytest.mark.parametrize("backend", ["triton", "chunked", "torch"])
def test_drdo_both_rewards_both_unlikelihoods_fp32(backend):
    batch = _batch(seed=1)
    for reward in ("head", "implicit"):
        for unlikelihood in ("welleck", "paper"):
            fused, ref = _drdo_pair(reward, unlikelihood)
            _assert_matches(fused(backend), ref, batch, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "chunked", "torch"])
def test_drdo_bf16_without_bias(backend):
    batch = _batch(seed=2, bias=False)
    fused, ref = _drdo_pair("implicit", "welleck", gamma=1.0)
    _assert_matches(fused(backend), ref, batch, torch.bfloat16)
    fused, ref = _drdo_pair("head", "paper", gamma=5.0)
    _assert_matches(fused(backend), ref, batch, torch.bfloat16)


def test_functional_form_and_reduction_sum():
    batch = _batch(seed=3)
    kw = dict(alpha=0.1, gamma=0.0, reward="implicit", beta=2.0, reduction="sum", backend="torch")

    def fused(b):
        return fused_linear_drdo_loss(b["weight"], b["hidden"], b["labels"], b["oracle"], bias=b["bias"], **kw)

    def ref(b):
        z, _ = _ref_logps(b)
        o = b["oracle"]
        return drdo_loss(z[:N_PAIRS], z[N_PAIRS:], 2.0 * z[:N_PAIRS], 2.0 * z[N_PAIRS:], o[:N_PAIRS], o[N_PAIRS:],
                         alpha=0.1, gamma=0.0, reduction="sum")

    _assert_matches(fused, ref, batch, torch.float32)


def _split(t):
    return t[..., :N_PAIRS], t[..., N_PAIRS:]


@pytest.mark.parametrize("backend", ["triton", "chunked", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpo(backend, dtype):
    batch = _batch(seed=4)
    module = FusedLinearDPOLoss(beta=0.1, backend=backend)

    def ref(b):
        z, _ = _ref_logps(b)
        return dpo_loss(*_split(z), *_split(b["ref_logps"]), beta=0.1)

    _assert_matches(lambda b: module(b["weight"], b["hidden"], b["labels"], b["ref_logps"], b["bias"]),
                    ref, batch, dtype)


@pytest.mark.parametrize("backend", ["triton", "chunked", "torch"])
def test_edpo_pessimistic_and_mean(backend):
    batch = _batch(seed=5, k_oracles=3)
    for pessimistic in (True, False):
        module = FusedLinearEDPOLoss(beta=0.1, pessimistic=pessimistic, backend=backend)

        def ref(b, pessimistic=pessimistic):
            z, _ = _ref_logps(b)
            return edpo_loss(*_split(z), *_split(b["ref_logps"]), *_split(b["oracle_k"]),
                             beta=0.1, pessimistic=pessimistic)

        _assert_matches(lambda b, module=module: module(b["weight"], b["hidden"], b["labels"], b["ref_logps"],
                                                        b["oracle_k"], b["bias"]), ref, batch, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "chunked", "torch"])
def test_oracle_loss_token_mean_and_sum(backend):
    batch = _batch(seed=6)
    for nll_reduction in ("mean", "sum"):
        module = FusedLinearOracleLoss(alpha=0.3, nll_reduction=nll_reduction, backend=backend)

        def ref(b, nll_reduction=nll_reduction):
            z, n = _ref_logps(b)
            r_w, r_l = _split(b["policy_rewards"])
            return oracle_loss(r_w, r_l, -z[:N_PAIRS], alpha=0.3, chosen_n_tokens=n[:N_PAIRS],
                               nll_reduction=nll_reduction)

        _assert_matches(lambda b, module=module: module(b["weight"], b["hidden"], b["labels"], b["policy_rewards"],
                                                        b["bias"]), ref, batch, torch.float32)


def test_oracle_loss_ignores_rejected_tokens():
    """Only chosen rows feed the NLL: a rejected row with no response token is fine,
    and the rejected hidden states get zero gradient."""
    batch = _leaves(_batch(seed=7), torch.float32)
    batch["labels"][-1] = -100
    loss, _ = FusedLinearOracleLoss(backend="torch")(batch["weight"], batch["hidden"], batch["labels"],
                                                     batch["policy_rewards"], batch["bias"])
    loss.backward()
    assert batch["hidden"].grad[N_PAIRS:].abs().max() == 0
    assert batch["hidden"].grad[:N_PAIRS].abs().max() > 0


def test_row_logprobs_matches_sequence_logprobs():
    b = _batch(seed=8)
    logps, n = row_logprobs(b["weight"], b["hidden"], b["labels"], b["bias"], backend="torch")
    ref, ref_n = _ref_logps(b)
    torch.testing.assert_close(logps, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(n, ref_n)


def test_exports():
    for name in ("FusedLinearDRDOLoss", "fused_linear_drdo_loss", "FusedLinearDPOLoss", "FusedLinearEDPOLoss",
                 "FusedLinearOracleLoss", "drdo_pair_loss"):
        assert hasattr(drdo_kernels, name)


def test_bad_inputs_raise_clear_errors():
    b = _batch(seed=9)
    w, h, y, o, p = b["weight"], b["hidden"], b["labels"], b["oracle"], b["policy_rewards"]
    loss = FusedLinearDRDOLoss(backend="torch")
    with pytest.raises(ValueError, match="even"):
        loss(w, h[:3], y[:3], o[:3], p[:3])
    with pytest.raises(ValueError, match="labels shape"):
        loss(w, h, y[:, :-1], o, p)
    with pytest.raises(ValueError, match="policy_rewards"):
        loss(w, h, y, o)
    with pytest.raises(ValueError, match=r"policy_rewards must have shape \[2B\]"):
        loss(w, h, y, o, p[:2])
    with pytest.raises(ValueError, match=r"oracle_rewards must have shape \[2B\]"):
        loss(w, h, y, o[:3], p)
    with pytest.raises(ValueError, match="ensemble"):
        loss(w, h, y, b["oracle_k"], p)
    with pytest.raises(ValueError, match="hidden must be"):
        loss(w, h[0], y[0], o, p)
    empty = y.clone()
    empty[1] = -100
    with pytest.raises(ValueError, match=r"rows \[1\] have no response token"):
        loss(w, h, empty, o, p)
    with pytest.raises(ValueError, match="reward"):
        FusedLinearDRDOLoss(reward="other")
    with pytest.raises(ValueError, match="unlikelihood"):
        FusedLinearDRDOLoss(unlikelihood="other")
    with pytest.raises(ValueError, match=r"oracle_rewards must have shape \[K, 2B\]"):
        FusedLinearEDPOLoss(backend="torch")(w, h, y, b["ref_logps"], b["oracle_k"][:, :3])
    with pytest.raises(ValueError, match="ref_logps"):
        FusedLinearDPOLoss(backend="torch")(w, h, y, b["ref_logps"][:3])
    with pytest.raises(ValueError, match="nll_reduction"):
        FusedLinearOracleLoss(nll_reduction="token")


def _loss_pairs(reduction):
    """name -> (fused(backend) -> fn(batch), ref fn(batch)) for every loss, with `reduction`."""
    def drdo(reward):
        kw = dict(alpha=0.5, gamma=2.0, unlikelihood="welleck", reduction=reduction)

        def ref(b):
            z, _ = _ref_logps(b)
            rhat = b["policy_rewards"] if reward == "head" else 0.5 * z
            return drdo_loss(*_split(z), *_split(rhat), *_split(b["oracle"]), **kw)

        def fused(backend):
            module = FusedLinearDRDOLoss(reward=reward, **_beta(reward, 0.5), backend=backend, **kw)
            return lambda b: module(b["weight"], b["hidden"], b["labels"], b["oracle"],
                                    b["policy_rewards"] if reward == "head" else None, b["bias"])
        return fused, ref

    def dpo_ref(b):
        z, _ = _ref_logps(b)
        return dpo_loss(*_split(z), *_split(b["ref_logps"]), beta=0.1, reduction=reduction)

    def dpo(backend):
        module = FusedLinearDPOLoss(beta=0.1, backend=backend, reduction=reduction)
        return lambda b: module(b["weight"], b["hidden"], b["labels"], b["ref_logps"], b["bias"])

    def oracle_ref(b):
        z, n = _ref_logps(b)
        return oracle_loss(*_split(b["policy_rewards"]), -z[:N_PAIRS], alpha=0.3, chosen_n_tokens=n[:N_PAIRS],
                           reduction=reduction)

    def oracle(backend):
        module = FusedLinearOracleLoss(alpha=0.3, backend=backend, reduction=reduction)
        return lambda b: module(b["weight"], b["hidden"], b["labels"], b["policy_rewards"], b["bias"])

    def edpo_ref(b):
        z, _ = _ref_logps(b)
        return edpo_loss(*_split(z), *_split(b["ref_logps"]), *_split(b["oracle_k"]), beta=0.1, reduction=reduction)

    def edpo(backend):
        module = FusedLinearEDPOLoss(beta=0.1, backend=backend, reduction=reduction)
        return lambda b: module(b["weight"], b["hidden"], b["labels"], b["ref_logps"], b["oracle_k"], b["bias"])

    return {"drdo_head": drdo("head"), "drdo_implicit": drdo("implicit"), "dpo": (dpo, dpo_ref),
            "oracle": (oracle, oracle_ref), "edpo": (edpo, edpo_ref)}


@pytest.fixture
def several_chunks(monkeypatch):
    """A CPU chunk budget of 3 fp32 tokens (2 bf16 ones): one pair per chunk, and every
    plain log-prob chunk boundary falls inside a sequence."""
    monkeypatch.setitem(drdo_kernels.logprobs_chunked.CHUNK_BUDGET_BYTES, "cpu", 3 * V * 4)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_every_loss_in_float64_on_several_chunks(backend, reduction, several_chunks):
    """float64 inputs: the chunked losses equal the reference to float64 rounding (loss,
    metrics and the gradients of hidden, weight, bias and rewards)."""
    batch = _batch(seed=10)
    for name, (fused, ref) in _loss_pairs(reduction).items():
        truth, keys = _evaluate(ref, batch, torch.float64)
        got, got_keys = _evaluate(fused(backend), batch, torch.float64)
        assert got_keys == keys and set(got) == set(truth), name
        for key, r in truth.items():
            assert got[key].dtype == torch.float64
            assert _err(got[key], r) < 1e-12, (name, key, _err(got[key], r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_every_loss_on_several_chunks(backend, dtype, several_chunks):
    batch = _batch(seed=11)
    for fused, ref in _loss_pairs("mean").values():
        _assert_matches(fused(backend), ref, batch, dtype)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_losses_autocast_mixed_precision(backend, several_chunks):
    """bf16 hidden with fp32 weight, bias and scores (autocast training): each gradient comes
    back in its input's dtype, and every result is within ERR_FACTOR of the error of the
    autocast-style naive composition (bf16 logits) against float64 on the bf16-rounded
    weight the GEMMs see (the fp32 bias is added to the fp32 logits unrounded)."""
    batch = _batch(seed=12)
    for name, (fused, ref) in _loss_pairs("mean").items():
        fused_fn = fused(backend)

        def mixed(b, fn=fused_fn):
            return fn(dict(b, hidden=b["hidden"].detach().bfloat16().requires_grad_()))

        def autocast(b, fn=ref):
            return fn(dict(b, hidden=b["hidden"].bfloat16(), weight=b["weight"].bfloat16(), bias=b["bias"].bfloat16()))

        exact = dict(batch, hidden=batch["hidden"].bfloat16().double(), weight=batch["weight"].bfloat16().double())
        truth, _ = _evaluate(ref, exact, torch.float64)
        naive, _ = _evaluate(autocast, batch, torch.float32)
        leaves = _leaves(batch, torch.float32)
        loss, _ = mixed(leaves)
        loss.backward()
        assert leaves["weight"].grad.dtype == torch.float32 and leaves["bias"].grad.dtype == torch.float32
        got, _ = _evaluate(mixed, batch, torch.float32)
        for key in ("loss", "metrics", "d_weight", "d_bias", "d_policy_rewards"):
            if key in truth:
                e, e_naive = _err(got[key], truth[key]), _err(naive[key], truth[key])
                assert e <= ERR_FACTOR * max(e_naive, ULP[torch.bfloat16]), (name, key, e, e_naive)
        assert _err(got["loss"], truth["loss"]) < 1e-5, name  # fp32 logits: fp32-accurate loss


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_all_tokens_ignored_raises(backend):
    b = _batch(seed=13)
    labels = torch.full_like(b["labels"], -100)
    for module in (FusedLinearDPOLoss(backend=backend),):
        with pytest.raises(ValueError, match="no response token"):
            module(b["weight"], b["hidden"], labels, b["ref_logps"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reward", ["head", "implicit"])
def test_drdo_length_normalize_is_the_reference_on_token_means(backend, reward):
    """length_normalize=True: z = summed log-prob / token count, then drdo_loss as usual."""
    batch = _batch(seed=4)
    kw = dict(alpha=0.5, gamma=2.0, unlikelihood="welleck")
    module = FusedLinearDRDOLoss(reward=reward, **_beta(reward, 0.5), length_normalize=True, backend=backend,
                                 **kw)

    def fused(b):
        return module(b["weight"], b["hidden"], b["labels"], b["oracle"],
                      b["policy_rewards"] if reward == "head" else None, b["bias"])

    def ref(b):
        z_sum, n = _ref_logps(b)
        z = z_sum / n.to(z_sum.dtype)
        rhat = b["policy_rewards"] if reward == "head" else 0.5 * z
        o = b["oracle"]
        return drdo_loss(z[:N_PAIRS], z[N_PAIRS:], rhat[:N_PAIRS], rhat[N_PAIRS:], o[:N_PAIRS], o[N_PAIRS:], **kw)

    _assert_matches(fused, ref, batch, torch.float32)
    assert "length_normalize=True" in repr(module)


def test_drdo_implicit_beta_defaults_to_0_1():
    """The implicit reward's default scale is beta = 0.1 (the paper's DPO beta), in both forms."""
    assert FusedLinearDRDOLoss().beta == 0.1
    batch = _batch(seed=5)

    def fused(b):
        return fused_linear_drdo_loss(b["weight"], b["hidden"], b["labels"], b["oracle"], bias=b["bias"],
                                      reward="implicit", backend="torch")

    def ref(b):
        z, _ = _ref_logps(b)
        o = b["oracle"]
        return drdo_loss(z[:N_PAIRS], z[N_PAIRS:], 0.1 * z[:N_PAIRS], 0.1 * z[N_PAIRS:], o[:N_PAIRS], o[N_PAIRS:])

    _assert_matches(fused, ref, batch, torch.float32)
