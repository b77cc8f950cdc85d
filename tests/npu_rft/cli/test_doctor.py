"""Tests for ``npu-rft doctor``: through click's CliRunner, and end to end in a
child process whose ``import torch`` raises, as it does where torch_npu is
installed without CANN: with a stand-in shaped as the real failure, and with
the real torch_npu 2.13.0 wheel on PYTHONPATH (``torch_npu_wheel``, conftest.py)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from click.testing import CliRunner
from helpers import run_command

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


# torch 2.13's wrapper of an autoload failure (torch/__init__.py, _import_device_backends)
AUTOLOAD_FAILED = ("Failed to load the backend extension: torch_npu. "
                   "You can disable extension auto-loading with TORCH_DEVICE_BACKEND_AUTOLOAD=0.")


def _stand_in_site(tmp_path, cause_code: str, torch_version: str = "2.13.0+cpu"):
    """A site folder whose `torch` raises as torch does when its autoload of torch_npu
    fails (unless TORCH_DEVICE_BACKEND_AUTOLOAD=0): torch's RuntimeError, with the
    exception ``cause_code`` builds as its __cause__; plus torch and torch_npu
    distribution metadata. Returns the environment for a child process."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import os\n"
        "if os.environ.get('TORCH_DEVICE_BACKEND_AUTOLOAD') != '0':\n"
        f"    raise RuntimeError({AUTOLOAD_FAILED!r}) from {cause_code}\n"
        f"__version__ = {torch_version!r}\n")
    for name, version in (("torch_npu", "2.13.0"), ("torch", torch_version)):
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND_", "NPU_RFT_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    return env


def _doctor(env, *args):
    return run_command([sys.executable, "-m", "npu_rft", "doctor", *args], env=env, timeout=300)


def test_doctor_runs_where_import_torch_raises(tmp_path):
    # Stand-in for a machine with torch_npu but no CANN, shaped as the real failure
    # (test_doctor_against_the_real_wheel): libhccl.so only in the cause, never in the top line.
    env = _stand_in_site(tmp_path, "ImportError('libhccl.so: cannot open shared object file: No such file or directory')")
    proc = _doctor(env, "--json")
    assert proc.returncode == 1, proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    torch_check = checks["torch import"]
    assert torch_check["status"] == "error"
    assert torch_check["detail"].startswith(f"`import torch` fails: RuntimeError: {AUTOLOAD_FAILED} Root cause: "
                                            f"ImportError: libhccl.so: cannot open shared object file")
    assert "libhccl.so is a CANN library" in torch_check["detail"]
    assert "With TORCH_DEVICE_BACKEND_AUTOLOAD=0 torch imports" in torch_check["detail"]
    assert "install the CANN toolkit matching torch_npu 2.13.0" in torch_check["fix"]
    assert "set_env.sh" in torch_check["fix"] and "pip uninstall torch-npu" in torch_check["fix"]
    assert "The above exception was the direct cause" in torch_check["trace"]
    assert checks["torch_npu"]["detail"] == "2.13.0"
    assert checks["CANN"]["status"] == "error"
    assert checks["devices"]["detail"] == "skipped: torch does not import"


def _wheel_two_accelerators_message(wheel_dir, accelerator="cuda"):
    """The RuntimeError message torch_npu 2.13.0 raises beside a torch built for
    ``accelerator``: its own ``_check_device_conflict``, taken from the wheel's
    torch_npu/__init__.py and run with a torch that reports that accelerator."""
    import ast
    import types

    source = (wheel_dir / "torch_npu" / "__init__.py").read_text(encoding="utf-8")
    function = next(n for n in ast.parse(source).body
                    if isinstance(n, ast.FunctionDef) and n.name == "_check_device_conflict")
    fake_torch = types.SimpleNamespace(
        _C=types.SimpleNamespace(_get_accelerator=lambda: types.SimpleNamespace(type=accelerator)))
    namespace = {"torch": fake_torch, "os": os}
    exec(compile(ast.Module([function], []), "torch_npu/__init__.py", "exec"), namespace)
    try:
        namespace["_check_device_conflict"]()
    except RuntimeError as exc:
        return str(exc)
    raise AssertionError("the wheel's _check_device_conflict did not raise for a CUDA torch")


def test_doctor_diagnoses_a_cuda_torch_beside_torch_npu(tmp_path, torch_npu_wheel):
    """`pip install torch torch-npu` on x86 gives a CUDA torch; torch_npu then refuses to load.
    CI has no GPU, so torch reports cpu and the real wheel cannot show this: the stand-in
    raises the wheel's own message (its check run with a torch reporting cuda)."""
    message = _wheel_two_accelerators_message(torch_npu_wheel)
    assert message.startswith(f"{doctor.TWO_ACCELERATORS} in PyTorch: npu and cuda.")
    site = tmp_path / "site"
    site.mkdir()
    env = _stand_in_site(site, f"RuntimeError({message!r})", torch_version="2.13.0+cu128")
    proc = _doctor(env, "--json")
    assert proc.returncode == 1, proc.stderr
    torch_check = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}["torch import"]
    assert "Root cause: RuntimeError: Two accelerators cannot be used at the same time in PyTorch: npu and cuda" \
        in torch_check["detail"]
    assert "This torch (2.13.0+cu128) is a build for cuda" in torch_check["detail"]
    assert "CANN" not in torch_check["detail"] and "CANN" not in torch_check["fix"]
    assert torch_check["fix"].startswith("install the CPU build of torch before torch_npu: `pip uninstall -y torch && "
                                         "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")


def test_doctor_against_the_real_wheel(torch_npu_wheel):
    """The real failure: the unpacked torch_npu 2.13.0 wheel on PYTHONPATH beside this
    CPU torch, and no CANN. torch's autoload imports it, its extension needs
    libhccl.so, and torch raises "Failed to load the backend extension: torch_npu"
    with that ImportError as its cause."""
    import sysconfig

    if "cpython-311" not in (sysconfig.get_config_var("EXT_SUFFIX") or ""):
        pytest.skip(f"the pinned wheel is built for CPython 3.11; this is {sys.version.split()[0]}: its extension "
                    f"could not load here for any reason, so the real failure cannot be reproduced")
    if doctor.base_version(torch.__version__) != (2, 13, 0):
        pytest.skip(f"the pinned torch_npu 2.13.0 is built for torch 2.13.0, this is torch {torch.__version__} "
                    f"(make test-floors): the real pair is checked by make test")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND_", "NPU_RFT_", "TORCH_DEVICE"))}
    env["LD_LIBRARY_PATH"] = ""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(torch_npu_wheel), env.get("PYTHONPATH")) if p)
    proc = _doctor(env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("[error] torch import:"))
    assert f"RuntimeError: {AUTOLOAD_FAILED} Root cause: ImportError: libhccl.so: cannot open shared object" in line
    assert "libhccl.so is a CANN library" in line and "its set_env.sh was not sourced" in line
    assert "fix: install the CANN toolkit matching torch_npu 2.13.0" in proc.stdout
    assert "(`npu-rft doctor --verbose` shows the full exception chain)" in proc.stdout
    verbose = _doctor(env, "--verbose")
    assert verbose.returncode == 1
    assert "torch_npu/npu/utils.py" in verbose.stdout and "import torch_npu._C" in verbose.stdout
    assert "The above exception was the direct cause of the following exception" in verbose.stdout
    # with autoload off torch imports, and the doctor's own `import torch_npu` meets the same library
    no_autoload = _doctor(dict(env, TORCH_DEVICE_BACKEND_AUTOLOAD="0"))
    assert no_autoload.returncode == 1
    assert "[ ok  ] torch import: torch 2.13.0" in no_autoload.stdout
    assert ("[error] torch_npu import: `import torch_npu` fails: ImportError: libhccl.so: cannot open shared object "
            "file: No such file or directory. libhccl.so is a CANN library") in no_autoload.stdout


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
