"""How the trained model is spread over the ranks: ``parallel.strategy``.

``ddp`` (the default) replicates the weights, gradients and optimizer state on
every rank and averages gradients with ``DistributedDataParallel``. ``fsdp2``
shards them with torch's own FSDP2 (``torch.distributed.fsdp.fully_shard``),
so each rank keeps ``1 / world_size`` of them. The trainer talks to either
through one small interface, :class:`Replicated` or :class:`Sharded`:

``forward``
    the module whose call computes the loss's hidden states
    (``npu_rft.model.CompletionHidden``); under fsdp2 it is the root shard unit.
``head_weight()``
    the LM head weight the fused losses multiply by, read after ``forward``.
``gathered(reference=False)``
    a context for no-grad passes whose forwards differ between ranks
    (sampling with its per-rank early exit, evaluation, the old and reference
    log-prob passes): every weight of the policy (or of the reference) is
    gathered once on entry and freed on exit, so nothing inside it is a
    collective and ranks may run different numbers of forwards in it.

**Loading under fsdp2**: rank 0 alone reads the checkpoint; the other ranks'
modules are built on the meta device, and :func:`shard` fills every rank's
shards from rank 0's weights (:func:`_fill_from_rank0`).

**The shard units under fsdp2** (:func:`shard_units`): each decoder layer, then
the root, which holds what is left: the embeddings, the final norm and the LM
head (tied to the embeddings in the small Qwen2.5 models). The root is the
``CompletionHidden`` wrapper, so its forward gathers those weights; the losses
read the LM head weight *after* the forward, outside any FSDP hook, so
``head_weight`` unshards the root explicitly (a no-op while the root keeps its
weights from its forward to the end of its backward, FSDP2's behaviour for the
root) and the root's post-backward reshards it. Each layer's collectives
follow the number of decoder calls, so the loss's forward calls the decoder
once per micro-batch (``CompletionHidden(share_prompts=False)``: GRPO's K
samples then run their prompt K times in training; the no-grad passes inside
``gathered`` still share it). Parameters are cast to the
device's compute dtype for compute and gradients are reduce-scattered in fp32
(``MixedPrecisionPolicy``); ``parallel.cpu_offload`` keeps parameters, gradients
and optimizer state in host memory (``CPUOffloadPolicy``, pinned only where
the device can pin). Gradients are reduce-scattered after every micro-batch
(no rank holds the whole model's gradient) with FSDP2's default averaging, which is
why the trainer multiplies each rank's loss by the world size.

fsdp2 needs torch >= 2.6 (``torch.distributed.fsdp.fully_shard`` public, with
``MixedPrecisionPolicy`` and ``CPUOffloadPolicy``);
:func:`require_fsdp2` refuses an older torch with that message.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterable, Iterator, List

import torch
from torch import nn

from npu_rft.hf import base_model, lm_head_weight

logger = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp2")
FSDP2_MIN_TORCH = "2.6"


@dataclass
class ParallelConfig:
    strategy: str = "ddp"  # ddp (weights, gradients and optimizer state replicated on every rank) | fsdp2 (sharded over the ranks with torch's fully_shard: docs/distributed.md)
    cpu_offload: bool = False  # fsdp2 only: keep parameters, gradients and optimizer state in host memory (slower steps, far less device memory)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.cpu_offload and self.strategy != "fsdp2":
            raise ValueError("parallel.cpu_offload is set but parallel.strategy is not fsdp2; "
                             "set parallel.strategy: fsdp2, or remove parallel.cpu_offload")


def require_fsdp2() -> None:
    """Raise with the fix when this torch has no public FSDP2."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard  # noqa: F401
    except ImportError:
        raise RuntimeError(f"parallel.strategy=fsdp2 needs torch >= {FSDP2_MIN_TORCH} "
                           f"(torch.distributed.fsdp.fully_shard); this is torch {torch.__version__}: "
                           "upgrade torch, or set parallel.strategy: ddp") from None


def shard_units(model: nn.Module) -> List[nn.Module]:
    """The decoder layers of a causal LM (a PeftModel's too): FSDP2's inner shard units."""
    decoder = base_model(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"parallel.strategy=fsdp2: the decoder {type(decoder).__name__} has no `layers` list "
                         "to shard; use parallel.strategy: ddp for this model")
    return list(layers)


class Replicated:
    """ddp, and any single-process run: the whole model on every rank."""

    strategy = "ddp"
    gathered_bytes = 0  # nothing is ever gathered

    def __init__(self, policy: Any, device: Any, world_size: int) -> None:
        from npu_rft.model import CompletionHidden

        self.policy = policy
        self.forward: nn.Module = CompletionHidden(policy.model)
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.forward, device_ids=device.hardware.ddp_device_ids(device))

    def head_weight(self) -> torch.Tensor:
        return lm_head_weight(self.policy.model)

    def gathered(self, reference: bool = False) -> ContextManager[None]:
        return contextlib.nullcontext()

    def accumulating(self, last: bool) -> ContextManager[None]:
        """One micro-batch's forward and backward: DDP synchronises on the last one only."""
        if last or not hasattr(self.forward, "no_sync"):
            return contextlib.nullcontext()
        return self.forward.no_sync()


class Sharded:
    """fsdp2: the policy (and a full fine-tuning reference) sharded over the ranks."""

    strategy = "fsdp2"

    def __init__(self, policy: Any, device: Any, cpu_offload: bool) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from npu_rft.model import CompletionHidden

        require_fsdp2()
        self.policy = policy
        self.gathered_bytes = 0  # the largest whole model gathered so far (the rollout's peak on top of the shards)
        mesh = init_device_mesh(device.torch_device.type, (dist.get_world_size(),))
        # one decoder call per micro-batch (and zero-loss pass): the same collectives on every rank
        self.forward = shard(CompletionHidden(policy.model, share_prompts=False), policy.model, device, mesh,
                             cpu_offload)
        # full fine-tuning's reference: a sharded no-grad copy (LoRA's is the policy with its adapter disabled)
        self.reference = (shard(CompletionHidden(policy.reference), policy.reference, device, mesh, cpu_offload)
                          if policy.reference is not None else None)

    def head_weight(self) -> torch.Tensor:
        self.forward.unshard()  # the root: a no-op after its forward, which keeps its weights until its backward
        return lm_head_weight(self.policy.model)

    def gathered(self, reference: bool = False) -> ContextManager[None]:
        root = self.reference if reference and self.reference is not None else self.forward
        return _whole_model(root, self)

    def accumulating(self, last: bool) -> ContextManager[None]:
        return contextlib.nullcontext()  # FSDP2 reduce-scatters every micro-batch's gradients

    # Checkpoints: torch.distributed.checkpoint, every rank writing and reading its own shards.
    # Only trainable weights are kept (LoRA: the adapter's), under the model's own parameter names.

    def _state(self, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        model = self.policy.model
        options = StateDictOptions(ignore_frozen_params=True)
        # a tied head under LoRA is a frozen weight under a second name, which ignore_frozen_params keeps
        trainable = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
        weights = {k: v for k, v in get_model_state_dict(model, options=options).items() if k in trainable}
        return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}

    def save(self, folder: Path, optimizer: torch.optim.Optimizer) -> None:
        """Every rank writes its shards of the weights and optimizer state to ``folder`` (a collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(optimizer), checkpoint_id=str(folder))

    def load(self, folder: Path, optimizer: torch.optim.Optimizer) -> None:
        """Every rank reads its shards back from ``folder`` (a collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        if not (Path(folder) / ".metadata").is_file():
            raise FileNotFoundError(f"{folder}: no .metadata; this is not a complete sharded checkpoint")
        state = self._state(optimizer)
        dcp.load(state, checkpoint_id=str(folder))
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(self.policy.model, state["model"], options=options)
        set_optimizer_state_dict(self.policy.model, optimizer, state["optimizer"], options=options)


def build(config: ParallelConfig, policy: Any, device: Any, world_size: int):
    """The ``parallel.strategy`` wrapper of a loaded policy; build the optimizer after it."""
    if config.strategy == "fsdp2":
        return Sharded(policy, device, config.cpu_offload)
    return Replicated(policy, device, world_size)


def shard(root: nn.Module, model: nn.Module, device: Any, mesh: Any, cpu_offload: bool) -> nn.Module:
    """``fully_shard`` each decoder layer of ``model``, then ``root`` (a module
    holding ``model``) over ``mesh``; returns ``root``, now an ``FSDPModule``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=device.compute_dtype, reduce_dtype=torch.float32),
        "offload_policy": CPUOffloadPolicy(pin_memory=device.hardware.pin_memory) if cpu_offload else OffloadPolicy(),
    }
    # rank 0's weights, before sharding, for the other ranks (one rank: nothing to send, nothing kept)
    full = model.state_dict() if mesh.size() > 1 and mesh.get_rank() == 0 else {}
    for layer in shard_units(model):
        fully_shard(layer, **options)
    fully_shard(root, **options)
    if mesh.size() > 1:
        _fill_from_rank0(model, full, device, cpu_offload)
    del full
    # FSDP2 takes the first module to run forward for the root: run the root
    # once here, before any decoder layer runs alone (sampling, evaluation).
    one = torch.zeros((1, 1), dtype=torch.long, device=device.torch_device)
    with torch.no_grad():
        root(one, one.bool(), one, one.bool())
    root.reshard()
    return root


def _fill_from_rank0(model: nn.Module, full: Dict[str, torch.Tensor], device: Any, cpu_offload: bool) -> None:
    """Every rank's shards (and buffers) from rank 0's weights, ``full`` there.

    Only rank 0 reads the checkpoint (``load_policy(read_weights=False)`` elsewhere):
    the other ranks' modules are on the meta device until here, so the host holds one
    copy of the model while loading, not one per rank. torch sends one tensor at a
    time, each rank keeping its shard of it. Buffers that are not in the state dict
    (e.g. rotary ``inv_freq``) are sent as they are."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device=torch.device("cpu") if cpu_offload else device.torch_device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        sent = buffer.to(device.torch_device)
        dist.broadcast(sent, src=0)
        if sent is not buffer:
            buffer.copy_(sent)


@contextlib.contextmanager
def _whole_model(root: nn.Module, sharded: Sharded) -> Iterator[None]:
    """Every shard unit under ``root`` unsharded on entry (one all-gather per
    unit, the same sequence on every rank) and kept so by forwards inside;
    resharded on exit. Records the gathered bytes in ``sharded.gathered_bytes``."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    sharded.gathered_bytes = max(sharded.gathered_bytes, local_bytes(root.parameters()))
    root.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in units:
            if unit is not root:
                unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes this rank holds of ``tensors``: a DTensor's local shard (``to_local()``), others whole."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective on every rank), other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def read_sharded(folder: Path) -> Dict[str, torch.Tensor]:
    """The whole weights of a ``sharded/`` checkpoint folder, in one process
    without a process group: ``{parameter name: tensor}`` in the model's own
    names (a PeftModel's for LoRA: the adapter's only)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder}: no .metadata; this is not a complete sharded checkpoint")
    reader = dcp.FileSystemReader(str(folder))
    prefix = "model."
    state = {name[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for name, meta in reader.read_metadata().state_dict_metadata.items()
             if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return state
