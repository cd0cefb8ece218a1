"""The README's Python examples run as written, each on its own (so the README stays true and a
reader can copy any one block)."""
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _run(block: str) -> dict:
    namespace: dict = {"__name__": "readme_example"}  # a fresh namespace: no block borrows another's names
    exec(compile(block, str(README), "exec"), namespace)
    return namespace


def test_readme_shows_the_fused_losses_trl_and_the_hf_trainer():
    assert len(BLOCKS) >= 3, "the README should show the fused losses, DRDOTrainer and the HF Trainer"
    assert any("FusedLinearDRDOLoss" in b and "fused_linear_logprobs" in b for b in BLOCKS)
    assert any("DRDOTrainer(" in b for b in BLOCKS)
    assert any("(Trainer)" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_readme_python_example_runs_on_its_own(index):
    namespace = _run(BLOCKS[index])
    if "policy" in namespace:  # the own-trainer example: the fused loss's gradient reached the LM head
        grad = namespace["policy"].lm_head.weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)
    if "token_logps" in namespace:
        assert float(namespace["token_logps"].detach().max()) <= 0.0
    if "hf_trainer" in namespace:  # the HF Trainer recipe's checkpoint holds the trained head and LM
        trained, loaded = namespace["hf_trainer"].model, namespace["student"]
        assert torch.allclose(trained.reward_head.weight.detach().cpu(), loaded.reward_head.weight)
        assert torch.allclose(trained.lm_head.weight.detach().cpu(), loaded.lm_head.weight)
