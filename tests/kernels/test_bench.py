"""The kernel benchmark: its CLI on quick shapes, and the memory measurement."""
from __future__ import annotations

import json

from npu_rft.cli import main
from npu_rft_kernels.bench import MIB, Case, _memory_in_subprocess


def test_bench_kernels_quick_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench-kernels", "--quick", "--repeats", "1", "--mode", "frozen", "--device", "cpu", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "N=64,H=32,V=2000 fp32 frozen torch" in table and "x gemm" in table
    rows = {r["case"]["impl"]: r for r in json.loads(out.read_text())}
    assert sorted(rows) == ["gemm", "naive", "torch"]
    assert rows["naive"]["vs_naive_time"] == 1.0 and rows["gemm"]["vs_gemm_time"] == 1.0
    assert all(r["fwd_bwd_ms"] > 0 and r["gflops"] > 0 and r["peak_mib"] is not None for r in rows.values())
    assert len(rows["torch"]["fwd_bwd_times_ms"]) == 1


def test_incremental_peak_sees_the_naive_logits_and_not_the_tiles(monkeypatch):
    # N x V fp32 logits = 256 * 20000 * 4 bytes = 19.5 MiB; naive holds several such buffers.
    monkeypatch.setenv("NPU_RFT_KERNELS_TILE_BYTES", str(4 * 2**20))  # inherited by the subprocess
    naive = _memory_in_subprocess(Case(256, 32, 20000, "frozen", "naive"))
    tiled = _memory_in_subprocess(Case(256, 32, 20000, "frozen", "torch"))
    assert naive["fwd_peak"] >= 256 * 20000 * 4
    assert naive["peak"] >= 2 * 256 * 20000 * 4
    assert tiled["peak"] < naive["peak"] / 3 and tiled["peak"] < 8 * MIB
