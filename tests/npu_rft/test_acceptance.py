"""The acceptance suite (``npu-rft doctor --full``): the whole suite on the CPU
(every line verified, or skipped with its reason), on an NPU or a GPU where
there is one (``pytest -m npu`` / ``pytest -m cuda``), and proof that its
checks can fail: a wrong kernel value, a wrong kernel gradient, a wrong fused
operator, a reward that does not rise, a non-finite loss."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from npu_rft import acceptance
from npu_rft.acceptance import CheckFailed, Result, Sizes

HCCL_GUARD = Path(__file__).resolve().parent / "hccl_guard"


def _cpu():
    from npu_rft.device import get_device

    return get_device("cpu")


# ----------------------------------------------------------------- the whole suite


def test_full_doctor_on_cpu_verifies_every_line_or_says_why_not(tmp_path, monkeypatch):
    """What CI runs so that the suite cannot rot: `npu-rft doctor --full --device
    cpu --json PATH`, end to end."""
    from npu_rft.cli import cli

    for var in ("NPU_RFT_DEVICE", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    out = tmp_path / "acc.json"
    result = CliRunner().invoke(cli, ["doctor", "--full", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["ok"] and data["acceptance"]["ok"] and data["doctor"]["ok"]
    lines = {r["name"]: r for r in data["acceptance"]["results"]}
    for line in lines.values():
        assert line["status"] in ("verified", "skipped"), line
        assert line["detail"].strip(), line
    verified = {n for n, r in lines.items() if r["status"] == "verified"}
    assert {"kernels naive fp32", "kernels torch fp32", "kernels naive bf16", "kernels torch bf16", "grpo run",
            "dpo run", "checkpoint resume", "throughput"} <= verified
    for name in ("fused op rms_norm", "fused op rotary", "fused op swiglu"):
        assert lines[name]["status"] == "skipped" and "not an Ascend NPU" in lines[name]["detail"]
    assert lines["2-rank equivalence"]["status"] == "skipped" and "CPU" in lines["2-rank equivalence"]["detail"]
    assert "tokens/s" in lines["throughput"]["detail"]
    assert data["acceptance"]["wall_s"] < 300
    # the table and the progress lines
    assert "grpo run" in result.output and "verified" in result.output
    assert "[1/7] kernels ..." in result.output


@pytest.mark.npu
def test_acceptance_suite_on_an_npu(tmp_path):
    from npu_rft.device import probe

    found = probe("npu")
    if not found.available:
        pytest.skip(f"no Ascend NPU: {found.detail}")
    report = acceptance.run_acceptance("npu", work_dir=tmp_path)
    print(report.format_table())
    assert report.ok, report.format_table()


@pytest.mark.cuda
def test_acceptance_suite_on_a_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    report = acceptance.run_acceptance("cuda", work_dir=tmp_path)
    print(report.format_table())
    assert report.ok, report.format_table()


# ----------------------------------------------------------------- kernels: verified, and failing when broken


def test_kernels_verified_on_cpu_with_stated_tolerances():
    results = acceptance.check_kernels(_cpu(), backends=["naive", "torch"])
    assert [(r.name, r.status) for r in results] == [
        ("kernels naive fp32", "verified"), ("kernels torch fp32", "verified"),
        ("kernels naive bf16", "verified"), ("kernels torch bf16", "verified")]
    assert "<= 1e-04 vs fp64" in results[1].detail and "2x naive's" in results[3].detail


def _broken_torch_backend(monkeypatch, *, value_scale=1.0, grad_scale=1.0):
    from npu_rft_kernels.logprob import torch_chunked

    real = torch_chunked.torch_logprob

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        logp, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        # value * value_scale, gradient * grad_scale
        logp = logp * value_scale + (grad_scale - 1.0) * (logp - logp.detach())
        return (logp, *rest) if rest else logp

    monkeypatch.setattr(torch_chunked, "torch_logprob", broken)


@pytest.mark.parametrize("broken", [{"value_scale": 1.001}, {"grad_scale": 1.01}], ids=["value", "gradient"])
def test_a_broken_kernel_is_reported_failed(monkeypatch, broken):
    _broken_torch_backend(monkeypatch, **broken)
    results = {r.name: r for r in acceptance.check_kernels(_cpu(), backends=["naive", "torch"], dtypes=["fp32"])}
    assert results["kernels naive fp32"].status == "verified"
    failed = results["kernels torch fp32"]
    assert failed.status == "failed", failed
    assert "off the fp64 oracle by more than 1e-04" in failed.detail
    report = acceptance.AcceptanceReport(device={"type": "cpu"}, results=list(results.values()))
    assert not report.ok and "failed" in report.format_table()


def test_a_crashing_kernel_fails_its_line_and_the_suite_goes_on(monkeypatch):
    from npu_rft_kernels.logprob import torch_chunked

    def crash(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(torch_chunked, "torch_logprob", crash)
    results = acceptance.check_kernels(_cpu(), backends=["naive", "torch"], dtypes=["fp32"])
    assert [r.status for r in results] == ["verified", "failed"]
    assert results[1].detail.startswith("raised RuntimeError: kernel launch failed (at ")


def test_a_low_precision_backend_twice_as_inexact_as_naive_fails():
    errors = {"a": 3e-3, "b": 1e-3}
    ok = acceptance._judge_kernel("k", torch.bfloat16, "torch", errors, {"a": 2e-3, "b": 1e-3}, 0.0)
    assert ok.status == "verified"
    bad = acceptance._judge_kernel("k", torch.bfloat16, "torch", {"a": 5e-3, "b": 1e-3}, {"a": 2e-3, "b": 1e-3}, 0.0)
    assert bad.status == "failed" and "worst a: 5.00e-03 > 4.10e-03" in bad.detail


# ----------------------------------------------------------------- fused ops, with a stand-in for torch_npu's operators


def _stand_in_ops(swiglu_act=F.silu):
    from npu_rft.ascend.fused_ops import FusedOps

    def rms_norm(x, gamma, epsilon=1e-6):  # documented math of npu_rms_norm: (x * rstd * gamma, rstd)
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + epsilon)
        return (x32 * rstd * gamma.float()).to(x.dtype), rstd

    def rotary_mul(x, r1, r2):  # npu_rotary_mul, 'half' mode
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return x * r1 + torch.cat((-x2, x1), dim=-1) * r2

    def swiglu(x, dim=-1):  # npu_swiglu: act(a) * b
        a, b = torch.chunk(x, 2, dim=dim)
        return swiglu_act(a) * b

    return FusedOps(rms_norm, rotary_mul, swiglu)


def test_fused_ops_are_skipped_off_an_npu_with_the_reason():
    results = acceptance.check_fused_ops(_cpu())
    assert [(r.name, r.status) for r in results] == [
        ("fused op rms_norm", "skipped"), ("fused op rotary", "skipped"), ("fused op swiglu", "skipped")]
    assert all("the device is cpu, not an Ascend NPU" in r.detail for r in results)


def test_fused_ops_comparison_verifies_the_documented_math_and_fails_a_wrong_operator():
    good = acceptance.check_fused_ops(_cpu(), ops=_stand_in_ops())
    assert [r.status for r in good] == ["verified"] * 3, [r.detail for r in good]
    assert "bfloat16, output and gradients" in good[0].detail
    wrong = acceptance.check_fused_ops(_cpu(), ops=_stand_in_ops(swiglu_act=F.gelu))
    assert [r.status for r in wrong] == ["verified", "verified", "failed"]
    assert "off the fp32 eager module" in wrong[2].detail


# ----------------------------------------------------------------- judging the training runs


def _grpo_records(rewards, losses=None):
    losses = losses or [0.1] * len(rewards)
    return [{"step": i + 1, "reward/mean": r, "loss": l} for i, (r, l) in enumerate(zip(rewards, losses))]


def test_judge_grpo_needs_finite_losses_and_a_rising_reward():
    sizes = Sizes(grpo_steps=8, rise_window=2, min_rise=0.15)
    detail = acceptance.judge_grpo(_grpo_records([0.0, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4]), sizes)
    assert detail == "8 steps, losses finite, reward 0.050 (steps 1-2) -> 0.400 (steps 7-8)"
    with pytest.raises(CheckFailed, match="did not rise by 0.15"):
        acceptance.judge_grpo(_grpo_records([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2]), sizes)
    with pytest.raises(CheckFailed, match=r"non-finite losses at steps \[\(3, nan\)\]"):
        acceptance.judge_grpo(_grpo_records([0.0] * 4 + [1.0] * 4, [0.1, 0.1, math.nan] + [0.1] * 5), sizes)
    with pytest.raises(CheckFailed, match="7 metric records, expected 8"):
        acceptance.judge_grpo(_grpo_records([0.0] * 7), sizes)


def _dpo_records(rewards, losses):
    records = []
    for i, loss in enumerate(losses):
        record = {"step": i + 1, "loss": loss}
        if i % 2 == 0:
            record["reward/mean"] = rewards[i // 2]
        records.append(record)
    return records


def test_judge_dpo_checks_log2_at_each_iteration_start_and_a_rising_reward():
    sizes = Sizes(dpo_iterations=2, dpo_min_rise=0.05)
    log2 = math.log(2)
    assert "reward 0.100 -> 0.200" in acceptance.judge_dpo(_dpo_records([0.1, 0.2], [log2, 0.5, log2, 0.4]), sizes, 2)
    with pytest.raises(CheckFailed, match="did not rise by 0.05"):
        acceptance.judge_dpo(_dpo_records([0.1, 0.14], [log2, 0.5, log2, 0.4]), sizes, 2)
    with pytest.raises(CheckFailed, match="iteration 2 starts at loss 0.5000, not log 2"):
        acceptance.judge_dpo(_dpo_records([0.1, 0.2], [log2, 0.5, 0.5, 0.4]), sizes, 2)
    with pytest.raises(CheckFailed, match="iteration 1 ends at loss 0.6931: its pairs were not fitted"):
        acceptance.judge_dpo(_dpo_records([0.1, 0.2], [log2, log2, log2, 0.4]), sizes, 2)


def test_throughput_by_hand():
    records = [{"completion/length_mean": 99.0, "timing_s/rollout": 99.0, "timing_s/loss": 9.0, "timing_s/update": 9.0}]
    records += [{"completion/length_mean": 5.0, "timing_s/rollout": 2.0, "timing_s/loss": 0.5, "timing_s/update": 0.5}] * 3
    # after 1 warm-up step: 3 steps x 5 tokens x 4 sequences = 60 tokens, in 6 s of rollout and 3 s of training
    assert acceptance.throughput(records, sequences_per_step=4, warmup=1) == (10.0, 20.0, 3)


def test_digit_fraction():
    assert acceptance.digit_fraction("", None) == 0.0
    assert acceptance.digit_fraction("a1b2", None) == 0.5


def test_a_result_needs_a_reason_and_a_known_status():
    with pytest.raises(ValueError, match="needs a detail"):
        Result("x", "skipped", " ")
    with pytest.raises(ValueError, match="status 'ok'"):
        Result("x", "ok", "fine")


def test_unknown_checks_are_refused_with_the_list():
    with pytest.raises(ValueError, match="unknown acceptance check"):
        acceptance.run_acceptance("cpu", only=["kernel"])


# ----------------------------------------------------------------- 2 ranks, on the CPU with gloo


def test_two_rank_equivalence_on_cpu_with_gloo_under_the_hccl_guard(tmp_path, monkeypatch):
    """The 2-rank check's own code on the CPU (gloo), its ranks under the guard
    that makes gloo refuse what HCCL refuses. The suite itself skips it on the CPU."""
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(HCCL_GUARD), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("NPU_RFT_HCCL_GUARD_LOG", str(tmp_path / "guard.log"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model_dir = acceptance.build_tiny_model(tmp_path / "model", Sizes())
    detail = acceptance.two_rank_equivalence("cpu", model_dir, tmp_path)
    assert detail.startswith("2 ranks (cpu) x 2 sequences, DDP: gradients of")
    assert "float32" in (tmp_path / "guard.log").read_text()  # the guard saw the loss-sum reduction


# ----------------------------------------------------------------- resume: a resume that loses state fails


def test_a_resume_that_forgets_the_optimizer_state_is_reported_failed(tmp_path, monkeypatch):
    from npu_rft import checkpoint as ckpt

    real = ckpt.load_checkpoint

    def forgetful(*args, **kwargs):  # restores everything, then drops AdamW's moments
        loaded = real(*args, **kwargs)
        kwargs["optimizer"].state.clear()
        return loaded

    monkeypatch.setattr(ckpt, "load_checkpoint", forgetful)
    sizes = Sizes()
    model_dir = acceptance.build_tiny_model(tmp_path / "model", sizes)
    train = acceptance.write_train_rows(tmp_path / "train.jsonl", 32)
    result = acceptance.check_resume(_cpu(), model_dir, train, tmp_path, sizes)
    assert result.status == "failed", result
    assert "tensors differ from the uninterrupted run" in result.detail
