"""flash-attn is the training default on CUDA with 16-bit compute when the package imports (mocked on CPU)."""
from __future__ import annotations

from unittest import mock

import torch

from drdo import models
from drdo.models import default_attn_implementation, loading, training_attn_implementation


def _with_flash(installed: bool):
    return mock.patch.object(loading, "flash_attn_available", return_value=installed)


def test_training_attention_selection():
    with _with_flash(True):
        assert training_attn_implementation(None, torch.device("cuda", 0), torch.bfloat16) == "flash_attention_2"
        assert training_attn_implementation(None, "cuda", torch.float16) == "flash_attention_2"
        assert training_attn_implementation(None, "cuda", torch.float32) == "sdpa"  # flash-attn has no fp32
        assert training_attn_implementation(None, "cpu", torch.bfloat16) == "sdpa"
        assert training_attn_implementation("eager", "cuda", torch.bfloat16) == "eager"  # an explicit choice wins
    with _with_flash(False):
        assert training_attn_implementation(None, "cuda", torch.bfloat16) == "sdpa"
        assert default_attn_implementation("cuda", "bf16") == "sdpa"


def test_build_policy_switches_to_flash_attn_only_for_bf16_on_cuda():
    from drdo.training import loop
    from drdo.training.loop import TrainConfig

    calls = []
    with _with_flash(True), mock.patch.object(loading, "set_attn_implementation",
                                              side_effect=lambda lm, impl: calls.append(impl)):
        # fp32 on CPU: left as loaded
        policy = loop._build_policy(TrainConfig(model="tiny"), torch.device("cpu"), bf16=False)
        assert calls == [] and policy.config._attn_implementation == "sdpa"
        # bf16 compute on a CUDA device (the .to(device) is skipped: no GPU here)
        with mock.patch.object(models.PolicyWithRewardHead, "to", lambda self, device: self):
            loop._build_policy(TrainConfig(model="tiny"), torch.device("cuda", 0), bf16=True)
            assert calls == ["flash_attention_2"]
            loop._build_policy(TrainConfig(model="tiny", attn_implementation="eager"), torch.device("cuda", 0),
                               bf16=True)
            assert calls == ["flash_attention_2", "eager"]  # the loader applies the explicit choice; nothing after
