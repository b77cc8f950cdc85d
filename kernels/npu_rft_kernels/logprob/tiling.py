"""Tile planning shared by the tiled log-prob backends: a tile's shape from a byte budget."""
from __future__ import annotations

from typing import Optional, Tuple

# Used when a caller of this module passes no budget; ``fused_logprob`` passes
# the per-device default of ``npu_rft_kernels.dispatch.tile_budget``.
DEFAULT_TILE_BYTES = 16 * 2**20
# Below this many vocabulary rows per tile the GEMMs get inefficient, so the
# token dimension is split into blocks instead.
MIN_TILE_COLS = 512
TILE_ALIGN = 128


def tile_budget(tile_bytes: Optional[int]) -> int:
    """``tile_bytes`` checked positive, or ``DEFAULT_TILE_BYTES`` when None."""
    if tile_bytes is None:
        return DEFAULT_TILE_BYTES
    if tile_bytes <= 0:
        raise ValueError(f"tile_bytes={tile_bytes} must be positive; pass a byte count such as {DEFAULT_TILE_BYTES}")
    return tile_bytes


def plan_tiles(n_rows: int, vocab: int, budget: int, bytes_per_elem: int) -> Tuple[int, int]:
    """Tile shape ``(rows, cols)`` with ``rows * cols * bytes_per_elem <= budget``
    (at least one element): all rows if that still leaves ``MIN_TILE_COLS``
    columns (or the whole vocabulary), else fewer rows. A partial ``cols`` is
    rounded down to a multiple of ``TILE_ALIGN`` so that the tiles' leading
    dimensions suit the GEMM kernels (an odd one can make cuBLAS several
    times slower)."""
    elems = max(1, budget // bytes_per_elem)
    rows = max(1, min(n_rows, elems // min(vocab, MIN_TILE_COLS)))
    cols = max(1, min(vocab, elems // rows))
    if cols < vocab and cols >= TILE_ALIGN:
        cols -= cols % TILE_ALIGN
    return rows, cols
