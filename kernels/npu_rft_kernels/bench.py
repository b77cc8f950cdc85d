"""Benchmark of the fused log-prob against the naive baseline and bare GEMMs
(library side of ``npu-rft bench-kernels``).

For each shape (N tokens, H hidden, V vocabulary), head mode (``frozen``:
only the hidden states need a gradient; ``trainable``: the head too) and
implementation (the log-prob backends, ``gemm`` = the bare GEMMs the tiled
algorithm needs, and ``liger`` = Liger-Kernel's fused linear cross-entropy
when it is installed, on CUDA), it measures

* ``fwd_ms``: the forward under ``torch.no_grad`` (the old/ref log-prob pass);
* ``fwd_bwd_ms``: forward + backward of ``sum(g * logp)`` (``+ sum(k * entropy)``
  with ``entropy``) with random upstream gradients (Liger: ``sum`` of its
  cross-entropy, whose gradient it computes in the forward);
* medians over ``repeats`` after one warm-up, with the cases interleaved
  (A B C A B C ...) so that a noisy, shared machine slows them alike;
* ``gflops``: the implementation's own FLOPs over ``fwd_bwd_ms``: 2NHV per
  GEMM, counting naive as 2 (frozen) / 3 (trainable) GEMMs and the tiled
  backends as 2 / 4 (the forward's accumulator GEMM or the backward's
  recompute), +1 with entropy in the frozen mode;
* ``peak_mib`` / ``fwd_peak_mib``: the incremental peak memory of fwd+bwd /
  of the no-grad forward, measured in a fresh subprocess per case: the peak
  minus what is held once the inputs exist (after one warm-up step), minus
  the gradients the step returns (the same for every implementation). CPU: the
  process's RSS high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``); accelerators: the allocator's peak statistics.

Inputs: hidden states N(0, 1), head N(0, 0.02^2) as in an initialised LM,
targets uniform, no ignored tokens, temperature 1.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

QWEN_SHAPES = ((1024, 896, 151936), (4096, 896, 151936))
QUICK_SHAPES = ((64, 32, 2000),)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("frozen", "trainable")
MIB = 2.0**20


@dataclass(frozen=True)
class Case:
    n: int
    h: int
    v: int
    mode: str  # frozen | trainable
    impl: str  # a backend name, "gemm" or "liger"
    dtype: str = "fp32"
    entropy: bool = False
    device: str = "cpu"
    seed: int = 0

    @property
    def name(self) -> str:
        ent = "+entropy" if self.entropy else ""
        return f"N={self.n},H={self.h},V={self.v} {self.dtype} {self.mode}{ent} {self.impl}"

    def gemms(self) -> int:
        """GEMMs of 2NHV in one fwd+bwd."""
        if self.impl == "naive":
            return 2 if self.mode == "frozen" else 3
        if self.impl == "liger":
            return 3  # logits, dh, dW in its forward
        base = 2 if self.mode == "frozen" else 4
        return base + (1 if self.entropy and self.mode == "frozen" else 0)


@dataclass
class Result:
    case: Case
    fwd_ms: float
    fwd_bwd_ms: float
    gflops: float
    peak_mib: Optional[float] = None
    fwd_peak_mib: Optional[float] = None
    vs_naive_time: Optional[float] = None
    vs_naive_mem: Optional[float] = None
    vs_gemm_time: Optional[float] = None
    fwd_times_ms: List[float] = field(default_factory=list)
    fwd_bwd_times_ms: List[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["case"]["name"] = self.case.name
        return out


def make_inputs(case: Case):
    """Hidden N(0, 1) [N, H], head N(0, 0.02^2) [V, H] (made in place: no
    temporaries), targets, and upstream gradients on the case's device."""
    device = torch.device(case.device)
    gen = torch.Generator(device="cpu").manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    hidden = torch.randn(case.n, case.h, generator=gen).to(device=device, dtype=dtype)
    weight = torch.empty(case.v, case.h, device=device, dtype=dtype)
    for v0 in range(0, case.v, 8192):  # chunked, so no [V, H] fp32 temporary
        chunk = torch.randn(min(8192, case.v - v0), case.h, generator=gen).mul_(0.02)
        weight[v0 : v0 + chunk.shape[0]].copy_(chunk)
    targets = torch.randint(0, case.v, (case.n,), generator=gen).to(device)
    g_logp = torch.randn(case.n, generator=gen).to(device)
    g_entropy = torch.randn(case.n, generator=gen).to(device)
    return hidden, weight, targets, g_logp, g_entropy


def make_step(case: Case, inputs) -> Tuple[Callable[[], None], Callable[[], None]]:
    """``(forward, forward_backward)`` closures for a case. Gradients are
    dropped after each step so that every step allocates the same."""
    hidden, weight, targets, g_logp, g_entropy = inputs
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(case.mode == "trainable")

    if case.impl == "gemm":
        trainable = case.mode == "trainable"

        def forward():
            torch.mm(hidden, weight.t())

        def forward_backward():
            z = torch.mm(hidden, weight.t())
            torch.mm(z, weight)  # dh (frozen: the accumulator GEMM)
            if case.entropy and not trainable:
                torch.mm(z, weight)
            if trainable:
                z = torch.mm(hidden, weight.t())  # recompute
                torch.mm(z.t(), hidden)  # dW

        return forward, forward_backward

    if case.impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def forward():
            with torch.no_grad():
                loss_fn(w, h, targets)

        def forward_backward():
            loss_fn(w, h, targets).backward()
            h.grad = w.grad = None

        return forward, forward_backward

    from npu_rft_kernels import fused_logprob

    def call():
        return fused_logprob(h, w, targets, return_entropy=case.entropy, backend=case.impl)

    def forward():
        with torch.no_grad():
            call()

    def forward_backward():
        out = call()
        if case.entropy:
            logp, ent = out
            ((logp * g_logp).sum() + (ent * g_entropy).sum()).backward()
        else:
            (out * g_logp).sum().backward()
        h.grad = w.grad = None

    return forward, forward_backward


def _gradient_bytes(case: Case) -> int:
    if case.impl == "gemm":
        return 0
    itemsize = DTYPES[case.dtype].itemsize
    size = case.n * case.h + (case.v * case.h if case.mode == "trainable" else 0)
    return size * itemsize


class _PeakMeter:
    """Incremental peak memory: ``start()`` then ``peak()`` bytes above the start."""

    def __init__(self, device) -> None:
        self.device = device

    def start(self) -> None:
        self.device.synchronize()
        if self.device.type == "cpu":
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
            self.base = _proc_status_kib("VmRSS") * 1024
        else:
            self.device.reset_peak_memory_stats()
            self.base = self.device.memory_stats()["allocated"]

    def peak(self) -> int:
        self.device.synchronize()
        if self.device.type == "cpu":
            return _proc_status_kib("VmHWM") * 1024 - self.base
        return self.device.memory_stats()["peak_allocated"] - self.base


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}; incremental peak memory needs Linux")


class BenchDevice:
    """What the benchmark asks of a device: synchronise and the allocator's
    statistics (``torch.cuda``, or torch_npu's ``torch_npu.npu`` through
    ``torch_npu_api.npu``). ``npu_rft.device.Device`` has the same methods, plus the NPU
    profiler; ``npu-rft bench-kernels`` passes one of those."""

    def __init__(self, device: str) -> None:
        self.torch_device = torch.device(device)
        self.type = self.torch_device.type
        self.index = self.torch_device.index or 0

    def _backend(self):
        if self.type == "cpu":
            return None
        if self.type == "npu":  # torch.npu is torch_npu.npu: its calls go through the one module that makes them
            from npu_rft_kernels import torch_npu_api

            return torch_npu_api.npu
        return getattr(torch, self.type)

    def synchronize(self) -> None:
        if self._backend() is not None:
            self._backend().synchronize(self.index)

    def memory_stats(self) -> Dict[str, int]:
        backend = self._backend()
        if backend is None:
            raise RuntimeError("BenchDevice.memory_stats is for accelerators; the CPU peak comes from /proc")
        return {"allocated": int(backend.memory_allocated(self.index)),
                "peak_allocated": int(backend.max_memory_allocated(self.index))}

    def reset_peak_memory_stats(self) -> None:
        if self._backend() is not None:
            self._backend().reset_peak_memory_stats(self.index)

    def profiler(self, out_dir: str, *, wait: int, warmup: int, active: int):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        return torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(out_dir),
        )


def measure_memory(case: Case) -> Dict[str, float]:
    """Run in a fresh process (``python -m npu_rft_kernels.bench CASE_JSON``):
    incremental peaks in bytes of the no-grad forward and of fwd+bwd."""
    device = BenchDevice(case.device)
    inputs = make_inputs(case)
    forward, forward_backward = make_step(case, inputs)
    forward()  # warm-up: library initialisation and kernel compilation are not the op's memory
    forward_backward()
    meter = _PeakMeter(device)
    meter.start()
    forward()
    fwd_peak = meter.peak()
    meter.start()
    forward_backward()  # the gradients it drops at its end are in the peak: subtract them
    peak = meter.peak()
    return {"fwd_peak": fwd_peak, "peak": peak - _gradient_bytes(case)}


def _memory_in_subprocess(case: Case) -> Dict[str, float]:
    # A fixed mmap threshold makes glibc return every freed block >= 64 KiB to
    # the OS at once, so the warm-up leaves no freed tiles resident for the
    # measured step to reuse unseen.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, "-m", "npu_rft_kernels.bench", json.dumps(asdict(case))],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {case.name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(
    shapes: Sequence[Tuple[int, int, int]],
    *,
    impls: Sequence[str],
    dtype: str = "fp32",
    device: Union[str, "BenchDevice"] = "cpu",
    modes: Sequence[str] = MODES,
    entropy: Sequence[bool] = (False,),
    repeats: int = 5,
    memory: bool = True,
    profile_dir: Optional[str] = None,
    log: Callable[[str], None] = lambda msg: None,
) -> List[Result]:
    """Benchmark every (shape, mode, entropy, impl) case; see the module docstring.
    ``naive`` and ``gemm`` are always included as references. ``device`` is a
    torch device name (``"cpu"``, ``"cuda:0"``) or an object with
    :class:`BenchDevice`'s methods (``npu-rft bench-kernels`` passes
    ``npu_rft.device.get_device(...)``)."""
    dev = BenchDevice(device) if isinstance(device, str) else device
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    impls = ["naive", "gemm"] + [i for i in impls if i not in ("naive", "gemm")]
    cases = [
        Case(n, h, v, mode, impl, dtype, ent, str(dev.torch_device))
        for (n, h, v) in shapes
        for mode in modes
        for ent in entropy
        for impl in impls
        if not (impl == "liger" and ent)  # Liger's fused CE returns no entropy
    ]
    results = []
    for group in _group_by_setting(cases):
        results.extend(_time_group(group, dev, repeats, profile_dir, log))
    if memory:
        for r in results:
            log(f"memory: {r.case.name}")
            mem = _memory_in_subprocess(r.case)
            r.peak_mib, r.fwd_peak_mib = mem["peak"] / MIB, mem["fwd_peak"] / MIB
    _add_ratios(results)
    return results


def _group_by_setting(cases: List[Case]) -> List[List[Case]]:
    """Cases that differ only in the implementation, in order: interleaved together."""
    groups: Dict[tuple, List[Case]] = {}
    for c in cases:
        groups.setdefault((c.n, c.h, c.v, c.mode, c.dtype, c.entropy), []).append(c)
    return list(groups.values())


def _time_group(group: List[Case], dev, repeats: int, profile_dir: Optional[str], log) -> List[Result]:
    inputs = make_inputs(group[0])
    steps = [make_step(c, inputs) for c in group]
    for case, (forward, forward_backward) in zip(group, steps):  # warm-up (and Triton compilation)
        log(f"warm-up: {case.name}")
        forward()
        forward_backward()
    fwd: List[List[float]] = [[] for _ in group]
    fwd_bwd: List[List[float]] = [[] for _ in group]
    for rep in range(repeats):
        for i, (forward, forward_backward) in enumerate(steps):
            fwd[i].append(_timed(forward, dev))
            fwd_bwd[i].append(_timed(forward_backward, dev))
        log(f"repeat {rep + 1}/{repeats}: {group[0].name.rsplit(' ', 1)[0]}")
    if profile_dir is not None:
        for case, (_, forward_backward) in zip(group, steps):
            path = f"{profile_dir}/{case.name.replace(' ', '_').replace(',', '_').replace('=', '')}"
            with dev.profiler(path, wait=0, warmup=0, active=1) as prof:
                forward_backward()
                prof.step()
    results = []
    for case, f, fb in zip(group, fwd, fwd_bwd):
        median = statistics.median(fb)
        flops = 2.0 * case.n * case.h * case.v * case.gemms()
        results.append(
            Result(case, statistics.median(f) * 1e3, median * 1e3, flops / median / 1e9, fwd_times_ms=[x * 1e3 for x in f],
                   fwd_bwd_times_ms=[x * 1e3 for x in fb])
        )
    return results


def _timed(fn: Callable[[], None], dev) -> float:
    dev.synchronize()
    start = time.perf_counter()
    fn()
    dev.synchronize()
    return time.perf_counter() - start


def _add_ratios(results: List[Result]) -> None:
    by_key = {(r.case.n, r.case.h, r.case.v, r.case.mode, r.case.dtype, r.case.entropy, r.case.impl): r for r in results}
    for r in results:
        key = (r.case.n, r.case.h, r.case.v, r.case.mode, r.case.dtype, r.case.entropy)
        naive, gemm = by_key[key + ("naive",)], by_key[key + ("gemm",)]
        r.vs_naive_time = r.fwd_bwd_ms / naive.fwd_bwd_ms
        r.vs_gemm_time = r.fwd_bwd_ms / gemm.fwd_bwd_ms
        if r.peak_mib is not None and naive.peak_mib:
            r.vs_naive_mem = r.peak_mib / naive.peak_mib


def format_table(results: List[Result]) -> str:
    """A fixed-width table of the results."""
    head = (
        f"{'case':<44} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x naive':>8} {'x gemm':>7} "
        f"{'GFLOP/s':>8} {'peak MiB':>9} {'x naive':>8} {'fwd MiB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        opt = lambda x, fmt: format(x, fmt) if x is not None else "-"  # noqa: E731
        lines.append(
            f"{r.case.name:<44} {r.fwd_ms:>9.1f} {r.fwd_bwd_ms:>11.1f} {opt(r.vs_naive_time, '.2f'):>8} "
            f"{opt(r.vs_gemm_time, '.2f'):>7} {r.gflops:>8.1f} {opt(r.peak_mib, '.1f'):>9} "
            f"{opt(r.vs_naive_mem, '.3f'):>8} {opt(r.fwd_peak_mib, '.1f'):>8}"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # the fresh process of one memory measurement
    print(json.dumps(measure_memory(Case(**json.loads(sys.argv[1])))))
