"""The GPU suite on a CPU: its plan lists the five stages with their budgets, and its dry run runs every
stage's command with toy shapes (the CUDA tests are only printed), leaving no machine path behind."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks.common import portable, read_csv

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["tests", "profile", "loss", "train", "padding"]


def test_dry_run_plans_five_stages_and_runs_every_command(tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for k, name in enumerate(STAGES, 1):
        assert f"stage {k}/5 {name}: budget" in log
    # each stage ends where the budgets up to it end (30 s of setup first), the last at BUDGET_S
    for k, name, end in ((1, "tests", 100), (2, "profile", 140), (3, "loss", 320), (4, "train", 410),
                         (5, "padding", 450)):
        assert f"stage {k}/5 {name}: until +{end}s" in log
    assert "would run (needs CUDA): " in log and "TRITON_INTERPRET=0 python3 -m pytest" in log
    assert "flash-attn: skipped, not built" in log
    assert log.count("[dry run] ok") == 11 and "FAILED" not in log
    # the CuTe DSL and TRL Triton peers: what each needs, whether it travels, and their rows with the reason
    assert "liger_flce_cutedsl: liger-kernel >= 0.8.5 with LIGER_KERNEL_IMPL=cutedsl" in log
    assert "far over the 64 MiB" in log and "trl_logprob_entropy: trl >= 1.16's Triton kernel" in log
    assert "LIGER_KERNEL_IMPL=cutedsl python3 benchmarks/bench_logprobs.py" in log
    logprobs = {r["method"]: r for r in read_csv(out / "logprobs.csv")}
    assert logprobs["liger_flce_cutedsl"]["status"] == "skipped" and "CUDA" in logprobs["liger_flce_cutedsl"]["note"]
    assert logprobs["trl_logprob_entropy"]["status"] == "skipped" and "CUDA" in logprobs["trl_logprob_entropy"]["note"]
    versions = json.loads((out / "logprobs_meta.json").read_text())["versions"]
    assert {"liger-kernel", "nvidia-cutlass-dsl", "trl"} <= set(versions)

    loss = read_csv(out / "loss.csv")
    assert {r["H"] for r in loss} == {"16", "24", "32"}  # the headline, then the other sizes appended
    assert {r["method"] for r in loss if r["status"] == "ok"} >= {"ours_auto", "ours_chunked"}
    assert all(r["work_nhv"] and r["logits"] == "std2" for r in loss)
    assert {r["method"] for r in read_csv(out / "train.csv") if r["status"] == "ok"} >= {"ours_auto", "naive"}
    assert [r["status"] for r in read_csv(out / "profile.csv") if r["backend"] == "chunked"][0] == "ok"
    assert json.loads((out / "padding_free.json").read_text())["speedup"] > 0
    suite = (out / "suite.md").read_text()
    assert all(f"/5 {name} |" in suite for name in STAGES)
    for path in out.rglob("*"):
        if path.suffix in (".csv", ".md", ".json", ".log"):
            text = path.read_text(encoding="utf-8")
            assert portable(text) == text and str(tmp_path) not in text, path.name
