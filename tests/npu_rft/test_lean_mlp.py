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
    from npu_rft.lean_mlp import _recomputed, lean_mlp_forward
    from npu_rft.model import load_policy

    def mlp_forwards(**kw):
        policy = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), finetune=finetune, **kw),
                             get_device("cpu"), False)
        mlps = [m for m in policy.model.modules() if type(m).__name__.endswith("MLP")]
        assert mlps
        return [getattr(m.forward, "func", None) for m in mlps]

    assert set(mlp_forwards(lean_swiglu=True, recompute_mlp=False)) == {lean_mlp_forward}
    assert set(mlp_forwards()) == {_recomputed}  # the default
    assert set(mlp_forwards(gradient_checkpointing=True)) == {None}  # whole layers are recomputed instead
    assert set(mlp_forwards(recompute_mlp=False)) == {None}


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-mlp", "trainable-mlp"])
def test_recomputed_mlps_give_bit_identical_gradients_and_keep_only_their_input(frozen):
    """A 2-layer Qwen2 forward+backward with and without ``patch_recomputed_mlps``:
    the same loss and gradients to the bit; between forward and backward the
    recomputed model holds no [tokens, intermediate] activation."""
    from transformers import Qwen2ForCausalLM

    from npu_rft.lean_mlp import patch_recomputed_mlps

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    plain = Qwen2ForCausalLM(config)
    recomputed = copy.deepcopy(plain)
    assert patch_recomputed_mlps(recomputed) == 2
    ids = torch.randint(0, 50, (3, 7))
    grads = []
    saved = []
    for model in (plain, recomputed):
        for name, p in model.named_parameters():
            p.requires_grad_(not (frozen and ".mlp." in name))
        out, nbytes = saved_bytes(lambda: model(input_ids=ids).logits)
        saved.append(nbytes)
        out.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    inter = 3 * 7 * 96 * 4  # one [tokens, intermediate] fp32 activation
    # plain keeps gate, silu(gate) and up per layer (and, trainable, the down projection's
    # input); recomputed keeps the MLP input [tokens, hidden] instead
    assert saved[0] - saved[1] >= 2 * (3 * inter - 3 * 7 * 32 * 4)


def test_recomputed_mlp_runs_plainly_without_grad():
    from npu_rft.lean_mlp import patch_recomputed_mlps

    config = Qwen2Config(hidden_size=16, intermediate_size=32)
    holder = torch.nn.Module()
    holder.mlp = Qwen2MLP(config)
    assert patch_recomputed_mlps(holder) == 1
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        _, nbytes = saved_bytes(lambda: holder.mlp(x))
    assert nbytes == 0 and holder.mlp(x).grad_fn is not None  # params require grad: autograd as usual
