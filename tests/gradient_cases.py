"""Generated cases for the differential gradient harness (``tests/test_gradients.py``).

A case is every choice a user can make when calling a fused loss: the loss and its options,
the backend, the dtypes, the shapes, the mask (an ignored prompt, padding, rows with a single
scored token), a bias or none, the model's logit transform (temperature, soft cap, logit scale),
which inputs require a gradient, the reduction ("none": the per-pair losses, under a random
upstream gradient [B]), a loss scale (as float16 training applies), and the chunk layout: one
pair per chunk, several, all of them, a pair larger than a chunk, whole 128-token GEMM tiles,
and the memory budget's own size.

Shapes come in size classes (:data:`SIZE_CLASSES`): mostly small ones (where a bug shows
cheapest), and, drawn rarely, many pairs (past the Triton pair kernel's 32-pair block), long
rows (up to 64 positions: several GEMM row tiles and chunks), wide hidden states (up to 128:
several K steps of the Triton tiles) and all of them at once. What a case costs is its full
logits, [2B, T, V] per path, four times over (:func:`case_cost`); a case over :data:`COST_CAP`
is drawn with a smaller vocabulary, hidden size or length, so that the run time stays bounded.

:func:`run_case` computes the loss and every gradient four ways, on the same inputs rounded
to the case's dtypes: the fused function under test; the float64 reference on full logits
(the formulas of ``tests/gradient_reference.py`` on ``hidden @ W.T + b``, differentiated by
autograd); and two yardsticks of the error a correct 16-bit path makes: the plain PyTorch path
in the case's dtypes (the same formulas, logits in that dtype), and the float64 reference with
the gradient of the logits rounded to the compute dtype (what feeding 16-bit gradient GEMMs
costs, cancellation included: a bias gradient is a sum over tokens of such rounded values).
Errors are measured against the size of what was summed, not of the sum (which cancellation
can make arbitrarily small): a "magnitude" run of the reference propagates |d loss / d logits|
through |W| and |hidden|.
"""
from __future__ import annotations

import dataclasses
import math

import gradient_reference as reference
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import drdo_kernels as dk
from drdo_kernels.triton_runtime import triton_interpreting

LOSSES = ("drdo", "dpo", "oracle", "edpo", "logprobs")
BIG_VOCABS = (32000, 32003, 32771)
#: dtype name -> (hidden dtype, LM-head weight dtype); "bf16_w32" is autocast training (fp32 master weight).
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "fp16": (torch.float16, torch.float16), "bf16_w32": (torch.bfloat16, torch.float32)}
LAYOUTS = ("split", "one", "several", "all", "tile", "budget")
#: Tokens per chunk of the "tile" layout: one GEMM row tile of the chunked backends.
TILE_TOKENS = 128
#: Where the fused path runs: the GPU when there is one (and Triton is compiled, not interpreted).
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu")


@dataclasses.dataclass(frozen=True)
class SizeClass:
    """Inclusive ranges of pairs B, positions T and hidden size H; ``weight``: how often it is drawn
    (out of the sum of the weights)."""

    name: str
    pairs: tuple[int, int]
    positions: tuple[int, int]
    hidden: tuple[int, int]
    weight: int


SMALL = SizeClass("small", (1, 5), (1, 9), (1, 24), 10)
#: Past the Triton pair kernel's block of 32 pairs (drdo_kernels.pair_loss.BLOCK_PAIRS).
MANY_PAIRS = SizeClass("many pairs", (31, 44), (1, 6), (1, 32), 5)
LARGE = SizeClass("large", (33, 48), (16, 64), (33, 128), 1)
SIZE_CLASSES = (SMALL, MANY_PAIRS, SizeClass("long rows", (1, 4), (10, 64), (1, 48), 2),
                SizeClass("wide", (1, 6), (1, 12), (33, 128), 2), LARGE)
#: Most multiply-adds one case may cost (:func:`case_cost`): a V = 32k case holds about 36
#: positions at H = 11; a large one (96 rows of 64 positions, H = 128) about 20 vocabulary entries.
COST_CAP = 2.5e8


def case_cost(n_rows: int, n_pos: int, n_hidden: int, n_vocab: int) -> float:
    """Multiply-adds of a case: four full-logits paths (reference, plain, rounded, magnitude),
    each a logits GEMM and two gradient GEMMs plus about ten element-wise passes over the
    [rows, T, V] logits, and the fused path (at most as much again)."""
    return n_rows * n_pos * n_vocab * (16 * n_hidden + 40)


@dataclasses.dataclass(frozen=True)
class Case:
    """One generated call. ``rows[r] = (prompt, response)`` tokens of row r (the rest is padding);
    ``grads``: the leaves that require a gradient, among weight, bias, hidden, head (the reward
    head's weight, through which policy rewards reach the hidden states) and scores (Oracle
    scores / reference log-probs); ``spread``: the standard deviation of hidden @ W.T; temperature,
    softcap, logit_scale: the logit transform; ``loss_scale`` multiplies the upstream gradient."""

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
    spread: float
    seed: int
    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0
    loss_scale: float = 1.0

    @property
    def opts(self) -> dict:
        return dict(self.options)

    @property
    def entropy(self) -> bool:
        """Whether the call also returns the per-token entropy (``return_entropy=True``), with an
        upstream gradient on it: per-token log-prob cases of odd seed (a choice derived from the
        seed, so the drawn cases stay those of the runs before it)."""
        return self.loss == "logprobs" and self.seed % 2 == 1

    @property
    def transform(self) -> dict:
        """The logit transform as the fused functions' keywords."""
        return dict(temperature=self.temperature, softcap=self.softcap, logit_scale=self.logit_scale)


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
def _shape(draw, big_vocab, max_tokens: int | None, size_classes) -> tuple[int, int, int, int]:
    """(pairs, positions, hidden size, vocabulary) of one size class, within :data:`COST_CAP` and
    ``max_tokens`` (2B * T): past them the vocabulary shrinks (a small one), else, where the
    vocabulary must be big, the hidden size and then the positions do."""
    size = draw(st.sampled_from([c for c in size_classes for _ in range(c.weight)]))
    n_pairs, n_pos, n_hidden = (draw(st.integers(*r)) for r in (size.pairs, size.positions, size.hidden))
    if max_tokens is not None:
        n_pos = max(1, min(n_pos, max_tokens // (2 * n_pairs)))
    if draw(big_vocab):
        n_vocab = draw(st.sampled_from(BIG_VOCABS))
        while case_cost(2 * n_pairs, n_pos, n_hidden, n_vocab) > COST_CAP and n_hidden > 1:
            n_hidden = max(1, n_hidden // 2)
        while case_cost(2 * n_pairs, n_pos, n_hidden, n_vocab) > COST_CAP and n_pos > 1:
            n_pos -= 1
        return n_pairs, n_pos, n_hidden, n_vocab
    most = int(COST_CAP // case_cost(2 * n_pairs, n_pos, n_hidden, 1))
    return n_pairs, n_pos, n_hidden, draw(st.integers(2, max(2, min(300, most))))


@st.composite
def cases(draw, losses=LOSSES, backends=("auto", "torch", "chunked", "reference"), dtypes=tuple(DTYPES),
          big_vocab=EITHER_VOCAB, max_tokens: int | None = None, size_classes=SIZE_CLASSES) -> Case:
    """A :class:`Case` drawn across every option; ``big_vocab`` draws whether V >= 32k;
    ``max_tokens``: at most this many positions in all (2B * T); shapes of ``size_classes``."""
    loss = draw(st.sampled_from(losses))
    options = draw(_options(loss))
    n_pairs, n_pos, n_hidden, n_vocab = draw(_shape(big_vocab, max_tokens, size_classes))
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
        dtype=draw(st.sampled_from(dtypes)), n_pairs=n_pairs, n_pos=n_pos, n_hidden=n_hidden, n_vocab=n_vocab,
        rows=tuple(rows), bias=draw(st.booleans()), grads=grads,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])), layout=draw(st.sampled_from(LAYOUTS)),
        spread=draw(st.sampled_from([0.3, 1.0, 4.0])), seed=draw(st.integers(0, 2**31 - 1)),
        # the identity half the time (it skips the transform everywhere), each factor otherwise
        temperature=draw(st.sampled_from([1.0, 1.0, 0.5, 2.0])), softcap=draw(st.sampled_from([None, None, 3.0, 30.0])),
        logit_scale=draw(st.sampled_from([1.0, 1.0, 0.25, -1.5])), loss_scale=draw(st.sampled_from([1.0, 1024.0])),
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
    labels = torch.full((2 * case.n_pairs, case.n_pos), reference.IGNORED, dtype=torch.long)
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
    plain log-probs chunk tokens: 1, 2, half and all of them. "tile": :data:`TILE_TOKENS`."""
    scored = (labels[:lm_rows(case)] != reference.IGNORED).sum(-1).tolist()
    total = sum(scored)
    if case.loss in ("edpo", "logprobs"):
        sizes = {"split": 1, "one": 2, "several": max(1, total // 2), "all": total}
    else:
        sides = 1 if case.loss == "oracle" else 2
        per_pair = [sum(scored[s * case.n_pairs + p] for s in range(sides)) for p in range(case.n_pairs)]
        largest = max(per_pair)
        sizes = {"split": max(1, largest - 1), "one": largest, "several": max(largest, total // 2), "all": total}
    sizes["tile"] = TILE_TOKENS
    return sizes.get(case.layout)


def inputs(case: Case) -> dict:
    """float64 tensors, already rounded to the case's dtypes (so every path sees the same values)."""
    gen = torch.Generator().manual_seed(case.seed)
    h_dtype, w_dtype = DTYPES[case.dtype]
    n_rows, k = 2 * case.n_pairs, case.opts.get("k", 1)

    def rounded(t, dtype):
        return t.to(dtype).double()

    scale = case.spread / math.sqrt(case.n_hidden)
    labels = _labels(case, gen)
    scored = labels != reference.IGNORED
    return dict(
        labels=labels,
        weight=rounded(torch.randn(case.n_vocab, case.n_hidden, generator=gen, dtype=torch.float64) * scale, w_dtype),
        hidden=rounded(torch.randn(n_rows, case.n_pos, case.n_hidden, generator=gen, dtype=torch.float64), h_dtype),
        bias=rounded(torch.randn(case.n_vocab, generator=gen, dtype=torch.float64), w_dtype) if case.bias else None,
        head=rounded(torch.randn(case.n_hidden, generator=gen, dtype=torch.float64) / math.sqrt(case.n_hidden),
                     torch.float32),
        oracle=rounded(torch.randn(k, n_rows, generator=gen, dtype=torch.float64), torch.float32),
        ref=rounded(-3.0 * scored.sum(-1) + torch.randn(n_rows, generator=gen, dtype=torch.float64), torch.float32),
        upstream=torch.randn(n_rows, case.n_pos, generator=gen, dtype=torch.float64),
        upstream_entropy=torch.randn(n_rows, case.n_pos, generator=gen, dtype=torch.float64),
        pair_upstream=torch.randn(case.n_pairs, generator=gen, dtype=torch.float64),
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


def _float_logits(case: Case, leaves: dict, mode: str, rows: int) -> torch.Tensor:
    """:func:`_logits` in float32 at least (what a plain path's log-softmax computes in), through
    the case's logit transform."""
    logits = _logits(case, leaves, mode, rows)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return reference.transform_logits(logits, **case.transform)


def full_logits_loss(case: Case, leaves: dict, data: dict, mode: str) -> torch.Tensor:
    """The loss on full logits by the formulas of ``gradient_reference``, mode as :func:`_logits`."""
    o, labels = dict(case.opts, reduction=case.reduction), data["labels"]
    if case.loss == "logprobs":
        logits = _float_logits(case, leaves, mode, labels.shape[0])
        logp = reference.token_logprobs(logits, labels)
        upstream = data["upstream"].to(logp.dtype)
        loss = (logp * (upstream.abs() if mode == "magnitude" else upstream)).sum()
        if not case.entropy:
            return loss
        up_entropy = data["upstream_entropy"].to(logp.dtype)  # magnitude: -|g_H| H <= 0 as |g| logp is
        return loss + (reference.token_entropy(logits, labels) *
                       (-up_entropy.abs() if mode == "magnitude" else up_entropy)).sum()
    rows = lm_rows(case)
    z, counts = reference.sequence_logprobs(_float_logits(case, leaves, mode, rows), labels[:rows])
    if case.loss == "drdo":
        rewards = _policy_rewards(case, leaves) if o["reward"] == "head" else None
        return reference.drdo(z, counts, rewards, leaves["oracle"][0], **o)
    if case.loss == "dpo":
        return reference.dpo(z, leaves["ref"], **o)
    if case.loss == "edpo":
        return reference.edpo(z, leaves["ref"], leaves["oracle"], **o)
    return reference.oracle_loss(z, counts, _policy_rewards(case, leaves), **o)


def fused_loss(case: Case, leaves: dict, data: dict) -> torch.Tensor:
    """The fused function under test on the case's backend and chunk layout."""
    o, labels = case.opts, data["labels"].to(DEVICE)
    common = dict(backend=case.backend, chunk_tokens=chunk_tokens(case, data["labels"]), **case.transform)
    w, h, b, oracle, ref = leaves["weight"], leaves["hidden"], leaves["bias"], leaves["oracle"], leaves["ref"]
    if case.loss == "logprobs":
        if not case.entropy:
            logp = dk.fused_linear_logprobs(w, h, labels, bias=b, **common)
            return (logp * data["upstream"].to(logp)).sum()
        logp, entropy = dk.fused_linear_logprobs(w, h, labels, bias=b, return_entropy=True, **common)
        return (logp * data["upstream"].to(logp)).sum() + (entropy * data["upstream_entropy"].to(entropy)).sum()
    common["reduction"] = case.reduction
    if case.loss == "drdo":
        rewards = _policy_rewards(case, leaves) if o["reward"] == "head" else None
        kw = {k: o[k] for k in ("alpha", "gamma", "reward", "unlikelihood", "length_normalize")}
        if o["reward"] == "implicit":  # a reward head's loss has no beta
            kw["beta"] = o["beta"]
        return dk.fused_linear_drdo_loss(w, h, labels, oracle[0], rewards, b, **kw, **common)[0]
    if case.loss == "dpo":
        return dk.fused_linear_dpo_loss(w, h, labels, ref, b, beta=o["beta"], **common)[0]
    if case.loss == "edpo":
        return dk.fused_linear_edpo_loss(w, h, labels, ref, oracle, b, beta=o["beta"], pessimistic=o["pessimistic"],
                                         **common)[0]
    return dk.fused_linear_oracle_loss(w, h, labels, _policy_rewards(case, leaves), b, alpha=o["alpha"],
                                       nll_reduction=o["nll_reduction"], **common)[0]


def upstream_gradient(case: Case, data: dict, mode: str) -> torch.Tensor:
    """What the loss's backward receives: the loss scale, times a random [B] for reduction="none"
    (its absolute value in the "magnitude" run; plain log-probs carry theirs, [2B, T], already)."""
    if case.reduction != "none" or case.loss == "logprobs":
        return torch.tensor(case.loss_scale, dtype=torch.float64)
    pair = data["pair_upstream"]
    return case.loss_scale * (pair.abs() if mode == "magnitude" else pair)


def _evaluate(case: Case, data: dict, mode: str) -> dict:
    """{"loss": float64 value, leaf name: float64 gradient or None} of one path."""
    leaves = _leaves(case, data, mode)
    loss = fused_loss(case, leaves, data) if mode == "fused" else full_logits_loss(case, leaves, data, mode)
    out = {"loss": loss.detach().cpu().double().abs() if mode == "magnitude" else loss.detach().cpu().double()}
    if loss.requires_grad:
        loss.backward(upstream_gradient(case, data, mode).to(loss).expand_as(loss))
    for name, t in leaves.items():
        if t is not None and t.requires_grad:
            out[name] = t.grad
    return out


def _loss_scale_that_fits(case: Case, data: dict) -> float:
    """The case's loss scale, halved until every reference gradient times it fits its dtype 16 times
    over (a float16 gradient past 65504 is inf: a GradScaler skips such a step and lowers its scale)."""
    if case.loss_scale == 1.0:
        return 1.0
    unscaled = _evaluate(dataclasses.replace(case, loss_scale=1.0), data, "reference")
    scale = case.loss_scale
    for name, grad in unscaled.items():
        if name != "loss" and grad is not None:
            dtype = _leaves(case, data, "plain")[name].dtype
            while scale > 1.0 and float(grad.abs().max()) * scale * 16 > torch.finfo(dtype).max:
                scale /= 2
    return scale


def run_case(case: Case) -> tuple[dict, dict, list[dict], dict]:
    """(fused, reference, [plain, rounded], magnitude) results of :func:`_evaluate`."""
    data = inputs(case)
    case = dataclasses.replace(case, loss_scale=_loss_scale_that_fits(case, data))
    WORST.cases += 1
    yardsticks = [_evaluate(case, data, mode) for mode in ("plain", "rounded")]
    return (_evaluate(case, data, "fused"), _evaluate(case, data, "reference"), yardsticks,
            _evaluate(case, data, "magnitude"))


def reduction_length(case: Case, name: str) -> int:
    """How many terms the longest chain of sums behind result ``name`` adds up: the logits (H), the
    log-sum-exp (V), and for all but the hidden states' gradient (a sum over V) the sum over the
    scored tokens (the LM head's gradients, z, the loss and what it feeds)."""
    length = case.n_hidden + case.n_vocab
    if name != "hidden":
        length += sum(response for _, response in case.rows)
    return length
