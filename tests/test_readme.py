"""The README's Python examples run as written, each on its own in a fresh namespace (so the README
stays true, and a reader can copy any one of them)."""
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_shows_the_reference_and_the_fused_losses():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_python_example_runs_alone(block):
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    if "policy" in namespace:  # the loss examples: a backward pass reached the LM head
        grad = namespace["policy"].lm_head.weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)
    if "token_logps" in namespace:
        assert float(namespace["token_logps"].detach().max()) <= 0.0
    if "hf_trainer" in namespace:  # the HF Trainer recipe's checkpoint holds the trained head and LM
        trained, loaded = namespace["hf_trainer"].model, namespace["student"]
        assert torch.allclose(trained.reward_head.weight.detach().cpu(), loaded.reward_head.weight)
        assert torch.allclose(trained.lm_head.weight.detach().cpu(), loaded.lm_head.weight)
