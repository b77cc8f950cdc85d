"""Tests for npu_rft/ascend/fused_ops.py, on CPU.

torch_npu's fused operators cannot run here. ``STAND_IN_OPS`` is a STAND-IN
(tests/torch_npu_stand_in.py): plain-torch implementations of the math torch_npu
documents for ``npu_rms_norm``, ``npu_rotary_mul`` and ``npu_swiglu``, bound by
the wheel's schemas and refusing inputs outside the documented limits (4-D BNSD
with 11SD/B1SD/BNSD cos/sin for the rotary, gamma in x's dtype for the norm).
These tests show that the replacement forwards, fed operators with that math,
reproduce the HF modules exactly and stay within those limits; they say nothing
about the real operators on a 910.
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

import torch_npu_stand_in as stand_in
from npu_rft.ascend import fused_ops
from npu_rft.device import Device, DeviceError
from npu_rft_kernels import torch_npu_api


# ---------------------------------------------------------------- the stand-in


STAND_IN_OPS = fused_ops.FusedOps(stand_in.npu_rms_norm, stand_in.npu_rotary_mul, stand_in.npu_swiglu)


@pytest.fixture(autouse=True)
def _restore_rotary(monkeypatch):
    # patch_model installs a dispatching apply_rotary_pos_emb in the modeling modules: undo after each test
    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", modeling_qwen2.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, hidden_act="silu")


def _tiny(model_cls, config_cls):
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY))
    with torch.no_grad():  # non-trivial norm weights, so a dropped gamma would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------- each replacement


def test_rms_norm_matches_qwen2_rms_norm_fp32_and_grad():
    norm = modeling_qwen2.Qwen2RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 32, requires_grad=True)
    expected = norm(x)
    got = fused_ops.rms_norm_forward(norm, x, rms_norm=stand_in.npu_rms_norm)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), x)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_rms_norm_low_precision_keeps_hf_dtype(x_dtype, w_dtype):
    norm = modeling_qwen2.Qwen2RMSNorm(64).to(w_dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 64).to(x_dtype)
    expected = norm(x)
    got = fused_ops.rms_norm_forward(norm, x, rms_norm=stand_in.npu_rms_norm)
    assert got.dtype == expected.dtype
    # one rounding instead of HF's two: within a couple of bf16 steps (2**-8 relative)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_hf_apply_rotary_pos_emb(dtype):
    torch.manual_seed(1)
    q = torch.randn(2, 4, 5, 8, dtype=dtype)    # [B, heads, S, D]
    k = torch.randn(2, 2, 5, 8, dtype=dtype)    # fewer kv heads
    angles = torch.randn(2, 5, 4)
    cos = torch.cat((angles, angles), -1).cos().to(dtype)   # [B, S, D], as HF's rotary embedding returns
    sin = torch.cat((angles, angles), -1).sin().to(dtype)
    q_hf, k_hf = modeling_qwen2.apply_rotary_pos_emb(q, k, cos, sin)
    q_got, k_got = fused_ops.apply_rotary_pos_emb_fused(q, k, cos, sin, rotary_mul=stand_in.npu_rotary_mul)
    assert q_got.dtype == q_hf.dtype
    torch.testing.assert_close(q_got, q_hf, rtol=0, atol=0)
    torch.testing.assert_close(k_got, k_hf, rtol=0, atol=0)


def test_swiglu_matches_qwen2_mlp_and_grad():
    torch.manual_seed(2)
    mlp = modeling_qwen2.Qwen2MLP(Qwen2Config(**TINY))
    x = torch.randn(2, 3, 32)
    expected = mlp(x)
    got = fused_ops.swiglu_mlp_forward(mlp, x, swiglu=stand_in.npu_swiglu)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    grads_expected = torch.autograd.grad(expected.sum(), list(mlp.parameters()))
    grads_got = torch.autograd.grad(fused_ops.swiglu_mlp_forward(mlp, x, swiglu=stand_in.npu_swiglu).sum(),
                                    list(mlp.parameters()))
    for a, b in zip(grads_got, grads_expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- whole models


@pytest.mark.parametrize("model_cls, config_cls", [(Qwen2ForCausalLM, Qwen2Config), (LlamaForCausalLM, LlamaConfig)])
def test_patched_model_matches_original_logits_and_grads(model_cls, config_cls):
    original = _tiny(model_cls, config_cls)
    patched = copy.deepcopy(original)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    out_original = original(input_ids=ids, labels=ids)  # before the rotary function is replaced

    summary = fused_ops.patch_model(patched, STAND_IN_OPS)
    assert summary.rms_norms == 2 * 2 + 1      # two per layer, one final
    assert summary.mlps == 2
    assert summary.attentions == 2
    out_patched = patched(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_patched.logits, out_original.logits, rtol=1e-5, atol=1e-5)

    out_patched.loss.backward()
    out_original.loss.backward()
    for (name, p), q in zip(patched.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


HF_QWEN2_ROTARY = modeling_qwen2.apply_rotary_pos_emb


def test_rotary_patch_is_seen_by_the_attention():
    model = _tiny(Qwen2ForCausalLM, Qwen2Config)
    calls = []

    def counting_rotary_mul(x, r1, r2):
        calls.append(x.shape)
        return stand_in.npu_rotary_mul(x, r1, r2)

    fused_ops.patch_model(model, dataclasses.replace(STAND_IN_OPS, rotary_mul=counting_rotary_mul))
    model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert calls == [(1, 4, 3, 8), (1, 2, 3, 8)] * 2   # q then k, in each of 2 layers


def test_selective_patching_and_unsupported_models():
    model = _tiny(Qwen2ForCausalLM, Qwen2Config)
    summary = fused_ops.patch_model(model, STAND_IN_OPS, rms_norm=False, rotary=False)
    assert (summary.rms_norms, summary.mlps, summary.attentions) == (0, 2, 0)
    assert modeling_qwen2.apply_rotary_pos_emb is HF_QWEN2_ROTARY

    model.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="needs hidden_act 'silu'"):
        fused_ops.patch_model(model, STAND_IN_OPS)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="support model types qwen2, llama, not 'gpt2'"):
        fused_ops.patch_model(model, STAND_IN_OPS)


def test_the_fused_rotary_is_this_models_only():
    patched, other = _tiny(Qwen2ForCausalLM, Qwen2Config), _tiny(Qwen2ForCausalLM, Qwen2Config)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    before = other(input_ids=ids).logits
    calls = []

    def counting_rotary_mul(x, r1, r2):
        calls.append(x.shape)
        return stand_in.npu_rotary_mul(x, r1, r2) + 1.0  # visibly different from HF's rotary

    fused_ops.patch_model(patched, dataclasses.replace(STAND_IN_OPS, rotary_mul=counting_rotary_mul),
                          rms_norm=False, swiglu=False)
    torch.testing.assert_close(other(input_ids=ids).logits, before, rtol=0, atol=0)
    assert calls == []  # the unpatched model of the same class still runs HF's rotary
    assert not torch.allclose(patched(input_ids=ids).logits, before)
    assert len(calls) == 4
    fused_ops.patch_model(patched, STAND_IN_OPS, rms_norm=False, swiglu=False)  # patching twice nests no dispatcher
    assert not hasattr(modeling_qwen2.apply_rotary_pos_emb.__wrapped__, "npu_rft_dispatcher")


# ---------------------------------------------------------------- through Device


def test_apply_refuses_a_non_npu_device():
    cpu = Device("cpu", 0, "gloo", None, False)
    with pytest.raises(DeviceError, match="only reachable on an Ascend NPU"):
        fused_ops.apply_npu_fused_ops(_tiny(Qwen2ForCausalLM, Qwen2Config), cpu)


def test_apply_takes_the_ops_from_torch_npu_via_device(monkeypatch):
    module = stand_in.install(monkeypatch)  # STAND-IN torch_npu, reached through torch_npu_api
    npu = Device("npu", 0, "hccl", "ASCEND_RT_VISIBLE_DEVICES", True, "Ascend910B3", 1)
    model = _tiny(Qwen2ForCausalLM, Qwen2Config)
    summary = fused_ops.apply_npu_fused_ops(model, npu)
    assert (summary.rms_norms, summary.mlps) == (5, 2)
    assert model.model.norm.forward.keywords["rms_norm"] is torch_npu_api.npu_rms_norm
    model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert [len(op.calls) for op in (module.npu_rms_norm, module.npu_rotary_mul, module.npu_swiglu)] == [5, 4, 2]
    assert module.npu_rotary_mul.calls[0]["rotary_mode"] == "half"  # the schema's default, bound as the op binds it


def _stand_in_torch_npu(monkeypatch):
    stand_in.install(monkeypatch)


@pytest.mark.parametrize("device, why", [
    (Device("cpu", 0, "gloo", None, False), "the device is cpu, not an Ascend NPU"),
    (Device("npu", 0, "hccl", "ASCEND_RT_VISIBLE_DEVICES", False, "Ascend910A", 1),
     "the chip Ascend910A is not one that runs them"),
    (Device("npu", 0, "hccl", "ASCEND_RT_VISIBLE_DEVICES", False, "Ascend910B3", 1),
     "the compute dtype is float16, not bfloat16"),  # bf16 probed off: fp16 compute
])
def test_configured_ops_say_why_they_are_not_applied(monkeypatch, caplog, device, why):
    _stand_in_torch_npu(monkeypatch)
    model = _tiny(Qwen2ForCausalLM, Qwen2Config)
    with caplog.at_level("INFO", logger="npu_rft.ascend.fused_ops"):
        assert fused_ops.apply_configured(model, device, ["rms_norm", "swiglu"]) is None
    assert why in caplog.text and "not applied" in caplog.text
    assert not isinstance(model.model.norm.forward, functools.partial)


def test_configured_ops_apply_the_named_ones_on_a_910b(monkeypatch, caplog):
    _stand_in_torch_npu(monkeypatch)
    npu = Device("npu", 0, "hccl", "ASCEND_RT_VISIBLE_DEVICES", True, "Ascend910B3", 1)
    model = _tiny(Qwen2ForCausalLM, Qwen2Config)
    with caplog.at_level("INFO", logger="npu_rft.ascend.fused_ops"):
        summary = fused_ops.apply_configured(model, npu, ["rms_norm", "rotary"])
    assert (summary.rms_norms, summary.attentions, summary.mlps) == (5, 2, 0)
    assert "NPU fused ops: 5 RMSNorm, 2 rotary (attention), 0 SwiGLU (MLP) modules" in caplog.text


def test_load_policy_logs_why_the_configured_ops_did_not_run(tiny_model_dir, caplog):
    from npu_rft.config import ModelConfig
    from npu_rft.device import get_device
    from npu_rft.model import load_policy

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), finetune="full", npu_fused_ops=True)
    with caplog.at_level("INFO", logger="npu_rft.hardware"):
        load_policy(cfg, get_device("cpu"), need_reference=False)
    assert "model.npu_fused_ops ['rms_norm', 'rotary', 'swiglu']: not applied, the device is cpu" in caplog.text


def test_fused_swiglu_and_lean_swiglu_conflict():
    from npu_rft.config import ModelConfig

    with pytest.raises(ValueError, match="drop one"):
        ModelConfig(name_or_path="m", npu_fused_ops=["swiglu"], lean_swiglu=True)
    assert ModelConfig(name_or_path="m", npu_fused_ops=["rms_norm"], lean_swiglu=True).fused_op_names == ["rms_norm"]
