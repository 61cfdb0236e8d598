"""One rule between a segmentation's own labelmap grid and the volume grid (reading and writing).

A segment is stored on its own grid (its labelmap's IJK-to-node matrix), which may differ from the
volume's: oversampled, shifted, tilted, or under another transform. The bridge reads a segment onto
the volume grid and writes predictions back onto the segment's grid with this module only, so that
both directions agree voxel for voxel:

* **The cell rule.** A point at continuous index ``x`` (along one grid axis) lies in cell
  ``floor(x + 0.5 + EPS)``: cells are ``[t - 0.5, t + 0.5)``, and a point within ``EPS`` of a cell
  boundary counts as lying on it (so round-off in the matrices never flips a tie).
* **Writing** gives a segmentation voxel the value of the volume cell its centre lies in (the cell
  rule in volume indices), and never writes a segmentation voxel that a kept volume voxel reads
  (see below). So a volume slice that is not written -- a labeled slice -- reads back bit for bit,
  and every segmentation voxel whose centre lies in such a slice keeps its stored value.
* **Reading** gives a volume voxel the value of the segmentation voxel whose cell holds the
  volume voxel's centre -- the same rule seen from the other side: along a segmentation axis that
  runs with a volume axis a tie goes to the lower segmentation index, against it to the upper
  one, which is exactly the pairing that makes the two directions inverse on aligned grids
  (a grid shifted by half a voxel included) -- and, in addition, marks the volume cell of every
  painted segmentation voxel. So every painted voxel is seen in the volume slice its centre lies
  in: that slice counts as painted, is never predicted, and the voxel is never overwritten.

Grids that coincide up to a whole-voxel offset (the usual case: a segmentation made on this volume)
take an exact fast path that gives the same result.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

#: Tolerance of the cell rule, in voxels.
EPS = 1e-6
#: Code values of a write (see :mod:`.writing`): keep the stored value, background, foreground.
KEEP, BACKGROUND, FOREGROUND = 0, 1, 2
#: Voxels per chunk of the general (non-aligned) path.
_CHUNK = 1 << 20


def cell_index(x) -> np.ndarray:
    """The cell rule: index of the cell ``[t - 0.5, t + 0.5)`` holding continuous index ``x``."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5 + EPS).astype(np.int64)


def _extent_shape(extent: Sequence[int]) -> Tuple[int, int, int]:
    return (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)


class GridMap:
    """The map between a segmentation grid and a volume grid.

    ``seg_to_volume``: 4x4 matrix from segmentation IJK to volume IJK (continuous indices).
    """

    def __init__(self, seg_to_volume: np.ndarray):
        self.s2v = np.asarray(seg_to_volume, dtype=np.float64)
        self.v2s = np.linalg.inv(self.s2v)
        # reading: per segmentation axis, a tie goes down when the axis runs with the volume
        # axis it is closest to, up when it runs against it (the inverse of the cell rule)
        cols = self.s2v[:3, :3]
        dominant = np.abs(cols).argmax(axis=0)
        self._runs_with = cols[dominant, np.arange(3)] > 0

    def offset(self, extent: Sequence[int]) -> Optional[np.ndarray]:
        """Whole-voxel offset (I, J, K) from segmentation to volume indices when the two grids
        coincide up to it over ``extent`` (then both maps are exact index shifts), else None."""
        off = np.round(self.s2v[:3, 3])
        corners = np.array(
            [[i, j, k, 1.0] for i in extent[0:2] for j in extent[2:4] for k in extent[4:6]]
        ).T
        drift = (self.s2v @ corners)[:3] - (corners[:3] + off[:, None])
        if np.abs(drift).max() < 0.25:
            return off.astype(np.int64)
        return None

    def volume_cells(self, seg_ijk: np.ndarray) -> np.ndarray:
        """Volume voxel (I, J, K rows) whose cell holds each segmentation voxel centre."""
        return cell_index(self.s2v[:3, :3] @ seg_ijk + self.s2v[:3, 3:4])

    def _read_rounding(self, c: np.ndarray, axis: int) -> np.ndarray:
        if self._runs_with[axis]:
            return np.ceil(c - 0.5 - EPS).astype(np.int64)  # a tie goes to the lower index
        return np.floor(c + 0.5 + EPS).astype(np.int64)  # ... to the upper index

    def segment_voxels(self, vol_ijk: np.ndarray) -> np.ndarray:
        """Segmentation voxel (I, J, K rows) read by each volume voxel centre."""
        c = self.v2s[:3, :3] @ vol_ijk + self.v2s[:3, 3:4]
        return np.stack([self._read_rounding(c[a], a) for a in range(3)])


def _inside(ijk: np.ndarray, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    """Columns of ``ijk`` (I, J, K rows) within [lo, hi] (inclusive, I, J, K order)."""
    ok = np.ones(ijk.shape[1], dtype=bool)
    for a in range(3):
        ok &= (ijk[a] >= lo[a]) & (ijk[a] <= hi[a])
    return ok


def _box_chunks(lo: Sequence[int], hi: Sequence[int]):
    """Split the box [lo, hi] (I, J, K, inclusive) into K-slabs of about ``_CHUNK`` voxels."""
    plane = (hi[0] - lo[0] + 1) * (hi[1] - lo[1] + 1)
    step = max(1, _CHUNK // max(1, plane))
    for k0 in range(lo[2], hi[2] + 1, step):
        yield k0, min(hi[2], k0 + step - 1)


def _map_box(matrix: np.ndarray, lo, hi, k0: int, k1: int, rounding) -> Tuple[np.ndarray, ...]:
    """Rounded image (I, J, K arrays of shape (K, J, I)) under the affine ``matrix`` of the
    voxel centres of the box [lo, hi] restricted to K in [k0, k1]; ``rounding(x, axis)``."""
    ii = np.arange(lo[0], hi[0] + 1, dtype=np.float64)[None, None, :]
    jj = np.arange(lo[1], hi[1] + 1, dtype=np.float64)[None, :, None]
    kk = np.arange(k0, k1 + 1, dtype=np.float64)[:, None, None]
    m = matrix
    return tuple(
        rounding(m[a, 0] * ii + m[a, 1] * jj + (m[a, 2] * kk + m[a, 3]), a) for a in range(3)
    )


def _within(ijk: Tuple[np.ndarray, ...], lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    ok = (ijk[0] >= lo[0]) & (ijk[0] <= hi[0])
    for a in (1, 2):
        ok &= (ijk[a] >= lo[a]) & (ijk[a] <= hi[a])
    return ok


def read_onto_volume(
    stored: np.ndarray, extent: Sequence[int], grid: GridMap, volume_shape: Sequence[int]
) -> np.ndarray:
    """Boolean KJI mask on the volume grid of a segment stored as ``stored`` (bool KJI over the
    segmentation ``extent``): the read described in the module docstring."""
    shape = tuple(int(s) for s in volume_shape)
    out = np.zeros(shape, dtype=bool)
    painted = np.argwhere(stored)
    if not len(painted):
        return out
    origin = np.array([extent[4], extent[2], extent[0]])
    vol_hi = np.array(shape[::-1]) - 1  # I, J, K
    off = grid.offset(extent)
    if off is not None:  # aligned: the read is an index shift
        kji = painted + origin + off[::-1]
        keep = np.all((kji >= 0) & (kji < np.array(shape)), axis=1)
        out[tuple(kji[keep].T)] = True
        return out
    seg_ijk = (painted + origin)[:, ::-1].T.astype(np.float64)
    # every painted voxel marks the volume cell holding its centre
    cells = grid.volume_cells(seg_ijk)
    keep = _inside(cells, (0, 0, 0), vol_hi)
    out[cells[2, keep], cells[1, keep], cells[0, keep]] = True
    # nearest-voxel read, over the volume voxels that can read a painted voxel
    lo_s, hi_s = seg_ijk.min(axis=1) - 1, seg_ijk.max(axis=1) + 1
    corners = np.array(
        [
            [i, j, k]
            for i in (lo_s[0], hi_s[0])
            for j in (lo_s[1], hi_s[1])
            for k in (lo_s[2], hi_s[2])
        ]
    ).T
    v = grid.s2v[:3, :3] @ corners + grid.s2v[:3, 3:4]
    lo_v = np.maximum(np.floor(v.min(axis=1)).astype(int) - 1, 0)
    hi_v = np.minimum(np.ceil(v.max(axis=1)).astype(int) + 1, vol_hi)
    if np.any(hi_v < lo_v):
        return out
    s_lo = (extent[0], extent[2], extent[4])
    s_hi = (extent[1], extent[3], extent[5])
    for k0, k1 in _box_chunks(lo_v, hi_v):
        seg = _map_box(grid.v2s, lo_v, hi_v, k0, k1, grid._read_rounding)
        ok = _within(seg, s_lo, s_hi)
        hit = np.zeros(ok.shape, dtype=bool)
        hit[ok] = stored[seg[2][ok] - extent[4], seg[1][ok] - extent[2], seg[0][ok] - extent[0]]
        out[k0 : k1 + 1, lo_v[1] : hi_v[1] + 1, lo_v[0] : hi_v[0] + 1] |= hit
    return out


def _dilate(mask: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """Box dilation of a bool KJI array by ``radius`` voxels per axis (K, J, I)."""
    out = mask.copy()
    for axis, r in enumerate(radius):
        for _ in range(int(r)):
            grown = out.copy()
            take = [slice(None)] * 3
            put = [slice(None)] * 3
            take[axis], put[axis] = slice(1, None), slice(None, -1)
            grown[tuple(put)] |= out[tuple(take)]
            grown[tuple(take)] |= out[tuple(put)]
            out = grown
    return out


def code_on_segment(code: np.ndarray, grid: GridMap, extent: Sequence[int]) -> np.ndarray:
    """The volume-grid ``code`` (uint8 KJI: KEEP / BACKGROUND / FOREGROUND) on the segmentation
    voxels of ``extent`` (uint8 KJI): a segmentation voxel takes the code of the volume cell its
    centre lies in, and KEEP where its centre lies outside the volume or where a KEEP volume voxel
    reads it (so kept volume voxels read back unchanged)."""
    shape = _extent_shape(extent)
    out = np.full(shape, KEEP, dtype=np.uint8)
    vol_shape = np.array(code.shape)  # K, J, I
    off = grid.offset(extent)
    if off is not None:  # aligned: the write is an index shift
        lo = np.array([extent[4], extent[2], extent[0]]) + off[::-1]  # volume K, J, I of corner
        src = tuple(slice(max(0, o), min(n, o + s)) for o, s, n in zip(lo, shape, vol_shape))
        dst = tuple(slice(s.start - o, s.stop - o) for s, o in zip(src, lo))
        if all(s.stop > s.start for s in src):
            out[dst] = code[src]
        return out
    # segmentation voxels read by a KEEP volume voxel next to a written one stay as they are
    keep = code == KEEP
    reach = np.ceil(np.abs(grid.s2v[:3, :3]).sum(axis=1) / 2 + 1).astype(int)[::-1]  # K, J, I
    near = keep & _dilate(~keep, reach)
    protected = np.zeros(shape, dtype=bool)
    s_lo = (extent[0], extent[2], extent[4])
    s_hi = (extent[1], extent[3], extent[5])
    kji = np.argwhere(near)
    for start in range(0, len(kji), _CHUNK):
        part = kji[start : start + _CHUNK]
        s = grid.segment_voxels(part[:, ::-1].T.astype(np.float64))
        ok = _inside(s, s_lo, s_hi)
        protected[s[2, ok] - extent[4], s[1, ok] - extent[2], s[0, ok] - extent[0]] = True
    vol_hi = vol_shape[::-1] - 1
    cell = lambda x, axis: cell_index(x)  # noqa: E731 - the cell rule, whatever the axis
    for k0, k1 in _box_chunks(s_lo, s_hi):
        cells = _map_box(grid.s2v, s_lo, s_hi, k0, k1, cell)
        ok = _within(cells, (0, 0, 0), vol_hi)
        c = np.full(ok.shape, KEEP, dtype=np.uint8)
        c[ok] = code[cells[2][ok], cells[1][ok], cells[0][ok]]
        rows = slice(k0 - extent[4], k1 - extent[4] + 1)
        c[protected[rows]] = KEEP
        out[rows] = c
    return out


def write_onto_segment(
    code: np.ndarray,
    grid: GridMap,
    extent: Sequence[int],
    current: Optional[np.ndarray],
) -> np.ndarray:
    """New stored values (uint8 0/1, KJI over the segmentation ``extent``) after writing ``code``
    (uint8 KJI on the volume grid: KEEP / BACKGROUND / FOREGROUND) into a segment whose stored
    values over ``extent`` are ``current`` (None: start from an empty segment); the voxels
    :func:`code_on_segment` marks KEEP keep their values."""
    seg_code = code_on_segment(code, grid, extent)
    out = np.zeros(seg_code.shape, dtype=np.uint8) if current is None else current.astype(np.uint8)
    return np.where(seg_code == KEEP, out, seg_code == FOREGROUND).astype(np.uint8)
