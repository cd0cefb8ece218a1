"""drdo.losses against independent float64 computations of the formulas in docs/math.md.

The independent computations below use Python's `math` module element by element, so
they share no code path with the torch implementation they check.
"""
import math

import pytest
import torch

from drdo import losses as L

torch.manual_seed(0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _log1mexp(z: float) -> float:
    z = min(z, L.LOGP_CLAMP_MAX)
    return math.log(-math.expm1(z)) if z > -math.log(2) else math.log1p(-math.exp(z))


def _drdo_pair(zw, zl, rw_hat, rl_hat, rw, rl, alpha, gamma, sign):
    distill = (rw - rl - (rw_hat - rl_hat)) ** 2
    p_w = _sigmoid(zw - zl)
    u = zw + sign * _log1mexp(zl)
    return distill - alpha * (1.0 - p_w) ** gamma * u


def _drdo_expected(inputs, alpha, gamma, unlikelihood):
    sign = 1.0 if unlikelihood == "welleck" else -1.0
    rows = zip(*(t.tolist() for t in inputs))
    vals = [_drdo_pair(*row, alpha, gamma, sign) for row in rows]
    return sum(vals) / len(vals)


def _random_pairs(b, dtype=torch.float64, z_scale=5.0):
    z = -torch.rand(2, b, dtype=dtype) * z_scale - 1e-3
    r = torch.randn(4, b, dtype=dtype)
    return [z[0], z[1], r[0], r[1], r[2], r[3]]


# ---------------------------------------------------------------- log1mexp
@pytest.mark.parametrize("z", [-1e-6, -1e-4, -0.3, -math.log(2), -0.7, -5.0, -50.0, -1e4])
def test_log1mexp_matches_math(z):
    got = L.log1mexp(torch.tensor([z], dtype=torch.float64)).item()
    want = math.log(-math.expm1(z)) if z > -1 else math.log1p(-math.exp(z))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_log1mexp_float32_finite_with_finite_grad():
    z = torch.tensor([-1e-6, -1e-3, -0.69, -0.7, -30.0, -1e4], requires_grad=True)
    out = L.log1mexp(z)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()
    want = torch.tensor([_log1mexp(v) for v in z.tolist()])
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-30)


# ---------------------------------------------------------------- sequence_logprobs
def test_sequence_logprobs_equals_explicit_loop():
    n, t, v = 3, 7, 11
    logits = torch.randn(n, t, v, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (n, t))
    labels[0, :3] = -100
    labels[2, :] = -100  # a fully ignored row: an error naming it, unless allowed (then it sums to 0)
    with pytest.raises(ValueError, match=r"rows \[2\] have no response token"):
        L.sequence_logprobs(logits, labels)
    logps, counts = L.sequence_logprobs(logits, labels, allow_empty_rows=True)
    for i in range(n):
        total, count = 0.0, 0
        for j in range(t):
            if labels[i, j] == -100:
                continue
            row = logits[i, j].tolist()
            m = max(row)
            lse = m + math.log(sum(math.exp(x - m) for x in row))
            total += row[labels[i, j]] - lse
            count += 1
        assert logps[i].item() == pytest.approx(total, rel=1e-12, abs=1e-12)
        assert counts[i].item() == count
    assert logps.dtype == torch.float64 and logps[2] == 0


def test_sequence_logprobs_low_precision_computes_in_float32():
    logits = torch.randn(2, 5, 13).to(torch.bfloat16)
    labels = torch.randint(0, 13, (2, 5))
    logps, _ = L.sequence_logprobs(logits, labels)
    assert logps.dtype == torch.float32
    want, _ = L.sequence_logprobs(logits.double(), labels)
    torch.testing.assert_close(logps.double(), want, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_custom_ignore_index_and_bad_labels():
    logits = torch.randn(1, 3, 4)
    logps, counts = L.sequence_logprobs(logits, torch.tensor([[0, 7, 7]]), ignore_index=7)
    assert counts.item() == 1
    with pytest.raises(ValueError, match="labels must lie"):
        L.sequence_logprobs(logits, torch.tensor([[0, 4, -100]]))
    with pytest.raises(ValueError, match="expected logits"):
        L.sequence_logprobs(logits[0], torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------- drdo_loss
@pytest.mark.parametrize("unlikelihood", ["welleck", "paper"])
@pytest.mark.parametrize("alpha,gamma", [(0.1, 2.0), (1.0, 0.0), (0.0, 2.0), (1.0, 5.0), (0.3, 1.0)])
def test_drdo_loss_matches_formula(unlikelihood, alpha, gamma):
    inputs = _random_pairs(9)
    loss, metrics = L.drdo_loss(*inputs, alpha=alpha, gamma=gamma, unlikelihood=unlikelihood)
    assert loss.item() == pytest.approx(_drdo_expected(inputs, alpha, gamma, unlikelihood), rel=1e-12)
    assert {"distill", "pref", "p_w", "reward_acc"} <= set(metrics)
    assert metrics["distill"].item() + metrics["pref"].item() == pytest.approx(loss.item(), rel=1e-12)
    want_acc = sum(a > b for a, b in zip(inputs[2].tolist(), inputs[3].tolist())) / 9
    assert metrics["reward_acc"].item() == pytest.approx(want_acc)


def test_drdo_loss_extreme_logprobs_are_finite():
    zw = torch.tensor([-1e-9, -1e4, -1e-7, -3.0, 0.0], requires_grad=True)
    zl = torch.tensor([-1e4, -1e-9, -1e-7, -3.0, 0.0], requires_grad=True)
    others = [torch.randn(5) for _ in range(4)]
    loss, _ = L.drdo_loss(zw, zl, *others)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zw.grad).all() and torch.isfinite(zl.grad).all()
    want = _drdo_expected([t.double() for t in (zw.detach(), zl.detach(), *others)], 0.1, 2.0, "welleck")
    assert loss.item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("unlikelihood", ["welleck", "paper"])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 5.0])
def test_drdo_loss_gradcheck(unlikelihood, gamma):
    inputs = [t.requires_grad_() for t in _random_pairs(5)]
    fn = lambda *x: L.drdo_loss(*x, alpha=0.7, gamma=gamma, unlikelihood=unlikelihood)[0]
    assert torch.autograd.gradcheck(fn, inputs)


def test_drdo_focal_factor_is_differentiated():
    """d/dz_w of -alpha (1-p)^g U includes alpha g (1-p)^g p U; a detached focal would drop it."""
    zw, zl = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True), torch.tensor([-3.0], dtype=torch.float64)
    zeros = [torch.zeros(1, dtype=torch.float64) for _ in range(4)]
    alpha, gamma = 1.0, 2.0
    L.drdo_loss(zw, zl, *zeros, alpha=alpha, gamma=gamma)[0].backward()
    p = _sigmoid(1.0)
    u = -2.0 + _log1mexp(-3.0)
    exact = -alpha * ((1 - p) ** gamma + (-gamma * (1 - p) ** (gamma - 1) * p * (1 - p)) * u)
    detached = -alpha * (1 - p) ** gamma
    assert zw.grad.item() == pytest.approx(exact, rel=1e-12)
    assert abs(exact - detached) > 1e-2


def test_drdo_alpha_zero_is_pure_distillation_and_gamma_zero_is_plain_unlikelihood():
    inputs = _random_pairs(6)
    loss, m = L.drdo_loss(*inputs, alpha=0.0)
    want = ((inputs[4] - inputs[5]) - (inputs[2] - inputs[3])).pow(2).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12) and m["pref"].item() == 0
    _, m = L.drdo_loss(*inputs, alpha=1.0, gamma=0.0)
    u = [zw + _log1mexp(zl) for zw, zl in zip(inputs[0].tolist(), inputs[1].tolist())]
    assert m["pref"].item() == pytest.approx(-sum(u) / 6, rel=1e-12)


def test_drdo_float_dtypes_and_reduction():
    inputs = _random_pairs(4, dtype=torch.float16)
    loss, _ = L.drdo_loss(*inputs)
    assert loss.dtype == torch.float32
    loss64, _ = L.drdo_loss(*[t.double() for t in inputs])
    assert loss64.dtype == torch.float64
    total, _ = L.drdo_loss(*[t.double() for t in inputs], reduction="sum")
    assert total.item() == pytest.approx(4 * loss64.item(), rel=1e-12)


def test_drdo_bad_inputs_raise_clear_errors():
    good = _random_pairs(3)
    with pytest.raises(ValueError, match="unlikelihood"):
        L.drdo_loss(*good, unlikelihood="other")
    with pytest.raises(ValueError, match="shape"):
        L.drdo_loss(good[0][:2], *good[1:])
    with pytest.raises(ValueError, match="empty batch"):
        L.drdo_loss(*[t[:0] for t in good])
    with pytest.raises(ValueError, match="gamma"):
        L.drdo_loss(*good, gamma=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        L.drdo_loss(*good, reduction="avg")


# ---------------------------------------------------------------- oracle_loss
def test_oracle_loss_matches_formula_mean_and_sum():
    rw, rl = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    nll = torch.rand(5, dtype=torch.float64) * 20
    n = torch.tensor([1, 3, 4, 10, 2])
    a = 0.01
    loss, m = L.oracle_loss(rw, rl, nll, alpha=a, chosen_n_tokens=n)
    terms = [-(1 - a) * math.log(_sigmoid(chosen - rejected)) + a * s / k
             for chosen, rejected, s, k in zip(rw.tolist(), rl.tolist(), nll.tolist(), n.tolist())]
    assert loss.item() == pytest.approx(sum(terms) / 5, rel=1e-12)
    loss_sum, _ = L.oracle_loss(rw, rl, nll, alpha=a, nll_reduction="sum")
    terms = [-(1 - a) * math.log(_sigmoid(chosen - rejected)) + a * s
             for chosen, rejected, s in zip(rw.tolist(), rl.tolist(), nll.tolist())]
    assert loss_sum.item() == pytest.approx(sum(terms) / 5, rel=1e-12)
    assert m["reward_acc"].item() == pytest.approx(
        sum(chosen > rejected for chosen, rejected in zip(rw.tolist(), rl.tolist())) / 5)


def test_oracle_loss_gradcheck_and_errors():
    args = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    n = torch.tensor([2, 5, 1, 3])
    assert torch.autograd.gradcheck(lambda *x: L.oracle_loss(*x, alpha=0.3, chosen_n_tokens=n)[0], args)
    with pytest.raises(ValueError, match="chosen_n_tokens"):
        L.oracle_loss(*args)
    with pytest.raises(ValueError, match="nll_reduction"):
        L.oracle_loss(*args, chosen_n_tokens=n, nll_reduction="max")


def test_oracle_loss_large_margins_stay_finite():
    rw = torch.tensor([1e4, -1e4], requires_grad=True)
    rl = torch.zeros(2)
    loss, _ = L.oracle_loss(rw, rl, torch.ones(2), nll_reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rw.grad).all()
    assert loss.item() == pytest.approx(0.99 * 1e4 / 2 + 0.01, rel=1e-6)


# ---------------------------------------------------------------- dpo_loss
def test_dpo_fixed_numbers():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.0, -3.5])
    loss, m = L.dpo_loss(pc, pr, rc, rr, beta=0.1)
    # margins: 0.1*((1) - (-1)) = 0.2 ; 0.1*((0.5) - (0.5)) = 0
    want = (-math.log(_sigmoid(0.2)) - math.log(0.5)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert m["reward_acc"].item() == 0.5
    assert m["rewards_chosen"].item() == pytest.approx((0.1 + 0.05) / 2, rel=1e-6)


def test_dpo_gradcheck_and_float64():
    args = [torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *x: L.dpo_loss(*x, beta=0.5)[0], args)
    assert L.dpo_loss(*args)[0].dtype == torch.float64


# ---------------------------------------------------------------- edpo_loss
def _edpo_expected(pc, pr, rc, rr, ow, ol, beta, pessimistic):
    margins = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc, pr, rc, rr)]
    members = []
    for k in range(len(ow)):
        sq = [(ow[k][i] - ol[k][i] - margins[i]) ** 2 for i in range(len(margins))]
        members.append(sum(sq) / len(sq))
    return max(members) if pessimistic else sum(members) / len(members)


@pytest.mark.parametrize("pessimistic", [True, False])
def test_edpo_matches_formula(pessimistic):
    b, k = 7, 3
    pol = [torch.randn(b, dtype=torch.float64) for _ in range(4)]
    ow, ol = torch.randn(k, b, dtype=torch.float64), torch.randn(k, b, dtype=torch.float64)
    loss, m = L.edpo_loss(*pol, ow, ol, beta=0.2, pessimistic=pessimistic)
    want = _edpo_expected(*(t.tolist() for t in pol), ow.tolist(), ol.tolist(), 0.2, pessimistic)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert m["distill_min"] <= m["distill_max"]


def test_edpo_single_member_equals_distillation_and_gradcheck():
    pol = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    ow, ol = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    loss_1d, _ = L.edpo_loss(*pol, ow, ol)
    loss_2d, _ = L.edpo_loss(*pol, ow[None], ol[None])
    assert loss_1d.item() == pytest.approx(loss_2d.item(), rel=1e-12)
    ow3, ol3 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    for pess in (True, False):
        assert torch.autograd.gradcheck(
            lambda *x, pess=pess: L.edpo_loss(*x, ow3, ol3, beta=0.3, pessimistic=pess)[0], pol)


def test_edpo_shape_errors():
    pol = [torch.randn(5) for _ in range(4)]
    with pytest.raises(ValueError, match="oracle rewards"):
        L.edpo_loss(*pol, torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="oracle rewards"):
        L.edpo_loss(*pol, torch.randn(3, 5), torch.randn(2, 5))
