"""The "letters" task: a synthetic preference task with a KNOWN true reward.

A prompt names a few distinct letters, e.g. ``"dkm:"``; a response is a short
lowercase string.  The true reward ``r_true(x, y)`` is computed from the text
alone (no model), so a student trained on noisy preference labels can be
judged against the truth instead of against a learned Oracle.

    K = the prompt's letters, T = 2 * |K| (target length)
    coverage = |K & set(y)| / |K|                       share of the letters used
    purity   = #(chars of y in K) / max(1, len(y))      share of on-topic chars
    length   = max(0, 1 - |len(y) - T| / T)             closeness to the target length
    r_true   = 0.45 * coverage + 0.35 * purity + 0.20 * length       in [0, 1]

The three properties have different strengths (weights) and different
difficulty for a byte-level model (purity and length are local; coverage needs
copying from the prompt).  The best response (e.g. ``"dkmdkm"`` for ``"dkm:"``)
scores 1.0.

Candidates are built by perturbation: each has a random length and a random
"purity" q; each character is a prompt letter with probability q, else an
off-topic letter.  Two independent candidates for the same prompt give pairs
whose reward gaps range from large to near-ties.  Everything is deterministic
given a ``random.Random`` (or a seed).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "LettersTask",
    "DEFAULT_TASK",
    "true_reward",
    "true_rewards",
    "reward_components",
    "parse_prompt",
]

#: Separator that ends every prompt; the response follows it directly.
PROMPT_SUFFIX = ":"
#: Component weights of r_true (sum to 1, so r_true is in [0, 1]).
WEIGHTS = {"coverage": 0.45, "purity": 0.35, "length": 0.20}


def parse_prompt(prompt: str) -> str:
    """Return the prompt's letters ``K`` as a string ("dkm:" -> "dkm").

    Raises ValueError for anything that is not 1+ distinct lowercase letters
    followed by ``PROMPT_SUFFIX`` (leading/trailing whitespace is ignored).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    text = prompt.strip()
    if not text.endswith(PROMPT_SUFFIX):
        raise ValueError(f"prompt must end with {PROMPT_SUFFIX!r}, got {prompt!r}")
    letters = text[: -len(PROMPT_SUFFIX)]
    if not letters or not (letters.isascii() and letters.isalpha() and letters.islower()):
        raise ValueError(f"prompt must be lowercase letters then {PROMPT_SUFFIX!r}, got {prompt!r}")
    if len(set(letters)) != len(letters):
        raise ValueError(f"prompt letters must be distinct, got {prompt!r}")
    return letters


def reward_components(prompt: str, response: str) -> dict[str, float]:
    """The three properties of ``response`` relative to ``prompt``, each in [0, 1].

    ``response`` is used as given except that surrounding whitespace is
    stripped (generations may end with a newline); any character counts
    toward the length, and only prompt letters count as on-topic.
    """
    letters = parse_prompt(prompt)
    y = response.strip() if isinstance(response, str) else None
    if y is None:
        raise ValueError(f"response must be a str, got {type(response).__name__}")
    keys = set(letters)
    target = 2 * len(letters)
    on_topic = sum(1 for ch in y if ch in keys)
    return {
        "coverage": len(keys & set(y)) / len(keys),
        "purity": on_topic / max(1, len(y)),
        "length": max(0.0, 1.0 - abs(len(y) - target) / target),
    }


def true_reward(prompt: str, response: str) -> float:
    """r_true(x, y) in [0, 1]: the weighted sum of :func:`reward_components`."""
    parts = reward_components(prompt, response)
    return float(sum(WEIGHTS[name] * value for name, value in parts.items()))


def true_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    """Batched r_true; the judge signature ``(prompts, responses) -> list[float]``
    that ``drdo eval --judge drdo.demo.synthetic:true_rewards`` accepts."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    return [true_reward(p, r) for p, r in zip(prompts, responses)]


@dataclass(frozen=True)
class LettersTask:
    """Prompt and candidate generator of the letters task.

    alphabet: letters prompts and responses draw from (off-topic letters are
        the alphabet minus the prompt's letters).
    min_letters / max_letters: number of distinct prompt letters.
    min_len / max_len: candidate response lengths (inclusive, >= 1).
    min_purity / max_purity: range of the per-candidate purity q.
    """

    alphabet: str = "abcdefghijklmnop"
    min_letters: int = 3
    max_letters: int = 4
    min_len: int = 2
    max_len: int = 14
    min_purity: float = 0.2
    max_purity: float = 1.0

    def __post_init__(self) -> None:
        if len(set(self.alphabet)) != len(self.alphabet) or not self.alphabet.isalpha():
            raise ValueError(f"alphabet must be distinct letters, got {self.alphabet!r}")
        if not 1 <= self.min_letters <= self.max_letters < len(self.alphabet):
            raise ValueError("need 1 <= min_letters <= max_letters < len(alphabet)")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError("need 1 <= min_len <= max_len")
        if not 0.0 <= self.min_purity <= self.max_purity <= 1.0:
            raise ValueError("need 0 <= min_purity <= max_purity <= 1")

    def sample_prompt(self, rng: random.Random) -> str:
        """One prompt, e.g. ``"dkm:"``."""
        n = rng.randint(self.min_letters, self.max_letters)
        return "".join(rng.sample(self.alphabet, n)) + PROMPT_SUFFIX

    def sample_prompts(self, n: int, rng: random.Random) -> list[str]:
        """``n`` prompts (repeats possible)."""
        return [self.sample_prompt(rng) for _ in range(n)]

    def sample_candidate(self, prompt: str, rng: random.Random) -> str:
        """One perturbed candidate response for ``prompt``."""
        letters = parse_prompt(prompt)
        off_topic = [ch for ch in self.alphabet if ch not in letters]
        length = rng.randint(self.min_len, self.max_len)
        purity = rng.uniform(self.min_purity, self.max_purity)
        chars = [rng.choice(letters) if rng.random() < purity else rng.choice(off_topic) for _ in range(length)]
        return "".join(chars)

    def best_response(self, prompt: str) -> str:
        """A response with r_true = 1: the prompt's letters, twice."""
        return parse_prompt(prompt) * 2


DEFAULT_TASK = LettersTask()
