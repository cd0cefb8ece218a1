"""Synthetic preference tasks with a known true reward (used by ``drdo demo``)."""
from drdo.tasks.preferences import (
    bradley_terry_prob,
    build_preference_pairs,
    draw_label,
    label_agreement_prob,
    read_jsonl,
    write_jsonl,
)
from drdo.tasks.synthetic import DEFAULT_TASK, LettersTask, reward_components, true_reward, true_rewards

__all__ = [
    "LettersTask",
    "DEFAULT_TASK",
    "true_reward",
    "true_rewards",
    "reward_components",
    "bradley_terry_prob",
    "label_agreement_prob",
    "draw_label",
    "build_preference_pairs",
    "write_jsonl",
    "read_jsonl",
]
