"""Slice rules, each defined once: which slices are non-empty, a structure's extent along an
axis, the typical gap between labeled slices, when nothing is predicted beyond the labeled slices,
the axis the painted slices lie on (``auto``), the evaluation's choice of labeled slices, and on
which slices the network runs (every slice, or every few thin ones)."""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import GeometryError

#: The slicing axis that means "the axis the painted slices lie on" (:func:`auto_axis`).
AXIS_AUTO = "auto"


def nonempty_slices(mask: np.ndarray, axis: int = 0) -> List[int]:
    """Sorted indices of the slices along ``axis`` where ``mask`` has at least one voxel."""
    m = np.moveaxis(np.asarray(mask), axis, 0)
    n = m.shape[0]
    return [int(i) for i in np.flatnonzero(m.reshape(n, -1).any(axis=1))]


def slice_extent(mask: np.ndarray, axis: int = 0) -> Optional[Tuple[int, int]]:
    """First and last non-empty slice of ``mask`` along ``axis`` (None when it is empty)."""
    idx = nonempty_slices(mask, axis)
    return (idx[0], idx[-1]) if idx else None


def typical_gap(labeled: Sequence[int], n_slices: int) -> float:
    """Typical distance (in slices) between labeled slices: the mean gap between consecutive
    ones; with a single labeled slice, an eighth of the stack (at least 2)."""
    lab = sorted(int(i) for i in labeled)
    if len(lab) >= 2:
        return float(np.mean(np.diff(lab)))
    return float(max(2, int(n_slices) // 8))


def evaluation_slices(z0: int, z1: int, k: int) -> List[int]:
    """The ``k`` labeled slices the evaluation (and the demo) paints over the extent ``[z0, z1]``:
    ``z0 + floor((i + 0.5) * (z1 - z0) / k + 0.5)`` for ``i = 0..k-1`` -- spread over the extent,
    not at its ends, so a method must extrapolate to reach the first and last slices. Sorted,
    duplicates removed."""
    if k < 1:
        raise ValueError("k must be at least 1")
    if z1 < z0:
        raise ValueError("empty extent")
    return sorted({z0 + int(math.floor((i + 0.5) * (z1 - z0) / k + 0.5)) for i in range(k)})


def extrapolation_slices(labeled: Sequence[int], n_slices: int, gaps: float) -> int:
    """How many slices are predicted beyond each painted end: ``gaps`` typical gaps, rounded up."""
    return int(np.ceil(float(gaps) * typical_gap(labeled, n_slices)))


def labeled_run(labeled: Sequence[int]) -> bool:
    """True when the labeled slices are two or more adjacent slices without a gap: a structure
    labeled slice by slice, whose extent is what was labeled. Nothing lies between its labeled
    slices, and the typical-gap rule extends it by nothing (the segment is left as it is)."""
    lab = sorted({int(i) for i in labeled})
    return len(lab) >= 2 and lab[-1] - lab[0] == len(lab) - 1


def prediction_targets(
    n_slices: int, labeled: Sequence[int], ends_painted: Tuple[bool, bool], extension: int
) -> List[int]:
    """The slices a propagation predicts: every unlabeled slice between the first and last labeled
    slice, plus ``extension`` slices beyond each end whose labeled slice is painted (nothing beyond
    an end slice that is labeled but empty: the user confirmed the structure has ended there)."""
    lab = sorted(int(i) for i in labeled)
    lo = lab[0] - (extension if ends_painted[0] else 0)
    hi = lab[-1] + (extension if ends_painted[1] else 0)
    skip = set(lab)
    return [t for t in range(max(0, lo), min(n_slices - 1, hi) + 1) if t not in skip]


#: How far the network's logits are interpolated at most, in pixels of its canvas: calibrated on
#: the validation brain (1 mm slices, 1.7 mm canvas pixels; ``docs/results/evaluation/``):
#: interpolating over 2 slices (1.18 pixels) moved the mean Dice at k = 2, 3, 5, 8 by at most
#: 0.0009 and no structure by more than 0.0036; over 3 (1.76 pixels) one structure lost 0.0098,
#: and on 3 mm MR slices over 2 (2.2 pixels) one lost 0.0136.
NETWORK_STEP_CANVAS_PIXELS = 1.2


def network_step(slice_mm: float, canvas_pixel_mm: float) -> int:
    """Every how many slices the network runs by default: as many slices as fit in
    :data:`NETWORK_STEP_CANVAS_PIXELS` pixels of its canvas (at least 1). The network cannot see
    finer than its canvas; its logits in between are interpolated (:func:`network_slices`)."""
    if slice_mm <= 0 or canvas_pixel_mm <= 0:
        return 1
    return max(1, int(math.floor(NETWORK_STEP_CANVAS_PIXELS * canvas_pixel_mm / slice_mm + 1e-6)))


def network_slices(
    labeled: Sequence[int], targets: Sequence[int], step: int
) -> Tuple[List[int], Dict[int, Tuple[int, int]]]:
    """Which targets the network runs on when it runs on every ``step``-th slice, and where the
    others take their logits from: ``(computed, {t: (a, b)})`` with ``a < t < b`` computed.

    Targets fall into runs of consecutive slices (between two labeled slices, or beyond an end);
    in each run the network runs on both of its ends and on every ``step``-th slice counted from
    the end next to a labeled slice (the lower end when both are), so a run's choice depends on
    the run alone (an edit elsewhere changes nothing here)."""
    step = max(1, int(step))
    lab = set(int(i) for i in labeled)
    computed: List[int] = []
    between: Dict[int, Tuple[int, int]] = {}
    ts = sorted(set(int(t) for t in targets))
    runs: List[List[int]] = []
    for t in ts:
        if runs and t == runs[-1][-1] + 1 and t not in lab:
            runs[-1].append(t)
        elif t not in lab:
            runs.append([t])
    for run in runs:
        first, last = run[0], run[-1]
        if (first - 1) in lab or (last + 1) not in lab:
            picks = set(range(first, last + 1, step)) | {last}
        else:  # labeled only above the run: count from its upper end
            picks = set(range(last, first - 1, -step)) | {first}
        picks = sorted(picks)
        computed.extend(picks)
        for a, b in zip(picks[:-1], picks[1:]):
            for t in range(a + 1, b):
                between[t] = (a, b)
    return sorted(computed), between


def isolated_slices(nonempty: Sequence[int]) -> int:
    """How many of the non-empty slice indices have no non-empty neighbour (k-1, k+1)."""
    present = set(nonempty)
    return sum(1 for k in present if k - 1 not in present and k + 1 not in present)


def painted_axis(mask: np.ndarray) -> int | None:
    """Array axis along which the foreground of ``mask`` occupies separate slices, or None when
    it is empty.

    Painted slices are isolated along the axis they were painted on (their neighbours are empty)
    and form one or two contiguous runs along the others, so the axis with the most isolated
    non-empty slices wins; a tie (e.g. a 3D brush on adjacent slices) goes to the axis with the
    fewest non-empty slices.
    """
    if not mask.any():
        return None
    scores = []
    for a in range(3):
        nonempty = nonempty_slices(mask, a)
        scores.append((-isolated_slices(nonempty), len(nonempty), a))
    return min(scores)[2]


def slice_wise_axis(mask: np.ndarray) -> int | None:
    """:func:`painted_axis` of a painting that has separate slices along it (at least one
    non-empty slice whose neighbours are empty), else None: a solid painting (e.g. a structure
    labeled on every slice) tells no slicing axis."""
    axis = painted_axis(mask)
    if axis is None or not isolated_slices(nonempty_slices(mask, axis)):
        return None
    return axis


def auto_axis(
    paintings: Mapping[str, np.ndarray],
    known: Optional[Mapping[str, int]] = None,
    label: Callable[[int], str] = lambda a: f"array axis {a}",
) -> int | None:
    """The array axis ``auto`` means: the one the painted slices lie on.

    Each segment tells an axis: in ``known`` (segment name -> the axis it was propagated along
    before), else from its mask in ``paintings`` (:func:`slice_wise_axis`; a solid painting tells
    none). Every axis told must be the same, else :class:`GeometryError` (one line naming the
    segments; ``label`` names an axis). When no segment tells one, the :func:`painted_axis` of all
    paintings together; None when nothing is painted.
    """
    told = dict(known or {})
    for name, mask in paintings.items():
        if name not in told:
            axis = slice_wise_axis(mask)
            if axis is not None:
                told[name] = axis
    axes = sorted(set(told.values()))
    if len(axes) > 1:
        parts = [f"{label(a)}: {', '.join(repr(n) for n in told if told[n] == a)}" for a in axes]
        raise GeometryError(
            f"the painted slices lie on more than one axis ({'; '.join(parts)}): choose the "
            "slicing axis, or propagate these segments separately"
        )
    if axes:
        return axes[0]
    union = None
    for mask in paintings.values():
        union = np.array(mask, dtype=bool) if union is None else union | np.asarray(mask, bool)
    return painted_axis(union) if union is not None else None
