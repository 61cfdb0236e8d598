"""A quick-look PNG of one cohort result: slices of the target with the predicted segments.

No plotting library: the picture is composed with numpy and encoded by :func:`encode_png`
(zlib), so the base install can write it.
"""

from __future__ import annotations

import struct
import zlib
from typing import List, Sequence, Tuple

import numpy as np

from ..core.canvas import intensity_window, scale_intensity
from ..core.geometry import SliceFrame, Volume
from ..core.slices import nonempty_slices

#: Slices shown, spread over the slices where any segment was predicted.
MONTAGE_SLICES = 8
#: Height of one tile (pixels); the width follows the slice's physical aspect ratio.
TILE_HEIGHT = 160
#: Opacity of the segment colors over the image.
ALPHA = 0.45


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _resize_nearest(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.minimum((np.arange(height) + 0.5) * plane.shape[0] / height, plane.shape[0] - 1)
    cols = np.minimum((np.arange(width) + 0.5) * plane.shape[1] / width, plane.shape[1] - 1)
    return plane[rows.astype(int)][:, cols.astype(int)]


def montage_slices(masks: Sequence[np.ndarray], n_slices: int, count: int) -> List[int]:
    """Up to ``count`` slice numbers spread evenly over the slices holding any mask voxel (the
    whole volume when every mask is empty)."""
    idx = np.array(sorted({i for m in masks for i in nonempty_slices(m, 0)}), dtype=int)
    if idx.size == 0:
        idx = np.arange(n_slices)
    picks = np.unique(np.round(np.linspace(idx[0], idx[-1], min(count, idx.size))).astype(int))
    return [int(i) for i in picks]


def montage_png(
    image: Volume,
    masks: Sequence[np.ndarray],
    colors: Sequence[Tuple[float, float, float]],
    axis,
    count: int = MONTAGE_SLICES,
) -> bytes:
    """PNG of up to ``count`` slices along ``axis`` (canonical orientation) with the ``masks``
    (KJI, on the image grid) blended in their ``colors`` (0..1 RGB)."""
    frame = SliceFrame.of(image, axis)
    stack = frame.to_frame(image.array)
    mstacks = [frame.to_frame(np.asarray(m, dtype=bool)) for m in masks]
    gray = scale_intensity(stack, intensity_window(stack))
    _, row_mm, col_mm = frame.spacing
    aspect = (stack.shape[2] * col_mm) / max(1e-6, stack.shape[1] * row_mm)
    width = max(8, int(round(TILE_HEIGHT * aspect)))
    tiles = []
    for i in montage_slices(mstacks, stack.shape[0], count):
        tile = np.repeat(_resize_nearest(gray[i], TILE_HEIGHT, width)[..., None], 3, axis=2)
        for m, c in zip(mstacks, colors):
            sel = _resize_nearest(m[i], TILE_HEIGHT, width)
            tile[sel] = (1 - ALPHA) * tile[sel] + ALPHA * np.asarray(c, dtype=np.float32)
        tiles.append(tile)
    per_row = 4
    rows = []
    for r in range(0, len(tiles), per_row):
        row = tiles[r : r + per_row]
        row += [np.zeros_like(tiles[0])] * (per_row - len(row)) if len(tiles) > per_row else []
        rows.append(np.concatenate(row, axis=1))
    picture = np.concatenate(rows, axis=0)
    return encode_png(np.clip(picture * 255.0 + 0.5, 0, 255).astype(np.uint8))
