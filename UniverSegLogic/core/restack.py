"""Restacking: per-slice predictions back into a volume on the native grid.

Canvas logits are resampled to each slice's native in-plane grid (the exact inverse of the canvas
mapping), thresholded at probability 0.5, and written into the canonical (slices, rows, cols) stack.
Labeled slices keep the user's labels bit for bit; the stack is then mapped back to KJI.
Predicted segments never overlap each other (:func:`resolve_overlaps`).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from .geometry import SliceFrame


def assemble(
    frame: SliceFrame,
    user_mask_kji: np.ndarray,
    labeled: Iterable[int],
    probabilities: Dict[int, np.ndarray],
) -> tuple:
    """Build (mask KJI bool, probability KJI float32) for one segment.

    ``probabilities`` maps slice index -> (rows, cols) probability in the canonical frame for the
    predicted slices; slices neither labeled nor predicted come out empty.
    """
    user = frame.to_frame(np.asarray(user_mask_kji, dtype=bool))
    prob = np.zeros(user.shape, dtype=np.float32)
    for t, p in probabilities.items():
        prob[t] = p
    mask = prob >= 0.5
    for i in labeled:
        mask[i] = user[i]
        prob[i] = user[i]
    return frame.from_frame(mask), frame.from_frame(prob)


def resolve_overlaps(
    masks: Sequence[np.ndarray],
    probabilities: Sequence[np.ndarray],
    labeled: Sequence[Iterable[int]],
    axis: int,
    keep_out: Optional[np.ndarray] = None,
) -> List[int]:
    """Make predicted voxels of several segments exclusive, in place; returns the predicted
    voxels each segment gave up.

    ``masks`` / ``probabilities``: KJI arrays of each segment (bool / float); ``labeled``: each
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
    claims = np.zeros(masks[0].shape, dtype=np.uint16)
    for m in masks:
        claims += m
    if keep_out is not None:
        claims += np.asarray(keep_out, dtype=bool)
    where = np.nonzero(claims > 1)
    if not where[0].size:
        return lost
    painted = [np.isin(where[axis], np.fromiter(lab, dtype=np.int64)) for lab in labeled]
    score = np.full((n, where[0].size), -1.0)  # -1: not claimed by this segment
    for i, m in enumerate(masks):
        mine = m[where]
        p = np.where(painted[i], 2.0, np.asarray(probabilities[i][where], dtype=np.float64))
        score[i] = np.where(mine, p, -1.0)
    winner = np.argmax(score, axis=0)  # first maximum: the segment listed first
    blocked = np.asarray(keep_out, dtype=bool)[where] if keep_out is not None else False
    for i, m in enumerate(masks):
        drop = (score[i] >= 0) & ~painted[i] & (blocked | (winner != i))
        if drop.any():
            m[tuple(axis_idx[drop] for axis_idx in where)] = False
            lost[i] = int(drop.sum())
    return lost
