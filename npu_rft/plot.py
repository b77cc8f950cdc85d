"""Training curves from a run directory's ``metrics.jsonl``, as one PNG.

Each line of ``metrics.jsonl`` is a JSON object with ``step`` and metric keys
named ``group/name``. ``plot_run`` draws one panel per entry of ``PANELS``
(mean reward, loss, KL to the reference, periodic eval Top@1) against the step,
from the records that hold the panel's key; a panel whose key the run never
logged says so instead of drawing. A run whose records hold
``dpo/reference_refresh`` (iterative DPO) gets a dotted vertical line in every
panel where an iteration began and the reference was refreshed. ``plot_arms``
draws several runs (the quickstart's GRPO and iterative-DPO arms) on one figure.
Rendering uses matplotlib's Agg backend, so no display is needed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

from npu_rft.data.schema import DataError

logger = logging.getLogger(__name__)

# (metric key, panel title)
PANELS: Tuple[Tuple[str, str], ...] = (
    ("reward/mean", "mean reward"),
    ("loss", "loss"),
    ("kl/mean", "KL to reference"),
    ("eval/top1", "eval Top@1"),
)


def read_metrics(path: Union[str, Path]) -> List[Dict[str, float]]:
    """The records of a ``metrics.jsonl``; ``DataError`` naming ``path:line`` on a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; pass a run directory written by `npu-rft train` or `npu-rft sft`")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg}); the metrics file is damaged") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise DataError(f"{path}:{number}: a metrics record needs an integer 'step'")
            records.append(record)
    return records


def series(records: List[Dict[str, float]], key: str) -> Tuple[List[int], List[float]]:
    """(steps, values) of the records holding a numeric ``key``, in file order."""
    points = [(r["step"], float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [s for s, _ in points], [v for _, v in points]


def refresh_steps(records: List[Dict[str, float]]) -> List[int]:
    """The updates done before each reference refresh of an iterative-DPO run
    (the record of step s holds the metrics of the s-th update, so a refresh
    logged at step s happened after s - 1 updates)."""
    return [r["step"] - 1 for r in records if r.get("dpo/reference_refresh") == 1.0]


def _mark_refreshes(ax, steps: List[int], **style) -> None:
    for x in steps:
        ax.axvline(x, linestyle=":", linewidth=0.7, alpha=0.5, **style)


def _save(fig, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    logger.info("curves: %s", out)


def plot_run(run_dir: Union[str, Path], out: Union[str, Path, None] = None) -> Path:
    """Write the curves of ``run_dir/metrics.jsonl`` to ``out`` (default
    ``run_dir/curves.png``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    refreshes = refresh_steps(records)
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], PANELS):
        steps, values = series(records, key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
            ax.grid(alpha=0.3)
            _mark_refreshes(ax, refreshes, color="gray")
        else:
            ax.text(0.5, 0.5, f"{key}\nnot logged", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    title = run_dir.name
    if refreshes:
        title += f" (dotted: {len(refreshes)} reference refreshes, one per iteration)"
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out


def plot_arms(run_dirs: Mapping[str, Union[str, Path]], out: Union[str, Path],
              baseline: Optional[float] = None) -> Path:
    """Several runs on one figure: eval Top@1 and mean reward against the
    optimizer update and against the training time (``timing_s/step`` summed),
    one line per run (``run_dirs``: label -> run directory); iterative-DPO
    runs get their reference refreshes as dotted lines in the update panels.
    ``baseline`` (the starting model's Top@1) is drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise ValueError("plot_arms needs at least one run directory")
    out = Path(out)
    panels = (("eval/top1", "eval Top@1", "update"), ("eval/top1", "eval Top@1", "time"),
              ("reward/mean", "mean reward of the samples", "update"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, run_dir) in enumerate(run_dirs.items()):
        records = read_metrics(Path(run_dir) / "metrics.jsonl")
        color = colors[i % len(colors)]
        elapsed, clock = {}, 0.0
        for r in records:
            clock += float(r.get("timing_s/step", 0.0))
            elapsed[r["step"]] = clock
        refreshes = refresh_steps(records)
        for ax, (key, title, x_axis) in zip(axes[0], panels):
            steps, values = series(records, key)
            xs = steps if x_axis == "update" else [elapsed[s] for s in steps]
            ax.plot(xs, values, color=color, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
            if x_axis == "update":
                _mark_refreshes(ax, refreshes, color=color)
    for ax, (key, title, x_axis) in zip(axes[0], panels):
        ax.set_title(title)
        ax.set_xlabel("optimizer update" if x_axis == "update" else "training time (s)")
        ax.grid(alpha=0.3)
        if baseline is not None and key == "eval/top1":
            ax.axhline(baseline, color="black", linestyle="--", linewidth=0.8, label="start")
        ax.legend(fontsize=7)
    fig.suptitle("dotted: iterative DPO's reference refreshes (one per iteration)")
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out
