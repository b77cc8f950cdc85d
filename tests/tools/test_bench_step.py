"""tools/bench_step.py: how a framework's processes become one figure with its spread, and the real shapes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_step", ROOT / "tools" / "bench_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _process(steps, rss_gb, stages, device_gb=None, load=(1.0, 1.5)):
    out = {"step_s": steps, "cpu_step_s": [t / 2 for t in steps], "peak_rss": rss_gb * 1e9, "stages": stages, "device_name": "CPU X, 2 cores",
           "load_avg": list(load)}
    if device_gb is not None:
        out["peak_device_gb"] = device_gb
    return out


def test_summarize_takes_the_median_of_process_medians_with_min_and_max():
    runs = [_process([3.0, 1.0, 2.0], 4.0, {"timing_s/rollout": 1.0}),  # median 2.0
            _process([5.0, 6.0], 3.0, {"timing_s/rollout": 3.0}),  # median 5.5
            _process([4.0], 5.0, {"timing_s/rollout": 2.0})]
    s = bench.summarize(runs)
    assert s["per_process_step_s"] == [2.0, 5.5, 4.0]
    assert (s["step_s"], s["step_s_min"], s["step_s_max"]) == (4.0, 2.0, 5.5)
    assert (s["cpu_step_s"], s["cpu_step_s_min"], s["cpu_step_s_max"]) == (2.0, 1.0, 2.75)
    assert (s["peak_rss_gb"], s["peak_rss_gb_min"], s["peak_rss_gb_max"]) == (4.0, 3.0, 5.0)
    assert s["stages"] == {"timing_s/rollout": 2.0}
    assert s["device_name"] == "CPU X, 2 cores" and len(s["load_avg"]) == 3
    assert "peak_device_gb" not in s  # CPU runs have no device memory


def test_summarize_reports_device_memory_where_the_processes_measured_it():
    s = bench.summarize([_process([1.0], 2.0, {}, device_gb=g) for g in (7.0, 9.0, 8.0)])
    assert (s["peak_device_gb"], s["peak_device_gb_min"], s["peak_device_gb_max"]) == (8.0, 7.0, 9.0)


def test_the_stage_line_leaves_out_the_whole_step():
    line = bench.stages_line({"timing_s/rollout": 1.25, "timing_s/step": 9.0, "timing_s/loss": 0.5})
    assert line == "rollout 1.250, loss 0.500"


@pytest.mark.parametrize("shape, layers, hidden, head_dim", [("qwen2.5-0.5b", 24, 896, 64),
                                                            ("qwen2.5-1.5b", 28, 1536, 128)])
def test_the_real_shapes_are_the_published_configs(shape, layers, hidden, head_dim):
    s = bench.SHAPES[shape]
    assert (s["layers"], s["hidden"], s["vocab"], s["tied"], s["kv_heads"]) == (layers, hidden, 151936, True, 2)
    assert s["hidden"] == s["heads"] * head_dim


def test_a_real_shape_refuses_another_vocabulary(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shape", "qwen2.5-0.5b", "--vocab", "8000"])
    assert "drop --vocab" in capsys.readouterr().err
