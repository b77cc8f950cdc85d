"""npu_rft_kernels/torch_npu_api.py: every call into torch_npu, checked against
the real torch_npu 2.13.0 wheel without importing it (the wheel is read as
files: its op schemas and Python sources; ``torch_npu_wheel`` in conftest.py),
and the stand-ins the other tests use, checked against the same wheel.

Tests that need the wheel skip without it (``make torch-npu-wheel`` fetches it),
and fail under CI=true."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from helpers import run_command

from npu_rft_kernels import torch_npu_api
from npu_rft_kernels.torch_npu_check import Wheel, call_sites, check_source, parse_schema, torch_npu_imports

import torch_npu_stand_in as stand_in

REPO = Path(__file__).resolve().parents[2]
API_SOURCE = Path(torch_npu_api.__file__).read_text(encoding="utf-8")

# The closed list: every torch_npu name npu-rft touches (torch_npu_api.py's call sites).
EXPECTED_NAMES = {
    "__version__",
    "npu.is_available", "npu.device_count", "npu.set_device", "npu.set_compile_mode", "npu.get_device_name",
    "npu.is_bf16_supported", "npu.synchronize", "npu.empty_cache", "npu.memory_allocated",
    "npu.max_memory_allocated", "npu.memory_reserved", "npu.reset_peak_memory_stats", "npu.get_device_properties",
    "npu.manual_seed_all", "npu.get_rng_state", "npu.set_rng_state", "npu.amp.GradScaler",
    "profiler._ExperimentalConfig", "profiler.ProfilerLevel.Level1", "profiler.AiCMetrics.PipeUtilization",
    "profiler.profile", "profiler.ProfilerActivity.CPU", "profiler.ProfilerActivity.NPU", "profiler.schedule",
    "profiler.tensorboard_trace_handler",
    "npu_rms_norm", "npu_rotary_mul", "npu_swiglu", "npu_fused_linear_online_max_sum",
}


@pytest.fixture(scope="module")
def wheel(torch_npu_wheel) -> Wheel:
    return Wheel(torch_npu_wheel)


# ----------------------------------------------------------------- the list is closed (no wheel needed)


def test_the_call_sites_are_the_expected_closed_list():
    assert {".".join(s.path) for s in call_sites(API_SOURCE)} == EXPECTED_NAMES


def test_only_torch_npu_api_imports_torch_npu():
    sources = sorted((REPO / "npu_rft").rglob("*.py")) + sorted((REPO / "kernels" / "npu_rft_kernels").rglob("*.py"))
    importers = {str(p.relative_to(REPO)): [code for _, code in found] for p in sources
                 if (found := torch_npu_imports(p.read_text(encoding="utf-8")))}
    assert importers == {"kernels/npu_rft_kernels/torch_npu_api.py": ["importlib.import_module('torch_npu')"]}


def test_the_import_scan_finds_each_way_in():
    source = ("import torch_npu\nfrom torch_npu.npu import set_device\nimport importlib, sys\n"
              "importlib.import_module('torch_npu')\nsys.modules['torch_npu']\n__import__('torch_npu.npu')\n"
              "info['torch_npu'] = 1\nCheck('torch_npu', 'info', 'not installed')\n")
    assert [line for line, _ in torch_npu_imports(source)] == [1, 2, 4, 5, 6]


def test_schema_parsing():
    sig = parse_schema("npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)")
    assert [(p.name, p.kind, p.has_default) for p in sig.params] == [
        ("self", "positional", False), ("gamma", "positional", False), ("epsilon", "positional", True)]
    assert (sig.outputs, sig.tuple_return, sig.params[2].default) == (2, True, 1e-6)
    kw = parse_schema("npu_format_cast.Tensor(Tensor self, Tensor dst, *, int? customize_dtype=None, "
                      "int[] sizes=[1, 2]) -> Tensor")
    assert kw.name == "npu_format_cast" and (kw.outputs, kw.tuple_return) == (1, False)
    assert [p.kind for p in kw.params] == ["positional", "positional", "keyword_only", "keyword_only"]
    assert kw.params[3].default == [1, 2]
    assert kw.check_call(3, [], False) == ["3 positional arguments, but npu_format_cast takes at most 2 (self, dst)"]


# ----------------------------------------------------------------- against the wheel


def test_every_call_site_agrees_with_the_wheel(wheel):
    assert check_source(API_SOURCE, wheel) == []
    sites = call_sites(API_SOURCE)
    ops = {s.path[0]: s for s in sites if len(s.path) == 1 and s.path[0].startswith("npu_")}
    assert {name: wheel.resolve((name,)).kind for name in ops} == dict.fromkeys(ops, "operator")
    assert ops["npu_rms_norm"].use == ("unpack", 2)  # both outputs of (Tensor, Tensor)
    assert ops["npu_fused_linear_online_max_sum"].use == ("slice_unpack", 2, 2)  # 2 of its 6
    found = wheel.resolve(("npu", "set_compile_mode"))
    assert found.where == "torch_npu/npu/npu_config.py:98"
    assert [p.name for p in found.signature.params] == ["jit_compile"]


def _mutated(old: str, new: str) -> str:
    assert API_SOURCE.count(old) == 1, old
    return API_SOURCE.replace(old, new)


@pytest.mark.parametrize("old, new, message", [
    # a wrong keyword
    ("npu_rms_norm(x, gamma, epsilon=epsilon)", "npu_rms_norm(x, gamma, eps=epsilon)",
     "keyword 'eps' is not a parameter of npu_rms_norm (keyword parameters: self, gamma, epsilon)"),
    ("set_compile_mode(jit_compile=jit_compile)", "set_compile_mode(jit=jit_compile)",
     "keyword 'jit' is not a parameter of set_compile_mode"),
    # a wrong output count
    ("y, rstd = _torch_npu().npu_rms_norm", "y, rstd, extra = _torch_npu().npu_rms_norm",
     "unpacks 3 outputs of npu_rms_norm, which returns 2"),
    ("return_logits=False)[:2]", "return_logits=False)[:7]",
     "takes outputs [:7] of npu_fused_linear_online_max_sum, which returns 6"),
    ("return _torch_npu().npu_swiglu(x, dim=dim)", "return _torch_npu().npu_swiglu(x, dim=dim)[0]",
     "npu_swiglu returns one Tensor, but the call's result is used as ('index', 0)"),
    # wrong argument counts and names
    ("npu_rotary_mul(x, r1, r2)", "npu_rotary_mul(x, r1)", "npu_rotary_mul needs r2, which the call does not give"),
    ("npu.set_device(index)", "npu.set_device(index, 0)", "2 positional arguments, but set_device takes at most 1"),
    ("npu.set_compile_mode(", "npu.set_compile_modes(", "torch_npu.npu.set_compile_modes is not in this torch_npu"),
    ("ProfilerActivity.NPU]", "ProfilerActivity.GPU]", "torch_npu.profiler.ProfilerActivity.GPU is not in"),
])
def test_the_checker_fails_a_broken_call(wheel, old, new, message):
    problems = [str(p) for p in check_source(_mutated(old, new), wheel)]
    assert len(problems) == 1 and message in problems[0], problems


def test_the_checker_fails_on_both_a_wrong_keyword_and_a_wrong_output_count_at_once(wheel):
    source = _mutated("npu_rms_norm(x, gamma, epsilon=epsilon)", "npu_rms_norm(x, gamma, eps=epsilon)")
    source = source.replace("y, rstd = _torch_npu()", "(y, rstd, extra) = _torch_npu()")
    problems = [p.message for p in check_source(source, wheel)]
    assert len(problems) == 2
    assert "keyword 'eps' is not a parameter" in problems[0] and "unpacks 3 outputs" in problems[1]


# ----------------------------------------------------------------- the stand-ins, against the wheel


def _normalised(schema: str) -> str:
    return re.sub(r"\s+", " ", schema).strip()


@pytest.mark.parametrize("name", sorted(stand_in.SCHEMAS))
def test_stand_in_operator_schemas_are_the_wheels(wheel, name):
    assert _normalised(wheel.schema_line(name)) == _normalised(stand_in.SCHEMAS[name])
    assert wheel.resolve((name,)).signature == getattr(stand_in, name).signature


@pytest.mark.parametrize("name", stand_in.NPU_FUNCTIONS)
def test_stand_in_npu_functions_take_the_wheels_parameters(wheel, name):
    ours = inspect.signature(getattr(stand_in.StandInNpu(bf16_probe=True), name))
    theirs = wheel.resolve(("npu", name)).signature
    assert [(p.name, p.default is not inspect.Parameter.empty) for p in ours.parameters.values()] == [
        (p.name, p.has_default) for p in theirs.params]


def test_the_wheel_documents_the_limits_the_stand_ins_enforce(wheel):
    docs = (wheel.root / "torch_npu" / "_op_plugin_docs.py").read_text(encoding="utf-8")
    rotary = docs[docs.index('"npu_rotary_mul"'):docs.index('"npu_mrope"')]
    assert "input为BNSD: 11SD、B1SD、BNSD" in rotary and "D < 896" in rotary and "B, N < 1000" in rotary
    fused = docs[docs.index('"npu_fused_linear_online_max_sum"'):docs.index('"npu_fused_cross_entropy_loss_with_max_sum"')]
    assert "数据类型支持bfloat16、float16" in fused and "返回6个Tensor" in fused


# ----------------------------------------------------------------- the stand-ins enforce the limits


def test_stand_in_rms_norm_returns_the_tuple_and_binds_by_schema():
    x, gamma = torch.randn(3, 8), torch.rand(8)
    y, rstd = stand_in.npu_rms_norm(x, gamma, epsilon=1e-5)
    assert y.shape == (3, 8) and rstd.shape == (3, 1) and rstd.dtype == torch.float32
    assert stand_in.npu_rms_norm(self=x, gamma=gamma)[0].shape == (3, 8)
    with pytest.raises(TypeError, match="keyword 'eps' is not a parameter"):
        stand_in.npu_rms_norm(x, gamma, eps=1e-5)
    with pytest.raises(stand_in.StandInLimitError, match="must have self's dtype"):
        stand_in.npu_rms_norm(x.bfloat16(), gamma)
    with pytest.raises(stand_in.StandInLimitError, match="2-8 dims"):
        stand_in.npu_rms_norm(torch.randn(8), gamma)


def test_stand_in_rotary_takes_bnsd_with_11sd_b1sd_bnsd_cos_only():
    q = torch.randn(2, 4, 5, 8)   # B N S D
    for r_shape in ((1, 1, 5, 8), (2, 1, 5, 8), (2, 4, 5, 8)):
        r = torch.rand(r_shape)
        assert stand_in.npu_rotary_mul(q, r, r).shape == q.shape
    with pytest.raises(stand_in.StandInLimitError, match="must be 4-D"):
        stand_in.npu_rotary_mul(q[0], torch.rand(1, 5, 8), torch.rand(1, 5, 8))
    with pytest.raises(stand_in.StandInLimitError, match="must be 11SD, B1SD or BNSD"):
        stand_in.npu_rotary_mul(q, torch.rand(2, 5, 1, 8), torch.rand(2, 5, 1, 8))  # a BSND-style cos
    with pytest.raises(stand_in.StandInLimitError, match="even and below 896"):
        stand_in.npu_rotary_mul(torch.randn(1, 1, 2, 7), torch.rand(1, 1, 2, 7), torch.rand(1, 1, 2, 7))


def test_stand_in_online_max_sum_takes_bf16_or_fp16_and_returns_six():
    h, w, t = torch.randn(4, 8), torch.randn(16, 8), torch.tensor([0, 3, 15, 7])
    outs = stand_in.npu_fused_linear_online_max_sum(h.bfloat16(), w.bfloat16(), t, 0, 15)
    assert len(outs) == 6 and outs[0].dtype == outs[1].dtype == torch.float32
    with pytest.raises(stand_in.StandInLimitError, match="bfloat16 or float16, not torch.float32"):
        stand_in.npu_fused_linear_online_max_sum(h, w, t, 0, 15)
    with pytest.raises(stand_in.StandInLimitError, match="1-D int32/int64"):
        stand_in.npu_fused_linear_online_max_sum(h.half(), w.half(), t.float(), 0, 15)


# ----------------------------------------------------------------- the API module, on the stand-in


def test_api_module_on_the_stand_in(monkeypatch):
    module = stand_in.install(monkeypatch, soc="Ascend910B2", count=1)
    assert torch_npu_api.version() == "2.13.0"
    x, gamma = torch.randn(2, 3, 8), torch.rand(8)
    y, rstd = torch_npu_api.npu_rms_norm(x, gamma, epsilon=1e-5)
    assert module.npu_rms_norm.calls[-1]["epsilon"] == 1e-5
    h, w = torch.randn(5, 8).half(), torch.randn(12, 8).half()
    logits_max, sum_exp = torch_npu_api.online_max_sum(h, w, torch.arange(5), 0, 11)
    expected = (h.float() @ w.float().t())
    torch.testing.assert_close(logits_max, expected.max(-1).values, rtol=1e-2, atol=1e-2)
    assert torch_npu_api.has_online_max_sum()
    del module.npu_fused_linear_online_max_sum
    assert not torch_npu_api.has_online_max_sum()


def test_import_errors_are_described_with_their_root_cause():
    try:
        try:
            raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")
        except ImportError as inner:
            raise RuntimeError("Failed to load the backend extension: torch_npu. You can disable ...") from inner
    except RuntimeError as exc:
        line = torch_npu_api.describe_import_error(exc)
    assert line == ("RuntimeError: Failed to load the backend extension: torch_npu. You can disable ... "
                    "(root cause: ImportError: libhccl.so: cannot open shared object file: No such file or directory)")
    missing = ModuleNotFoundError("No module named 'torch_npu'", name="torch_npu")
    assert torch_npu_api.not_installed(missing)
    assert not torch_npu_api.not_installed(ModuleNotFoundError("No module named 'yaml'", name="yaml"))


# ----------------------------------------------------------------- the wheel fixture


@pytest.mark.parametrize("ci, outcome, rc", [("true", "1 error", 1), ("", "1 skipped", 0)])
def test_a_missing_wheel_fails_under_ci_and_is_skipped_elsewhere(tmp_path, ci, outcome, rc):
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(NPU_RFT_TEST_WHEELS_DIR=str(tmp_path), **({"CI": ci} if ci else {}))
    proc = run_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs",
                        f"{__file__}::test_every_call_site_agrees_with_the_wheel"], cwd=REPO, env=env, timeout=300)
    assert outcome in proc.stdout and proc.returncode == rc, proc.stdout
    assert "run `make torch-npu-wheel`" in proc.stdout
    assert ("CI=true: the torch_npu 2.13.0 wheel is not in" in proc.stdout) is (ci == "true")


def test_the_kernel_benchmark_reaches_npu_statistics_through_the_api_module(monkeypatch):
    from npu_rft_kernels.bench import BenchDevice

    module = stand_in.install(monkeypatch, count=2)
    device = object.__new__(BenchDevice)  # torch.device("npu:1") needs the real torch_npu to register "npu"
    device.type, device.index = "npu", 1
    device.synchronize()
    device.reset_peak_memory_stats()
    assert device.memory_stats() == {"allocated": 100, "peak_allocated": 300}
    assert module.npu.calls == [("synchronize", 1), ("reset_peak_memory_stats", 1)]
