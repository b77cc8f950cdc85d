"""Training curves from a run directory's ``metrics.jsonl``, as one PNG.

Each line of ``metrics.jsonl`` is a JSON object with ``step`` and metric keys
named ``group/name``. ``plot_run`` draws one panel per entry of ``PANELS``
(mean reward, loss, KL to the reference, periodic eval Top@1) against the step,
from the records that hold the panel's key; a panel whose key the run never
logged says so instead of drawing. Rendering uses matplotlib's Agg backend, so
no display is needed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Tuple, Union

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


def plot_run(run_dir: Union[str, Path], out: Union[str, Path, None] = None) -> Path:
    """Write the curves of ``run_dir/metrics.jsonl`` to ``out`` (default
    ``run_dir/curves.png``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], PANELS):
        steps, values = series(records, key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, f"{key}\nnot logged", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    logger.info("curves: %s", out)
    return out
