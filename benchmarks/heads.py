"""LM-head inputs, the naive full-logits log-probs, a chunked float32 reference, and what the
inputs look like (their logit statistics).

Shapes: hidden [N, H] (or [R, T, H]) in bf16/fp32, weight [V, H] same dtype,
labels [N] (or [R, T]) int64 with ignore_index on ignored tokens.
"""
from __future__ import annotations

import math

import torch

from benchmarks.common import LOGIT_REGIMES, MARGINS, ZIPF_EXPONENT, torch_dtype

IGNORE_INDEX = -100
__all__ = ["IGNORE_INDEX", "LOGIT_REGIMES", "MARGINS", "ZIPF_EXPONENT", "SEQ_LEN", "rows_and_len", "make_head_tensors",
           "close_pairs", "logit_stats", "naive_logprobs", "reference_logprobs"]
#: Tokens per row of the loss benchmarks (2B rows of T tokens), by device, unless ctx["seq_len"] says.
SEQ_LEN = {"cuda": 1024, "cpu": 256}

LOGIT_STD = {"std2": 2.0, "init": 0.6, "peaked": 1.0}
#: The tile a filtering backward skips or keeps, and the bf16 filter threshold (default_filter_eps).
TILE, FILTER_EPS_BF16 = 128, 2.0**-12


def rows_and_len(ctx: dict) -> tuple[int, int]:
    """(2B rows, T tokens per row) with 2B*T == N: T = min(seq_len, N // 2); raises if N does not split."""
    n = ctx["N"]
    t = min(int(ctx.get("seq_len") or SEQ_LEN[ctx["device"]]), n // 2)
    if t < 1 or n % t or (n // t) % 2:
        raise ValueError(f"N={n} must be an even multiple of the sequence length {t} (2B rows x T tokens)")
    return n // t, t


def make_head_tensors(ctx: dict, shape: tuple[int, ...]):
    """Seeded (hidden [*shape, H], weight [V, H], labels [*shape]) on ctx's device and dtype, with the
    logits of regime ctx["logits"] (:data:`LOGIT_REGIMES`, default "std2"). A fraction ctx["ignore_frac"]
    of labels is ignore_index."""
    device, dtype, regime = ctx["device"], torch_dtype(ctx["dtype"]), ctx.get("logits", "std2")
    if regime not in LOGIT_REGIMES:
        raise ValueError(f"logits must be one of {sorted(LOGIT_REGIMES)}, got {regime!r}")
    gen = torch.Generator(device=device).manual_seed(int(ctx["seed"]))
    hidden = torch.randn(*shape, ctx["H"], device=device, generator=gen)
    weight = torch.randn(ctx["V"], ctx["H"], device=device, generator=gen) * (LOGIT_STD[regime] / ctx["H"] ** 0.5)
    if regime == "peaked":
        prior = _zipf_direction(hidden, weight, gen)
        labels = torch.multinomial(prior, math.prod(shape), replacement=True, generator=gen).reshape(shape)
    else:
        labels = torch.randint(0, ctx["V"], shape, device=device, generator=gen)
    frac = float(ctx.get("ignore_frac", 0.0))
    if frac > 0:
        drop = torch.rand(shape, device=device, generator=gen) < frac
        labels = labels.masked_fill(drop, IGNORE_INDEX)
    return hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), labels


def _zipf_direction(hidden: torch.Tensor, weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Make hidden dimension 0 a direction that adds -ZIPF_EXPONENT * log(rank of token v) to every
    logit (hidden[..., 0] = 1, weight[:, 0] = that shift; ranks in a random token order), in place.
    Returns the Zipf prior over the vocabulary [V] (probabilities proportional to rank**-ZIPF_EXPONENT)."""
    v = weight.shape[0]
    rank = torch.randperm(v, device=weight.device, generator=gen).float() + 1.0
    hidden[..., 0] = 1.0
    weight[:, 0] = -ZIPF_EXPONENT * rank.log()
    return rank.pow(-ZIPF_EXPONENT) / rank.pow(-ZIPF_EXPONENT).sum()


def close_pairs(hidden: torch.Tensor, labels: torch.Tensor, n_vocab: int, gen: torch.Generator):
    """Rows [2B, T]: the rejected rows B..2B-1 become copies of the chosen rows 0..B-1 with one label
    each moved to another token (an ignored label stays ignored). Returns (hidden leaf, labels)."""
    b, t = hidden.shape[0] // 2, hidden.shape[1]
    hidden = hidden.detach().clone()
    hidden[b:] = hidden[:b]
    labels = labels.clone()
    labels[b:] = labels[:b]
    rows = torch.arange(b, 2 * b, device=labels.device)
    pos = torch.randint(0, t, (b,), device=labels.device, generator=gen)
    shift = torch.randint(1, max(2, n_vocab), (b,), device=labels.device, generator=gen)
    old = labels[rows, pos]
    labels[rows, pos] = torch.where(old == IGNORE_INDEX, old, (old + shift) % n_vocab)
    return hidden.requires_grad_(), labels


@torch.no_grad()
def logit_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, max_rows: int = 1024) -> dict:
    """What the logits of the first (up to) ``max_rows`` labelled tokens look like, in float32:
    logit_std, top1_prob (mean largest softmax value), entropy (mean, nats), label_prob (mean
    softmax value of the label), and tile_keep_frac: the fraction of TILE x TILE [token, vocab]
    tiles holding an entry with |softmax - onehot| >= FILTER_EPS_BF16, i.e. the tiles a filtering
    Triton backward must still compute."""
    y = labels.reshape(-1)
    h = hidden.detach().reshape(-1, hidden.shape[-1])[y != IGNORE_INDEX][:max_rows].float()
    y = y[y != IGNORE_INDEX][:max_rows]
    x = h @ weight.detach().float().T
    p = torch.softmax(x, dim=-1)
    diff = p - torch.nn.functional.one_hot(y, x.shape[1]).float()
    rows, cols = -(-diff.shape[0] // TILE) * TILE, -(-diff.shape[1] // TILE) * TILE
    tiles = torch.nn.functional.pad(diff.abs(), (0, cols - diff.shape[1], 0, rows - diff.shape[0]))
    tiles = tiles.reshape(rows // TILE, TILE, cols // TILE, TILE).amax(dim=(1, 3))
    return dict(logit_std=float(x.std()), top1_prob=float(p.max(-1).values.mean()),
                entropy=float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean()),
                label_prob=float(p.gather(-1, y[:, None]).mean()),
                tile_keep_frac=float((tiles >= FILTER_EPS_BF16).float().mean()))


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
