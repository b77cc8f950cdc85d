"""``npu-rft doctor --full``: an acceptance suite that runs on the device.

It lives in the package, not under ``tests/``, so that whoever installed
npu-rft with pip can check a machine with one command. ``run_acceptance()``
runs these checks on the selected device (``auto|npu|cuda|cpu``) and returns an
:class:`AcceptanceReport`: one :class:`Result` per line, each ``verified``,
``failed`` or ``skipped`` with what was checked or why not.

- **kernels**: ``fused_logprob`` (log-probs, entropy, gradients in the hidden
  states and a trainable or frozen head), ``fused_linear_grpo_loss`` and
  ``fused_linear_dpo_loss`` on every backend ``available_backends`` lists for
  the device, in fp32 and bf16, against an fp64 evaluation of the naive
  formula (see :data:`FP32_RTOL` and :data:`LOW_PRECISION_SLACK` for the
  tolerances).
- **fused ops**: torch_npu's RMSNorm, rotary and SwiGLU operators against
  the eager HF modules, forward and gradients, in bf16 (NPU only).
- **GRPO**: a 20-step run of a tiny model built here (nothing is downloaded)
  on a learnable reward (:func:`digit_fraction`): every loss finite, the
  reward of the last steps above that of the first ones.
- **DPO**: three iterations of iterative DPO on the same task: finite
  losses, the loss at ``log 2`` where each iteration starts (policy =
  reference) and below it at its end, the reward rising.
- **checkpoint/resume**: a run resumed from its step-2 checkpoint ends with
  the parameters of the uninterrupted run.
- **2 ranks**: where the device type has two devices, two processes (one per
  device, the device's collective backend) take the same gradient as one
  process on the whole batch.
- **throughput**: rollout and train-step tokens per second of the GRPO run.

Each check is independent: an exception fails its line (with the exception)
and the suite goes on. On a 2-core CPU the suite takes about a minute.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

STATUSES = ("verified", "failed", "skipped")

# ----------------------------------------------------------------- tolerances
#
# Every error is a relative L2 error, ||x - ref|| / ||ref||, against an fp64
# evaluation of the naive formula on the CPU (the "oracle").
#
# fp32: every backend (naive included) within FP32_RTOL of the oracle. On
# CPU the observed errors are ~1e-7; 1e-4 leaves room for an accelerator's
# fp32 exp/log while still catching a wrong tile merge or a wrong gradient
# (errors of 1e-2 and more).
FP32_RTOL = 1e-4
# bf16/fp16: rounding dominates, so each backend is held to its own device's
# naive backend in the same dtype: its error may be at most this multiple of
# naive's (plus LOW_PRECISION_FLOOR, so that an exactly-rounded naive result
# does not demand perfection). Naive itself must be within NAIVE_LOW_PRECISION_RTOL
# of the oracle: a sanity bound, not a precision claim. Observed on CPU in bf16:
# 2e-3 to 6e-3 for log-probs, entropies and gradients, 2.4e-2 for the GRPO
# loss, a sum of terms of both signs whose cancellation magnifies the relative error.
LOW_PRECISION_SLACK = 2.0
LOW_PRECISION_FLOOR = 1e-4
NAIVE_LOW_PRECISION_RTOL = 1e-1
# The fused NPU operators against the eager HF modules, both in bf16 and both
# measured against the eager module in fp32 on the same device.
FUSED_OPS_SLACK = 2.0
FUSED_OPS_FLOOR = 2e-3

IGNORE_INDEX = -100


# ----------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    """One line of the report."""

    name: str
    status: str            # verified | failed | skipped
    detail: str            # what was verified, what failed, or why it was skipped
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"result {self.name!r}: status {self.status!r} is not one of {STATUSES}")
        if not self.detail.strip():
            raise ValueError(f"result {self.name!r}: a {self.status} line needs a detail (what, or why not)")


@dataclass
class AcceptanceReport:
    device: Dict[str, Any]
    results: List[Result] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True unless some line failed."""
        return all(r.status != "failed" for r in self.results)

    def counts(self) -> Dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in STATUSES}

    def to_dict(self) -> Dict[str, Any]:
        return {"ok": self.ok, "device": self.device, "wall_s": round(self.wall_s, 2), "counts": self.counts(),
                "results": [asdict(r) for r in self.results]}

    def format_table(self) -> str:
        width = max([len(r.name) for r in self.results] + [5])
        device = self.device
        lines = [f"npu-rft acceptance on {device.get('type')} ({device.get('name')}), torch {device.get('torch')}",
                 f"{'check':<{width}}  {'status':<8}  {'time':>6}  detail"]
        for r in self.results:
            lines.append(f"{r.name:<{width}}  {r.status:<8}  {r.seconds:>5.1f}s  {r.detail}")
        counts = self.counts()
        lines.append(f"{counts['verified']} verified, {counts['failed']} failed, {counts['skipped']} skipped "
                     f"in {self.wall_s:.1f} s")
        return "\n".join(lines)


class CheckFailed(AssertionError):
    """A check ran and its numbers are wrong; the message says which and by how much."""


class Skip(Exception):
    """A check cannot run here; the message says why."""


# ----------------------------------------------------------------- the toy task


def digit_fraction(completion: str, example: Any) -> float:
    """A learnable reward for a random tiny model: the fraction of the
    completion's characters that are digits (0 for an empty completion).
    Used as the grader ``npu_rft.acceptance:digit_fraction``."""
    if not completion:
        return 0.0
    return sum(ch.isdigit() for ch in completion) / len(completion)


# The tiny model's tokenizer is trained on this text; single digits are tokens
# of their own (the byte alphabet), so a completion of digits is reachable.
_CORPUS = (
    "the quick brown fox jumps over the lazy dog 0123456789",
    "count 1 2 3 4 5 6 7 8 9 10 11 12 and write the number 42",
    "a case with fever and cough; answer with one word or a number",
    "{\"answer\": 7} [\"flu\", \"cold\"] 3.14 2026",
)
_NAMES = ("fever", "cough", "flu", "cold", "rash")


@dataclass(frozen=True)
class Sizes:
    """What the suite runs. With the defaults both runs learned for every seed
    0-4 on the CPU (seed = the tiny model's initialisation and the run's seed):
    the GRPO reward of steps 17-20 exceeded that of steps 1-4 by 0.90 to 0.97,
    DPO's third-iteration reward its first's by 0.10 to 0.33."""

    seed: int = 0
    hidden_size: int = 32
    layers: int = 2
    grpo_steps: int = 20
    grpo_prompts: int = 2
    grpo_samples: int = 8
    grpo_lr: float = 2e-2
    max_new_tokens: int = 8
    rise_window: int = 4          # mean reward of the first and of the last this-many GRPO steps
    min_rise: float = 0.15        # the last window's mean must exceed the first's by this much
    dpo_iterations: int = 3
    dpo_prompts: int = 4          # 2 gave too few pairs: the reward fell at one iteration for seed 1
    dpo_lr: float = 3e-2
    dpo_min_rise: float = 0.05    # the last iteration's reward must exceed the first's by this much
    resume_steps: int = 4
    warmup_steps: int = 2         # GRPO steps left out of the throughput figures


def build_tiny_model(path: Path, sizes: Sizes) -> Path:
    """A random tiny Qwen2 chat model and its locally trained tokenizer, saved to ``path``."""
    from npu_rft.quickstart.tiny_model import TinyModelSpec, build_model, build_tokenizer

    spec = TinyModelSpec(bpe_vocab_size=320, hidden_size=sizes.hidden_size, intermediate_size=2 * sizes.hidden_size,
                         num_hidden_layers=sizes.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, seed=sizes.seed)
    tokenizer = build_tokenizer(_CORPUS, list(_NAMES), spec.bpe_vocab_size)
    model = build_model(tokenizer, spec)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


def write_train_rows(path: Path, n: int) -> Path:
    rows = [{"system": "Answer briefly.", "context": f"case {i}: a patient with {_NAMES[i % len(_NAMES)]}",
             "target": "0", "meta": {"id": f"case-{i}"}} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train_config(model_dir: Path, train: Path, out: Path, device: str, sizes: Sizes, progress_bar: bool = False,
                 **sections: Any):
    """A ``TrainConfig`` for the suite's runs: GRPO, full fine-tuning, the digit
    reward; ``sections`` replace whole sections (None removes one)."""
    from npu_rft.config import TrainConfig
    from npu_rft.config_base import from_dict

    cfg: Dict[str, Any] = {
        "run": {"output_dir": str(out), "seed": sizes.seed, "device": device, "progress_bar": progress_bar,
                "tensorboard": False, "log_samples_every": 0},
        "model": {"name_or_path": str(model_dir), "finetune": "full"},
        "data": {"train": str(train), "max_prompt_length": 128},
        "rollout": {"num_samples": sizes.grpo_samples, "max_new_tokens": sizes.max_new_tokens, "temperature": 1.0},
        "graders": [{"name": "npu_rft.acceptance:digit_fraction"}],
        "algorithm": "grpo",
        "grpo": {"beta": 0.0},
        "optim": {"lr": sizes.grpo_lr},
        "schedule": {"steps": sizes.grpo_steps},
        "batch": {"prompts_per_step": sizes.grpo_prompts, "micro_batch_size": 16},
    }
    cfg.update(sections)
    return from_dict(TrainConfig, {k: v for k, v in cfg.items() if v is not None})


def read_records(run_dir: Path) -> List[Dict[str, Any]]:
    from npu_rft.metrics import METRICS_FILE

    return [json.loads(line) for line in (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------- judging runs (pure, tested on hand-made records)


def _finite_losses(records: Sequence[Mapping[str, Any]], expected_steps: int) -> List[float]:
    if len(records) != expected_steps:
        raise CheckFailed(f"{len(records)} metric records, expected {expected_steps}")
    losses = [float(r["loss"]) for r in records]
    bad = [(r["step"], loss) for r, loss in zip(records, losses) if not math.isfinite(loss)]
    skipped = [r["step"] for r in records if r.get("train/skipped")]
    if bad or skipped:
        raise CheckFailed(f"non-finite losses at steps {bad or skipped}")
    return losses


def judge_grpo(records: Sequence[Mapping[str, Any]], sizes: Sizes) -> str:
    """Finite losses, and the mean reward of the last ``rise_window`` steps at
    least ``min_rise`` above that of the first ones. Returns the detail line."""
    _finite_losses(records, sizes.grpo_steps)
    rewards = [float(r["reward/mean"]) for r in records]
    w = sizes.rise_window
    first, last = sum(rewards[:w]) / w, sum(rewards[-w:]) / w
    shown = f"reward {first:.3f} (steps 1-{w}) -> {last:.3f} (steps {len(rewards) - w + 1}-{len(rewards)})"
    if not last >= first + sizes.min_rise:
        raise CheckFailed(f"the reward did not rise by {sizes.min_rise}: {shown}; per step "
                          f"{[round(x, 3) for x in rewards]}")
    return f"{len(records)} steps, losses finite, {shown}"


def judge_dpo(records: Sequence[Mapping[str, Any]], sizes: Sizes, steps_per_iteration: int) -> str:
    """Finite losses; each iteration's first loss is log 2 (the policy is its
    reference) and its last below; the reward of the last iteration's rollout
    at least ``dpo_min_rise`` above the first's."""
    steps = sizes.dpo_iterations * steps_per_iteration
    losses = _finite_losses(records, steps)
    starts = [r for r in records if "reward/mean" in r]
    if [r["step"] for r in starts] != list(range(1, steps + 1, steps_per_iteration)):
        raise CheckFailed(f"rollouts at steps {[r['step'] for r in starts]}, expected one per iteration")
    for i in range(sizes.dpo_iterations):
        first, last = losses[i * steps_per_iteration], losses[(i + 1) * steps_per_iteration - 1]
        if abs(first - math.log(2)) > 1e-2:
            raise CheckFailed(f"iteration {i + 1} starts at loss {first:.4f}, not log 2 = 0.6931 "
                              f"(policy and reference should agree there)")
        if not last < math.log(2) - 1e-2:
            raise CheckFailed(f"iteration {i + 1} ends at loss {last:.4f}: its pairs were not fitted")
    rewards = [float(r["reward/mean"]) for r in starts]
    if not rewards[-1] >= rewards[0] + sizes.dpo_min_rise:
        raise CheckFailed(f"the reward did not rise by {sizes.dpo_min_rise} from the first iteration to the last: "
                          f"{[round(x, 3) for x in rewards]}")
    return (f"{steps} steps ({sizes.dpo_iterations} iterations), losses finite, log 2 at each iteration's start, "
            f"reward {' -> '.join(f'{x:.3f}' for x in rewards)}")


def throughput(records: Sequence[Mapping[str, Any]], sequences_per_step: int, warmup: int) -> Tuple[float, float, int]:
    """``(rollout tokens/s, train-step tokens/s, steps measured)`` over the steps
    after ``warmup``: completion tokens (``completion/length_mean`` times the
    sequences of a step) per second of ``timing_s/rollout``, and per second of
    ``timing_s/loss + timing_s/update``."""
    measured = list(records[warmup:]) or list(records)
    tokens = sum(float(r["completion/length_mean"]) * sequences_per_step for r in measured)
    rollout_s = sum(float(r["timing_s/rollout"]) for r in measured)
    train_s = sum(float(r["timing_s/loss"]) + float(r["timing_s/update"]) for r in measured)
    if not (tokens > 0 and rollout_s > 0 and train_s > 0):
        raise CheckFailed(f"nothing to measure: {tokens} tokens in {rollout_s} s rollout, {train_s} s training")
    return tokens / rollout_s, tokens / train_s, len(measured)


# ----------------------------------------------------------------- kernels


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    if not math.isfinite(diff):
        return math.inf
    return diff / denom if denom > 0 else diff


def _kernel_inputs(seed: int) -> Dict[str, torch.Tensor]:
    """fp32 CPU inputs: B=3 sequences of T=11 tokens, H=48, V=1001 (odd on purpose),
    a quarter of the targets ignored, fixed cotangents."""
    g = torch.Generator().manual_seed(seed)
    b, t, h, v = 3, 11, 48, 1001
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[torch.rand(b, t, generator=g) < 0.25] = IGNORE_INDEX
    mask = (targets != IGNORE_INDEX).long()
    noise = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {
        "hidden": noise(b, t, h), "weight": noise(v, h) * 0.5, "targets": targets, "mask": mask,
        "g_logp": noise(b, t), "g_entropy": noise(b, t),
        "old_shift": noise(b, t) * 0.1, "ref_shift": noise(b, t) * 0.1, "advantages": noise(b),
        "hidden_rejected": noise(b, t, h), "targets_rejected": torch.where(torch.rand(b, t, generator=g) < 0.25,
                                                                          IGNORE_INDEX, torch.randint(0, v, (b, t), generator=g)),
        "ref_chosen": noise(b) - 60.0, "ref_rejected": noise(b) - 60.0,
    }


def _oracle_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """The naive formula in fp64: log p(target) and entropy, 0 at ignored targets."""
    z = (hidden.double() @ weight.double().t()) / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    valid = targets != IGNORE_INDEX
    logp = logprobs.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(logprobs.exp() * logprobs).sum(-1) * valid
    return logp, entropy


KernelRun = Callable[..., Dict[str, torch.Tensor]]


def _run_kernel_cases(inputs: Mapping[str, torch.Tensor], *, backend: Optional[str], dtype: torch.dtype,
                      device: torch.device, tile_bytes: Optional[int]) -> Dict[str, torch.Tensor]:
    """Every case's outputs and gradients (on the CPU) with ``backend`` in
    ``dtype`` on ``device``; ``backend=None`` is the fp64 oracle on the CPU."""
    import npu_rft_kernels as K

    oracle = backend is None
    dev = torch.device("cpu") if oracle else device
    dt = torch.float64 if oracle else dtype
    out: Dict[str, torch.Tensor] = {}

    def leaf(name: str, grad: bool, key: Optional[str] = None) -> torch.Tensor:
        return inputs[key or name].detach().to(dev, dt).clone().requires_grad_(grad)

    targets, mask = inputs["targets"].to(dev), inputs["mask"].to(dev)
    kernel_kw = dict(backend=backend, tile_bytes=tile_bytes) if not oracle else {}
    for frozen in (False, True):
        tag = "frozen" if frozen else "trainable"
        # fused_logprob with entropy: logp, entropy and both gradients
        h, w = leaf("hidden", True), leaf("weight", not frozen)
        if oracle:
            logp, entropy = _oracle_logprob(h, w, targets)
        else:
            logp, entropy = K.fused_logprob(h, w, targets, return_entropy=True, **kernel_kw)
        loss = (logp * inputs["g_logp"].to(dev, logp.dtype)).sum() + (entropy * inputs["g_entropy"].to(dev, logp.dtype)).sum()
        loss.backward()
        out[f"logprob/{tag}/logp"], out[f"logprob/{tag}/entropy"] = logp.detach().cpu(), entropy.detach().cpu()
        out[f"logprob/{tag}/dh"] = h.grad.cpu()
        if not frozen:
            out[f"logprob/{tag}/dW"] = w.grad.cpu()
        # fused_logprob without entropy (the NPU backend's fused-op path)
        h, w = leaf("hidden", True), leaf("weight", not frozen)
        logp = _oracle_logprob(h, w, targets)[0] if oracle else K.fused_logprob(h, w, targets, **kernel_kw)
        (logp * inputs["g_logp"].to(dev, logp.dtype)).sum().backward()
        out[f"logprob-only/{tag}/logp"], out[f"logprob-only/{tag}/dh"] = logp.detach().cpu(), h.grad.cpu()
        if not frozen:
            out[f"logprob-only/{tag}/dW"] = w.grad.cpu()
        if frozen:  # no gradient at all: the old/reference log-prob passes
            with torch.no_grad():
                h, w = leaf("hidden", False), leaf("weight", False)
                logp = _oracle_logprob(h, w, targets)[0] if oracle else K.fused_logprob(h, w, targets, **kernel_kw)
            out["logprob-nograd/logp"] = logp.cpu()
        # GRPO loss (old and reference log-probs near the current ones, k3 KL)
        h, w = leaf("hidden", True), leaf("weight", not frozen)
        reference = _oracle_logprob(inputs["hidden"], inputs["weight"], inputs["targets"])[0].float()
        old = (reference + inputs["old_shift"]).to(dev)
        ref = (reference + inputs["ref_shift"]).to(dev)
        adv = inputs["advantages"].to(dev)
        grpo_kw = dict(ref_logp=ref, beta=0.04)
        if oracle:
            logp = _oracle_logprob(h, w, targets.masked_fill(mask == 0, IGNORE_INDEX))[0]
            loss, _ = K.grpo_loss(logp, old.double(), adv.double(), mask, **{**grpo_kw, "ref_logp": ref.double()})
        else:
            loss, _ = K.fused_linear_grpo_loss(h, w, targets, old, adv, mask, backend=backend, **grpo_kw)
        loss.backward()
        out[f"grpo/{tag}/loss"], out[f"grpo/{tag}/dh"] = loss.detach().cpu().reshape(1), h.grad.cpu()
        if not frozen:
            out[f"grpo/{tag}/dW"] = w.grad.cpu()
        # DPO loss (chosen and rejected in one call)
        hc, hr, w = leaf("hidden", True), leaf("hidden_rejected", True), leaf("weight", not frozen)
        tc, tr = targets, inputs["targets_rejected"].to(dev)
        rc, rr = inputs["ref_chosen"].to(dev), inputs["ref_rejected"].to(dev)
        if oracle:
            pc, pr = _oracle_logprob(hc, w, tc)[0].sum(-1), _oracle_logprob(hr, w, tr)[0].sum(-1)
            loss, _ = K.dpo_loss(pc, pr, rc.double(), rr.double(), beta=0.1)
        else:
            loss, _ = K.fused_linear_dpo_loss(hc, hr, w, tc, tr, rc, rr, beta=0.1, backend=backend)
        loss.backward()
        out[f"dpo/{tag}/loss"], out[f"dpo/{tag}/dh"] = loss.detach().cpu().reshape(1), hc.grad.cpu()
        out[f"dpo/{tag}/dh_rejected"] = hr.grad.cpu()
        if not frozen:
            out[f"dpo/{tag}/dW"] = w.grad.cpu()
    return out


def _errors(got: Mapping[str, torch.Tensor], oracle: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    missing = sorted(set(oracle) - set(got))
    if missing:
        raise CheckFailed(f"no output for {missing}")
    return {k: _rel(got[k], oracle[k]) for k in oracle}


def _worst(errors: Mapping[str, float]) -> Tuple[str, float]:
    key = max(errors, key=lambda k: errors[k])
    return key, errors[key]


def kernel_dtypes(device: Any) -> List[Tuple[str, Optional[torch.dtype], str]]:
    """``(name, dtype or None, why skipped)``: fp32 and bf16; on an accelerator
    without bf16, fp16 instead (its compute dtype)."""
    dtypes: List[Tuple[str, Optional[torch.dtype], str]] = [("fp32", torch.float32, "")]
    if device.type != "cpu" and not device.supports_bf16:
        dtypes.append(("bf16", None, f"{device.name} has no bf16 (training computes in fp16 there)"))
        dtypes.append(("fp16", torch.float16, ""))
    else:
        dtypes.append(("bf16", torch.bfloat16, ""))
    return dtypes


SMALL_TILE_BYTES = 32 * 1024


def _tile_budgets(backend: str) -> Tuple[Optional[int], ...]:
    """The tile budgets a backend is checked with: naive has no tiles; the
    triton backend also has its streaming mode (``kernels.tile_bytes: 0``)."""
    if backend == "naive":
        return (None,)
    if backend == "triton":
        return (None, SMALL_TILE_BYTES, 0)
    return (None, SMALL_TILE_BYTES)


def check_kernels(device: Any, seed: int = 0, backends: Optional[Sequence[str]] = None,
                  dtypes: Optional[Sequence[str]] = None) -> List[Result]:
    """One line per (backend, dtype): every kernel case against the fp64 oracle
    (fp32: within ``FP32_RTOL``; bf16/fp16: within ``LOW_PRECISION_SLACK`` times
    the naive backend's error on this device). Each backend runs with its
    default tile budget and with a small one (``SMALL_TILE_BYTES``: several
    tiles); triton also in its streaming mode. ``backends``, ``dtypes`` (``fp32``, ``bf16``, ``fp16``): a subset
    (default: every backend available on the device; fp32 and bf16)."""
    import npu_rft_kernels as K

    inputs = _kernel_inputs(seed)
    oracle = _run_kernel_cases(inputs, backend=None, dtype=torch.float64, device=torch.device("cpu"), tile_bytes=None)
    probe = torch.empty(0, device=device.torch_device)
    names = list(backends) if backends is not None else K.available_backends(probe)
    if "naive" in names:  # the reference for low precision: first
        names = ["naive"] + [n for n in names if n != "naive"]
    results: List[Result] = []
    for dtype_name, dtype, why in kernel_dtypes(device):
        if dtypes is not None and dtype_name not in dtypes:
            continue
        if dtype is None:
            results.append(Result(f"kernels {dtype_name}", "skipped", why))
            continue
        naive_errors: Optional[Dict[str, float]] = None
        for backend in names:
            name = f"kernels {backend} {dtype_name}"
            start = time.perf_counter()
            try:
                worst: Dict[str, float] = {}
                for tile_bytes in _tile_budgets(backend):
                    got = _run_kernel_cases(inputs, backend=backend, dtype=dtype, device=device.torch_device,
                                            tile_bytes=tile_bytes)
                    for key, err in _errors(got, oracle).items():
                        worst[key] = max(worst.get(key, 0.0), err)
                if backend == "naive":
                    naive_errors = worst
                results.append(_judge_kernel(name, dtype, backend, worst, naive_errors, time.perf_counter() - start))
            except Exception as exc:  # a crash of the backend fails its line; the suite goes on
                results.append(Result(name, "failed", _exc_line(exc), time.perf_counter() - start))
    return results


def _judge_kernel(name: str, dtype: torch.dtype, backend: str, errors: Mapping[str, float],
                  naive_errors: Optional[Mapping[str, float]], seconds: float) -> Result:
    cases = "fused_logprob (logp, entropy, dh, dW; trainable and frozen head), GRPO and DPO losses with gradients"
    if dtype == torch.float32:
        bad = {k: e for k, e in errors.items() if not e <= FP32_RTOL}
        key, err = _worst(errors)
        if bad:
            k, e = _worst(bad)
            return Result(name, "failed", f"{len(bad)} output(s) off the fp64 oracle by more than {FP32_RTOL:.0e}; "
                                          f"worst {k}: {e:.2e}", seconds)
        return Result(name, "verified", f"{cases}: max rel. error {err:.1e} ({key}) <= {FP32_RTOL:.0e} vs fp64",
                      seconds)
    if backend == "naive" or naive_errors is None:
        bound = {k: NAIVE_LOW_PRECISION_RTOL for k in errors}
        rule = f"<= {NAIVE_LOW_PRECISION_RTOL:.0e} vs fp64"
    else:
        bound = {k: LOW_PRECISION_SLACK * naive_errors[k] + LOW_PRECISION_FLOOR for k in errors}
        rule = f"<= {LOW_PRECISION_SLACK:g}x naive's + {LOW_PRECISION_FLOOR:.0e}"
    bad = {k: e for k, e in errors.items() if not e <= bound[k]}
    if bad:
        k = max(bad, key=lambda x: bad[x] / bound[x])
        return Result(name, "failed", f"{len(bad)} output(s) outside the bound ({rule}); worst {k}: "
                                      f"{bad[k]:.2e} > {bound[k]:.2e}", seconds)
    k = max(errors, key=lambda x: errors[x] / bound[x])
    return Result(name, "verified", f"{cases}: every rel. error {rule}; closest {k}: {errors[k]:.1e} "
                                    f"(bound {bound[k]:.1e})", seconds)


# ----------------------------------------------------------------- fused ops (NPU)


FUSED_OP_NAMES = ("rms_norm", "rotary", "swiglu")


def fused_ops_skip_reason(device: Any) -> Optional[str]:
    """Why the fused ops cannot be checked on ``device`` (the verdict
    ``model.npu_fused_ops`` uses, from the chip table), or None."""
    from npu_rft.ascend.fused_ops import fused_ops_problem

    why = fused_ops_problem(device)
    return None if why is None else f"torch_npu fused operators: {why}"


def check_fused_ops(device: Any, ops: Any = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> List[Result]:
    """The fused RMSNorm, rotary and SwiGLU replacements against HF's Qwen2
    modules, forward and gradients, in ``dtype`` on ``device``. ``ops`` defaults
    to torch_npu's (NPU only; elsewhere the lines are skipped with the reason);
    tests pass a stand-in to run the comparison on CPU."""
    if ops is None:
        why = fused_ops_skip_reason(device)
        if why is not None:
            return [Result(f"fused op {name}", "skipped", why) for name in FUSED_OP_NAMES]
    from npu_rft.ascend import fused_ops

    if ops is None:
        ops = fused_ops.npu_ops(device)  # torch_npu's operators, through npu_rft_kernels.torch_npu_api
    from transformers import Qwen2Config
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    config = Qwen2Config(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=64, max_position_embeddings=256, rms_norm_eps=1e-6, hidden_act="silu")
    dev = device.torch_device
    g = torch.Generator().manual_seed(seed)
    batch, seq, heads, head_dim = 2, 13, config.num_attention_heads, config.hidden_size // config.num_attention_heads

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        norm = qwen2.Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight.data = 1.0 + 0.1 * torch.randn(config.hidden_size, generator=g)
        mlp = qwen2.Qwen2MLP(config)
        rope = qwen2.Qwen2RotaryEmbedding(config)
    x = torch.randn(batch, seq, config.hidden_size, generator=g)
    q = torch.randn(batch, heads, seq, head_dim, generator=g)
    k = torch.randn(batch, config.num_key_value_heads, seq, head_dim, generator=g)
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    cos, sin = rope(x, position_ids)

    def run(module: Optional[torch.nn.Module], fn: Callable, tensors: Sequence[torch.Tensor], n_grad: int,
            dt: torch.dtype):
        """Outputs and gradients (of a fixed random cotangent) of fn(module copy, *tensors) in dt on
        the device; the first ``n_grad`` tensors (and the module's weights) require grad."""
        import copy

        m = None if module is None else copy.deepcopy(module).to(dev, dt)
        leaves = [t.detach().to(dev, dt).requires_grad_(i < n_grad) for i, t in enumerate(tensors)]
        outs = fn(m, *leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator().manual_seed(seed + 1)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(dev)).sum() for o in outs)
        loss.backward()
        found = {f"out{i}": o.detach().cpu() for i, o in enumerate(outs)}
        found.update({f"d_in{i}": t.grad.cpu() for i, t in enumerate(leaves[:n_grad])})
        if m is not None:
            found.update({f"d_{n}": p.grad.cpu() for n, p in m.named_parameters()})
        return found

    cases = {
        "rms_norm": (norm, lambda m, t: m(t), lambda m, t: fused_ops.rms_norm_forward(m, t, rms_norm=ops.rms_norm), [x], 1),
        "rotary": (None, lambda m, a, b, c, s: qwen2.apply_rotary_pos_emb(a, b, c, s),
                   lambda m, a, b, c, s: fused_ops.apply_rotary_pos_emb_fused(a, b, c, s, rotary_mul=ops.rotary_mul),
                   [q, k, cos, sin], 2),  # cos and sin need no gradient (as in training)
        "swiglu": (mlp, lambda m, t: m(t), lambda m, t: fused_ops.swiglu_mlp_forward(m, t, swiglu=ops.swiglu), [x], 1),
    }
    dtype_name = str(dtype).replace("torch.", "")
    results = []
    for name in FUSED_OP_NAMES:
        module, eager, fused, tensors, n_grad = cases[name]
        start = time.perf_counter()
        line = f"fused op {name}"
        try:
            reference = run(module, eager, tensors, n_grad, torch.float32)
            eager_err = _errors(run(module, eager, tensors, n_grad, dtype), reference)
            fused_err = _errors(run(module, fused, tensors, n_grad, dtype), reference)
            bound = {k: FUSED_OPS_SLACK * eager_err[k] + FUSED_OPS_FLOOR for k in reference}
            bad = {k: e for k, e in fused_err.items() if not e <= bound[k]}
            if bad:
                k = max(bad, key=lambda x: bad[x] / bound[x])
                results.append(Result(line, "failed", f"{dtype_name}: {k} of the fused op is off the fp32 eager "
                                                      f"module by {bad[k]:.2e} > {bound[k]:.2e} "
                                                      f"({FUSED_OPS_SLACK:g}x eager {dtype_name}'s + {FUSED_OPS_FLOOR:g})",
                                      time.perf_counter() - start))
                continue
            k = max(fused_err, key=lambda x: fused_err[x] / bound[x])
            results.append(Result(line, "verified", f"{dtype_name}, output and gradients ({len(reference)} tensors) "
                                                    f"within {FUSED_OPS_SLACK:g}x eager {dtype_name}'s error + "
                                                    f"{FUSED_OPS_FLOOR:g}; closest {k}: {fused_err[k]:.1e}",
                                  time.perf_counter() - start))
        except Exception as exc:
            results.append(Result(line, "failed", _exc_line(exc), time.perf_counter() - start))
    return results


# ----------------------------------------------------------------- training runs


def check_grpo(device: Any, model_dir: Path, train: Path, work: Path, sizes: Sizes,
               progress_bar: bool = False) -> Tuple[Result, Optional[List[Dict[str, Any]]]]:
    from npu_rft.trainer import fit

    start = time.perf_counter()
    records = None
    try:
        fit(train_config(model_dir, train, work / "grpo", device.type, sizes, progress_bar))
        records = read_records(work / "grpo")
        return Result("grpo run", "verified", judge_grpo(records, sizes), time.perf_counter() - start), records
    except Exception as exc:
        return Result("grpo run", "failed", _exc_line(exc), time.perf_counter() - start), records


def check_dpo(device: Any, model_dir: Path, train: Path, work: Path, sizes: Sizes, progress_bar: bool = False) -> Result:
    from npu_rft.trainer import fit

    start = time.perf_counter()
    batches, epochs = 2, 2
    try:
        cfg = train_config(model_dir, train, work / "dpo", device.type, sizes, progress_bar, algorithm="dpo", grpo=None,
                           dpo={"beta": 0.1, "epochs": epochs, "batches_per_iteration": batches},
                           optim={"lr": sizes.dpo_lr},
                           schedule={"steps": sizes.dpo_iterations * batches * epochs},
                           batch={"prompts_per_step": sizes.dpo_prompts, "micro_batch_size": 8})
        fit(cfg)
        detail = judge_dpo(read_records(work / "dpo"), sizes, batches * epochs)
        return Result("dpo run", "verified", detail, time.perf_counter() - start)
    except Exception as exc:
        return Result("dpo run", "failed", _exc_line(exc), time.perf_counter() - start)


def _checkpoint_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found: Dict[str, torch.Tensor] = {}
    for sub in ("adapter", "model"):
        for file in sorted((path / sub).glob("*.safetensors")):
            found.update({f"{sub}/{file.name}/{k}": v for k, v in load_file(str(file)).items()})
    if not found:
        raise CheckFailed(f"no weights in checkpoint {path}")
    return found


def check_resume(device: Any, model_dir: Path, train: Path, work: Path, sizes: Sizes) -> Result:
    """An uninterrupted LoRA run of ``resume_steps`` steps (dropout on, so the
    restored RNG state matters) and a run resumed from its step-2 checkpoint
    must end with the same parameters: bit-identical on CPU; on an accelerator,
    whose kernels need not be bitwise deterministic, within 1e-3 relative."""
    from npu_rft import checkpoint as ckpt
    from npu_rft.trainer import fit

    start = time.perf_counter()
    steps = sizes.resume_steps
    lora = {"name_or_path": str(model_dir), "finetune": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}}
    common = dict(model=lora, rollout={"num_samples": 4, "max_new_tokens": 6}, grpo={"beta": 0.04},
                  schedule={"steps": steps}, batch={"prompts_per_step": 2, "micro_batch_size": 8},
                  checkpoint={"every_steps": 1, "keep_last": steps + 1, "keep_best": False})
    try:
        straight = fit(train_config(model_dir, train, work / "resume-straight", device.type, sizes, **common))
        if straight.step != steps:
            raise CheckFailed(f"the uninterrupted run stopped at step {straight.step} of {steps}")
        at = ckpt.checkpoint_dir(work / "resume-straight", 2)
        resumed = fit(train_config(model_dir, train, work / "resume-resumed", device.type, sizes, **common),
                      resume=str(at))
        steps_logged = [r["step"] for r in read_records(work / "resume-resumed")]
        if resumed.step != steps or steps_logged != list(range(3, steps + 1)):
            raise CheckFailed(f"resumed from step 2, the run logged steps {steps_logged} and ended at {resumed.step}")
        a = _checkpoint_tensors(ckpt.checkpoint_dir(work / "resume-straight", steps))
        b = _checkpoint_tensors(ckpt.checkpoint_dir(work / "resume-resumed", steps))
        if a.keys() != b.keys():
            raise CheckFailed(f"the checkpoints hold different tensors: {sorted(set(a) ^ set(b))[:4]}")
        changed = sum(not torch.equal(a[k], ckpt_b) for k, ckpt_b in b.items())
        if changed == 0:
            detail = f"resumed at step 2 of {steps}: steps 3-{steps} logged, all {len(a)} tensors bit-identical"
        else:
            worst = max(_rel(b[k], a[k]) for k in a)
            if device.type == "cpu" or worst > 1e-3:
                raise CheckFailed(f"{changed} of {len(a)} tensors differ from the uninterrupted run "
                                  f"(max rel. difference {worst:.2e})")
            detail = (f"resumed at step 2 of {steps}: steps 3-{steps} logged; {changed} of {len(a)} tensors differ "
                      f"by at most {worst:.1e} relative (not bitwise deterministic on {device.type})")
        initial = read_records(work / "resume-straight")
        later = read_records(work / "resume-resumed")
        if device.type == "cpu" and [r["loss"] for r in initial[2:]] != [r["loss"] for r in later]:
            raise CheckFailed("the resumed run's losses differ from the uninterrupted run's")
        return Result("checkpoint resume", "verified", detail, time.perf_counter() - start)
    except Exception as exc:
        return Result("checkpoint resume", "failed", _exc_line(exc), time.perf_counter() - start)


def check_throughput(records: Optional[List[Dict[str, Any]]], sizes: Sizes, why_not: str) -> Result:
    if records is None:
        return Result("throughput", "skipped", why_not)
    start = time.perf_counter()
    try:
        rollout, train, measured = throughput(records, sizes.grpo_prompts * sizes.grpo_samples, sizes.warmup_steps)
    except Exception as exc:
        return Result("throughput", "failed", _exc_line(exc), time.perf_counter() - start)
    return Result("throughput", "verified",
                  f"rollout {rollout:,.0f} tokens/s, train step (loss + update) {train:,.0f} tokens/s: completion "
                  f"tokens of GRPO steps {sizes.warmup_steps + 1}-{sizes.warmup_steps + measured} "
                  f"({sizes.grpo_prompts * sizes.grpo_samples} sequences/step, tiny model)")


# ----------------------------------------------------------------- 2 ranks


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_batch(model_dir: str, seed: int, rows: slice):
    """The fixed batch (token ids, targets, mask, advantages) that the ranks split."""
    g = torch.Generator().manual_seed(seed)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[1, 8:] = 0
    mask[3, 5:] = 0
    adv = torch.randn(4, generator=g)
    return ids[rows], mask[rows], adv[rows], int(mask.sum())


def _rank_gradient(model_dir: str, device: Any, seed: int, rows: slice, world_size: int) -> Dict[str, torch.Tensor]:
    """One rank's share of the GRPO loss of the fixed batch (normalised by the
    global token count and scaled by ``world_size``, as the trainer does), its
    DDP-synchronised gradient, on the CPU."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import npu_rft_kernels as K

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device.torch_device)
    ids, mask, adv, total = _rank_batch(model_dir, seed, rows)
    ids, mask, adv = ids.to(device.torch_device), mask.to(device.torch_device), adv.to(device.torch_device)
    forward = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=device.hardware.ddp_device_ids(device))
    hidden = forward(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, :-1]
    weight = model.get_output_embeddings().weight
    loss, _ = K.fused_linear_grpo_loss(hidden, weight, ids[:, 1:], None, adv, mask, normalizer=float(total))
    (loss * world_size).backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["__loss__"] = loss.detach().float().cpu()
    if world_size > 1:
        from npu_rft.distributed import all_reduce_count, all_reduce_sum

        count = all_reduce_count(int(mask.sum()))
        loss_sum = all_reduce_sum(float(loss.detach()))
        grads["__count__"] = torch.tensor(float(count))
        grads["__loss__"] = torch.tensor(float(loss_sum))
        dist.barrier()
    return grads


def _rank_worker(rank: int, device_type: str, model_dir: str, seed: int, out: str) -> None:
    """One rank, in a process of its own started by :func:`two_rank_equivalence`
    with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set."""
    from npu_rft.device import get_device
    from npu_rft.distributed import destroy, init_distributed

    import gc

    device = get_device(device_type, index=0 if device_type == "cpu" else rank)
    init_distributed(device)
    try:
        torch.manual_seed(seed)
        grads = _rank_gradient(model_dir, device, seed, slice(2 * rank, 2 * rank + 2), 2)
        if rank == 0:
            torch.save(grads, out)
    finally:
        gc.collect()  # the DDP wrapper (kept alive by reference cycles) goes before its process group
        destroy()


def two_rank_equivalence(device_type: str, model_dir: Path, work: Path, seed: int = 0,
                         timeout_s: float = 180.0) -> str:
    """Two fresh processes (ranks 0 and 1 on devices 0 and 1, the device's
    collective backend; gloo on the CPU, for tests) each take half of a fixed
    batch; their DDP gradient must be the one-process gradient of the whole
    batch, within 1e-5 relative. Returns the detail line; raises :class:`CheckFailed`."""
    import subprocess

    from npu_rft.device import get_device

    out = work / "rank0_grads.pt"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        # os._exit after a clean return: the results are saved, and skipping the interpreter's
        # teardown avoids a gloo/DDP destructor-order abort seen once at exit under torch 2.10
        code = (f"import os, sys; from npu_rft.acceptance import _rank_worker; "
                f"_rank_worker({rank}, {device_type!r}, {str(model_dir)!r}, {seed}, {str(out)!r}); "
                f"sys.stdout.flush(); sys.stderr.flush(); os._exit(0)")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"the 2 ranks did not finish in {timeout_s:.0f} s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, text) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            tail = " | ".join(line for line in text.strip().splitlines()[-3:])
            raise CheckFailed(f"rank {rank} exited with code {proc.returncode}: {tail}")
    two = torch.load(out, weights_only=True)
    count, loss_sum = int(two.pop("__count__")), float(two.pop("__loss__"))
    device = get_device(device_type, index=0)
    torch.manual_seed(seed)
    one = _rank_gradient(str(model_dir), device, seed, slice(0, 4), 1)
    one_loss = float(one.pop("__loss__"))
    _, mask, _, total = _rank_batch(str(model_dir), seed, slice(0, 4))
    if count != total:
        raise CheckFailed(f"all_reduce_count over 2 ranks gave {count} tokens, expected {total}")
    if not abs(loss_sum - one_loss) <= 1e-5 * max(1.0, abs(one_loss)):
        raise CheckFailed(f"the 2 ranks' losses sum to {loss_sum:.6f}, the 1-process loss is {one_loss:.6f}")
    if one.keys() != two.keys():
        raise CheckFailed(f"different parameters have gradients: {sorted(set(one) ^ set(two))[:4]}")
    errors = {k: _rel(two[k], one[k]) for k in one}
    key, worst = _worst(errors)
    if not worst <= 1e-5:
        raise CheckFailed(f"2-rank DDP gradient differs from the 1-process gradient: {key} by {worst:.2e} (> 1e-5)")
    return (f"2 ranks ({device_type}) x 2 sequences, DDP: gradients of {len(one)} tensors equal the 1-process "
            f"whole-batch gradient within {worst:.1e} (<= 1e-5); all-reduced token count and loss sum "
            f"({loss_sum:.4f}) match")


def check_two_ranks(device: Any, model_dir: Path, work: Path, seed: int = 0) -> Result:
    if device.type == "cpu":
        return Result("2-rank equivalence", "skipped",
                      "needs two accelerators of one type; this run is on the CPU (the gloo path is tested in CI)")
    if device.count < 2:
        return Result("2-rank equivalence", "skipped",
                      f"needs 2 {device.type} devices, {device.count} visible ({device.visible_devices_env})")
    start = time.perf_counter()
    try:
        detail = two_rank_equivalence(device.type, model_dir, work, seed)
        return Result("2-rank equivalence", "verified", detail, time.perf_counter() - start)
    except Exception as exc:
        return Result("2-rank equivalence", "failed", _exc_line(exc), time.perf_counter() - start)


# ----------------------------------------------------------------- the suite


def _exc_line(exc: BaseException) -> str:
    if isinstance(exc, (CheckFailed, Skip)):
        return str(exc)
    where = traceback.extract_tb(exc.__traceback__)
    frame = where[-1] if where else None
    at = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    message = " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    if len(message) > 400:
        message = message[:400] + " ..."
    return f"raised {type(exc).__name__}: {message}{at}"


@contextlib.contextmanager
def _work_dir(path: Optional[Path]) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="npu-rft-acceptance-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe_device(device: Any) -> Dict[str, Any]:
    """The device and software versions, JSON-ready, for the report's header."""
    import importlib.metadata

    def version(dist: str) -> Optional[str]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"type": device.type, "index": device.index, "name": device.name, "count": device.count,
            "compute_dtype": str(device.compute_dtype).replace("torch.", ""), "dist_backend": device.dist_backend,
            "torch": torch.__version__, "torch_npu": version("torch-npu"), "transformers": version("transformers"),
            "cpu_threads": torch.get_num_threads()}


CHECKS = ("kernels", "fused_ops", "grpo", "dpo", "resume", "two_ranks", "throughput")


def run_acceptance(device: str = "auto", *, sizes: Sizes = Sizes(), work_dir: Optional[Path] = None,
                   only: Optional[Sequence[str]] = None, progress: Optional[Callable[[str], None]] = None,
                   progress_bar: bool = False) -> AcceptanceReport:
    """Run the suite on ``device`` (``auto|npu|cuda|cpu``).

    ``only``: a subset of :data:`CHECKS`; ``work_dir``: where the tiny model
    and the runs go (default: a temporary directory, removed afterwards);
    ``progress``: called with one line as each check starts and ends;
    ``progress_bar``: the training runs' console bars.
    """
    from npu_rft.device import get_device

    unknown = sorted(set(only or ()) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown acceptance check(s) {unknown}; choose from {', '.join(CHECKS)}")
    selected = [c for c in CHECKS if only is None or c in only]
    say = progress or (lambda line: None)
    begin = time.perf_counter()
    dev = get_device(device)
    report = AcceptanceReport(device=describe_device(dev))
    with _work_dir(work_dir) as work:
        model_dir = train = None
        if any(c in selected for c in ("grpo", "dpo", "resume", "two_ranks", "throughput")):
            say("building the tiny model (local, nothing downloaded)")
            model_dir = build_tiny_model(work / "tiny-model", sizes)
            train = write_train_rows(work / "train.jsonl", 32)
        grpo_records: Optional[List[Dict[str, Any]]] = None
        grpo_why = "the GRPO run was not selected"
        for i, check in enumerate(selected, 1):
            say(f"[{i}/{len(selected)}] {check} ...")
            t0 = time.perf_counter()
            if check == "kernels":
                lines = check_kernels(dev, sizes.seed)
            elif check == "fused_ops":
                lines = check_fused_ops(dev, seed=sizes.seed)
            elif check == "grpo":
                line, grpo_records = check_grpo(dev, model_dir, train, work, sizes, progress_bar)
                grpo_why = "the GRPO run did not finish" if grpo_records is None else grpo_why
                lines = [line]
            elif check == "dpo":
                lines = [check_dpo(dev, model_dir, train, work, sizes, progress_bar)]
            elif check == "resume":
                lines = [check_resume(dev, model_dir, train, work, sizes)]
            elif check == "two_ranks":
                lines = [check_two_ranks(dev, model_dir, work, sizes.seed)]
            else:
                lines = [check_throughput(grpo_records, sizes, grpo_why)]
            report.results.extend(lines)
            summary = ", ".join(f"{r.name}: {r.status}" for r in lines)
            say(f"[{i}/{len(selected)}] {check} done in {time.perf_counter() - t0:.1f} s ({summary})")
    report.wall_s = time.perf_counter() - begin
    return report
