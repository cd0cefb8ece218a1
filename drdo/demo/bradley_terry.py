"""Preference labels drawn by Bradley-Terry on a known reward, with a noise knob.

For a candidate pair (a, b) with true rewards r_a, r_b:

    P(a preferred) = sigmoid((r_a - r_b) / temperature)      (temperature 0: argmax, ties 50/50)
    then, with probability flip_rate, the label is flipped.

So the probability that the label agrees with the true order of a pair with
gap d = |r_a - r_b| > 0 is

    (1 - flip_rate) * sigmoid(d / temperature) + flip_rate * (1 - sigmoid(d / temperature)),

and with temperature 0 exactly ``1 - flip_rate``.  The temperature makes
near-ties ambiguous (the "non-deterministic" preferences of the paper); the
flip rate is label noise independent of the gap.

Candidates and label draws use separate random streams derived from the seed,
and both uniforms of every pair are drawn whatever the noise level, so the
SAME pairs get labels at every noise level and a higher flip rate flips a
superset of the pairs a lower one flips (common random numbers): differences
between noise levels are due to the noise, not to a different sample.
"""
from __future__ import annotations

import math
import random
from typing import Callable

from drdo.demo.synthetic import DEFAULT_TASK, LettersTask, true_reward

__all__ = [
    "bradley_terry_prob",
    "label_agreement_prob",
    "draw_label",
    "build_preference_pairs",
]


def _check_noise(temperature: float, flip_rate: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(flip_rate, (int, float)) and 0.0 <= flip_rate <= 0.5):
        raise ValueError(f"flip_rate must be in [0, 0.5] (0.5 = pure noise), got {flip_rate!r}")


def bradley_terry_prob(r_a: float, r_b: float, temperature: float) -> float:
    """P(a preferred over b) = sigmoid((r_a - r_b) / temperature); temperature 0 is the step function (0.5 at a tie)."""
    _check_noise(temperature, 0.0)
    diff = r_a - r_b
    if temperature == 0:
        return 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5
    z = diff / temperature
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def label_agreement_prob(gap: float, temperature: float, flip_rate: float) -> float:
    """Probability that the drawn label agrees with the true order of a pair whose reward gap is ``gap`` >= 0."""
    _check_noise(temperature, flip_rate)
    p = bradley_terry_prob(abs(gap), 0.0, temperature)
    return (1.0 - flip_rate) * p + flip_rate * (1.0 - p)


def draw_label(
    r_a: float, r_b: float, u_bt: float, u_flip: float, temperature: float, flip_rate: float
) -> tuple[bool, bool]:
    """Label of one pair from two uniforms in [0, 1).

    Returns (a_preferred, flipped): ``a_preferred`` is the final label,
    ``flipped`` says the flip step reversed the Bradley-Terry draw.
    """
    _check_noise(temperature, flip_rate)
    a_preferred = u_bt < bradley_terry_prob(r_a, r_b, temperature)
    flipped = u_flip < flip_rate
    return (a_preferred != flipped), flipped


def build_preference_pairs(
    n_pairs: int,
    *,
    seed: int,
    temperature: float = 0.05,
    flip_rate: float = 0.0,
    task: LettersTask = DEFAULT_TASK,
    reward_fn: Callable[[str, str], float] = true_reward,
) -> list[dict]:
    """``n_pairs`` labelled pairs of the task, deterministic in (seed, n_pairs).

    Each row: prompt, chosen, rejected (text), true_chosen, true_rejected
    (r_true of each), agrees (label matches the true order, ties count as
    agreeing), flipped (the flip step reversed the label).  The two candidates
    of a pair are distinct strings.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    _check_noise(temperature, flip_rate)
    cand_rng = random.Random(f"letters-candidates-{seed}")
    label_rng = random.Random(f"letters-labels-{seed}")
    rows = []
    for _ in range(n_pairs):
        prompt = task.sample_prompt(cand_rng)
        a = task.sample_candidate(prompt, cand_rng)
        b = task.sample_candidate(prompt, cand_rng)
        while b == a:
            b = task.sample_candidate(prompt, cand_rng)
        r_a, r_b = reward_fn(prompt, a), reward_fn(prompt, b)
        u_bt, u_flip = label_rng.random(), label_rng.random()
        a_preferred, flipped = draw_label(r_a, r_b, u_bt, u_flip, temperature, flip_rate)
        chosen, rejected, r_c, r_r = (a, b, r_a, r_b) if a_preferred else (b, a, r_b, r_a)
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "true_chosen": r_c,
                "true_rejected": r_r,
                "agrees": r_c >= r_r,
                "flipped": flipped,
            }
        )
    return rows


