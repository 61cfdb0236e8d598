"""Restacking: per-slice predictions back into a volume on the native grid.

Canvas logits are resampled to each slice's native in-plane grid (the exact inverse of the canvas
mapping), thresholded at probability 0.5, and written into the canonical (slices, rows, cols) stack.
Labeled slices keep the user's labels bit for bit; the stack is then mapped back to KJI.
"""

from __future__ import annotations

from typing import Dict, Iterable

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
