"""The lean SwiGLU MLP: same values and gradients as HF's MLP, a third fewer saved activations."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from npu_rft.lean_mlp import SwiGLU, patch_lean_mlps


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves while ``fn`` runs, parameters excluded."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_swiglu_matches_autograd_of_silu_times_up_in_fp64():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))
    ref = torch.nn.functional.silu(gate) * up
    assert torch.equal(SwiGLU.apply(gate, up), ref)


def test_patched_qwen2_mlp_same_outputs_and_gradients_with_a_third_less_saved():
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=96, hidden_act="silu")
    mlp = Qwen2MLP(config)
    lean = copy.deepcopy(mlp)
    holder = torch.nn.Sequential(lean)
    assert patch_lean_mlps(holder) == 1
    x = torch.randn(4, 6, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, saved_a = saved_bytes(lambda: mlp(xa))
    out_b, saved_b = saved_bytes(lambda: lean(xb))
    assert torch.equal(out_a, out_b)
    grad = torch.randn_like(out_a)
    out_a.backward(grad)
    out_b.backward(grad)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(mlp.parameters(), lean.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-5, atol=1e-6)
    inter = 4 * 6 * 96 * 4  # one [tokens, intermediate] fp32 activation
    assert saved_a - saved_b == inter  # silu(gate) is no longer kept


def test_other_activations_are_left_alone():
    config = Qwen2Config(hidden_size=16, intermediate_size=32, hidden_act="gelu")
    assert patch_lean_mlps(torch.nn.Sequential(Qwen2MLP(config))) == 0


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_load_policy_patches_the_mlps(tiny_model_dir, finetune):
    from npu_rft.config import ModelConfig
    from npu_rft.device import get_device
    from npu_rft.lean_mlp import lean_mlp_forward
    from npu_rft.model import load_policy

    on = ModelConfig(name_or_path=str(tiny_model_dir), finetune=finetune, lean_swiglu=True)
    policy = load_policy(on, get_device("cpu"), False)
    mlps = [m for m in policy.model.modules() if type(m).__name__.endswith("MLP")]
    assert mlps and all(getattr(m.forward, "func", None) is lean_mlp_forward for m in mlps)
    off = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), finetune=finetune), get_device("cpu"), False)
    assert not any(hasattr(m.forward, "func") for m in off.model.modules() if type(m).__name__.endswith("MLP"))
