"""Logit transforms (temperature, softcap, logit_scale) on every backend, against float64 full logits.

The ground truth is written here, independently of drdo_kernels: float64 logits
``x = hidden @ weight.T + bias`` of the (dtype-exact) inputs, then ``s * x``, ``c * tanh(. / c)``,
``/ T``, log-softmax, and autograd for every gradient. Raw logits reach +-60, so a softcap of 30
is deep in its non-linear range. Triton backends run in the interpreter
(``TRITON_INTERPRET=1 python -m pytest -q -m "triton or chunked" tests/test_logit_transforms.py``).
"""
import math

import pytest
import torch

import drdo_kernels
from drdo.losses import DPOSpec, DRDOSpec, EDPOSpec, OracleSpec, objective_loss
from drdo_kernels import LogitTransform, fused_linear_logprobs, fused_objective_loss
from drdo_kernels.logit_transform import IDENTITY, logit_transform

ROWS, T, H, V = 4, 9, 32, 200  # V spans two Triton vocab tiles (128) and a partial one
CHUNK = 5  # tokens per chunk: every chunk boundary falls inside a row
TRANSFORMS = {
    "identity": dict(),
    "softcap": dict(softcap=30.0),
    "scale": dict(logit_scale=0.25),
    "temperature": dict(temperature=0.7),
    "all": dict(softcap=30.0, logit_scale=0.25, temperature=0.7),
    "negative_scale": dict(softcap=30.0, logit_scale=-1.5, temperature=0.7),
}
#: (logp absolute, gradient relative to its largest entry) per dtype of the inputs.
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4), torch.float16: (2e-3, 6e-3),
       torch.bfloat16: (2e-3, 3e-2)}


def _batch(seed=0, bias=True):
    """float64 weight [V, H], hidden [ROWS, T, H], bias [V] | None, labels [ROWS, T] (a prompt
    and padding ignored), the raw logits reaching +-60."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    weight *= 60.0 / (hidden.reshape(-1, H) @ weight.T).abs().max()
    labels = torch.randint(0, V, (ROWS, T), generator=g)
    labels[:, :2] = -100
    labels[1, -3:] = -100
    b = 5.0 * torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    return weight, hidden, labels, b


def _transformed(x, temperature=1.0, softcap=None, logit_scale=1.0):
    """The definition, term by term, in float64."""
    x = logit_scale * x
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def _expected_logprobs(weight, hidden, labels, bias, **transform):
    """float64 per-token log-probs [ROWS, T] (0 where ignored) from full logits."""
    x = hidden @ weight.T + (0.0 if bias is None else bias)
    logp = torch.log_softmax(_transformed(x, **transform), -1)
    picked = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return torch.where(labels == -100, torch.zeros_like(picked), picked)


def _leaves(tensors, dtype):
    """float64 copies (requiring grad) of the tensors rounded to ``dtype``, and the ``dtype`` leaves."""
    exact = [None if t is None else t.to(dtype).double().requires_grad_() for t in tensors]
    cast = [None if t is None else t.to(dtype).requires_grad_() for t in tensors]
    return exact, cast


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


BACKEND_DTYPES = [(b, d) for b in ("reference", "torch", "chunked", "triton")
                  for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
                  if not (b == "triton" and d == torch.float64)]


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("with_bias", [True, False])
def test_logprobs_and_every_gradient_match_float64_full_logits(backend, dtype, name, with_bias):
    weight, hidden, labels, bias = _batch(bias=with_bias)
    (w64, h64, b64), (w, h, b) = _leaves((weight, hidden, bias), dtype)
    transform = TRANSFORMS[name]
    upstream = torch.randn(ROWS, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if backend == "reference" and dtype in (torch.bfloat16, torch.float16):
        # an unfused model rounds its logits to its dtype: so does the "reference" backend
        x = (h64 @ w64.T + (0.0 if b64 is None else b64)).to(dtype).double()
        want = torch.log_softmax(_transformed(x, **transform), -1).gather(-1, labels.clamp_min(0)[..., None])
        want = torch.where(labels == -100, 0.0, want.squeeze(-1))
    else:
        want = _expected_logprobs(w64, h64, labels, b64, **transform)
    (want * upstream).sum().backward()

    got = fused_linear_logprobs(w, h, labels, bias=b, backend=backend, chunk_tokens=CHUNK, **transform)
    (got * upstream.to(got.dtype)).sum().backward()

    logp_tol, grad_tol = TOL[dtype]
    slope = abs(transform.get("logit_scale", 1.0)) / transform.get("temperature", 1.0)
    if backend == "reference" and dtype in (torch.bfloat16, torch.float16):
        logp_tol = 1e-3  # the rounded logits are the reference's too; the log-softmax is float32
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (got[labels == -100] == 0).all()
    assert (got.double() - want).abs().max().item() <= logp_tol * max(1.0, slope * 60), name
    for leaf, exact, what in ((h, h64, "hidden"), (w, w64, "weight"), (b, b64, "bias")):
        if leaf is None:
            continue
        assert leaf.grad.dtype == dtype
        assert _rel(leaf.grad, exact.grad) <= grad_tol, (what, _rel(leaf.grad, exact.grad))
    assert (h.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
def test_softcap_changes_the_logprobs_by_far_more_than_the_tolerance(backend):
    """The transform is applied, not dropped: at logits of +-60 a softcap of 30 moves log-probs
    by units, and the fused result follows the capped ground truth."""
    weight, hidden, labels, bias = _batch(seed=3)
    w, h, b = weight.float(), hidden.float(), bias.float()
    plain = fused_linear_logprobs(w, h, labels, bias=b, backend=backend, chunk_tokens=CHUNK)
    capped = fused_linear_logprobs(w, h, labels, bias=b, backend=backend, chunk_tokens=CHUNK, softcap=30.0)
    want = _expected_logprobs(w.double(), h.double(), labels, b.double(), softcap=30.0)
    assert (plain.double() - want).abs().max() > 1.0
    assert (capped.double() - want).abs().max() < 1e-3


def _pair_batch(seed=0):
    """weight, hidden [2B, T, H], labels, bias (float64) and per-row scores for the losses."""
    weight, hidden, labels, bias = _batch(seed)
    g = torch.Generator().manual_seed(seed + 10)
    scores = dict(rewards=torch.randn(ROWS, generator=g, dtype=torch.float64),
                  oracle=torch.randn(ROWS, generator=g, dtype=torch.float64),
                  ref_logps=-20.0 + 3 * torch.randn(ROWS, generator=g, dtype=torch.float64),
                  oracle_k=torch.randn(3, ROWS, generator=g, dtype=torch.float64))
    return weight, hidden, labels, bias, scores


SPECS = {
    "drdo_head": DRDOSpec(alpha=0.5, gamma=2.0, reward="head"),
    "drdo_implicit": DRDOSpec(alpha=0.5, reward="implicit", beta=0.05, length_normalize=True),
    "dpo": DPOSpec(beta=0.1),
    "edpo": EDPOSpec(beta=0.1),
    "oracle": OracleSpec(alpha=0.3),
}


def _score_inputs(spec, scores):
    if isinstance(spec, EDPOSpec):
        return dict(ref_logps=scores["ref_logps"], oracle=scores["oracle_k"])
    if isinstance(spec, DPOSpec):
        return dict(ref_logps=scores["ref_logps"])
    if isinstance(spec, OracleSpec):
        return dict(rewards=scores["rewards"])
    return dict(rewards=scores["rewards"], oracle=scores["oracle"])


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("backend", ["reference", "torch", "chunked", "triton"])
@pytest.mark.parametrize("chunk_tokens", [CHUNK, 64])  # pairs split over chunks (two passes), whole pairs
def test_loss_gradients_with_a_transform_match_a_float64_composition(spec_name, backend, chunk_tokens):
    spec = SPECS[spec_name]
    transform = TRANSFORMS["all"]
    weight, hidden, labels, bias, scores = _pair_batch()
    named = _score_inputs(spec, scores)
    (w64, h64, b64), (w, h, b) = _leaves((weight, hidden, bias), torch.float32)
    named64 = {k: v.clone().requires_grad_() for k, v in named.items()}
    named32 = {k: v.float().requires_grad_() for k, v in named.items()}

    logps = _expected_logprobs(w64, h64, labels, b64, **transform).sum(-1)
    n_tokens = (labels != -100).sum(-1)
    want, _ = objective_loss(spec, logps, n_tokens, **named64)
    want.backward()

    got, metrics = fused_objective_loss(spec, w, h, labels, b, backend=backend, chunk_tokens=chunk_tokens,
                                        **named32, **transform)
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-4 * max(1.0, abs(want.item()))
    for leaf, exact, what in ((h, h64, "hidden"), (w, w64, "weight"), (b, b64, "bias"),
                              *((named32[k], named64[k], k) for k in named)):
        if exact.grad is None:  # e.g. the Oracle's LM term does not read the rejected rows
            continue
        assert _rel(leaf.grad, exact.grad) <= 2e-4, (what, _rel(leaf.grad, exact.grad))


@pytest.mark.parametrize("cls,kwargs", [
    (drdo_kernels.FusedLinearDRDOLoss, dict(alpha=0.5)),
    (drdo_kernels.FusedLinearDPOLoss, dict(beta=0.1)),
    (drdo_kernels.FusedLinearEDPOLoss, dict(beta=0.1)),
    (drdo_kernels.FusedLinearOracleLoss, dict(alpha=0.3)),
])
def test_modules_take_the_transform_and_show_it(cls, kwargs):
    module = cls(**kwargs, softcap=30.0, logit_scale=0.25, temperature=0.7, backend="torch")
    assert (module.temperature, module.softcap, module.logit_scale) == (0.7, 30.0, 0.25)
    assert "softcap=30.0" in repr(module) and "logit_scale=0.25" in repr(module) and "temperature=0.7" in repr(module)
    assert cls(**kwargs).transform.is_identity
    with pytest.raises(ValueError, match="softcap"):
        cls(**kwargs, softcap=0.0)


def test_module_forward_applies_the_transform():
    weight, hidden, labels, bias, scores = _pair_batch(seed=5)
    transform = TRANSFORMS["all"]
    loss_fn = drdo_kernels.FusedLinearDPOLoss(beta=0.1, backend="torch", chunk_tokens=CHUNK, **transform)
    got, _ = loss_fn(weight, hidden, labels, scores["ref_logps"], bias)
    logps = _expected_logprobs(weight, hidden, labels, bias, **transform).sum(-1)
    want, _ = objective_loss(DPOSpec(beta=0.1), logps, (labels != -100).sum(-1), ref_logps=scores["ref_logps"])
    assert abs(got.item() - want.item()) < 1e-9


@pytest.mark.parametrize("field,value,message", [
    ("temperature", 0.0, "temperature must be a finite number > 0, got 0.0"),
    ("temperature", -1.0, "temperature must be a finite number > 0, got -1.0"),
    ("temperature", math.inf, "temperature must be a finite number > 0, got inf"),
    ("temperature", True, "temperature must be a finite number, got True"),
    ("softcap", 0.0, "softcap must be a finite number > 0, got 0.0"),
    ("softcap", math.nan, "softcap must be a finite number > 0, got nan"),
    ("softcap", False, "softcap must be a finite number, got False"),
    ("softcap", "30", "softcap must be a finite number, got '30'"),
    ("logit_scale", 0.0, "logit_scale must be a finite non-zero number, got 0.0"),
    ("logit_scale", -math.inf, "logit_scale must be a finite non-zero number, got -inf"),
    ("logit_scale", True, "logit_scale must be a finite number, got True"),
])
def test_bad_transform_values_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError) as info:
        LogitTransform(**{field: value})
    assert str(info.value) == message
    weight, hidden, labels, bias = _batch()
    with pytest.raises(ValueError, match=field):
        fused_linear_logprobs(weight, hidden, labels, backend="torch", **{field: value})


def test_the_value_object():
    assert IDENTITY.is_identity and logit_transform() is IDENTITY
    t = LogitTransform(temperature=2, softcap=30, logit_scale=-0.5)
    assert (t.temperature, t.softcap, t.logit_scale) == (2.0, 30.0, -0.5) and not t.is_identity
    assert not LogitTransform(temperature=0.5).is_identity
    with pytest.raises(dataclasses_frozen_error()):
        t.softcap = 1.0
    x = torch.linspace(-80, 80, 33, dtype=torch.float64)
    assert torch.allclose(t.apply(x), _transformed(x, 2.0, 30.0, -0.5), rtol=0, atol=1e-12)
    assert torch.allclose(t.apply_(x.clone()), _transformed(x, 2.0, 30.0, -0.5), rtol=0, atol=1e-12)
    xg = x.clone().requires_grad_()
    _transformed(xg, 2.0, 30.0, -0.5).sum().backward()
    assert torch.allclose(t.derivative(t.apply(x)), xg.grad, rtol=0, atol=1e-12)
    assert IDENTITY.apply(x) is x


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("use_triton", [False, True])
def test_the_fold_applies_the_transform_in_place(use_triton):
    """row_stats leaves transform(x + bias) in the buffer; softmax_grad of it (or of the raw
    logits with raw=True) is the gradient w.r.t. x + bias."""
    from drdo_kernels.softmax_fold import row_stats, softmax_grad

    g = torch.Generator().manual_seed(2)
    x = 40 * torch.randn(6, 300, generator=g)
    bias = torch.randn(300, generator=g)
    labels = torch.randint(0, 300, (6,), generator=g)
    up = torch.randn(6, generator=g)
    t = LogitTransform(**TRANSFORMS["all"])
    x64 = (x.double() + bias.double()).requires_grad_()
    logp = torch.log_softmax(_transformed(x64, **TRANSFORMS["all"]), -1).gather(1, labels[:, None]).squeeze(1)
    (logp * up.double()).sum().backward()
    buf = x.clone()
    lse, target = row_stats(buf, bias, labels, use_triton, t)
    assert torch.allclose(buf.double(), _transformed(x64.detach(), **TRANSFORMS["all"]), atol=1e-4, rtol=0)
    assert torch.allclose((target - lse).double(), logp.detach(), atol=1e-4, rtol=0)
    raw = x + bias
    d_stored = softmax_grad(buf, labels, lse, up, torch.float32, use_triton, t)
    d_raw = softmax_grad(raw, labels, lse, up, torch.float32, use_triton, t, raw=True)
    for d in (d_stored, d_raw):
        assert _rel(d, x64.grad) < 1e-5


# ---- one argument order: (lm_head_weight, hidden, labels, bias=None, *, ...)

def test_fused_linear_logprobs_is_weight_first_with_a_positional_bias():
    import inspect

    params = list(inspect.signature(fused_linear_logprobs).parameters.values())
    assert [p.name for p in params[:4]] == ["lm_head_weight", "hidden", "labels", "bias"]
    assert params[3].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert {"temperature", "softcap", "logit_scale"} <= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    weight, hidden, labels, bias = _batch()
    torch.testing.assert_close(fused_linear_logprobs(weight, hidden, labels, bias, backend="torch"),
                               _expected_logprobs(weight, hidden, labels, bias))


def test_the_old_weight_keyword_warns_and_still_works():
    weight, hidden, labels, bias = _batch()
    want = fused_linear_logprobs(weight, hidden, labels, bias, backend="torch")
    with pytest.warns(FutureWarning, match=r"lm_head_weight, hidden, labels"):
        old = fused_linear_logprobs(hidden, weight=weight, labels=labels, bias=bias, backend="torch")
    torch.testing.assert_close(old, want)
    with pytest.warns(FutureWarning):
        old = fused_linear_logprobs(hidden=hidden, weight=weight, labels=labels, backend="torch")
    torch.testing.assert_close(old, fused_linear_logprobs(weight, hidden, labels, backend="torch"))


@pytest.mark.parametrize("flat", [True, False])
def test_a_call_in_the_old_order_says_the_order(flat):
    weight, hidden, labels, _ = _batch()
    if flat:
        hidden, labels = hidden.reshape(-1, H), labels.reshape(-1)
    order = r"did you pass hidden first\? the order is \(lm_head_weight, hidden, labels\)"
    with pytest.raises(ValueError, match=order):
        fused_linear_logprobs(hidden, weight, labels, backend="torch")


@pytest.mark.parametrize("cls,fields", [
    (drdo_kernels.FusedLinearDRDOLoss, DRDOSpec),
    (drdo_kernels.FusedLinearDPOLoss, DPOSpec),
    (drdo_kernels.FusedLinearEDPOLoss, EDPOSpec),
    (drdo_kernels.FusedLinearOracleLoss, OracleSpec),
])
def test_module_constructors_name_every_spec_field(cls, fields):
    import dataclasses
    import inspect

    params = inspect.signature(cls).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    expected = {f.name for f in dataclasses.fields(fields)} | {
        "spec", "ignore_index", "backend", "reduction", "chunk_tokens", "temperature", "softcap", "logit_scale"}
    assert set(params) == expected
    for f in dataclasses.fields(fields):
        value = getattr(fields(), f.name)
        module = cls(**{f.name: value})
        assert getattr(module.spec, f.name) == value
