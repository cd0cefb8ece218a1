"""``drdo demo``: a synthetic task with a known true reward (:mod:`.synthetic`), noisy preference
pairs labelled from it by Bradley–Terry (:mod:`.bradley_terry`), the end-to-end study (:mod:`.run`),
named DRDO variants trained beside it (:mod:`.variants`) and its report (:mod:`.report`)."""
from drdo.demo.bradley_terry import bradley_terry_prob, build_preference_pairs, draw_label, label_agreement_prob
from drdo.demo.synthetic import DEFAULT_TASK, LettersTask, reward_components, true_reward, true_rewards

__all__ = [
    "LettersTask", "DEFAULT_TASK", "true_reward", "true_rewards", "reward_components",
    "bradley_terry_prob", "label_agreement_prob", "draw_label", "build_preference_pairs",
]
