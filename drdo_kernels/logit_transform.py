"""The map from an LM head's output to the logits its model samples from.

Many models do not feed ``hidden @ weight.T + bias`` to the softmax as it is:

* Gemma 2 / 3 cap it softly: ``final_logit_softcapping * tanh(x / final_logit_softcapping)``;
* Cohere multiplies it by ``logit_scale``; Granite divides it by ``logits_scaling``
  (``logit_scale = 1 / logits_scaling``);
* sampling divides it by a temperature.

:class:`LogitTransform` holds the three in the order they apply::

    l = logit_scale * (hidden @ weight.T + bias)
    l = softcap * tanh(l / softcap)          # when softcap is set
    l = l / temperature
    logp = log_softmax(l)

Every backend of :func:`drdo_kernels.fused_linear_logprobs` and of the fused losses applies it
in the same two constants (:attr:`LogitTransform.pre`, :attr:`LogitTransform.post`)::

    no softcap:  l = pre * x                 pre = logit_scale / temperature
    softcap:     l = post * tanh(pre * x)    pre = logit_scale / softcap, post = softcap / temperature

and its derivative from the transformed logit alone (what the backward passes hold)::

    dl/dx = slope * (1 - (l / post)^2)       slope = logit_scale / temperature   (softcap)
    dl/dx = slope                                                                 (no softcap)

The identity (the defaults) is skipped everywhere: it adds no operation.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from drdo.errors import shown

from .triton_runtime import triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["LogitTransform", "IDENTITY", "logit_transform", "TRANSFORM_NONE", "TRANSFORM_LINEAR",
           "TRANSFORM_SOFTCAP", "transform_logits", "transform_grad"]

#: Kinds of transform, the ``TRANSFORM`` constexpr of the Triton kernels.
TRANSFORM_NONE, TRANSFORM_LINEAR, TRANSFORM_SOFTCAP = 0, 1, 2


def _finite(name: str, value, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0) or value == 0:
        need = "a finite number > 0" if positive else "a finite non-zero number"
        raise ValueError(f"{name} must be {need}, got {shown(value)}")
    return value


@dataclasses.dataclass(frozen=True)
class LogitTransform:
    """temperature: finite > 0; softcap: None or finite > 0; logit_scale: finite, non-zero."""

    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "temperature", _finite("temperature", self.temperature, positive=True))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", _finite("softcap", self.softcap, positive=True))
        object.__setattr__(self, "logit_scale", _finite("logit_scale", self.logit_scale, positive=False))

    @property
    def is_identity(self) -> bool:
        """True when the logits are the LM head's output unchanged."""
        return self.softcap is None and self.logit_scale == 1.0 and self.temperature == 1.0

    @property
    def kind(self) -> int:
        """:data:`TRANSFORM_NONE`, :data:`TRANSFORM_LINEAR` or :data:`TRANSFORM_SOFTCAP`."""
        if self.softcap is not None:
            return TRANSFORM_SOFTCAP
        return TRANSFORM_NONE if self.is_identity else TRANSFORM_LINEAR

    @property
    def pre(self) -> float:
        """The factor applied before the tanh (the only one without a softcap)."""
        return self.logit_scale / (self.temperature if self.softcap is None else self.softcap)

    @property
    def post(self) -> float:
        """The factor applied after the tanh (1.0 without a softcap)."""
        return 1.0 if self.softcap is None else self.softcap / self.temperature

    @property
    def slope(self) -> float:
        """dl/dx at x = 0: logit_scale / temperature."""
        return self.logit_scale / self.temperature

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The transformed logits of ``logits`` [*, V] (the LM head's output, bias included), in
        plain differentiable torch ops in the order of the definition; the identity returns
        ``logits`` itself."""
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """In place on a float32/float64 buffer ``x`` (the fold's form, :attr:`pre` / :attr:`post`);
        returns x. The identity does nothing."""
        kind = self.kind
        if kind != TRANSFORM_NONE:
            x.mul_(self.pre)
        if kind == TRANSFORM_SOFTCAP:
            x.tanh_().mul_(self.post)
        return x

    def derivative(self, logits: torch.Tensor) -> torch.Tensor:
        """dl/dx [*, V] (a new tensor) from the transformed ``logits``: slope * (1 - (l / post)^2)
        with a softcap, else the constant slope (broadcast)."""
        if self.softcap is None:
            return torch.full_like(logits, self.slope)
        t = logits / self.post  # tanh(pre * x)
        return t.mul_(t).neg_().add_(1.0).mul_(self.slope)

    def __str__(self) -> str:
        return f"temperature={self.temperature}, softcap={self.softcap}, logit_scale={self.logit_scale}"


#: The transform that changes nothing.
IDENTITY = LogitTransform()


def logit_transform(temperature=1.0, softcap=None, logit_scale=1.0) -> LogitTransform:
    """The :class:`LogitTransform` of the keyword arguments of the fused functions (the shared
    :data:`IDENTITY` for the defaults)."""
    if temperature == 1.0 and softcap is None and logit_scale == 1.0 and not isinstance(temperature, bool) \
            and not isinstance(logit_scale, bool):
        return IDENTITY
    return LogitTransform(temperature=temperature, softcap=softcap, logit_scale=logit_scale)


if triton is not None:

    @triton.jit
    def _tanh(y):
        """tanh in fp32 from exp (the interpreter has no libdevice): a Taylor polynomial below
        |y| = 1/8 (relative error < 1e-9 there), (1 - e^-2|y|) / (1 + e^-2|y|) above; tanh(+-inf) = +-1."""
        a = tl.abs(y)
        e = tl.exp(-2.0 * a)
        s = tl.minimum(a, 0.125)  # the polynomial's argument stays finite (no inf * 0 off its range)
        s2 = s * s
        small = s * (1.0 - s2 / 3.0 * (1.0 - 0.4 * s2 * (1.0 - s2 * (17.0 / 42.0))))
        t = tl.where(a < 0.125, small, (1.0 - e) / (1.0 + e))
        return tl.where(y < 0, -t, t)

    @triton.jit
    def transform_logits(x, pre, post, TRANSFORM: tl.constexpr):
        """The transformed logits of fp32 ``x`` (the LM head's output, bias included):
        TRANSFORM 0 returns x, 1 pre * x, 2 post * tanh(pre * x)."""
        if TRANSFORM == 1:
            x = x * pre
        elif TRANSFORM == 2:
            x = _tanh(x * pre) * post
        return x

    @triton.jit
    def transform_grad(d, logits, post, slope, TRANSFORM: tl.constexpr):
        """``d`` (gradient w.r.t. the transformed ``logits``) times dl/dx: slope, times
        (1 - (logits / post)^2) with a softcap; TRANSFORM 0 returns d."""
        if TRANSFORM == 1:
            d = d * slope
        elif TRANSFORM == 2:
            t = logits / post
            d = d * (slope * (1.0 - t) * (1.0 + t))
        return d
