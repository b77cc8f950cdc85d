"""Exporting a trained checkpoint: the adapter as it is, or a merged model.

``export_checkpoint(checkpoint, out, merge=...)``:

- LoRA run, ``merge=False``: copies the PEFT adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``); ``PeftModel.from_pretrained(base, out)``
  loads it. Its base is ``model.name_or_path`` with ``model.init_adapter``
  merged in, when the run had one; then only ``merge=True`` gives the model
  that was trained.
- LoRA run, ``merge=True``: loads the base (merging ``init_adapter`` first, as
  training did), applies the adapter, merges it into the weights and saves a
  full model directory with its tokenizer, which plain
  ``AutoModelForCausalLM.from_pretrained(out)`` loads.
- Full fine-tuning: the checkpoint already holds a full model; it is copied.
- A sharded checkpoint (``parallel.strategy: fsdp2``, ``sharded/``): the
  shards are read back whole in this one process (no process group, any
  number of ranks wrote them) into the base model (LoRA: with its adapter,
  which ``merge=False`` writes alone and ``merge=True`` merges); a full
  fine-tuning checkpoint gives the full model either way.

The checkpoint's ``config.yaml`` says which base model and adapter it used.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from npu_rft import checkpoint as ckpt

logger = logging.getLogger(__name__)


def resolve_checkpoint(run: Optional[str] = None, checkpoint: Optional[str] = None) -> Path:
    """Exactly one of a run directory (its latest checkpoint) or a checkpoint directory."""
    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of --run DIR (its latest checkpoint) or --checkpoint DIR")
    if run is not None:
        found = ckpt.latest_checkpoint(Path(run))
        if found is None:
            raise FileNotFoundError(f"--run {run}: no checkpoint under {Path(run) / ckpt.CHECKPOINTS}")
        return found
    path = Path(checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--checkpoint {path}: not a checkpoint directory (no trainer_state.json)")
    return path


def export_checkpoint(checkpoint: Path, out: Path, *, merge: bool) -> Path:
    """Write the export to ``out`` (which must not exist), atomically."""
    from npu_rft.config import load_train_config

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists():
        raise FileExistsError(f"--out {out} already exists; choose a new directory")
    config = load_train_config(checkpoint / "config.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if (checkpoint / ckpt.SHARDED).is_dir():
            _gather_sharded(config.model, checkpoint / ckpt.SHARDED, tmp, merge=merge)
        elif (checkpoint / "model").is_dir():
            shutil.copytree(checkpoint / "model", tmp, dirs_exist_ok=True)
        elif not merge:
            shutil.copytree(checkpoint / "adapter", tmp, dirs_exist_ok=True)
        else:
            _merge_adapter(config.model, checkpoint / "adapter", tmp)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("exported %s -> %s%s", checkpoint, out, " (merged)" if merge else "")
    return out


def _base_model(model_cfg):
    """The run's starting weights in fp32: the base model, with init_adapter merged as in training."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=torch.float32,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.init_adapter:
        model = PeftModel.from_pretrained(model, model_cfg.init_adapter).merge_and_unload()
    return model


def _merge_adapter(model_cfg, adapter_dir: Path, out: Path) -> None:
    """Base (+ init_adapter, as in training) + adapter, merged in fp32, saved with the tokenizer."""
    from peft import PeftModel

    from npu_rft.model import load_tokenizer

    model = PeftModel.from_pretrained(_base_model(model_cfg), str(adapter_dir)).merge_and_unload()
    model.save_pretrained(out)
    load_tokenizer(model_cfg.name_or_path, model_cfg.trust_remote_code).save_pretrained(out)


def _gather_sharded(model_cfg, folder: Path, out: Path, *, merge: bool) -> None:
    """A sharded checkpoint's weights loaded whole into the base model (LoRA:
    the adapter alone without ``merge``), saved with the tokenizer."""
    from npu_rft.model import load_tokenizer, peft_lora_config
    from npu_rft.sharding import read_sharded

    weights = read_sharded(folder)
    model = _base_model(model_cfg)
    if model_cfg.finetune == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, peft_lora_config(model_cfg))
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{folder}: weights that model {model_cfg.name_or_path} does not have: {unexpected[:5]}; "
                         "export with the base model the run trained")
    if model_cfg.finetune == "lora":
        if not merge:
            model.save_pretrained(out)  # the adapter alone, in PEFT's format
            return
        model = model.merge_and_unload()
    model.save_pretrained(out)
    load_tokenizer(model_cfg.name_or_path, model_cfg.trust_remote_code).save_pretrained(out)
