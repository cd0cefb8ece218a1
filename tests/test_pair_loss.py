"""drdo_kernels.drdo_pair_loss against the reference drdo.losses.drdo_loss.

Error bound in the style of Cut Cross-Entropy's tests: inputs are float32 numbers,
the ground truth is the reference evaluated in float64 on those same numbers, and
each backend's float32 error (elementwise, relative to the magnitude of the terms each
value sums) must be within a small multiple of the float32 reference's own error
(floored at two float32 ulps).
"""
import pytest
import torch

from drdo.losses import LOGP_CLAMP_MAX, drdo_loss, log1mexp
from drdo_kernels.pair_loss import BLOCK_PAIRS, METRIC_NAMES, drdo_pair_loss

ULP32 = 2.0**-24
#: the kernel's error may be this many times the float32 reference's, floored at two ulps:
#: each value composes a few rounded float32 operations, the reference's can be exact by luck
ERR_FACTOR = 4.0
FLOOR = 2 * ULP32


def _pairs(n_pairs: int, seed: int = 0) -> list[torch.Tensor]:
    """Six [B] float64 tensors holding float32-exact values: z_w, z_l, rhat_w, rhat_l, r*_w, r*_l.

    The first entries are the hard cases: z near 0 and the clamp, z = -1e4, both sides of
    -ln 2 (the log1mexp branch point), near-ties and very large margins."""
    g = torch.Generator().manual_seed(seed)
    z_w = -20 * torch.rand(n_pairs, generator=g, dtype=torch.float64)
    z_l = -20 * torch.rand(n_pairs, generator=g, dtype=torch.float64)
    special = [  # (z_w, z_l)
        (-5.0, -1e-7), (-1.0, -1e4), (-1e4, -2.0), (-1e-7, -2e-7), (-3.0, -3.0 + 1e-5), (-2.0, -2.0),
        (-1.0, -300.0), (-300.0, -1.0), (-4.0, -0.6931), (-4.0, -0.6932), (-0.5, -2.5e-6), (-7.0, -1e-3),
        (-1e4, -1e-7), (-1e-7, -1e4), (-9.0, 0.0), (-2.0, -30.0),
    ]
    for i, pair in enumerate(special[:n_pairs]):
        z_w[i], z_l[i] = pair
    rest = [torch.randn(n_pairs, generator=g, dtype=torch.float64) for _ in range(4)]
    return [t.float().double() for t in (z_w, z_l, *rest)]


def _run(fn, base, dtype, **kw):
    """loss, grads w.r.t. all six inputs, metric values; everything as float64."""
    xs = [t.detach().to(dtype).clone().requires_grad_() for t in base]
    loss, metrics = fn(*xs, **kw)
    loss.backward()
    return {
        "loss": loss.detach().double().reshape(1),
        **{f"grad{i}": x.grad.double() for i, x in enumerate(xs)},
        "metrics": torch.stack([v.double() for v in metrics.values()]),
    }, loss, metrics


def _rel_err(x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max_i |x_i - ref_i| / scale_i; scale defaults to |ref_i| floored at 1e-6 max|ref|."""
    if scale is None:
        scale = ref.abs() + 1e-6 * ref.abs().max() + 1e-30
    return ((x - ref).abs() / scale).max().item()


def _grad_scales(base, alpha=0.1, gamma=2.0, unlikelihood="welleck", reduction="mean"):
    """Per-element magnitude of the terms the loss and each gradient sum (float64): the scale on
    which a float32 evaluation of a sum with cancellation is accurate. focal <= 1, |focal'| <= gamma."""
    z_w, z_l, rh_w, rh_l, or_w, or_l = base
    sign = 1.0 if unlikelihood == "welleck" else -1.0
    zc = z_l.clamp(max=LOGP_CLAMP_MAX)
    u = (z_w + sign * log1mexp(zc)).abs()
    d_l1me = torch.where(z_l <= LOGP_CLAMP_MAX, torch.exp(zc) / torch.expm1(zc), torch.zeros_like(zc)).abs()
    div = z_w.numel() if reduction == "mean" else 1
    g_zw = alpha * (1.0 + gamma * u) / div
    g_zl = alpha * (d_l1me + gamma * u) / div
    g_r = 2.0 * ((or_w - or_l).abs() + (rh_w - rh_l).abs()) / div
    loss = (((or_w - or_l) - (rh_w - rh_l)) ** 2 + alpha * u).sum(0, keepdim=True) / div
    scales = {"loss": loss, "grad0": g_zw, "grad1": g_zl, "grad2": g_r, "grad3": g_r, "grad4": g_r, "grad5": g_r}
    return {k: v + 1e-30 for k, v in scales.items()}


def _check_against_reference(base, backend, **kw):
    ref64, _, m64 = _run(drdo_loss, base, torch.float64, **kw)
    ref32, _, _ = _run(drdo_loss, base, torch.float32, **kw)
    out, loss, metrics = _run(lambda *a, **k: drdo_pair_loss(*a, backend=backend, **k), base, torch.float32, **kw)
    assert loss.dtype == torch.float32
    assert list(metrics) == list(m64)
    scales = _grad_scales(base, **kw)
    for name in ref64:
        assert torch.isfinite(out[name]).all(), name
        scale = scales.get(name)
        e_ref, e_out = _rel_err(ref32[name], ref64[name], scale), _rel_err(out[name], ref64[name], scale)
        assert e_out <= ERR_FACTOR * max(e_ref, FLOOR), (name, kw, e_out, e_ref)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("unlikelihood", ["welleck", "paper"])
def test_matches_reference_over_alpha_gamma(backend, unlikelihood):
    base = _pairs(37)  # more than one block of pairs
    assert 37 > BLOCK_PAIRS
    for gamma in (0.0, 1.0, 2.0, 5.0):
        for alpha in (0.0, 0.1, 1.0):
            _check_against_reference(base, backend, alpha=alpha, gamma=gamma, unlikelihood=unlikelihood)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sweep_over_log1mexp_and_sigmoid_range(backend):
    """z_l from -3e-6 to -1e3 (both log1mexp branches) and margins from -40 to 40."""
    n = 2 * BLOCK_PAIRS
    z_l = -torch.logspace(-5.5, 3, n, dtype=torch.float64)
    z_w = z_l + torch.linspace(-40, 40, n, dtype=torch.float64).flip(0)
    base = [t.float().double() for t in (z_w, z_l, *_pairs(n, seed=3)[2:])]
    _check_against_reference(base, backend, alpha=1.0, gamma=2.0, unlikelihood="welleck")
    _check_against_reference(base, backend, alpha=0.5, gamma=1.0, unlikelihood="paper")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_pair_and_reduction(backend, reduction):
    base = _pairs(1, seed=1)
    _check_against_reference(base, backend, alpha=0.1, gamma=2.0, reduction=reduction)
    base = _pairs(5, seed=2)
    _check_against_reference(base, backend, alpha=1.0, gamma=5.0, reduction=reduction, unlikelihood="paper")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_clamp_boundary_matches_torch_clamp(backend):
    """In float32: z_l == LOGP_CLAMP_MAX still passes gradient, z_l above it gets none."""
    clamp = torch.tensor(LOGP_CLAMP_MAX, dtype=torch.float32)
    z_l = torch.stack([clamp, torch.nextafter(clamp, torch.tensor(0.0)), torch.tensor(-1e-8), torch.tensor(0.0)])
    base = [torch.full((4,), -3.0), z_l, torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4)]
    kw = dict(alpha=1.0, gamma=0.0)
    ref, _, _ = _run(drdo_loss, base, torch.float32, **kw)
    out, _, _ = _run(lambda *a, **k: drdo_pair_loss(*a, backend=backend, **k), base, torch.float32, **kw)
    assert ref["grad1"][0] != 0 and (ref["grad1"][1:] == 0).all()
    torch.testing.assert_close(out["grad1"], ref["grad1"], rtol=4 * ULP32, atol=0)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=4 * ULP32, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gamma_zero_focal_is_exactly_one(backend):
    base = [t.float() for t in _pairs(6, seed=4)]
    for t in base[:2]:
        t.requires_grad_()
    loss, metrics = drdo_pair_loss(*base, alpha=1.0, gamma=0.0, backend=backend)
    assert metrics["focal"].item() == 1.0
    loss.backward()
    # with focal == 1, dloss/dz_w = -alpha / B exactly
    torch.testing.assert_close(base[0].grad, torch.full((6,), -1.0 / 6), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_implicit_reward_shares_the_logps(backend):
    """reward="implicit": rhat = beta * z, so gradients of both uses of z add up."""
    base = _pairs(9, seed=5)
    beta = 0.7

    def run(fn, dtype):
        z_w, z_l = (t.detach().to(dtype).requires_grad_() for t in base[:2])
        loss, _ = fn(z_w, z_l, beta * z_w, beta * z_l, base[4].to(dtype), base[5].to(dtype), alpha=0.1, gamma=2.0)
        loss.backward()
        return torch.cat([loss.detach().reshape(1), z_w.grad, z_l.grad]).double()

    ref64, ref32 = run(drdo_loss, torch.float64), run(drdo_loss, torch.float32)
    out = run(lambda *a, **k: drdo_pair_loss(*a, backend=backend, **k), torch.float32)
    assert _rel_err(out, ref64) <= ERR_FACTOR * max(_rel_err(ref32, ref64), FLOOR)


def test_torch_backend_float64_matches_reference_and_gradcheck():
    base = _pairs(7, seed=6)
    # smooth points only (gradcheck's finite differences must not cross the clamp); both log1mexp branches
    base[0] = torch.tensor([-5.0, -1.0, -3.0, -2.0, -0.1, -8.0, -2.5], dtype=torch.float64)
    base[1] = torch.tensor([-0.3, -2.0, -1e-3, -2.0, -6.0, -0.7, -30.0], dtype=torch.float64)
    base = [t.detach().clone().requires_grad_() for t in base]
    kw = dict(alpha=0.3, gamma=2.0, unlikelihood="paper")
    loss, metrics = drdo_pair_loss(*base, backend="torch", **kw)
    ref, ref_metrics = drdo_loss(*base, **kw)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
    for k in ref_metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda *x: drdo_pair_loss(*x, backend="torch", **kw)[0], base)
    # "auto" keeps float64 on the torch path
    assert drdo_pair_loss(*base, backend="auto", **kw)[0].dtype == torch.float64


@pytest.mark.triton
def test_mixed_dtypes_give_grads_in_input_dtypes():
    base = _pairs(4, seed=7)
    xs = [base[0].float(), base[1].float(), base[2].bfloat16(), base[3].bfloat16(), base[4].half(), base[5].half()]
    xs = [x.requires_grad_() for x in xs]
    loss, _ = drdo_pair_loss(*xs, backend="triton")
    ref, _ = drdo_loss(*xs)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert [x.grad.dtype for x in xs] == [x.dtype for x in xs]
    ref_xs = [x.detach().clone().requires_grad_() for x in xs]
    drdo_loss(*ref_xs)[0].backward()
    for x, r in zip(xs, ref_xs):  # oracle gradients are exact too (the negated reward-head gradients)
        torch.testing.assert_close(x.grad, r.grad)


@pytest.mark.triton
def test_oracle_rewards_without_grad_and_no_grad_mode():
    base = [t.float() for t in _pairs(3, seed=8)]
    with torch.no_grad():
        loss, metrics = drdo_pair_loss(*base, backend="triton")
    ref, ref_metrics = drdo_loss(*base)
    torch.testing.assert_close(loss, ref)
    assert set(metrics) == set(METRIC_NAMES) == set(ref_metrics)
    assert all(not v.requires_grad for v in metrics.values())


def test_bad_inputs_raise():
    b = [torch.zeros(3) for _ in range(6)]
    with pytest.raises(ValueError, match="unlikelihood"):
        drdo_pair_loss(*b, unlikelihood="other")
    with pytest.raises(ValueError, match="gamma"):
        drdo_pair_loss(*b, gamma=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        drdo_pair_loss(*b, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        drdo_pair_loss(*b, backend="cuda")
    with pytest.raises(ValueError, match="shape"):
        drdo_pair_loss(*b[:5], torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        drdo_pair_loss(*b[:5], torch.zeros(3, 1))
    with pytest.raises(ValueError, match="empty"):
        drdo_pair_loss(*[torch.zeros(0) for _ in range(6)])
    with pytest.raises(TypeError, match="floating"):
        drdo_pair_loss(*b[:5], torch.zeros(3, dtype=torch.long))


@pytest.mark.triton
def test_triton_refuses_float64():
    with pytest.raises(ValueError, match="float64"):
        drdo_pair_loss(*[torch.zeros(3, dtype=torch.float64) for _ in range(6)], backend="triton")


def test_double_backward_is_refused():
    z = [t.float().requires_grad_() for t in _pairs(3, seed=9)]
    loss, _ = drdo_pair_loss(*z, backend="torch")
    (g,) = torch.autograd.grad(loss, z[0], create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_per_pair_loss_value_across_log1mexp_range(backend):
    """One pair per call, so each loss value is a single pair's (no other pair can mask its
    error): z_l across both log1mexp branches and the branch point, both readings."""
    z_ls = [-2e-6, -1e-4, -0.01, -0.1, -0.3, -0.5, -0.6931, -0.6932, -0.8, -1.0, -2.0, -5.0, -20.0]
    zero = torch.zeros(1, dtype=torch.float64)
    for unlikelihood in ("welleck", "paper"):
        for z_l in z_ls:
            base = [torch.tensor([-1.5], dtype=torch.float64), torch.tensor([z_l]).double(), zero, zero, zero, zero]
            _check_against_reference(base, backend, alpha=1.0, gamma=1.0, unlikelihood=unlikelihood)
