"""Overlap scores, defined once."""

from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

import numpy as np


def dice_from_counts(intersection, predicted, truth) -> Union[float, np.ndarray]:
    """Dice from voxel counts (|P & T|, |P|, |T|; scalars or arrays); 1.0 where both are empty."""
    inter = np.asarray(intersection, dtype=np.float64)
    denom = np.asarray(predicted, dtype=np.float64) + np.asarray(truth, dtype=np.float64)
    out = np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1.0), 1.0)
    return float(out) if out.ndim == 0 else out


def dice(
    pred: np.ndarray, truth: np.ndarray, axis: Optional[Union[int, Tuple[int, ...]]] = None
) -> Union[float, np.ndarray]:
    """Dice coefficient of two boolean arrays; 1.0 when both are empty.

    With ``axis`` (the axes to reduce), one score per remaining index is returned as an array
    (e.g. ``axis=(1, 2)`` scores each slice of a stack).
    """
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    return dice_from_counts(
        np.count_nonzero(p & t, axis=axis),
        np.count_nonzero(p, axis=axis),
        np.count_nonzero(t, axis=axis),
    )


def dice_unlabeled(
    pred: np.ndarray, truth: np.ndarray, labeled: Iterable[int], axis: int = 0
) -> float:
    """Dice over the slices along ``axis`` that are not in ``labeled`` (the honest score: labeled
    slices are the truth for every method)."""
    p = np.moveaxis(np.asarray(pred, dtype=bool), axis, 0)
    t = np.moveaxis(np.asarray(truth, dtype=bool), axis, 0)
    hidden = np.ones(p.shape[0], dtype=bool)
    hidden[[int(i) for i in labeled]] = False
    return dice(p[hidden], t[hidden])
