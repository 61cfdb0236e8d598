"""The in-plane region a segment's fusion works in, and where the network's canvas lands in it.

A propagation fuses the network with the painted-slice prior only inside a rectangle of the
canonical slice grid (:class:`Region`): the bounding box of what the painting and Fill between
slices cover, grown by a margin. Whether that is exact -- nothing outside the rectangle could have
come out foreground -- is decided per slice by the caller from bounds on the features outside it
(:func:`UniverSegLogic.core.prior.inside_upper_bound`), or afterwards from the result (foreground
on the rectangle's border: :meth:`Region.touches_border`); where it is not, the slice grid is
used whole. This module holds the geometry of that: rectangles, bounding boxes, distances, and
which native pixels each canvas pixel's value reaches (:func:`canvas_footprints`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class Region:
    """Rows ``r0:r1`` and columns ``c0:c1`` of a ``rows`` x ``cols`` slice grid."""

    r0: int
    r1: int
    c0: int
    c1: int
    rows: int
    cols: int

    @classmethod
    def full(cls, rows: int, cols: int) -> Region:
        """The whole slice."""
        return cls(0, int(rows), 0, int(cols), int(rows), int(cols))

    @classmethod
    def around(
        cls, box: Optional[Tuple[int, int, int, int]], rows: int, cols: int, grow: Tuple[int, int]
    ) -> Region:
        """``box`` (r0, r1, c0, c1; None = nothing) grown by ``grow`` (rows, cols) pixels on
        every side, clipped to the slice (the whole slice for an empty box)."""
        if box is None:
            return cls.full(rows, cols)
        r0, r1, c0, c1 = box
        return cls(
            max(0, r0 - grow[0]),
            min(rows, r1 + grow[0]),
            max(0, c0 - grow[1]),
            min(cols, c1 + grow[1]),
            int(rows),
            int(cols),
        )

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.r1 - self.r0, self.c1 - self.c0)

    @property
    def is_full(self) -> bool:
        return (self.r0, self.c0, self.r1, self.c1) == (0, 0, self.rows, self.cols)

    @property
    def index(self) -> Tuple[slice, slice]:
        """In-plane index of the region (``plane[region.index]``)."""
        return slice(self.r0, self.r1), slice(self.c0, self.c1)

    def crop(self, array: np.ndarray) -> np.ndarray:
        """The region of a slice (..., rows, cols) -- a view."""
        return array[..., self.r0 : self.r1, self.c0 : self.c1]

    def embed(self, values: np.ndarray, dtype=None, fill=0) -> np.ndarray:
        """A whole slice holding ``values`` (region-sized) in the region and ``fill`` elsewhere."""
        out = np.full((self.rows, self.cols), fill, dtype=dtype or values.dtype)
        out[self.index] = values
        return out

    def touches_border(self, mask: np.ndarray) -> bool:
        """True when region-sized ``mask`` is set on a side of the region that is not the edge
        of the slice (something there may go on outside the region)."""
        m = np.asarray(mask, dtype=bool)
        if not m.size:
            return False
        sides = (
            (self.r0 > 0, m[0, :]),
            (self.r1 < self.rows, m[-1, :]),
            (self.c0 > 0, m[:, 0]),
            (self.c1 < self.cols, m[:, -1]),
        )
        return any(inner and side.any() for inner, side in sides)


def bounding_box(planes: Iterable[np.ndarray]) -> Optional[Tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) (ends exclusive) of everything set in the 2D boolean ``planes`` (each
    given whole, or as ``(plane, row offset, col offset)``); None when nothing is set."""
    r0 = c0 = None
    r1 = c1 = None
    for item in planes:
        plane, dr, dc = item if isinstance(item, tuple) else (item, 0, 0)
        plane = np.asarray(plane)
        if plane.size == 0:
            continue
        rows = np.flatnonzero(plane.any(axis=1))
        if not len(rows):
            continue
        cols = np.flatnonzero(plane.any(axis=0))
        lo_r, hi_r = int(rows[0]) + dr, int(rows[-1]) + 1 + dr
        lo_c, hi_c = int(cols[0]) + dc, int(cols[-1]) + 1 + dc
        r0 = lo_r if r0 is None else min(r0, lo_r)
        r1 = hi_r if r1 is None else max(r1, hi_r)
        c0 = lo_c if c0 is None else min(c0, lo_c)
        c1 = hi_c if c1 is None else max(c1, hi_c)
    if r0 is None:
        return None
    return r0, r1, c0, c1


def box_distance_mm(
    rect: Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    box: Tuple[int, int, int, int],
    spacing: Tuple[float, float],
) -> np.ndarray:
    """Smallest distance (mm) between pixel centres of the rectangles ``rect`` (arrays r0, r1,
    c0, c1, ends inclusive) and those of ``box`` (r0, r1, c0, c1, ends exclusive)."""
    r0, r1, c0, c1 = rect
    dr = np.maximum(0, np.maximum(box[0] - r1, r0 - (box[1] - 1)))
    dc = np.maximum(0, np.maximum(box[2] - c1, c0 - (box[3] - 1)))
    return np.sqrt((dr * float(spacing[0])) ** 2 + (dc * float(spacing[1])) ** 2)


def canvas_footprints(n_native: int, n_inner: int) -> Tuple[np.ndarray, np.ndarray]:
    """For each canvas pixel along one axis of the canvas' inner part (``n_inner``), the first
    and last native pixel (``n_native``) that takes its value from that canvas pixel as the
    *lower* of its two bilinear sources (``Canvas.from_canvas``: ``align_corners=False``). Every
    native pixel is in exactly one footprint; its other source is the next canvas pixel."""
    y = np.arange(n_native, dtype=np.float64)
    src = (y + 0.5) * (float(n_inner) / float(n_native)) - 0.5
    lower = np.clip(np.floor(src), 0, n_inner - 1).astype(np.int64)
    first = np.full(n_inner, n_native, dtype=np.int64)
    last = np.full(n_inner, -1, dtype=np.int64)
    np.minimum.at(first, lower, np.arange(n_native))
    np.maximum.at(last, lower, np.arange(n_native))
    return first, last


def max_filter3(values: np.ndarray) -> np.ndarray:
    """3x3 maximum filter of a 2D array (edges: the pixels that exist)."""
    v = np.asarray(values)
    p = np.pad(v, 1, mode="edge")
    out = v.copy()
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            np.maximum(out, p[dr : dr + v.shape[0], dc : dc + v.shape[1]], out=out)
    return out
