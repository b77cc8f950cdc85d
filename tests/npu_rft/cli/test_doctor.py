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
