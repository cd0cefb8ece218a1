"""Generated cases for the differential gradient harness (``tests/test_gradients.py``).

A case is every choice a user can make when calling a fused loss: the loss and its options,
the backend, the dtypes, the shapes (pairs, positions, hidden size, a small vocabulary or one
of 32k and more), the mask (an ignored prompt, padding, rows with a single scored token), a
bias or none, which inputs require a gradient, the reduction, and the chunk layout: one pair
per chunk, several, all of them, a pair larger than a chunk, and the memory budget's own size.

:func:`run_case` computes the loss and every gradient four ways, on the same inputs rounded
to the case's dtypes: the fused function under test; the float64 reference on full logits
(``drdo.losses`` on ``hidden @ W.T + b``); and two yardsticks of the error a correct 16-bit
path makes: the plain PyTorch path in the case's dtypes (the same composition, logits in that
dtype), and the float64 reference with the gradient of the logits rounded to the compute
dtype (what feeding 16-bit gradient GEMMs costs, cancellation included: a bias gradient is a
sum over tokens of such rounded values). Errors are measured against the size of what was
summed, not of the sum (which cancellation can make arbitrarily small): a "magnitude" run of
the reference propagates |d loss / d logits| through |W| and |hidden|.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import drdo_kernels as dk
from drdo.losses import IGNORE_INDEX, dpo_loss, drdo_loss, edpo_loss, oracle_loss, sequence_logprobs
from drdo_kernels.triton_runtime import triton_interpreting

LOSSES = ("drdo", "dpo", "oracle", "edpo", "logprobs")
BIG_VOCABS = (32000, 32003, 32771)
#: dtype name -> (hidden dtype, LM-head weight dtype); "bf16_w32" is autocast training (fp32 master weight).
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "fp16": (torch.float16, torch.float16), "bf16_w32": (torch.bfloat16, torch.float32)}
LAYOUTS = ("split", "one", "several", "all", "budget")
#: Where the fused path runs: the GPU when there is one (and Triton is compiled, not interpreted).
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu")


@dataclasses.dataclass(frozen=True)
class Case:
    """One generated call. ``rows[r] = (prompt, response)`` tokens of row r (the rest is padding);
    ``grads``: the leaves that require a gradient, among weight, bias, hidden, head (the reward
    head's weight, through which policy rewards reach the hidden states) and scores (Oracle
    scores / reference log-probs)."""

    loss: str
    options: tuple
    backend: str
    dtype: str
    n_pairs: int
    n_pos: int
    n_hidden: int
    n_vocab: int
    rows: tuple
    bias: bool
    grads: frozenset
    reduction: str
    layout: str
    logit_scale: float
    seed: int

    @property
    def opts(self) -> dict:
        return dict(self.options)


def _options(loss: str):
    if loss == "drdo":
        return st.fixed_dictionaries(dict(
            reward=st.sampled_from(["head", "implicit"]), unlikelihood=st.sampled_from(["welleck", "paper"]),
            reward_grad=st.sampled_from(["backbone", "head"]), length_normalize=st.booleans(),
            alpha=st.sampled_from([0.0, 0.1, 1.0]), gamma=st.sampled_from([0.0, 1.0, 2.0, 5.0]),
            beta=st.sampled_from([0.1, 1.0])))
    if loss == "dpo":
        return st.fixed_dictionaries(dict(beta=st.sampled_from([0.1, 0.5])))
    if loss == "edpo":
        return st.fixed_dictionaries(dict(beta=st.sampled_from([0.1, 0.5]), pessimistic=st.booleans(),
                                          k=st.integers(2, 3)))
    if loss == "oracle":
        return st.fixed_dictionaries(dict(alpha=st.sampled_from([0.0, 0.01, 0.5]),
                                          nll_reduction=st.sampled_from(["mean", "sum"])))
    return st.just({})


def _grad_choices(loss: str, options: dict) -> tuple[str, ...]:
    """Leaves of this loss that can require a gradient."""
    leaves = ["weight", "hidden", "bias"]
    if loss in ("oracle",) or (loss == "drdo" and options["reward"] == "head"):
        leaves.append("head")
    if loss != "logprobs":
        leaves.append("scores")
    return tuple(leaves)


EITHER_VOCAB = st.booleans()  # the default of ``cases``: small and big vocabularies


@st.composite
def cases(draw, losses=LOSSES, backends=("auto", "torch", "chunked", "reference"), dtypes=tuple(DTYPES),
          big_vocab=EITHER_VOCAB) -> Case:
    """A :class:`Case` drawn across every option; ``big_vocab`` draws whether V >= 32k."""
    loss = draw(st.sampled_from(losses))
    options = draw(_options(loss))
    big = draw(big_vocab)
    n_vocab = draw(st.sampled_from(BIG_VOCABS)) if big else draw(st.integers(2, 300))
    n_pairs = draw(st.integers(1, 3 if big else 5))
    n_pos = draw(st.integers(1, 6 if big else 9))
    n_rows = 2 * n_pairs
    rows = []
    for _ in range(n_rows):
        prompt = draw(st.integers(0, n_pos - 1))
        rows.append((prompt, draw(st.integers(1, n_pos - prompt))))
    if draw(st.booleans()):  # a row with a single scored token, after an ignored prompt where there is room
        r = draw(st.integers(0, n_rows - 1))
        rows[r] = (min(rows[r][0], n_pos - 1), 1)
    grads = frozenset(draw(st.sets(st.sampled_from(_grad_choices(loss, options)), min_size=1)))
    return Case(
        loss=loss, options=tuple(sorted(options.items())), backend=draw(st.sampled_from(backends)),
        dtype=draw(st.sampled_from(dtypes)), n_pairs=n_pairs, n_pos=n_pos,
        n_hidden=draw(st.integers(1, 24)), n_vocab=n_vocab, rows=tuple(rows), bias=draw(st.booleans()),
        grads=grads, reduction=draw(st.sampled_from(["mean", "sum"])), layout=draw(st.sampled_from(LAYOUTS)),
        logit_scale=draw(st.sampled_from([0.3, 1.0, 4.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )


class _Worst:
    """The largest relative error seen per dtype (and the plain path's error there), for the
    summary line pytest prints at the end of a run."""

    def __init__(self):
        self.cases, self.by_dtype = 0, {}

    def record(self, dtype: str, name: str, err: float, err_plain: float) -> None:
        if err > self.by_dtype.get(dtype, (-1.0,))[0]:
            self.by_dtype[dtype] = (err, err_plain, name)

    def summary(self) -> str:
        parts = [f"{dt} {err:.2e} ({name}; yardstick {plain:.2e})" for dt, (err, plain, name) in
                 sorted(self.by_dtype.items())]
        return f"gradient harness: {self.cases} cases; largest relative error per dtype: " + ", ".join(parts)


WORST = _Worst()


# ---------------------------------------------------------------------------------------------- inputs


def _labels(case: Case, gen: torch.Generator) -> torch.Tensor:
    labels = torch.full((2 * case.n_pairs, case.n_pos), IGNORE_INDEX, dtype=torch.long)
    for r, (prompt, response) in enumerate(case.rows):
        labels[r, prompt:prompt + response] = torch.randint(0, case.n_vocab, (response,), generator=gen)
    return labels


def lm_rows(case: Case) -> int:
    """Rows that go through the LM head: the Oracle loss scores the chosen rows only."""
    return case.n_pairs if case.loss == "oracle" else 2 * case.n_pairs


def chunk_tokens(case: Case, labels: torch.Tensor) -> int | None:
    """The case's chunk layout as a ``chunk_tokens`` value (None: the memory budget). DRDO, DPO
    and the Oracle loss chunk whole pairs: "split" makes the largest pair exceed a chunk, "one"
    fits the largest pair exactly, "several" about half the pairs, "all" every pair. e-DPO and
    plain log-probs chunk tokens: 1, 2, half and all of them."""
    scored = (labels[:lm_rows(case)] != IGNORE_INDEX).sum(-1).tolist()
    total = sum(scored)
    if case.loss in ("edpo", "logprobs"):
        sizes = {"split": 1, "one": 2, "several": max(1, total // 2), "all": total}
    else:
        sides = 1 if case.loss == "oracle" else 2
        per_pair = [sum(scored[s * case.n_pairs + p] for s in range(sides)) for p in range(case.n_pairs)]
        largest = max(per_pair)
        sizes = {"split": max(1, largest - 1), "one": largest, "several": max(largest, total // 2), "all": total}
    return sizes.get(case.layout)


def inputs(case: Case) -> dict:
    """float64 tensors, already rounded to the case's dtypes (so every path sees the same values)."""
    gen = torch.Generator().manual_seed(case.seed)
    h_dtype, w_dtype = DTYPES[case.dtype]
    n_rows, k = 2 * case.n_pairs, case.opts.get("k", 1)

    def rounded(t, dtype):
        return t.to(dtype).double()

    scale = case.logit_scale / math.sqrt(case.n_hidden)
    labels = _labels(case, gen)
    return dict(
        labels=labels,
        weight=rounded(torch.randn(case.n_vocab, case.n_hidden, generator=gen, dtype=torch.float64) * scale, w_dtype),
        hidden=rounded(torch.randn(n_rows, case.n_pos, case.n_hidden, generator=gen, dtype=torch.float64), h_dtype),
        bias=rounded(torch.randn(case.n_vocab, generator=gen, dtype=torch.float64), w_dtype) if case.bias else None,
        head=rounded(torch.randn(case.n_hidden, generator=gen, dtype=torch.float64) / math.sqrt(case.n_hidden),
                     torch.float32),
        oracle=rounded(torch.randn(k, n_rows, generator=gen, dtype=torch.float64), torch.float32),
        ref=rounded(-3.0 * (labels != IGNORE_INDEX).sum(-1) + torch.randn(n_rows, generator=gen, dtype=torch.float64),
                    torch.float32),
        upstream=torch.randn(n_rows, case.n_pos, generator=gen, dtype=torch.float64),
    )


def _leaves(case: Case, data: dict, mode: str) -> dict:
    """The leaf tensors of one path: mode "fused" (case dtypes, on DEVICE), "plain" (case dtypes)
    or "reference" / "rounded" (float64)."""
    h_dtype, w_dtype = DTYPES[case.dtype]
    device = DEVICE if mode == "fused" else torch.device("cpu")
    ref = mode in ("reference", "rounded", "magnitude")
    dtypes = dict(weight=w_dtype, bias=w_dtype, hidden=h_dtype, head=torch.float32, oracle=torch.float32,
                  ref=torch.float32)
    out = {}
    for name, dtype in dtypes.items():
        t = data[name]
        if t is None:
            out[name] = None
            continue
        t = t.clone() if ref else t.to(device=device, dtype=dtype)
        want = name in case.grads or (name in ("oracle", "ref") and "scores" in case.grads)
        out[name] = t.requires_grad_(want)
    return out


# ---------------------------------------------------------------------------------------------- paths


def _policy_rewards(case: Case, leaves: dict) -> torch.Tensor:
    """[2B] rewards of a linear head on each row's last hidden state (detached for reward_grad="head")."""
    h_last = leaves["hidden"][:, -1]
    if case.opts.get("reward_grad") == "head":
        h_last = h_last.detach()
    return h_last.to(leaves["head"].dtype) @ leaves["head"]


def _logits(case: Case, leaves: dict, mode: str, rows: int) -> torch.Tensor:
    """Full logits [rows, T, V]: float64 ("reference"; "rounded": the weight and the logits'
    gradient rounded to the compute dtype; "magnitude": |gradient| propagated through |W| and |hidden|), or in the
    case's dtypes ("plain"; autocast casts an fp32 weight)."""
    h, w, b = leaves["hidden"][:rows], leaves["weight"], leaves["bias"]
    compute = DTYPES[case.dtype][0]
    if mode == "plain" and w.dtype != h.dtype:
        w, b = w.to(h.dtype), None if b is None else b.to(h.dtype)
    if mode == "rounded":  # an fp32 weight computes in 16 bits, as under autocast
        w = w.to(compute).to(w.dtype)
    logits = F.linear(h, w, b)
    if mode == "magnitude":
        size = F.linear(h.abs(), w.abs(), b)
        logits = logits.detach() + (size - size.detach())
    if logits.requires_grad and mode in ("rounded", "magnitude"):
        logits.register_hook((lambda g: g.to(compute).to(g.dtype)) if mode == "rounded" else torch.abs)
    return logits


def _full_logprobs(case: Case, leaves: dict, labels: torch.Tensor, mode: str):
    """Summed log-probs [R] and counts [R] on full logits (log-softmax in float32 at least)."""
    return sequence_logprobs(_logits(case, leaves, mode, lm_rows(case)), labels[:lm_rows(case)])


def _token_logprobs(case: Case, leaves: dict, labels: torch.Tensor, mode: str) -> torch.Tensor:
    logits = _logits(case, leaves, mode, labels.shape[0])
    logits = logits if logits.dtype == torch.float64 else logits.float()
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(mask, logp, torch.zeros_like(logp))


def full_logits_loss(case: Case, leaves: dict, data: dict, mode: str) -> torch.Tensor:
    """The loss on full logits (``drdo.losses``), mode as :func:`_logits`."""
    o, labels, n = case.opts, data["labels"], case.n_pairs
    if case.loss == "logprobs":
        logp = _token_logprobs(case, leaves, labels, mode)
        upstream = data["upstream"].to(logp.dtype)
        return (logp * (upstream.abs() if mode == "magnitude" else upstream)).sum()
    z, counts = _full_logprobs(case, leaves, labels, mode)
    oracle, ref = leaves["oracle"], leaves["ref"]
    if case.loss == "drdo":
        if o["length_normalize"]:
            z = z / counts.to(z.dtype)
        rhat = _policy_rewards(case, leaves) if o["reward"] == "head" else o["beta"] * z
        return drdo_loss(z[:n], z[n:], rhat[:n], rhat[n:], oracle[0, :n], oracle[0, n:], alpha=o["alpha"],
                         gamma=o["gamma"], unlikelihood=o["unlikelihood"], reduction=case.reduction)[0]
    if case.loss == "dpo":
        return dpo_loss(z[:n], z[n:], ref[:n], ref[n:], beta=o["beta"], reduction=case.reduction)[0]
    if case.loss == "edpo":
        return edpo_loss(z[:n], z[n:], ref[:n], ref[n:], oracle[:, :n], oracle[:, n:], beta=o["beta"],
                         pessimistic=o["pessimistic"], reduction=case.reduction)[0]
    rewards = _policy_rewards(case, leaves)
    return oracle_loss(rewards[:n], rewards[n:], -z, alpha=o["alpha"], chosen_n_tokens=counts,
                       nll_reduction=o["nll_reduction"], reduction=case.reduction)[0]


def fused_loss(case: Case, leaves: dict, data: dict) -> torch.Tensor:
    """The fused function under test on the case's backend and chunk layout."""
    o, labels = case.opts, data["labels"].to(DEVICE)
    common = dict(backend=case.backend, chunk_tokens=chunk_tokens(case, data["labels"]))
    w, h, b, oracle, ref = leaves["weight"], leaves["hidden"], leaves["bias"], leaves["oracle"], leaves["ref"]
    if case.loss == "logprobs":
        logp = dk.fused_linear_logprobs(w, h, labels, bias=b, **common)
        return (logp * data["upstream"].to(logp)).sum()
    common["reduction"] = case.reduction
    if case.loss == "drdo":
        rewards = _policy_rewards(case, leaves) if o["reward"] == "head" else None
        kw = {k: o[k] for k in ("alpha", "gamma", "reward", "beta", "unlikelihood", "length_normalize")}
        return dk.fused_linear_drdo_loss(w, h, labels, oracle[0], rewards, b, **kw, **common)[0]
    if case.loss == "dpo":
        return dk.fused_linear_dpo_loss(w, h, labels, ref, b, beta=o["beta"], **common)[0]
    if case.loss == "edpo":
        return dk.fused_linear_edpo_loss(w, h, labels, ref, oracle, b, beta=o["beta"], pessimistic=o["pessimistic"],
                                         **common)[0]
    return dk.fused_linear_oracle_loss(w, h, labels, _policy_rewards(case, leaves), b, alpha=o["alpha"],
                                       nll_reduction=o["nll_reduction"], **common)[0]


def _evaluate(case: Case, data: dict, mode: str) -> dict:
    """{"loss": float64 value, leaf name: float64 gradient or None} of one path."""
    leaves = _leaves(case, data, mode)
    loss = fused_loss(case, leaves, data) if mode == "fused" else full_logits_loss(case, leaves, data, mode)
    out = {"loss": loss.detach().cpu().double().abs() if mode == "magnitude" else loss.detach().cpu().double()}
    if loss.requires_grad:
        loss.backward()
    for name, t in leaves.items():
        if t is not None and t.requires_grad:
            out[name] = t.grad
    return out


def run_case(case: Case) -> tuple[dict, dict, list[dict], dict]:
    """(fused, reference, [plain, rounded], magnitude) results of :func:`_evaluate`."""
    data = inputs(case)
    WORST.cases += 1
    yardsticks = [_evaluate(case, data, mode) for mode in ("plain", "rounded")]
    return (_evaluate(case, data, "fused"), _evaluate(case, data, "reference"), yardsticks,
            _evaluate(case, data, "magnitude"))
