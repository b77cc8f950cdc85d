"""Stage timing, the metrics/samples JSONL files, and truncation on resume."""
from __future__ import annotations

import json
import logging
import time

from npu_rft.metrics import MetricsWriter, StageTimer, truncate_jsonl


def test_stage_timer_accumulates_per_stage():
    timer = StageTimer()
    for _ in range(2):
        with timer("loss"):
            time.sleep(0.01)
    with timer("update"):
        pass
    m = timer.metrics()
    assert set(m) == {"timing_s/loss", "timing_s/update"}
    assert m["timing_s/loss"] >= 0.02 and m["timing_s/update"] < m["timing_s/loss"]


def test_writer_appends_records_and_samples_on_rank_zero_only(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="npu_rft.metrics")
    # the CLI's setup_logging stops npu_rft records from reaching the root logger
    monkeypatch.setattr(logging.getLogger("npu_rft"), "propagate", True)
    with MetricsWriter(tmp_path, enabled=True, total_steps=3, start_step=0, tensorboard=False, progress_bar=False) as w:
        w.log(1, {"reward/mean": 0.25, "loss": 1.5})
        w.log_samples(1, [{"completion": "[\"a\"]", "reward": 1.0}])
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "reward/mean": 0.25, "loss": 1.5}]
    assert json.loads((tmp_path / "samples.jsonl").read_text()) == {"step": 1, "completion": "[\"a\"]", "reward": 1.0}
    assert "step 1: reward=0.25 loss=1.5" in caplog.text
    other = tmp_path / "rank1"
    other.mkdir()
    with MetricsWriter(other, enabled=False, total_steps=3, start_step=0, tensorboard=True, progress_bar=True) as w:
        w.log(1, {"loss": 1.0})
    assert list(other.iterdir()) == []


def test_truncate_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3, 4)))
    truncate_jsonl(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    truncate_jsonl(tmp_path / "absent.jsonl", 2)  # nothing to do
