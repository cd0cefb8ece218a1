"""A vocabulary-parallel LM head (weight DTensor Shard(0), hidden DTensor Replicate()) over 2 and
4 CPU ranks (gloo, torchrun) equals one float64 process: the fused log-probs and every loss,
forward and every gradient, with even and uneven shards, with and without a bias and a logit
transform; no rank gathers the head; and under torch.compile, fullgraph included
(tests/vocab_parallel_worker.py does the work)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Worst relative error allowed: float64 inputs are exact to rounding; float32 inputs to a few
#: ulps of the sums (the largest measured: 1.9e-6 on a DRDO d_hidden).
TOLERANCE = {"float64": 1e-12, "float32": 2e-5}


def run_worker(ranks: int, out, *what: str) -> dict:
    """tests/vocab_parallel_worker.py on ``ranks`` gloo ranks: what rank 0 wrote to ``out``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           os.path.join(REPO, "tests", "vocab_parallel_worker.py"), str(out), *what]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world"] == ranks
    return result["errors"]


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def errors(request, tmp_path_factory):
    return run_worker(request.param, tmp_path_factory.mktemp("vocab_parallel") / "errors.json")


def test_every_case_ran(errors):
    names = {key.split("/")[0] for key in errors}
    assert names == {"logprobs", "drdo", "drdo_implicit", "dpo", "edpo", "oracle"}
    assert len(errors) == 6 * 2 * 3


def test_vocab_parallel_equals_one_float64_process(errors):
    for key, worst in errors.items():
        limit = TOLERANCE[key.split("/")[2]]
        bad = {name: err for name, err in worst.items() if not err <= limit}
        assert not bad, f"{key}: relative errors {bad} above {limit}"


def test_compiled_step_with_a_sharded_head_equals_one_process(tmp_path):
    """torch.compile of a step around fused log-probs and DRDO on a head sharded over 2 ranks
    (uneven shards). Vocabulary-parallel, in default and fullgraph mode: no graph break (each call
    is one operator). A Shard(0) weight with plain hidden states (FSDP2's head outside its forward):
    each call is a graph break that says why. Each time the loss and every gradient equal one
    float64 process."""
    from drdo_kernels.compiled import DTENSOR_HEAD_REASON

    result = run_worker(2, tmp_path / "compiled.json", "compile")
    assert set(result) == {"default", "fullgraph", "gathered"}
    for mode, found in result.items():
        breaks = found.pop("graph_breaks")
        if mode == "gathered":
            assert len(breaks) == 2 and all(DTENSOR_HEAD_REASON in b for b in breaks), breaks
            assert all(any(name in b for b in breaks) for name in ("fused_linear_logprobs", "fused_linear_drdo_loss"))
        else:
            assert breaks == [], (mode, breaks)
        bad = {name: err for name, err in found.items() if not err <= TOLERANCE["float32"]}
        assert set(found) == {"value", "weight", "hidden", "bias"} and not bad, (mode, found)


def test_fsdp2_and_vocab_parallel_recipe_equals_one_process(tmp_path):
    """examples/train_vocab_parallel.py on a (dp=2, tp=2) mesh trains as one process does."""
    script = os.path.join(REPO, "examples", "train_vocab_parallel.py")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    runs = {"one": [sys.executable, script, "--out", str(tmp_path / "one.json")],
            "mesh": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", script,
                     "--dp", "2", "--tp", "2", "--out", str(tmp_path / "mesh.json")]}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-4000:]}"
    one, mesh = (json.loads((tmp_path / f"{name}.json").read_text())["losses"] for name in runs)
    assert len(one) == len(mesh) == 4
    assert mesh == pytest.approx(one, rel=1e-5)
    assert len(set(one)) == 4  # the model trains: every step's loss differs
