"""FSDP2 over 2 CPU ranks (gloo, launched by torchrun through the CLI) equals one process.

The fused loss reads the LM-head weight inside the root module's FSDP-managed forward,
so this also checks that the kernel sees the full (unsharded) [V, H] weight and that its
gradient is reduce-scattered correctly: any sharded read would change the losses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import KERNEL, make_rows, write_rows

from drdo.training.loop import TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_two_fsdp2_ranks_equal_one_process(tmp_path):
    data = write_rows(tmp_path / "scored.jsonl", make_rows(12))
    common = dict(max_steps=3, batch_size=4, seed=0, lr=1e-4, max_length=48, max_prompt_length=24, backend=KERNEL)
    dist_out = tmp_path / "fsdp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "drdo.cli", "train", "--loss", "drdo", "--model", "tiny", "--data", data,
           "--output-dir", str(dist_out), "--micro-batch-size", "1", "--save-every", "2", "--no-progress",
           "--no-plot"]
    for key, value in common.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    single_out = tmp_path / "single"
    train(TrainConfig(stage="drdo", model="tiny", data=data, output_dir=str(single_out), micro_batch_size=4,
                      progress=False, plot=False, **common))

    # per-step losses (2 ranks x 2 accumulation steps of 1 pair vs 1 rank x 1 micro-batch of 4)
    for a, b in zip(_losses(dist_out), _losses(single_out), strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    # parameters gathered from the FSDP2 shards equal the single-process ones
    a, b = load_file(str(dist_out / "model.safetensors")), load_file(str(single_out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    ha = load_file(str(dist_out / "reward_head.safetensors"))
    hb = load_file(str(single_out / "reward_head.safetensors"))
    assert torch.allclose(ha["weight"], hb["weight"], atol=1e-6)
    # the mid-run checkpoint holds the full optimizer state and one RNG file per rank
    ckpt = dist_out / "checkpoints" / "step-0000002"
    assert {"optimizer.pt", "rng-rank0.pt", "rng-rank1.pt", "trainer_state.json"} <= set(os.listdir(ckpt))
    state = json.load(open(ckpt / "trainer_state.json"))
    assert state["step"] == 2 and state["world_size"] == 2

    # that FSDP2 checkpoint resumes in one process (world size 2 -> 1) and lands on the same step 3
    resumed = tmp_path / "resumed"
    train(TrainConfig(stage="drdo", model="tiny", data=data, output_dir=str(resumed), micro_batch_size=4,
                      progress=False, plot=False, resume=str(ckpt), **common))
    assert _losses(resumed) == pytest.approx(_losses(single_out)[2:], rel=1e-6)
    c = load_file(str(resumed / "model.safetensors"))
    assert max((c[k] - b[k]).abs().max().item() for k in b) < 1e-6
