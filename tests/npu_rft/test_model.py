"""Model loading (LoRA / full, reference, initial adapter, tokenizer checks)
and the hidden-state forward the losses use, with and without prompt sharing."""
from __future__ import annotations

import shutil

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from npu_rft.algorithms.base import collate
from npu_rft.config import ModelConfig
from npu_rft.device import get_device
from npu_rft.model import (
    _hidden_unshared,
    base_model,
    check_fused_head,
    completion_hidden,
    lm_head_weight,
    load_policy,
    load_tokenizer,
    merged_lora,
)

CPU = get_device("cpu")
IDS = torch.tensor([[3, 17, 42, 5, 9, 11]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_lora(model):
    return get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False, task_type="CAUSAL_LM"))


def test_shared_prompt_forward_equals_the_plain_one_in_value_and_gradient(tiny_model_dir):
    model = random_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir)).train()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (7, 4, 9)]
    completions = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (5, 1, 3, 6, 2, 4)]
    batch = collate([prompts[0]] * 3 + [prompts[1]] * 2 + [prompts[2]], completions, 0)
    upstream = torch.randn(6, batch.completion_ids.shape[1], 32, generator=g) * batch.completion_mask[..., None]

    def run(fn):
        model.zero_grad()
        hidden = fn()
        (hidden * upstream).sum().backward()
        return hidden.detach() * batch.completion_mask[..., None], [p.grad.clone() for p in model.parameters() if p.requires_grad]

    shared, g_shared = run(lambda: completion_hidden(model, batch.prompt_ids, batch.prompt_mask,
                                                     batch.completion_ids, batch.completion_mask))
    plain, g_plain = run(lambda: _hidden_unshared(base_model(model).get_decoder(), batch.prompt_ids,
                                                  batch.prompt_mask, batch.completion_ids, batch.completion_mask))
    assert torch.allclose(shared, plain, atol=1e-5)
    for a, b in zip(g_shared, g_plain):
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_hidden_states_reproduce_the_models_own_logits(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = collate([[3, 17, 42]], [[5, 9, 11]], 0)
    hidden = completion_hidden(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    expected = logits(model)[0, 2:5]  # positions 2..4 predict tokens 3..5
    assert torch.allclose(hidden[0] @ lm_head_weight(model).T, expected, atol=1e-5)


def test_lora_policy_and_its_reference_are_one_model(tiny_model_dir):
    policy = load_policy(ModelConfig(name_or_path=str(tiny_model_dir)), CPU, need_reference=True)
    assert policy.lora and policy.reference is None
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(logits(policy.model), logits(base))
    with policy.reference_mode() as ref:
        assert torch.allclose(logits(ref), logits(base), atol=1e-6)


def test_merged_lora_computes_the_adapted_model_and_gives_back_the_very_same_base_weights(tiny_model_dir):
    model = random_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir)).eval()
    adapted = logits(model)
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    attention = base_model(model).model.layers[0].self_attn
    lora_q = attention.q_proj
    with torch.no_grad(), merged_lora(model) as merged:
        assert merged is model and type(attention.q_proj) is torch.nn.Linear
        # q_proj is now a plain linear with W + scaling * B @ A (a new tensor) and the base bias
        expected = saved["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] + 2.0 * (
            saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
            @ saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"])
        assert torch.allclose(attention.q_proj.weight, expected, atol=1e-6)
        assert attention.q_proj.bias is lora_q.get_base_layer().bias
        assert torch.allclose(logits(model), adapted, atol=1e-5)
    assert attention.q_proj is lora_q
    assert all(p is params[n] and torch.equal(p, saved[n]) for n, p in model.named_parameters())
    assert torch.equal(logits(model), adapted)


def test_merged_lora_refuses_gradients_and_passes_other_models_through(tiny_model_dir):
    model = random_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    with pytest.raises(RuntimeError, match="no-grad passes"):
        with merged_lora(model):
            pass
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          PeftLoraConfig(r=4, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM"))
    for other in (plain, dora):
        weights = [p for p in other.parameters()]
        with torch.no_grad(), merged_lora(other) as same:
            assert same is other and all(a is b for a, b in zip(other.parameters(), weights))
    base = logits(plain)
    with model.disable_adapter(), torch.no_grad(), merged_lora(model):  # the reference stays the base model
        assert torch.allclose(logits(model), base, atol=1e-6)


def test_full_finetuning_keeps_a_frozen_reference_copy_only_when_asked(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), finetune="full")
    policy = load_policy(cfg, CPU, need_reference=True)
    assert all(p.requires_grad for p in policy.model.parameters())
    assert not any(p.requires_grad for p in policy.reference.parameters())
    before = logits(policy.reference)
    with torch.no_grad():
        next(policy.model.parameters()).add_(1.0)
    with policy.reference_mode() as ref:
        assert torch.equal(logits(ref), before)
    without = load_policy(cfg, CPU, need_reference=False)
    with pytest.raises(RuntimeError, match="no reference model was loaded"):
        without.reference_mode()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_configured_weights_dtype_is_the_loaded_one(tiny_model_dir, dtype):
    # transformers before 4.56 calls from_pretrained's argument torch_dtype (4.55.4
    # hands `dtype=` on to the model's __init__, which raises TypeError): the floors
    # run's check that setup.py's transformers floor loads in the dtype asked for.
    name = str(dtype).replace("torch.", "")
    policy = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), finetune="full", dtype=name), CPU,
                         need_reference=False)
    assert {p.dtype for p in policy.model.parameters()} == {dtype}


def test_full_fp16_weights_under_a_loss_scaler_are_refused_before_loading():
    """fp16 compute (Ascend 910A, pre-Ampere CUDA) scales the loss, and GradScaler cannot unscale fp16
    gradients: full fine-tuning in fp16 weights is refused with the fix; LoRA and auto are not."""
    from npu_rft.model import weights_dtype

    class Fp16Device:  # what weights_dtype reads of a Device whose compute dtype is fp16
        compute_dtype, needs_loss_scaling = torch.float16, True

    fp16_device = Fp16Device()
    cfg = ModelConfig(name_or_path="m", finetune="full", dtype="float16")
    with pytest.raises(ValueError, match="model.dtype: float16 with model.finetune: full.*model.dtype: auto"):
        weights_dtype(cfg, fp16_device)
    assert weights_dtype(cfg, CPU) == torch.float16  # fp32 compute: no scaler, allowed
    assert weights_dtype(ModelConfig(name_or_path="m", finetune="full"), fp16_device) == torch.float32
    assert weights_dtype(ModelConfig(name_or_path="m", finetune="lora", dtype="float16"), fp16_device) == torch.float16


def test_initial_adapter_is_merged_into_the_base(tiny_model_dir, tmp_path):
    adapter = random_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    adapter.save_pretrained(tmp_path / "warmup")
    expected = logits(adapter)
    policy = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), init_adapter=str(tmp_path / "warmup")),
                         CPU, need_reference=True)
    assert torch.allclose(logits(policy.model), expected, atol=1e-5)  # fresh LoRA: B = 0
    with policy.reference_mode() as ref:  # the merged start is also the reference
        assert torch.allclose(logits(ref), expected, atol=1e-5)


def test_tokenizer_needs_a_chat_template(tiny_model_dir, tmp_path):
    assert load_tokenizer(str(tiny_model_dir)).padding_side == "left"
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = (bare / "tokenizer_config.json").read_text()
    import json

    data = json.loads(config)
    data.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(str(bare))


def test_heads_the_fused_kernels_cannot_compute_are_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_fused_head(model, "m")
