"""--report-to: each step's metrics also go to TensorBoard (offline) or wandb (offline, when installed)."""
from __future__ import annotations

import json
import os

import pytest
from test_train import KERNEL, make_rows, write_rows

from drdo.training.loop import TrainConfig, train
from drdo.training.reporting import Reporter, make_reporter


def _run(tmp_path, report_to):
    data = write_rows(tmp_path / "scored.jsonl", make_rows(4))
    out = tmp_path / report_to
    train(TrainConfig(stage="drdo", model="tiny", data=data, output_dir=str(out), max_steps=2, batch_size=2,
                      micro_batch_size=2, max_length=48, max_prompt_length=24, backend=KERNEL, progress=False,
                      plot=False, report_to=report_to))
    with open(out / "metrics.jsonl") as f:
        return out, [json.loads(line) for line in f]


def test_report_to_tensorboard_matches_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows = _run(tmp_path, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/distill", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2]
    for event, row in zip(logged, rows, strict=True):
        assert event.value == pytest.approx(row["loss"], rel=1e-6)


def test_report_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, rows = _run(tmp_path, "wandb")
    assert len(rows) == 2 and os.path.isdir(out / "wandb")


def test_report_to_none_and_bad_names(tmp_path):
    assert type(make_reporter("none", str(tmp_path), {})) is Reporter
    assert type(make_reporter("tensorboard", str(tmp_path), {}, enabled=False)) is Reporter  # ranks > 0
    with pytest.raises(ValueError, match="report_to must be one of"):
        make_reporter("mlflow", str(tmp_path), {})
    assert not os.listdir(tmp_path)
