"""Tests for npu_rft/doctor.py: each check on hand-made inputs, and the whole
report on this CPU machine (where it must find no accelerator and no error)."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from npu_rft import doctor
from npu_rft.doctor import Check, Report, TorchImport


@pytest.mark.parametrize(
    "version, expected",
    [("2.12.0.post3", (2, 12, 0)), ("2.13.0+cpu", (2, 13, 0)), ("2.1.0rc1", (2, 1, 0)), ("2.5", (2, 5, 0)),
     ("2.5.1.dev20241112", (2, 5, 1))],
)
def test_base_version(version, expected):
    assert doctor.base_version(version) == expected


@pytest.mark.parametrize(
    "torch_version, npu_version, match",
    [
        ("2.12.0", "2.12.0.post3", True),
        ("2.12.0+cpu", "2.12.0.post3", True),
        ("2.13.0", "2.13.0", True),
        ("2.1.0", "2.1.0rc1", True),
        ("2.13.0", "2.12.0.post3", False),
        ("2.12.1", "2.12.0.post3", False),
        ("2.5.1", "2.6.0", False),
    ],
)
def test_versions_match_table(torch_version, npu_version, match):
    assert doctor.versions_match(torch_version, npu_version) is match


def test_torch_npu_mismatch_is_an_error_with_the_wanted_version():
    checks = doctor.check_torch_npu_versions({"torch": "2.13.0", "torch-npu": "2.12.0.post3"})
    match = checks[-1]
    assert match.status == "error"
    assert "built for torch 2.12.0" in match.detail and match.fix.startswith("pip install torch==2.12.0")
    ok = doctor.check_torch_npu_versions({"torch": "2.12.0", "torch-npu": "2.12.0.post3"})[-1]
    assert ok.status == "ok"
    assert doctor.check_torch_npu_versions({"torch": "2.13.0"})[0].status == "info"


def test_find_cann_reads_the_toolkit_install_info(tmp_path):
    (tmp_path / "aarch64-linux").mkdir()
    (tmp_path / "aarch64-linux" / "ascend_toolkit_install.info").write_text(
        "package_name=Ascend-cann-toolkit\nversion=8.0.RC3\narch=aarch64\n")
    version, source, _ = doctor.find_cann({"ASCEND_HOME_PATH": str(tmp_path)})
    assert version == "8.0.RC3" and source.endswith("aarch64-linux/ascend_toolkit_install.info")


def test_find_cann_falls_back_to_version_cfg(tmp_path):
    (tmp_path / "version.cfg").write_text(
        "# version: 1.0\nruntime_running_version=[7.6.0.1.220:8.0.0]\ntoolkit_running_version=[7.6.0.1.220:8.0.0]\n")
    version, source, searched = doctor.find_cann({"ASCEND_TOOLKIT_HOME": str(tmp_path)})
    assert (version, source) == ("8.0.0", str(tmp_path / "version.cfg"))
    assert searched == [str(tmp_path)]


def test_cann_missing_is_an_error_only_with_torch_npu(tmp_path):
    env = {"ASCEND_HOME_PATH": str(tmp_path)}
    assert doctor.check_cann({}, env).status == "info"
    missing = doctor.check_cann({"torch-npu": "2.13.0"}, env)
    assert missing.status == "error" and "set_env.sh" in missing.fix and str(tmp_path) in missing.detail


def _triton_pkg(tmp_path: Path, ascend_backend: bool) -> Path:
    package = tmp_path / "triton"
    (package / "backends" / "nvidia").mkdir(parents=True)
    if ascend_backend:
        (package / "backends" / "ascend").mkdir()
    return package


@pytest.mark.parametrize(
    "dists, ascend_backend, npu_expected, status, phrase",
    [
        ({"triton": "3.2.0", "triton-ascend": "3.2.0"}, True, True, "error", "both installed"),
        ({"triton-ascend": "3.2.0"}, False, True, "error", "no Ascend backend"),
        ({"triton-ascend": "3.2.0"}, True, True, "ok", "triton-ascend 3.2.0"),
        ({"triton": "3.9.0"}, False, True, "warn", "cannot compile for Ascend"),
        ({"triton": "3.9.0"}, False, False, "ok", "triton 3.9.0"),
        ({}, False, False, "info", "not installed"),
    ],
)
def test_triton_table(tmp_path, dists, ascend_backend, npu_expected, status, phrase):
    check = doctor.check_triton(dists, _triton_pkg(tmp_path, ascend_backend), npu_expected)
    assert check.status == status and phrase in check.detail
    if status == "error":
        assert "pip uninstall -y triton triton-ascend" in check.fix


def test_broken_torch_import_is_explained_when_torch_npu_is_installed():
    calls = []

    def probe(extra_env=None):
        calls.append(extra_env)
        return TorchImport(True, "2.13.0")  # works without autoload

    failed = TorchImport(False, error="RuntimeError: libhccl.so: cannot open shared object file")
    check = doctor.check_torch_import(failed, {"torch-npu": "2.13.0"}, probe)
    assert check.status == "error"
    assert calls == [{"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}]
    assert "libhccl.so" in check.detail and "comes from the torch_npu 2.13.0 backend" in check.detail
    assert "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in check.fix and "pip uninstall torch-npu" in check.fix
    assert "set_env.sh" in check.fix


def test_probe_torch_import_against_a_python_whose_torch_raises(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("stand-in: torch_npu backend autoload failed")\n')
    result = doctor.probe_torch_import(extra_env={"PYTHONPATH": str(tmp_path)})
    assert result == TorchImport(False, None, "RuntimeError: stand-in: torch_npu backend autoload failed")


def test_run_doctor_survives_a_broken_torch(monkeypatch):
    report = doctor.run_doctor(probe=lambda extra_env=None: TorchImport(False, error="ImportError: boom"))
    names = [c.name for c in report.checks]
    assert not report.ok
    assert "accelerator" not in names and report.checks[-1].detail == "skipped: torch does not import"
    assert {"python", "torch import", "CANN", "triton"} <= set(names)


def test_run_doctor_on_this_machine_finds_no_accelerator_and_no_error(monkeypatch):
    for var in ("NPU_RFT_DEVICE", "ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    report = doctor.run_doctor()
    by_name = {c.name: c for c in report.checks}
    assert report.ok, report.format_text()
    assert by_name["torch import"].status == "ok"
    assert by_name["accelerator"].detail.startswith("no accelerator")
    assert by_name["distributed (gloo)"].status == "ok"


def test_report_text_and_json():
    report = Report([Check("a", "ok", "fine"), Check("b", "error", "broken", "do this")])
    assert not report.ok
    assert report.format_text() == textwrap.dedent("""\
        [ ok  ] a: fine
        [error] b: broken
                fix: do this
        1 error(s), 0 warning(s)""")
    assert report.to_dict()["checks"][1] == {"name": "b", "status": "error", "detail": "broken", "fix": "do this"}
    with pytest.raises(ValueError, match="status 'bad'"):
        Check("c", "bad", "x")


def test_kernel_self_test_on_cpu_checks_the_torch_backend(monkeypatch):
    from npu_rft.device import get_device

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    checks = doctor.check_kernels(get_device("cpu"))
    assert [(c.name, c.status) for c in checks] == [("kernel fused_logprob[torch]", "ok")]


def test_kernel_self_test_flags_a_backend_that_differs_from_naive(monkeypatch):
    import types

    from npu_rft.device import get_device

    real = pytest.importorskip("npu_rft_kernels")
    stand_in = types.ModuleType("npu_rft_kernels")  # a kernels package with one wrong, one crashing backend
    stand_in.available_backends = lambda tensor: ["naive", "off_by_a_bit", "crashing"]

    def fused_logprob(hidden, weight, targets, *, return_entropy, backend):
        logp, entropy = real.fused_logprob(hidden, weight, targets, return_entropy=True, backend="naive")
        if backend == "crashing":
            raise RuntimeError("kernel launch failed")
        return (logp + 1e-3, entropy) if backend == "off_by_a_bit" else (logp, entropy)

    stand_in.fused_logprob = fused_logprob
    monkeypatch.setitem(sys.modules, "npu_rft_kernels", stand_in)
    wrong, crashing = doctor.check_kernels(get_device("cpu"))
    assert wrong.status == "error" and "differs from naive by 1.000e-03" in wrong.detail
    assert crashing.status == "error" and "RuntimeError: kernel launch failed" in crashing.detail


def test_mindspeed_is_reported_only_when_installed():
    assert doctor.check_mindspeed({}) is None
    check = doctor.check_mindspeed({"mindspeed": "0.12.1"})
    assert check.status == "info" and "not used by npu-rft" in check.detail
