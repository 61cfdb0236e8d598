"""Restacking: per-slice predictions back into a volume on the native grid.

Each predicted slice comes as its fused probability over a region of the canonical slice grid
(:class:`~UniverSegLogic.core.region.Region`; nothing outside it is foreground), thresholded at
0.5 and written into the segment's mask through a view of the KJI array in the canonical frame,
so no other copy of the volume is made. Labeled slices keep the user's labels bit for bit;
slices neither labeled nor predicted come out empty.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

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
