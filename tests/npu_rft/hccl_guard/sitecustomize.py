"""Make gloo refuse what HCCL refuses, for the multi-process CPU tests.

A directory on ``PYTHONPATH`` holding this file makes every Python process
started there (torchrun's workers included) import it at start-up. It wraps
torch.distributed's reductions (all_reduce, reduce, reduce_scatter,
reduce_scatter_tensor, and reduce_scatter_single, which FSDP2 reduces its
gradients with in recent torch) so that a tensor HCCL's all-reduce would
refuse on a 910B (float64, bool, unsigned integers) raises HCCL's error here
too, and FSDP2's parameter all-gathers (all_gather_into_tensor,
all_gather_single) so that they refuse float64 and bool. Each checked call's
name and dtype go to ``$NPU_RFT_HCCL_GUARD_LOG`` so a test can see that the
guard ran. DDP's gradient buckets are reduced from C++ and are not seen here;
they have the parameters' dtype (fp32 or bf16).
"""
import functools
import os

import torch
import torch.distributed as dist

_ALLOWED = {torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.bfloat16}


def _tensors(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


# all-gathers move bytes without arithmetic: unsigned bytes too (FSDP2 gathers mixed dtypes as uint8)
_GATHERED = _ALLOWED | {torch.uint8}


def _guarded(name, fn, allowed=_ALLOWED):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for tensor in _tensors(args, kwargs):
            log = os.environ.get("NPU_RFT_HCCL_GUARD_LOG")
            if log:
                with open(log, "a", encoding="utf-8") as f:
                    f.write(f"{os.getpid()} {name} {str(tensor.dtype).replace('torch.', '')}\n")
            if tensor.dtype not in allowed:
                raise RuntimeError(f"HCCL {name}: Unsupported data type {tensor.dtype} (guard of the CPU tests)")
        return fn(*args, **kwargs)

    return wrapper


for _name in ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single"):
    if hasattr(dist, _name):
        setattr(dist, _name, _guarded(_name, getattr(dist, _name)))
for _name in ("all_gather_into_tensor", "all_gather_single"):
    if hasattr(dist, _name):
        setattr(dist, _name, _guarded(_name, getattr(dist, _name), _GATHERED))
