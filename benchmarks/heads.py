"""LM-head inputs, the naive full-logits log-probs, and a chunked float32 reference.

Shapes: hidden [N, H] (or [R, T, H]) in bf16/fp32, weight [V, H] same dtype,
labels [N] (or [R, T]) int64 with ignore_index on ignored tokens.
"""
from __future__ import annotations

import torch

from benchmarks.common import torch_dtype

IGNORE_INDEX = -100


def make_head_tensors(ctx: dict, shape: tuple[int, ...]):
    """Seeded (hidden [*shape, H], weight [V, H], labels [*shape]) on ctx's device and dtype.

    Logits hidden @ weight.T have a standard deviation of about 2, like a trained head.
    A fraction ctx["ignore_frac"] of labels is ignore_index."""
    device, dtype = ctx["device"], torch_dtype(ctx["dtype"])
    gen = torch.Generator(device=device).manual_seed(int(ctx["seed"]))
    hidden = torch.randn(*shape, ctx["H"], device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(ctx["V"], ctx["H"], device=device, generator=gen) * (2.0 / ctx["H"] ** 0.5)).to(dtype)
    weight.requires_grad_()
    labels = torch.randint(0, ctx["V"], shape, device=device, generator=gen)
    frac = float(ctx.get("ignore_frac", 0.0))
    if frac > 0:
        drop = torch.rand(shape, device=device, generator=gen) < frac
        labels = labels.masked_fill(drop, IGNORE_INDEX)
    return hidden, weight, labels


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What users write: full logits [N, V], float32 log_softmax, gather. Returns logp [N] float32 (0 where ignored)."""
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != IGNORE_INDEX
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, token, torch.zeros_like(token))


@torch.no_grad()
def reference_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       chunk: int = 2048) -> torch.Tensor:
    """log_softmax(hidden @ weight.T)[labels] computed in float32 from the (rounded) inputs, in row
    chunks so the check itself fits in memory. hidden [*, H], labels [*] -> [*] float32."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    w = weight.detach().float()
    out = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        stop = min(start + chunk, h.shape[0])
        out[start:stop] = naive_logprobs(h[start:stop].float(), w, y[start:stop])
    return out.reshape(labels.shape)
