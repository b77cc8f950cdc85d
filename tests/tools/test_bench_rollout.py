"""``tools/bench_rollout.py`` at a smoke size, against real vLLM (``make test-vllm``)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_rollout.py"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed here; `make test-vllm`")
def test_bench_rollout_measures_both_engines_on_the_same_work(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_rollout", TOOL)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", [str(TOOL.parent), *sys.path])
    spec.loader.exec_module(module)
    out = tmp_path / "rollout.json"
    assert module.main(["--shape", "tiny", "--prompts", "2", "--samples", "3", "--max-new-tokens", "5",
                        "--repeats", "2", "--kv-cache-gib", "0.0625", "--cache-dir", str(tmp_path / "models"),
                        "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for name in ("native", "vllm"):
        assert len(figures["runs"][name]["tokens_per_s"]) == 2 and min(figures["runs"][name]["tokens_per_s"]) > 0
        assert all(0 < t <= 2 * 3 * 5 for t in figures["runs"][name]["tokens"])
    summary = figures["summary"]
    assert figures["ratio"] == pytest.approx(summary["vllm"]["median_tokens_per_s"]
                                             / summary["native"]["median_tokens_per_s"])
