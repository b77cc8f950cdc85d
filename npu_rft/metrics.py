"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard, the console.

Keys are ``group/name`` (``reward/mean``, ``timing_s/rollout``, ``eval/top1``).
Each ``metrics.jsonl`` line is ``{"step": N, key: value, ...}`` for the step
that just completed (N counts completed steps, from 1). ``samples.jsonl`` holds
the sample completions logged every ``run.log_samples_every`` steps.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
# Shown on the progress bar (and the console line), in this order.
CONSOLE_KEYS = (("reward", "reward/mean"), ("loss", "loss"), ("kl", "kl/mean"), ("s/step", "timing_s/step"))


class StageTimer:
    """Accumulates wall time per named stage: ``with timer("rollout"): ...``."""

    def __init__(self, synchronize=None) -> None:
        self.seconds: Dict[str, float] = {}
        self._synchronize = synchronize or (lambda: None)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._synchronize()
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"stage/{stage}"):  # names the stage in a torch.profiler trace
                yield
        finally:
            self._synchronize()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def metrics(self) -> Dict[str, float]:
        return {f"timing_s/{k}": v for k, v in self.seconds.items()}


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep only the records of steps <= ``max_step`` (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= max_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class MetricsWriter:
    """JSONL + TensorBoard (+ a progress bar) for rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool, progress_bar: bool) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._bar = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")
        self._metrics = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._samples = open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step":
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        shown = {label: metrics[key] for label, key in CONSOLE_KEYS if key in metrics}
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            logger.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def log_samples(self, step: int, rows: List[Dict[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        for row in rows:
            self._samples.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
        self._samples.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        for handle in (self._metrics, self._samples):
            handle.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Optional[BaseException]) -> None:
        self.close()
