"""The differential gradient harness: every fused loss, on generated cases, against float64.

Each case (``tests/gradient_cases.py``) compares the loss and EVERY gradient the caller asked
for (LM-head weight, bias, hidden states, the reward head through the hidden states, Oracle
scores and reference log-probs) with the float64 reference on full logits, the inputs being
the same values rounded to the case's dtypes. The error (2-norm) of each result, relative to
the size of what it sums (the reference's "magnitude" run: |d loss / d logits| through |W| and
|hidden|, so that a gradient that cancels to almost nothing is not judged relative to
nothing), must be within RATIO times the larger error of two yardsticks, or within FLOOR of the case's dtype,
whichever is larger, and never above CAP: a pair whose gradient is lost, or a chunk computed
twice, is off by far more. A gradient that its own dtype cannot hold (e.g. an exact 1e-10,
below fp16's smallest subnormal) is compared with its value in that dtype. The yardsticks:
the plain PyTorch path in the case's dtypes (full logits in that dtype, the log-softmax in
float32: what a trainer without fused kernels computes), and the float64 reference with the
logits' gradient rounded to the compute dtype (what any path that feeds 16-bit gradient GEMMs
pays, cancellations included). Gradients come back in their
inputs' dtypes; a result the reference does not depend on is None or zero on both sides.

Cases are derandomized (the same in every run, so CI is repeatable); set
``DRDO_HARNESS_SCALE=10`` to draw ten times as many, and ``DRDO_HARNESS_SEED`` to explore
other cases (``derandomize`` off, seeded).
"""
import os

import pytest
import torch
from gradient_cases import WORST, Case, cases, run_case
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

SCALE = int(os.environ.get("DRDO_HARNESS_SCALE", "1"))
EXPLORE_SEED = os.environ.get("DRDO_HARNESS_SEED")
RATIO = 4.0
FLOOR = {"fp32": 1e-5, "bf16": 2.0**-7, "fp16": 2.0**-10, "bf16_w32": 2.0**-7}
CAP = 0.1


def _settings(n: int):
    explore = EXPLORE_SEED is not None
    config = settings(max_examples=n * SCALE, deadline=None, derandomize=not explore, database=None,
                      suppress_health_check=list(HealthCheck), print_blob=True)

    def wrap(fn):
        fn = config(fn)
        return seed(int(EXPLORE_SEED))(fn) if explore else fn

    return wrap


def _rel(a: torch.Tensor, ref: torch.Tensor, size: torch.Tensor) -> float:
    scale = max(float(ref.norm()), float(size.norm()))
    return float((a - ref).norm()) / scale if scale > 0 else float(a.norm())


def check(case: Case, fused: dict, ref: dict, yardsticks: list[dict], size: dict) -> None:
    """Every result of ``fused`` matches ``ref`` (see the module doc)."""
    assert fused.keys() == ref.keys(), f"{case}: results {sorted(fused)} vs {sorted(ref)}"
    for name, want in ref.items():
        got = fused[name]
        if want is None or got is None:
            for t in (want, got):
                assert t is None or not bool(t.any()), f"{case}: {name} is None on one side, non-zero on the other"
            continue
        plain = yardsticks[0][name]
        if name != "loss":
            assert got.dtype == plain.dtype, f"{case}: {name} gradient is {got.dtype}, not {plain.dtype}"
        if _rel(want.to(got.dtype).double(), want, size[name]) > CAP:  # the output dtype cannot hold it
            want = want.to(got.dtype).double()
        err = _rel(got.detach().cpu().double(), want, size[name])
        err_plain = max(_rel(y[name].detach().double(), want, size[name]) for y in yardsticks)
        tol = min(max(RATIO * err_plain, FLOOR[case.dtype]), CAP)
        WORST.record(case.dtype, name, err, err_plain)
        assert err <= tol, (f"{name}: relative error {err:.3e} > {tol:.3e} (yardstick in {case.dtype}: "
                            f"{err_plain:.3e})\n{case}")


@_settings(500)
@given(cases(losses=("drdo", "dpo", "oracle")))
def test_pair_losses(case):
    """DRDO (every option), DPO and the Oracle loss on auto / torch / chunked (and "reference": full
    logits): the one-pass path with gradients in the forward, every chunk layout, and pairs split
    across chunks."""
    check(case, *run_case(case))


@_settings(200)
@given(cases(losses=("edpo", "logprobs")))
def test_edpo_and_token_logprobs(case):
    """e-DPO (K >= 2) and plain per-token log-probs: the recomputing two-pass path."""
    check(case, *run_case(case))


@_settings(100)
@given(cases(big_vocab=st.just(True), dtypes=("bf16", "fp16", "bf16_w32")))
def test_large_vocab_16bit(case):
    """V >= 32k in 16-bit: the natural budget holds few pairs per chunk on a CPU."""
    check(case, *run_case(case))


@pytest.mark.triton
@_settings(100)
@given(cases(backends=("triton",), big_vocab=st.just(False)))
def test_triton_backend(case):
    """The tiled Triton kernels (and the DRDO pair-loss kernel), small vocabularies."""
    check(case, *run_case(case))


@pytest.mark.triton
@_settings(3)
@given(cases(backends=("triton",), big_vocab=st.just(True), losses=("drdo", "logprobs")))
def test_triton_backend_large_vocab(case):
    """The Triton kernels at V >= 32k (slow in the interpreter: few cases)."""
    check(case, *run_case(case))


@pytest.mark.triton
@_settings(150)
@given(cases(backends=("chunked",)))
def test_chunked_with_triton_fold(case):
    """The chunked backend where its fold runs in Triton (a GPU, or the interpreter)."""
    check(case, *run_case(case))


