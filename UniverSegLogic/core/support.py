"""Support selection: which labeled slices serve as UniverSeg's in-context examples.

A segment's *labeled slices* are the slices where its mask is non-empty, plus any slices a caller
lists explicitly (so a slice the user confirmed empty counts as labeled background).
For each target slice, support is chosen *bracketing first*: the nearest labeled slice below and the
nearest above, then the remaining labeled slices nearest-first, up to ``support_size``. Slices from
other labeled volumes can be appended (matched by relative position along the axis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import SupportError  # noqa: F401
from .slices import nonempty_slices


def labeled_slices_of(
    mask_stack: np.ndarray, explicit: Optional[Sequence[int]] = None, name: str = "segment"
) -> List[int]:
    """Sorted labeled slice indices of a (slices, rows, cols) mask stack: every painted
    (non-empty) slice, plus the slices listed in ``explicit`` (an empty listed slice is labeled
    background). A list never removes a painted slice: painted voxels are always the user's."""
    n = mask_stack.shape[0]
    out = set(nonempty_slices(mask_stack, 0))
    for i in explicit if explicit is not None else ():
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise SupportError(f"{name}: labeled slice {i!r} is not a slice number")
        if not 0 <= int(i) < n:
            raise SupportError(f"{name}: labeled slice {int(i)} is outside 0..{n - 1}")
        out.add(int(i))
    if not out:
        raise SupportError(
            f"segment {name!r} has no labeled slice along this axis: paint at "
            "least one slice (or list labeled slices explicitly)"
        )
    return sorted(out)


def bracketing_order(target: int, labeled: Sequence[int]) -> List[int]:
    """Labeled slices ordered for ``target``: the two that bracket it, then nearest-first."""
    lab = sorted(labeled)
    below = [i for i in lab if i < target]
    above = [i for i in lab if i > target]
    first = ([below[-1]] if below else []) + ([above[0]] if above else [])
    rest = sorted((i for i in lab if i not in first), key=lambda i: (abs(i - target), i))
    return first + rest


def select_support(target: int, labeled: Sequence[int], support_size: int) -> Tuple[int, ...]:
    """The labeled slices used as support for ``target`` (sorted tuple, at most support_size)."""
    if support_size < 1:
        raise SupportError("support size must be at least 1")
    return tuple(sorted(bracketing_order(target, labeled)[:support_size]))


def ensemble_subsets(support: Sequence[int], ensemble: int, seed: int = 0) -> List[Tuple[int, ...]]:
    """``ensemble`` support subsets for averaging: the full set, then random ~3/4 subsets.

    Subsets always keep the first two (bracketing) items when there are more than two.
    """
    support = tuple(support)
    out = [support]
    if ensemble <= 1 or len(support) <= 2:
        return out
    rng = np.random.default_rng(seed)
    keep = max(2, int(round(0.75 * len(support))))
    for _ in range(ensemble - 1):
        pick = rng.choice(len(support), size=keep, replace=False)
        out.append(tuple(sorted(support[i] for i in pick)))
    return out


@dataclass
class ExternalSupport:
    """Slices from another labeled volume, already in canvas space.

    ``images``/``labels`` are (N, 1, size, size) float tensors (numpy arrays accepted);
    ``positions`` the relative position (0..1) of each slice along the slicing axis.
    """

    images: np.ndarray
    labels: np.ndarray
    positions: np.ndarray

    def nearest(self, position: float, count: int) -> np.ndarray:
        """Indices of the ``count`` slices nearest to relative ``position``."""
        order = np.argsort(np.abs(self.positions - position), kind="stable")
        return order[:count]
