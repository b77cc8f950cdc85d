"""Tests for npu_rft/plot.py: reading metrics.jsonl and writing the PNG headless."""
from __future__ import annotations

import json

import pytest

from npu_rft.data.schema import DataError
from npu_rft import plot


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_series_keeps_only_records_with_the_key(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", [
        {"step": 1, "reward/mean": 0.2, "loss": 0.5},
        {"step": 2, "reward/mean": 0.4, "loss": 0.3, "kl/mean": 0.01},
        {"step": 2, "eval/top1": 0.6},
        {"step": 3, "reward/mean": None},
    ])
    records = plot.read_metrics(tmp_path / "metrics.jsonl")
    assert plot.series(records, "reward/mean") == ([1, 2], [0.2, 0.4])
    assert plot.series(records, "eval/top1") == ([2], [0.6])
    assert plot.series(records, "nothing") == ([], [])


def test_plot_run_writes_a_png(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", [
        {"step": s, "reward/mean": s / 10, "loss": 1 / s, "eval/top1": 0.3 + s / 20} for s in range(1, 11)
    ])
    out = plot.plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    other = plot.plot_run(tmp_path, tmp_path / "sub" / "c.png")
    assert other.is_file()


def test_bad_metrics_name_the_line(tmp_path):
    with pytest.raises(DataError, match="not found"):
        plot.read_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n\n{oops\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:3: invalid JSON"):
        plot.read_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"loss": 1}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:1: .*'step'"):
        plot.read_metrics(tmp_path / "metrics.jsonl")


def test_refresh_steps_are_the_updates_done_before_each_dpo_iteration(tmp_path):
    # two iterations of 2 updates; the refresh is logged with the first update of each
    write_metrics(tmp_path / "metrics.jsonl", [
        {"step": 1, "dpo/reference_refresh": 1}, {"step": 2, "dpo/reference_refresh": 0},
        {"step": 3, "dpo/reference_refresh": 1}, {"step": 4, "dpo/reference_refresh": 0, "eval/top1": 0.5},
    ])
    assert plot.refresh_steps(plot.read_metrics(tmp_path / "metrics.jsonl")) == [0, 2]
    assert plot.refresh_steps([{"step": 1, "loss": 0.3}]) == []  # GRPO: none


def test_plot_arms_draws_runs_on_one_figure(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_metrics(tmp_path / name / "metrics.jsonl", [
            {"step": 1, "reward/mean": 0.2, "timing_s/step": 0.5, "dpo/reference_refresh": 1},
            {"step": 2, "reward/mean": 0.4, "timing_s/step": 0.5, "eval/top1": 0.3},
        ])
    out = plot.plot_arms({"A": tmp_path / "a", "B": tmp_path / "b"}, tmp_path / "both.png", baseline=0.25)
    assert out == tmp_path / "both.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one run"):
        plot.plot_arms({}, tmp_path / "none.png")
    with pytest.raises(DataError, match="not found"):
        plot.plot_arms({"A": tmp_path / "missing"}, tmp_path / "x.png")
