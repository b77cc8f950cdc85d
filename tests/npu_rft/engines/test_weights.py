"""PEFT names to the checkpoint names an engine loads, and the merged-LoRA weights pushed to it."""
from __future__ import annotations

import pytest
import torch

from npu_rft.engines.weights import engine_weight_name, engine_weights


@pytest.mark.parametrize("peft_name, engine_name", [
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias", "model.layers.0.self_attn.q_proj.bias"),
    ("base_model.model.model.layers.3.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"),
    ("base_model.model.model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("base_model.model.lm_head.weight", "lm_head.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", None),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.my_adapter.weight", None),
    ("base_model.model.model.embed_tokens.lora_embedding_A.default", None),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight", None),
    # not PEFT-wrapped: unchanged
    ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.weight"),
    ("model.norm.weight", "model.norm.weight"),
])
def test_engine_weight_name_table(peft_name, engine_name):
    assert engine_weight_name(peft_name) == engine_name


def _lora_model(tiny_model_dir, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM", **lora)
    return base, get_peft_model(base, config)


def test_engine_weights_push_lora_merged_under_checkpoint_names(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    plain = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    _, model = _lora_model(tiny_model_dir)
    with torch.no_grad():
        pushed = dict(engine_weights(model))
    assert set(pushed) == set(plain)  # every checkpoint weight once, no adapter tensors
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    merged = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(pushed["model.layers.0.self_attn.q_proj.weight"], merged, atol=1e-6)
    assert not torch.equal(merged, layer.base_layer.weight)  # the adapter is not zero: merging changed it
    assert torch.equal(pushed["model.layers.0.self_attn.k_proj.weight"], plain["model.layers.0.self_attn.k_proj.weight"])
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, type(layer))  # LoRA put back


def test_engine_weights_refuse_adapters_that_do_not_merge(tiny_model_dir):
    _, model = _lora_model(tiny_model_dir, use_dora=True)
    with torch.no_grad(), pytest.raises(ValueError, match="cannot be merged into its base weight.*rollout.engine: native"):
        dict(engine_weights(model))
