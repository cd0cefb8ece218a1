"""The letters task: r_true on hand-made examples, determinism, and the noise knob of the labels."""
import math
import random

import pytest

from drdo.demo import (
    DEFAULT_TASK,
    LettersTask,
    bradley_terry_prob,
    build_preference_pairs,
    draw_label,
    label_agreement_prob,
    reward_components,
    true_reward,
    true_rewards,
)
from drdo.demo.report import ci95_halfwidth, noise_key, summarize
from drdo.jsonl import read_jsonl, write_jsonl

# ------------------------------------------------------------------ r_true on hand-made examples


@pytest.mark.parametrize(
    "prompt, response, coverage, purity, length",
    [
        ("dkm:", "dkmdkm", 1.0, 1.0, 1.0),  # the best response: all letters, only letters, length 2*3
        ("dkm:", "dddddd", 1 / 3, 1.0, 1.0),  # one letter of three
        ("dkm:", "dkmxyz", 1.0, 0.5, 1.0),  # half the characters off-topic
        ("dkm:", "dkm", 1.0, 1.0, 0.5),  # half the target length
        ("abcd:", "abcdabcdabcdabcd", 1.0, 1.0, 0.0),  # twice the target length 8 -> length score 0
        ("abcd:", "xyz", 0.0, 0.0, 3 / 8),
        ("abc:", "", 0.0, 0.0, 0.0),  # empty response
        ("abc:", "  abcabc\n", 1.0, 1.0, 1.0),  # surrounding whitespace is ignored
    ],
)
def test_reward_components_by_hand(prompt, response, coverage, purity, length):
    parts = reward_components(prompt, response)
    assert parts == pytest.approx({"coverage": coverage, "purity": purity, "length": length})
    assert true_reward(prompt, response) == pytest.approx(0.45 * coverage + 0.35 * purity + 0.20 * length)


def test_true_reward_values_and_order():
    assert true_reward("dkm:", "dkmdkm") == pytest.approx(1.0)
    assert true_reward("abcd:", "xyz") == pytest.approx(0.2 * 3 / 8)
    # a strictly better response scores strictly higher on each property
    assert true_reward("dkm:", "dkmdkm") > true_reward("dkm:", "dkmdkx") > true_reward("dkm:", "dkxdkx")
    assert true_rewards(["dkm:", "abc:"], ["dkmdkm", ""]) == pytest.approx([1.0, 0.0])


def test_true_reward_is_deterministic():
    rng = random.Random(0)
    prompts = DEFAULT_TASK.sample_prompts(200, rng)
    responses = [DEFAULT_TASK.sample_candidate(p, rng) for p in prompts]
    first = true_rewards(prompts, responses)
    assert first == true_rewards(list(prompts), list(responses))
    assert all(0.0 <= r <= 1.0 for r in first)
    assert len({round(r, 6) for r in first}) > 50  # a spread of values, not a few levels


@pytest.mark.parametrize("bad", ["dkm", "DKM:", "dkk:", ":", "dk1:", 3])
def test_bad_prompt_raises(bad):
    with pytest.raises(ValueError):
        true_reward(bad, "abc")


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        true_rewards(["ab:", "cd:"], ["a"])


def test_task_generator():
    rng = random.Random(1)
    for _ in range(100):
        p = DEFAULT_TASK.sample_prompt(rng)
        letters = p[:-1]
        assert 3 <= len(letters) <= 4 and len(set(letters)) == len(letters) and p.endswith(":")
        c = DEFAULT_TASK.sample_candidate(p, rng)
        assert 2 <= len(c) <= 14 and set(c) <= set(DEFAULT_TASK.alphabet)
        assert true_reward(p, DEFAULT_TASK.best_response(p)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        LettersTask(min_len=0)
    with pytest.raises(ValueError):
        LettersTask(alphabet="aab")


# ------------------------------------------------------------------ Bradley-Terry labels and noise


def test_bradley_terry_prob():
    assert bradley_terry_prob(0.6, 0.5, 0.1) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert bradley_terry_prob(0.5, 0.6, 0.1) == pytest.approx(1 / (1 + math.exp(1.0)))
    assert bradley_terry_prob(0.5, 0.6, 0.0) == 0.0 and bradley_terry_prob(0.6, 0.5, 0.0) == 1.0
    assert bradley_terry_prob(0.5, 0.5, 0.0) == 0.5
    assert bradley_terry_prob(1000.0, 0.0, 1e-3) == 1.0  # no overflow
    assert label_agreement_prob(0.1, 0.1, 0.2) == pytest.approx(0.8 * 0.7310586 + 0.2 * 0.2689414)
    with pytest.raises(ValueError):
        label_agreement_prob(0.1, -1.0, 0.0)
    with pytest.raises(ValueError):
        draw_label(0.5, 0.4, 0.1, 0.1, 0.0, 0.7)


def test_draw_label_flips():
    assert draw_label(0.9, 0.1, 0.5, 0.9, 0.0, 0.2) == (True, False)  # no flip: the better one wins
    assert draw_label(0.9, 0.1, 0.5, 0.1, 0.0, 0.2) == (False, True)  # flipped


def _binomial_ok(successes: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(successes - n * p) <= z * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("flip_rate", [0.0, 0.25])
def test_flip_rate_on_a_large_sample(flip_rate):
    """Temperature 0: the label disagrees with the true order on exactly a flip_rate share of pairs."""
    n = 5000
    rows = [r for r in build_preference_pairs(n, seed=3, temperature=0.0, flip_rate=flip_rate)
            if r["true_chosen"] != r["true_rejected"]]  # exact ties are coin flips
    wrong = sum(r["true_chosen"] < r["true_rejected"] for r in rows)
    assert len(rows) > 0.9 * n
    if flip_rate == 0.0:
        assert wrong == 0
    else:
        assert _binomial_ok(wrong, len(rows), flip_rate), (wrong / len(rows), flip_rate)
    flipped = sum(r["flipped"] for r in rows)
    assert flipped == wrong  # without BT randomness every disagreement is a flip


def test_bt_temperature_and_flips_match_the_model():
    """Temperature > 0 and flips: the agreement rate matches the mean of label_agreement_prob."""
    rows = build_preference_pairs(5000, seed=4, temperature=0.1, flip_rate=0.2)
    rows = [r for r in rows if r["true_chosen"] != r["true_rejected"]]
    expected = sum(label_agreement_prob(abs(r["true_chosen"] - r["true_rejected"]), 0.1, 0.2) for r in rows) / len(rows)
    agree = sum(r["true_chosen"] > r["true_rejected"] for r in rows)
    assert 0.6 < expected < 0.8
    assert _binomial_ok(agree, len(rows), expected)


def test_pairs_are_deterministic_and_coupled_across_noise():
    a = build_preference_pairs(300, seed=7, temperature=0.05, flip_rate=0.1)
    b = build_preference_pairs(300, seed=7, temperature=0.05, flip_rate=0.1)
    assert a == b
    assert build_preference_pairs(300, seed=8, temperature=0.05, flip_rate=0.1) != a
    noisy = build_preference_pairs(300, seed=7, temperature=0.05, flip_rate=0.3)
    for x, y in zip(a, noisy):  # same pairs, only the labels differ; a higher rate flips a superset
        assert x["prompt"] == y["prompt"] and {x["chosen"], x["rejected"]} == {y["chosen"], y["rejected"]}
        assert x["chosen"] != x["rejected"]
        assert not x["flipped"] or y["flipped"]
    gaps = [abs(r["true_chosen"] - r["true_rejected"]) for r in a]
    assert min(gaps) < 0.02 and max(gaps) > 0.4  # near-ties and clear cases


def test_jsonl_round_trip(tmp_path):
    rows = build_preference_pairs(5, seed=0)
    path = write_jsonl(rows, str(tmp_path / "sub" / "pairs.jsonl"))
    assert read_jsonl(path) == rows


# ------------------------------------------------------------------ report statistics


def test_ci95_and_summarize():
    assert ci95_halfwidth([1.0, 2.0, 3.0]) == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    with pytest.raises(ValueError):
        ci95_halfwidth([1.0])
    cells = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        methods = {m: {"true": [0.5 + shift + d, 0.5 + shift], "oracle": [1.0 + d, 1.0], "selected_lr": 1e-3,
                       "sweep": {"0.001": 0.5}}
                   for m, d in (("sft", 0.0), ("drdo", 0.2), ("dpo", 0.1), ("edpo", -0.1))}
        cells.append({"seed": seed, "noise": 0.3, "methods": methods, "label_agreement": 0.7, "oracle_true_corr": 0.5})
    rep = summarize(cells, {"seeds": [0, 1]})
    assert rep["noise_levels"] == [0.3] and noise_key(0.3) == "0.3"
    drdo = rep["methods"]["drdo"]["0.3"]
    assert drdo["true_reward_mean"] == pytest.approx(0.65)
    assert drdo["win_rate_vs_sft"] == pytest.approx(0.75)  # one win, one tie per seed
    assert rep["methods"]["edpo"]["0.3"]["win_rate_vs_sft"] == pytest.approx(0.25)
    assert drdo["ci95"] == pytest.approx(12.706 * math.sqrt(0.005) / math.sqrt(2))
    assert rep["comparisons"]["0.3"]["drdo_minus_dpo"]["mean"] == pytest.approx(0.05)
