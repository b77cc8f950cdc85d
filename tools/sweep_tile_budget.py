"""Tile budget against Liger-Kernel on one accelerator: fwd+bwd time and memory.

For the ``triton`` backend at several tile budgets (0: its streaming mode,
no logits tile at all; ``kernels/npu_rft_kernels/logprob/triton_stream.py``), and for Liger-Kernel's
``LigerFusedLinearCrossEntropyLoss`` (if installed) and ``naive``, in one
process: median fwd+bwd time of ``--repeats`` after 3 warm-ups (CUDA events),
and the incremental peak memory (allocator peak above what is held, minus the
gradients the step returns). Frozen and trainable head, entropy off (plus the
frozen head with a detached entropy, GRPO's case, at two budgets).

    python tools/sweep_tile_budget.py --json sweep.json            # N,H,V = 4096,896,151936, bf16
    python tools/sweep_tile_budget.py --budgets 0,256,32           # streaming mode and two budgets

Numbers from an H200 are in docs/kernels.md (GPU section).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from npu_rft_kernels import fused_logprob

MIB = 2**20


def make_step(hid, W, t, g, impl, frozen, budget=None, entropy=False):
    h = hid.detach().requires_grad_(True)
    w = W.detach().requires_grad_(not frozen)
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def step():
            fn(w, h, t).backward()
            h.grad = w.grad = None

        return step

    def step():
        out = fused_logprob(h, w, t, backend=impl, tile_bytes=budget, return_entropy=entropy, entropy_grad=False)
        logp = out[0] if entropy else out
        (logp * g).sum().backward()
        h.grad = w.grad = None

    return step


def measure(step, grad_bytes: int, repeats: int):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base - grad_bytes) / MIB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096,896,151936", help="N,H,V")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--budgets", default="0,256,64,32,16,8,4", help="tile budgets in MiB (0: streaming mode)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (the triton backend and Liger run there)")
    n, hs, v = (int(x) for x in args.shape.split(","))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    hid = torch.randn(n, hs, generator=gen).to("cuda", dtype)
    W = (torch.randn(v, hs, generator=gen) * 0.02).to("cuda", dtype)
    t = torch.randint(0, v, (n,), generator=gen).cuda()
    g = torch.randn(n, generator=gen).cuda()
    budgets = [int(b) for b in args.budgets.split(",")]
    rows = []
    for frozen in (True, False):
        cases = [("naive", None, False), ("liger", None, False)] + [("triton", b * MIB, False) for b in budgets]
        if frozen:
            cases += [("triton", b * MIB, True) for b in (budgets[0], budgets[-1])]
        grad_bytes = (n * hs + (0 if frozen else v * hs)) * dtype.itemsize
        for impl, budget, entropy in cases:
            try:
                ms, mib = measure(make_step(hid, W, t, g, impl, frozen, budget, entropy), grad_bytes, args.repeats)
            except ImportError as e:
                print(f"skipped {impl}: {e}")
                continue
            row = dict(mode="frozen" if frozen else "trainable", impl=impl, budget_mib=budget and budget // MIB,
                       entropy=entropy, ms=round(ms, 2), peak_mib=round(mib, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
