"""Restacking: per-slice predictions back into a volume on the native grid.

Each predicted slice comes as its fused probability over a region of the canonical slice grid
(:class:`~UniverSegLogic.core.region.Region`; nothing outside it is foreground), thresholded at
0.5 and written into the segment's mask through a view of the KJI array in the canonical frame,
so no other copy of the volume is made. Labeled slices keep the user's labels bit for bit;
slices neither labeled nor predicted come out empty.
Predicted segments never overlap each other (:func:`resolve_overlaps`).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .geometry import SliceFrame
from .region import Region

#: slice -> (region, fused probability over it)
RegionProbabilities = Dict[int, Tuple[Region, np.ndarray]]


def assemble_mask(
    frame: SliceFrame,
    user_mask_kji: np.ndarray,
    labeled: Iterable[int],
    probabilities: RegionProbabilities,
) -> np.ndarray:
    """The segment's boolean KJI mask: the user's labels on labeled slices, ``p >= 0.5`` on
    predicted ones."""
    user = frame.to_frame(np.asarray(user_mask_kji, dtype=bool))
    out = np.zeros(np.shape(user_mask_kji), dtype=bool)
    view = frame.to_frame(out)  # writes land in ``out``
    for t, (region, p) in probabilities.items():
        view[t][region.index] = p >= 0.5
    for i in labeled:
        view[i] = user[i]
    return out


def assemble_probability(
    frame: SliceFrame,
    user_mask_kji: np.ndarray,
    labeled: Iterable[int],
    probabilities: RegionProbabilities,
) -> np.ndarray:
    """The segment's float32 KJI probability: 0/1 on labeled slices, the fused probability on
    predicted ones (0 outside their region), 0 elsewhere."""
    user = frame.to_frame(np.asarray(user_mask_kji, dtype=bool))
    out = np.zeros(np.shape(user_mask_kji), dtype=np.float32)
    view = frame.to_frame(out)
    for t, (region, p) in probabilities.items():
        view[t][region.index] = p
    for i in labeled:
        view[i] = user[i]
    return out


def probability_at(
    frame: SliceFrame,
    user_mask_kji: np.ndarray,
    labeled: Iterable[int],
    probabilities: RegionProbabilities,
    where: Tuple[np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    """:func:`assemble_probability` at the KJI voxels ``where`` only (float32, one value per
    voxel), without building the volume's probability."""
    k, j, i = (np.asarray(w, dtype=np.int64) for w in where)
    kji = (k, j, i)
    shape = np.shape(user_mask_kji)
    t = kji[frame.axis]
    r = kji[frame.row_axis]
    c = kji[frame.col_axis]
    if frame.flip_rows:
        r = shape[frame.row_axis] - 1 - r
    if frame.flip_cols:
        c = shape[frame.col_axis] - 1 - c
    out = np.zeros(t.shape, dtype=np.float32)
    for s, (region, p) in probabilities.items():
        on = np.flatnonzero(t == s)
        if not on.size:
            continue
        rr, cc = r[on] - region.r0, c[on] - region.c0
        inside = (rr >= 0) & (rr < p.shape[0]) & (cc >= 0) & (cc < p.shape[1])
        out[on[inside]] = p[rr[inside], cc[inside]]
    user = np.asarray(user_mask_kji, dtype=bool)
    painted = np.isin(t, np.fromiter(labeled, dtype=np.int64))
    out[painted] = user[tuple(a[painted] for a in kji)]
    return out


#: KJI slices (along array axis 0) counted at once when looking for contested voxels
CLAIM_BLOCK_SLICES = 16


def _contested(
    masks: Sequence[np.ndarray], keep_out: Optional[np.ndarray]
) -> Tuple[np.ndarray, ...]:
    """KJI indices of the voxels claimed by more than one of ``masks`` and ``keep_out``, counted
    a block of slices at a time (a whole clinical volume's count would take 100 MB and more)."""
    n = len(masks) + (keep_out is not None)
    dtype = np.uint8 if n < 255 else np.uint16
    found = []
    for k0 in range(0, masks[0].shape[0], CLAIM_BLOCK_SLICES):
        block = slice(k0, k0 + CLAIM_BLOCK_SLICES)
        claims = np.zeros(masks[0][block].shape, dtype=dtype)
        for m in masks:
            claims += m[block]
        if keep_out is not None:
            claims += np.asarray(keep_out[block], dtype=bool)
        k, j, i = np.nonzero(claims > 1)
        if k.size:
            found.append((k + k0, j, i))
    if not found:
        return tuple(np.zeros(0, dtype=np.intp) for _ in range(3))
    return tuple(np.concatenate(parts) for parts in zip(*found))


#: a segment's probability in :func:`resolve_overlaps`: a KJI array, or a function giving the
#: values at KJI voxels (``where`` -> values), e.g. :func:`probability_at` bound to a segment
ProbabilitySource = Union[np.ndarray, Callable[[Tuple[np.ndarray, ...]], np.ndarray]]


def resolve_overlaps(
    masks: Sequence[np.ndarray],
    probabilities: Sequence[ProbabilitySource],
    labeled: Sequence[Iterable[int]],
    axis: int,
    keep_out: Optional[np.ndarray] = None,
) -> List[int]:
    """Make predicted voxels of several segments exclusive, in place; returns the predicted
    voxels each segment gave up.

    ``masks`` / ``probabilities``: KJI arrays of each segment (bool / float; a probability may
    be a function of the voxels instead, :data:`ProbabilitySource`); ``labeled``: each
    segment's labeled slices along array axis ``axis``, where its voxels are the user's.
    A voxel claimed by more than one segment goes to the most probable one: a painted voxel
    (on a labeled slice) counts as certain and is never removed, a predicted one keeps its
    probability, and a tie goes to the segment listed first. ``keep_out``: voxels of segments
    that are not propagated (the user's too): predictions never take them. So a propagation of
    non-overlapping segments gives non-overlapping segments (one layer in a ``.seg.nrrd``).
    """
    n = len(masks)
    lost = [0] * n
    if n == 0 or (n == 1 and keep_out is None):
        return lost
    where = _contested(masks, keep_out)
    if not where[0].size:
        return lost
    painted = [np.isin(where[axis], np.fromiter(lab, dtype=np.int64)) for lab in labeled]
    score = np.full((n, where[0].size), -1.0)  # -1: not claimed by this segment
    for i, m in enumerate(masks):
        mine = m[where]
        source = probabilities[i]
        values = source(where) if callable(source) else np.asarray(source)[where]
        p = np.where(painted[i], 2.0, np.asarray(values, dtype=np.float64))
        score[i] = np.where(mine, p, -1.0)
    winner = np.argmax(score, axis=0)  # first maximum: the segment listed first
    blocked = np.asarray(keep_out, dtype=bool)[where] if keep_out is not None else False
    for i, m in enumerate(masks):
        drop = (score[i] >= 0) & ~painted[i] & (blocked | (winner != i))
        if drop.any():
            m[tuple(axis_idx[drop] for axis_idx in where)] = False
            lost[i] = int(drop.sum())
    return lost
