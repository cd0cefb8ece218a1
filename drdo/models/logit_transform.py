"""What a causal LM's forward does to ``lm_head(hidden)`` before its log-softmax.

Most models' logits are ``lm_head(hidden)``. Some transform them: Gemma 2 / 3 cap them softly
(``final_logit_softcapping``: l = c·tanh(l / c)), Cohere multiplies them (``logit_scale``),
Granite divides them (``logits_scaling``), and other families do the same under other names.
The fused kernels of :mod:`drdo_kernels` never see the model's forward, only its last hidden
state and ``lm_head.weight``, so they take the transform as keywords:

    l = logit_scale · lm_head(hidden);  l = softcap · tanh(l / softcap) (softcap set);  log_softmax(l)

:func:`model_logit_transform` finds those keywords for a model. It runs the model's own forward
ONCE on one token with a hook that replaces the output embedding's result by a known grid of
raw logits, and reads the transform off the logits the forward returns
(:func:`probe_logit_transform`), so it holds for any family, whatever its config calls the
setting. Where the model cannot run (weights on the meta device) it falls back to the config
(:func:`config_logit_transform`). A transform outside this family is refused in one line.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["IDENTITY", "config_logit_transform", "probe_logit_transform", "model_logit_transform"]

#: The keywords of the fused kernels for a model whose logits are lm_head(hidden).
IDENTITY = {"logit_scale": 1.0, "softcap": None}

#: Relative agreement asked of the probe's fit on every grid point (the forward runs in float32).
_FIT_RTOL = 1e-5


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _positive(value) -> float | None:
    """A finite non-zero number as float, else None (unset, 0 or a non-number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        return None
    return float(value)


def config_logit_transform(config) -> dict:
    """The transform a config declares, by the names transformers' families use:
    ``final_logit_softcapping`` (Gemma 2 / 3 and kin), ``logit_scale`` (Cohere),
    ``logits_scaling`` (Granite: logits are divided by it), ``output_multiplier`` (applied
    before the softcap). Returns {"logit_scale": float, "softcap": float | None}."""
    text = _text_config(config)
    scale = 1.0
    for name in ("logit_scale", "output_multiplier"):
        scale *= _positive(getattr(text, name, None)) or 1.0
    divisor = _positive(getattr(text, "logits_scaling", None))
    if divisor is not None:
        scale /= divisor
    return {"logit_scale": scale, "softcap": _positive(getattr(text, "final_logit_softcapping", None))}


def _probe_grid(n: int) -> torch.Tensor:
    """[n] float32 raw logits from ±1e-4 to ±1e3 on a log scale, both signs (n >= 2)."""
    magnitudes = torch.logspace(-4, 3, max(1, n // 2), dtype=torch.float64)
    grid = torch.cat([magnitudes, -magnitudes])
    return torch.cat([grid, grid.new_zeros(n - grid.numel())]).float()


def _forward_on_grid(lm: nn.Module, grid: torch.Tensor) -> torch.Tensor:
    """The model's logits [V] float32 when its output embedding returns ``grid`` [V] on one token."""
    head = lm.get_output_embeddings()
    device = head.weight.device
    hook = head.register_forward_hook(lambda _m, _i, out: grid.to(device).expand(*out.shape[:-1], grid.numel()))
    try:
        with torch.no_grad():
            ids = torch.zeros(1, 1, dtype=torch.long, device=device)
            logits = lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    finally:
        hook.remove()
    return logits.reshape(-1, grid.numel())[-1].double()


def _close(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    return bool(((a - b).abs() <= _FIT_RTOL * (b.abs() + 1e-3 * scale)).all())


def _fit(grid: torch.Tensor, out: torch.Tensor) -> dict | None:
    """logit_scale and softcap that map ``grid`` to ``out`` (float64 [V]), or None."""
    x = grid.double()
    small = x.abs() == x.abs()[x != 0].min()
    slope = float((out[small] / x[small]).mean())  # d out / d raw at 0: logit_scale
    if _close(out, slope * x, float(out.abs().max())):
        return {"logit_scale": slope, "softcap": None}
    cap = float(out.abs().max())  # the grid reaches far past any softcap: tanh saturates to 1
    if cap > 0 and _close(out, cap * torch.tanh(slope * x / cap), cap):
        return {"logit_scale": slope, "softcap": cap}
    return None


def _snap(measured: dict, declared: dict) -> dict:
    """The config's exact numbers where they agree with the measurement to a float32 rounding."""
    def same(a, b):
        return a is None and b is None or a is not None and b is not None and abs(a - b) <= 1e-6 * abs(b)

    return {k: declared[k] if same(measured[k], declared[k]) else measured[k] for k in measured}


def probe_logit_transform(lm: nn.Module) -> dict:
    """Measure the transform of a causal LM's forward (one token, no gradient, weights untouched).

    Returns {"logit_scale": float, "softcap": float | None}, the config's own numbers where they
    agree with the measurement. Raises ValueError when the forward does something else to its
    logits (the fused kernels could not reproduce it)."""
    if lm.get_output_embeddings() is None:
        raise ValueError(f"{type(lm).__name__} has no output embedding: not a causal LM with an LM head")
    grid = _probe_grid(lm.get_output_embeddings().weight.shape[0])
    was_training = lm.training
    lm.eval()
    try:
        out = _forward_on_grid(lm, grid)
    finally:
        lm.train(was_training)
    fitted = _fit(grid, out)
    if fitted is None:
        raise ValueError(
            f"{type(lm).__name__}'s forward transforms its logits in a way the fused kernels cannot reproduce "
            "(not logit_scale * lm_head(hidden), optionally soft-capped with softcap * tanh(l / softcap))")
    return _snap(fitted, config_logit_transform(lm.config))


def model_logit_transform(lm: nn.Module) -> dict:
    """The fused kernels' keywords for ``lm``: measured by :func:`probe_logit_transform`, or read
    from its config (:func:`config_logit_transform`) where its weights are not materialised."""
    head = lm.get_output_embeddings()
    if head is None or head.weight.is_meta:
        return config_logit_transform(lm.config)
    return probe_logit_transform(lm)

