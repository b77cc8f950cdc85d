"""Checkpoints: atomic directories that a run resumes from bit for bit.

A checkpoint is ``<run>/checkpoints/step_<N>/`` (N = steps completed)::

    adapter/                      LoRA: PEFT format (PeftModel.from_pretrained loads it)
    model/                        full fine-tuning: save_pretrained (safetensors)
    optimizer.pt                  optimizer state (torch file, loaded with weights_only=True)
    sharded/                      parallel.strategy fsdp2, instead of the three above: weights (LoRA:
                                  adapter keys only) and optimizer state as torch.distributed.checkpoint
                                  shards, one file per rank (``npu-rft export --merge`` makes a model of it)
    scheduler.json                LR scheduler state
    grad_scaler.json              fp16 loss-scaler state (only when one is used)
    rng.json, rng.safetensors     every RNG state (Device.rng_state)
    trainer_state.json            step, data cursor, non-finite streak, best eval score
    config.yaml                   the run's resolved config (export reads the base model from it)
    algorithm.json, algorithm.safetensors   the algorithm's own state
    rank_<r>/                     data-parallel runs: rank r's rng.* and algorithm.* (r >= 1)

Rank 0 writes the checkpoint; under fsdp2 every rank first writes its own
shard of ``sharded/`` into the same temporary directory. Each rank's RNG and
algorithm states are its own (iterative DPO keeps the pairs of the rank's
prompts), so rank 0 writes every rank's, and a checkpoint resumes with the
number of processes and the ``parallel.strategy`` that wrote it.

It is written into a temporary directory beside it (``.step_<N>.<random>``)
and renamed into place once every rank's part is written, so a crash never
leaves a half-written checkpoint under a ``step_<N>`` name; the next start in
the run directory deletes such a torn temporary directory
(``remove_torn_staging``).
Retention keeps the last ``keep_last`` checkpoints plus the best one by the
eval score recorded in ``trainer_state.json``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from safetensors.torch import load_file, save_file

from npu_rft.algorithms.base import AlgorithmState

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SHARDED = "sharded"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_STAGING_DIR = re.compile(r"^\.step_\d+\.")  # staging_dir's names


@dataclass
class TrainerState:
    """The loop's own state. ``cursor`` is the data stream's position
    (``{"epoch": e, "index": i}``); ``best_score`` is the best eval Top@1 so
    far and ``best_step`` the checkpoint holding it."""

    step: int = 0
    cursor: Dict[str, int] = field(default_factory=lambda: {"epoch": 0, "index": 0})
    nonfinite_in_row: int = 0
    best_score: Optional[float] = None
    best_step: Optional[int] = None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def staging_dir(run_dir: Path, step: int) -> Path:
    """A new temporary directory beside ``step_<step>``, which ``save_checkpoint(staging=...)`` renames into it."""
    target = checkpoint_dir(run_dir, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def remove_torn_staging(run_dir: Path) -> List[Path]:
    """Delete the staging directories a killed run left under ``<run>/checkpoints``
    and return them; complete ``step_<N>`` checkpoints are never touched.

    Call it on rank 0 before this run's first save: it deletes every staging
    directory, so none may be in use (ranks write only into the one rank 0 made
    and handed them during a save)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    torn = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _STAGING_DIR.match(p.name))
    for path in torn:
        shutil.rmtree(path)
        logger.info("removed a torn checkpoint staging directory (a run was killed while saving): %s", path)
    return torn


def written_under(path: Path) -> str:
    """The ``parallel.strategy`` that wrote a checkpoint."""
    return "fsdp2" if (Path(path) / SHARDED).is_dir() else "ddp"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _split_tensors(tree: Dict[str, Any]) -> tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Top-level tensors go to safetensors, the rest to JSON."""
    meta = {k: v for k, v in tree.items() if not isinstance(v, torch.Tensor)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tree.items() if isinstance(v, torch.Tensor)}
    return meta, tensors


def save_checkpoint(
    run_dir: Path,
    *,
    policy: Any,
    optimizer: Optional[torch.optim.Optimizer],
    scheduler: Any,
    grad_scaler: Any,
    rng_state: Dict[str, Any],
    state: TrainerState,
    algorithm_state: AlgorithmState,
    config: Dict[str, Any],
    keep_last: int,
    other_ranks: Sequence[Tuple[Dict[str, Any], AlgorithmState]] = (),
    staging: Optional[Path] = None,
) -> Path:
    """Write ``step_<state.step>`` atomically, then prune old checkpoints.

    ``rng_state`` and ``algorithm_state`` are rank 0's; ``other_ranks[r - 1]``
    is rank r's ``(rng_state, algorithm_state)`` in a data-parallel run.
    ``staging``: a ``staging_dir`` that already holds the weights and optimizer
    state (fsdp2's ``sharded/``, written by every rank); then ``optimizer`` is
    None and the policy's weights are not written again."""
    target = checkpoint_dir(run_dir, state.step)
    tmp = staging if staging is not None else staging_dir(run_dir, state.step)
    try:
        if staging is not None:
            if not (staging / SHARDED / ".metadata").is_file():
                raise RuntimeError(f"{staging / SHARDED}: the sharded weights are incomplete (no .metadata)")
        elif policy.lora:
            policy.model.save_pretrained(tmp / "adapter")
        else:
            policy.model.save_pretrained(tmp / "model")
            policy.tokenizer.save_pretrained(tmp / "model")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        if grad_scaler is not None:
            _write_json(tmp / "grad_scaler.json", grad_scaler.state_dict())
        _write_rank_state(tmp, rng_state, algorithm_state)
        for rank, (rank_rng, rank_algorithm) in enumerate(other_ranks, start=1):
            (tmp / f"rank_{rank}").mkdir()
            _write_rank_state(tmp / f"rank_{rank}", rank_rng, rank_algorithm)
        _write_json(tmp / "trainer_state.json", asdict(state))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        if target.exists():  # a re-run of the same step after a resume
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    prune_checkpoints(run_dir, keep_last, state.best_step)
    logger.info("checkpoint: %s", target)
    return target


def _write_rank_state(folder: Path, rng_state: Dict[str, Any], algorithm_state: AlgorithmState) -> None:
    rng_meta, rng_tensors = _split_tensors(rng_state)
    _write_json(folder / "rng.json", rng_meta)
    save_file(rng_tensors, str(folder / "rng.safetensors"))
    _write_json(folder / "algorithm.json", algorithm_state.meta)
    save_file({k: v.detach().cpu().contiguous() for k, v in algorithm_state.tensors.items()},
              str(folder / "algorithm.safetensors"))


def prune_checkpoints(run_dir: Path, keep_last: int, best_step: Optional[int]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the best one."""
    found = list_checkpoints(run_dir)
    keep = set(found[-keep_last:])
    if best_step is not None:
        keep.add(checkpoint_dir(run_dir, best_step))
    for path in found:
        if path not in keep:
            shutil.rmtree(path)


@dataclass
class LoadedCheckpoint:
    path: Path
    state: TrainerState
    rng_state: Dict[str, Any]
    algorithm_state: AlgorithmState


def load_checkpoint(
    path: Path,
    *,
    policy: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    grad_scaler: Any,
    rank: int = 0,
    world_size: int = 1,
    strategy: str = "ddp",
) -> LoadedCheckpoint:
    """Restore weights, optimizer, scheduler and scaler in place; return the
    rest, with rank ``rank``'s RNG and algorithm states. Under
    ``strategy="fsdp2"`` the weights and optimizer state are the caller's to
    restore from ``sharded/`` (``npu_rft.sharding.Sharded.load``)."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a checkpoint (no trainer_state.json); pass a checkpoints/step_<N> directory or a run directory"
        )
    written_by = 1 + sum(1 for p in path.iterdir() if p.is_dir() and p.name.startswith("rank_"))
    if written_under(path) != strategy:
        raise ValueError(
            f"{path} was written under parallel.strategy={written_under(path)} by {written_by} process(es) but this "
            f"run uses parallel.strategy={strategy}; resume with parallel.strategy: {written_under(path)} and "
            f"{written_by} process(es), or export it (npu-rft export --merge) and start a new run from that model"
        )
    if written_by != world_size:
        raise ValueError(
            f"{path} was written by {written_by} process(es) but this run has {world_size}; every rank keeps its own "
            f"RNG and algorithm state{' and its weight shards' if strategy == 'fsdp2' else ''}, so resume with "
            f"{written_by} process(es) in all (torchrun --nnodes x --nproc-per-node)"
        )
    device = next(policy.model.parameters()).device
    if strategy == "fsdp2":
        pass  # the caller restores the sharded weights and optimizer state
    elif policy.lora:
        from peft import set_peft_model_state_dict

        weights_file = path / "adapter" / "adapter_model.safetensors"
        if not weights_file.is_file():
            raise FileNotFoundError(f"{weights_file} is missing; this checkpoint was not written by a LoRA run "
                                    "(set model.finetune to match the run that wrote it)")
        result = set_peft_model_state_dict(policy.model, load_file(str(weights_file), device=str(device)))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{weights_file}: adapter weights do not fit the model: {result.unexpected_keys[:5]}")
    else:
        _load_full_weights(policy.model, path / "model", device)
    if strategy != "fsdp2":
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(_read_json(path / "scheduler.json"))
    if grad_scaler is not None and (path / "grad_scaler.json").is_file():
        grad_scaler.load_state_dict(_read_json(path / "grad_scaler.json"))
    rank_dir = path if rank == 0 else path / f"rank_{rank}"
    rng_state = {**_read_json(rank_dir / "rng.json"), **load_file(str(rank_dir / "rng.safetensors"))}
    state = TrainerState(**_read_json(path / "trainer_state.json"))
    algorithm_state = AlgorithmState(load_file(str(rank_dir / "algorithm.safetensors")),
                                     _read_json(rank_dir / "algorithm.json"))
    logger.info("resumed from %s (step %d)", path, state.step)
    return LoadedCheckpoint(path, state, rng_state, algorithm_state)


def _load_full_weights(model: torch.nn.Module, model_dir: Path, device: torch.device) -> None:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors; this checkpoint was not written by a full fine-tuning run")
    weights: Dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f), device=str(device)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # tied heads are not saved
    if unexpected or set(missing) - tied:
        raise ValueError(f"{model_dir}: weights do not fit the model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")


def resolve_resume(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """``resume``: None (fresh run), ``"latest"`` (the run's newest checkpoint),
    or a checkpoint directory."""
    if resume is None:
        return None
    if resume == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {Path(run_dir) / CHECKPOINTS}; "
                                    "start without --resume, or pass a checkpoint directory")
        return found
    path = Path(resume)
    if (path / CHECKPOINTS).is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--resume {path}: the run has no checkpoint yet")
        return found
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint directory (no trainer_state.json) nor a run directory")
    return path
