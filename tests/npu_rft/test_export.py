"""Export: the adapter loads in plain peft; the merged model loads in plain
transformers and computes what the trained policy computes."""
from __future__ import annotations

import pytest
import torch
from helpers import example_rows, tiny_train_config, write_jsonl
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from npu_rft.config import TrainConfig
from npu_rft.config_base import from_dict
from npu_rft.export import export_checkpoint, resolve_checkpoint
from npu_rft.trainer import fit


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train = write_jsonl(root / "train.jsonl", example_rows(6))
    cfg = tiny_train_config(tiny_model_dir, train, root / "run", overrides={"optim": {"lr": 0.05}})
    fit(from_dict(TrainConfig, cfg))
    return root / "run"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_and_merged_exports_load_in_plain_peft_and_transformers(trained_run, tiny_model_dir, tmp_path):
    source = resolve_checkpoint(run=str(trained_run))
    adapter = export_checkpoint(source, tmp_path / "adapter", merge=False)
    merged = export_checkpoint(source, tmp_path / "merged", merge=True)
    ids = torch.tensor([[3, 17, 42, 5, 9]])

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = _logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, str(adapter))
    adapted = _logits(with_adapter, ids)
    assert not torch.allclose(adapted, base_logits)  # training changed the policy

    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    assert torch.allclose(_logits(plain, ids), adapted, atol=1e-5)
    assert AutoTokenizer.from_pretrained(merged).chat_template


def test_export_refuses_ambiguous_or_existing_targets(trained_run, tmp_path):
    with pytest.raises(ValueError, match="exactly one of --run"):
        resolve_checkpoint()
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_checkpoint(resolve_checkpoint(run=str(trained_run)), tmp_path / "taken", merge=True)
