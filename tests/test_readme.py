"""The README's Python examples run as written (so the README stays true)."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2, "the README should show the reference and the fused losses"
    namespace: dict = {}
    for block in blocks:  # later blocks build on the names of earlier ones, as a reader would
        exec(compile(block, str(README), "exec"), namespace)
    grad = namespace["policy"].lm_head.weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)
    assert float(namespace["token_logps"].detach().max()) <= 0.0
    if "hf_trainer" in namespace:  # the HF Trainer recipe's checkpoint holds the trained head and LM
        trained, loaded = namespace["hf_trainer"].model, namespace["student"]
        assert torch.allclose(trained.reward_head.weight.detach().cpu(), loaded.reward_head.weight)
        assert torch.allclose(trained.lm_head.weight.detach().cpu(), loaded.lm_head.weight)
