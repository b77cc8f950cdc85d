"""Logging set-up: one handler, rank-0 filter, `group/name` metric keys elsewhere."""
from __future__ import annotations

import logging
import os


class RankZeroFilter(logging.Filter):
    """Drops records on ranks other than 0 unless they are warnings or worse."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = int(os.environ.get("RANK", "0"))
        return rank == 0 or record.levelno >= logging.WARNING


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("npu_rft")
    if any(getattr(h, "_npu_rft", False) for h in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler()
    handler._npu_rft = True  # type: ignore[attr-defined]
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}] " if rank not in (None, "0") else ""
    handler.setFormatter(logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RankZeroFilter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
