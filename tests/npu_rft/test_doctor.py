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

    # as torch 2.13 reports the real failure: its wrapper on top, libhccl.so only in the cause
    top = ("Failed to load the backend extension: torch_npu. You can disable extension auto-loading with "
           "TORCH_DEVICE_BACKEND_AUTOLOAD=0.")
    failed = TorchImport(False, error=f"RuntimeError: {top}",
                         chain=(("RuntimeError", top),
                                ("ImportError", "libhccl.so: cannot open shared object file: No such file or directory")),
                         traceback="Traceback ...\nImportError: libhccl.so ...\n")
    check = doctor.check_torch_import(failed, {"torch-npu": "2.13.0"}, probe)
    assert check.status == "error"
    assert calls == [{"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}]
    assert ("Root cause: ImportError: libhccl.so: cannot open shared object file: No such file or directory. "
            "libhccl.so is a CANN library") in check.detail
    assert "comes from the torch_npu 2.13.0 backend" in check.detail
    assert "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in check.fix and "pip uninstall torch-npu" in check.fix
    assert "install the CANN toolkit matching torch_npu 2.13.0" in check.fix and "set_env.sh" in check.fix
    assert check.trace == failed.traceback
    without_cause = doctor.check_torch_import(TorchImport(False, error=f"RuntimeError: {top}",
                                                          chain=(("RuntimeError", top),)), {"torch-npu": "2.13.0"}, probe)
    assert "Root cause" not in without_cause.detail and "CANN is missing or not set up" in without_cause.fix


# torch_npu 2.13.0's message beside a CUDA torch (torch_npu/__init__.py; tests/npu_rft/cli/test_doctor.py
# produces it by running the wheel's own check)
TWO_ACCELERATORS = ("Two accelerators cannot be used at the same time in PyTorch: npu and cuda. You can install the "
                    "cpu version of PyTorch to use your npu device, or use the cuda device with "
                    "'export TORCH_DEVICE_BACKEND_AUTOLOAD=0'.\n[ERROR] 2026-12-05-20:00:00 (PID:1, Device:-1, "
                    "RankID:-1) ERR00007 PTA feature not supported")


def test_a_cuda_torch_beside_torch_npu_is_diagnosed_not_blamed_on_cann():
    chain = (("RuntimeError", "Failed to load the backend extension: torch_npu. ..."), ("RuntimeError", TWO_ACCELERATORS))
    dists = {"torch": "2.13.0+cu128", "torch-npu": "2.13.0"}
    cause, fix = doctor.explain_torch_npu_failure(chain, dists)
    assert cause.startswith("RuntimeError: Two accelerators cannot be used at the same time in PyTorch: npu and cuda.")
    assert "This torch (2.13.0+cu128) is a build for cuda" in cause and "CANN" not in cause + fix
    assert ("install the CPU build of torch before torch_npu: `pip uninstall -y torch && pip install torch==2.13.0 "
            "--index-url https://download.pytorch.org/whl/cpu && pip install torch-npu==2.13.0`") in fix
    # the same error met directly (import torch_npu with autoload off): no wrapper
    assert doctor.explain_torch_npu_failure((("RuntimeError", TWO_ACCELERATORS),), dists) == (cause, fix)
    assert doctor.explain_torch_npu_failure((("RuntimeError", "something else"),), dists) is None


def test_probe_torch_import_against_a_python_whose_torch_raises(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("stand-in: torch_npu backend autoload failed")\n')
    result = doctor.probe_torch_import(extra_env={"PYTHONPATH": str(tmp_path)})
    assert (result.ok, result.version, result.error) == (False, None, "RuntimeError: stand-in: torch_npu backend autoload failed")
    assert result.chain == (("RuntimeError", "stand-in: torch_npu backend autoload failed"),)
    assert result.traceback.startswith("Traceback") and 'torch/__init__.py", line 1' in result.traceback


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


def test_the_exception_chain_is_shown_with_verbose_only():
    report = Report([Check("torch import", "error", "fails", "do this", trace="Traceback\n  line\nImportError: x\n")])
    assert report.format_text().splitlines()[2] == "        (`npu-rft doctor --verbose` shows the full exception chain)"
    assert report.format_text(verbose=True).splitlines()[2:6] == [
        "        the full exception chain:", "        | Traceback", "        |   line", "        | ImportError: x"]
    assert report.to_dict()["checks"][0]["trace"].startswith("Traceback")


def test_kernel_self_test_on_cpu_checks_the_torch_backend(monkeypatch):
    from npu_rft.device import get_device

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    checks = doctor.check_kernels(get_device("cpu"))
    assert [(c.name, c.status) for c in checks] == [("kernel fused_logprob[torch, float32]", "ok")]


def test_kernel_self_test_runs_low_precision_on_an_accelerator_only():
    from npu_rft.device import Device

    cpu = Device("cpu", 0, "gloo", None, False)
    a2 = Device("npu", 0, "hccl", "ASCEND_RT_VISIBLE_DEVICES", True, "Ascend910B3", 1)
    a1 = Device("npu", 0, "hccl", "ASCEND_RT_VISIBLE_DEVICES", False, "Ascend910A", 1)
    assert doctor.self_test_dtypes(cpu) == [torch.float32]
    assert doctor.self_test_dtypes(a2) == [torch.float32, torch.bfloat16]  # bf16: the fused op's dtype
    assert doctor.self_test_dtypes(a1) == [torch.float32, torch.float16]


def test_kernel_self_test_in_bf16_on_cpu(monkeypatch):
    """The low-precision case, run here on the torch backend: what an accelerator runs."""
    from npu_rft.device import get_device

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (check,) = doctor.check_kernels(get_device("cpu"), dtypes=[torch.bfloat16])
    assert check.name == "kernel fused_logprob[torch, bfloat16]" and check.status == "ok", check


@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1e-3), (torch.bfloat16, 1e-1)])
def test_kernel_self_test_flags_a_backend_that_differs_from_naive(monkeypatch, dtype, offset):
    import types

    from npu_rft.device import get_device

    real = pytest.importorskip("npu_rft_kernels")
    stand_in = types.ModuleType("npu_rft_kernels")  # a kernels package with one wrong, one crashing, one good backend
    stand_in.available_backends = lambda tensor: ["naive", "off_by_a_bit", "crashing", "good"]

    def fused_logprob(hidden, weight, targets, *, return_entropy=False, backend):
        out = real.fused_logprob(hidden, weight, targets, return_entropy=return_entropy, backend="naive")
        if backend == "crashing":
            raise RuntimeError("kernel launch failed")
        if backend == "off_by_a_bit":
            return (out[0] + offset, out[1]) if return_entropy else out + offset
        return out

    stand_in.fused_logprob = fused_logprob
    monkeypatch.setitem(sys.modules, "npu_rft_kernels", stand_in)
    wrong, crashing, good = doctor.check_kernels(get_device("cpu"), dtypes=[dtype])
    assert wrong.status == "error" and wrong.detail.startswith("differs from naive by "), wrong
    assert float(wrong.detail.split()[4]) >= 0.8 * offset
    assert crashing.status == "error" and "RuntimeError: kernel launch failed" in crashing.detail
    assert good.status == "ok"


def test_mindspeed_is_reported_only_when_installed():
    assert doctor.check_mindspeed({}) is None
    check = doctor.check_mindspeed({"mindspeed": "0.12.1"})
    assert check.status == "info" and "not used by npu-rft" in check.detail


def test_torch_npu_import_in_process_is_explained(monkeypatch):
    """Where autoload is off, torch imports and torch_npu's own failure shows only
    when the doctor imports it (through torch_npu_api): root cause and fix as above."""
    class FailingFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "torch_npu":
                return None
            raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")

    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(sys, "meta_path", [FailingFinder] + sys.meta_path)
    check = doctor.check_torch_npu_import({"torch": "2.13.0", "torch-npu": "2.13.0"})
    assert check.status == "error"
    assert check.detail.startswith("`import torch_npu` fails: ImportError: libhccl.so: cannot open shared object file")
    assert "libhccl.so is a CANN library" in check.detail and "set_env.sh" in check.fix
    assert "Traceback" in check.trace


def test_torch_npu_import_in_process_ok_on_the_stand_in(monkeypatch):
    import torch_npu_stand_in

    torch_npu_stand_in.install(monkeypatch)
    assert doctor.check_torch_npu_import({"torch-npu": "2.13.0"}) == Check(
        "torch_npu import", "ok", "torch_npu 2.13.0 imports")
