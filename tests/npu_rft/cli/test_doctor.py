"""Tests for ``npu-rft doctor``: through click's CliRunner, and end to end in a
child process whose ``import torch`` raises, as it does where torch_npu is
installed without CANN."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from click.testing import CliRunner

from npu_rft import doctor
from npu_rft.cli import cli, main


def test_doctor_exits_zero_here_and_says_no_accelerator(monkeypatch):
    for var in ("NPU_RFT_DEVICE", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "no accelerator" in result.output
    assert "\n0 error(s)" in result.output


def test_doctor_json_and_non_zero_exit_on_an_error(monkeypatch):
    monkeypatch.setattr(doctor, "run_doctor", lambda: doctor.Report([doctor.Check("x", "error", "bad", "fix it")]))
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output) == {"ok": False, "checks": [
        {"name": "x", "status": "error", "detail": "bad", "fix": "fix it"}]}
    assert main(["doctor"]) == 1


def test_doctor_runs_where_import_torch_raises(tmp_path):
    # Stand-in for a machine with torch_npu but no CANN: a `torch` package that raises
    # unless TORCH_DEVICE_BACKEND_AUTOLOAD=0, and torch_npu distribution metadata.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import os\n"
        "if os.environ.get('TORCH_DEVICE_BACKEND_AUTOLOAD') != '0':\n"
        "    raise RuntimeError('Failed to load the backend extension: torch_npu. libhccl.so not found')\n"
        "__version__ = '2.13.0'\n")
    info = tmp_path / "torch_npu-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.13.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND_", "NPU_RFT_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "npu_rft", "doctor", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    torch_check = checks["torch import"]
    assert torch_check["status"] == "error"
    assert "libhccl.so not found" in torch_check["detail"]
    assert "With TORCH_DEVICE_BACKEND_AUTOLOAD=0 torch imports" in torch_check["detail"]
    assert "pip uninstall torch-npu" in torch_check["fix"]
    assert checks["torch_npu"]["detail"] == "2.13.0"
    assert checks["CANN"]["status"] == "error"
    assert checks["devices"]["detail"] == "skipped: torch does not import"


# ----------------------------------------------------------------- --full (the acceptance suite, stubbed here;
# tests/npu_rft/test_acceptance.py runs the real one)


def _stub_suite(monkeypatch, status):
    from npu_rft import acceptance

    calls = []

    def run_acceptance(device, progress=None, progress_bar=False, **kw):
        calls.append(device)
        progress("[1/1] kernels ...")
        return acceptance.AcceptanceReport(
            device={"type": "cpu", "name": "x86_64", "torch": "2.x"},
            results=[acceptance.Result("kernels torch fp32", status, "max rel. error 1e-7"),
                     acceptance.Result("fused op swiglu", "skipped", "the device is cpu, not an Ascend NPU")],
            wall_s=1.5)

    monkeypatch.setattr(acceptance, "run_acceptance", run_acceptance)
    monkeypatch.setattr(doctor, "run_doctor", lambda: doctor.Report([doctor.Check("torch import", "ok", "2.x")]))
    return calls


def test_doctor_full_prints_the_table_and_writes_json(monkeypatch, tmp_path):
    calls = _stub_suite(monkeypatch, "verified")
    out = tmp_path / "reports" / "acc.json"
    result = CliRunner().invoke(cli, ["doctor", "--full", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert calls == ["cpu"]
    assert "[1/1] kernels ..." in result.output
    assert "kernels torch fp32  verified" in result.output and "1 verified, 0 failed, 1 skipped in 1.5 s" in result.output
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["doctor"]["ok"] is True
    assert data["acceptance"]["counts"] == {"verified": 1, "failed": 0, "skipped": 1}
    assert data["acceptance"]["results"][1] == {"name": "fused op swiglu", "status": "skipped",
                                                "detail": "the device is cpu, not an Ascend NPU", "seconds": 0.0}


def test_doctor_full_exits_non_zero_when_a_line_failed(monkeypatch):
    _stub_suite(monkeypatch, "failed")
    result = CliRunner().invoke(cli, ["doctor", "--json", "--full"])  # bare --json: the JSON on stdout
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["acceptance"]["results"][0]["status"] == "failed"


def test_doctor_full_on_an_absent_device_says_so(monkeypatch):
    monkeypatch.setattr(doctor, "run_doctor", lambda: doctor.Report([doctor.Check("torch import", "ok", "2.x")]))
    monkeypatch.delenv("NPU_RFT_DEVICE", raising=False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    result = CliRunner().invoke(cli, ["doctor", "--full", "--device", "npu"])
    assert result.exit_code == 1
    assert "acceptance suite: not run:" in result.output and "asked for device 'npu'" in result.output


def test_doctor_full_is_not_run_where_torch_does_not_import(monkeypatch):
    monkeypatch.setattr(doctor, "run_doctor", lambda: doctor.Report([doctor.Check("torch import", "error", "boom")]))
    result = CliRunner().invoke(cli, ["doctor", "--full"])
    assert result.exit_code == 1
    assert "acceptance suite: not run, because `import torch` fails" in result.output
