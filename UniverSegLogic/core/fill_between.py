"""Slicer's "Fill between slices", run outside the Slicer application.

Slicer's Segment Editor effect ("Fill between slices") runs ``vtkITKMorphologicalContourInterpolator``
(Slicer's vtkITK wrapper of ITK's morphological contour interpolation, Zukic et al. 2016) with all
settings at their defaults (label 0 = every label, axis -1 = every axis with annotated slices,
heuristic alignment on, repeated dilations instead of a distance transform, cross structuring
element) on the merged labelmap of the visible segments. That labelmap covers the segments'
effective extent grown by ``max(3, 10 % of the extent)`` voxels on every side (clamped to the image),
and segment *n* has label value *n*. :func:`fill_between_slices` reproduces exactly that for one
binary mask, so the comparison with our propagation is the comparison a Slicer user would see.

The filter ships with the Slicer application (``vtkITK``) and with the ``slicer-core`` wheel
(``slicer.vtkITKMorphologicalContourInterpolator``). With slicer-core, ITK's default thread pool
can crash the process at exit after the filter ran; :func:`interpolator_class` therefore selects
ITK's ``Platform`` threader (:func:`.itk_threads.use_platform_threader`) unless the user chose
one.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UniverSegError
from .itk_threads import use_platform_threader
from .slices import nonempty_slices

#: Slicer's AbstractScriptedSegmentEditorAutoCompleteEffect: extent growth ratio and minimum margin.
EXTENT_GROWTH_RATIO = 0.1
MINIMUM_EXTENT_MARGIN = 3

_CLASS = None


class FillBetweenUnavailable(UniverSegError):
    """Neither the Slicer application's vtkITK nor the slicer-core wheel is importable."""


class FillBetweenRefused(FillBetweenUnavailable):
    """The painting is one the interpolator cannot take: it would abort the whole process."""


#: The interpolator labels the islands of a slice with an 8-bit ITK ConnectedComponentImageFilter;
#: more than this many islands throw a C++ exception that aborts the process (measured: 306
#: islands of 3x3 pixels abort slicer-core 5.11; ``Testing/test_safety.py``). Checked before every
#: call, with the filter's own 4-connectivity, on every slice the filter will label.
MAX_ISLANDS = 255


def count_islands(plane: np.ndarray) -> int:
    """Number of 4-connected islands of a 2D boolean slice."""
    import SimpleITK as sitk

    plane = np.ascontiguousarray(plane, dtype=np.uint8)
    if not plane.any():
        return 0
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(plane), False)
    return int(sitk.GetArrayViewFromImage(cc).max())


def interpolated_slices(mask: np.ndarray, axis: int = -1) -> Dict[int, List[int]]:
    """The slices the interpolator treats as annotated, per array axis (its
    ``DetermineSliceOrientations``): a voxel marks its slice along axis ``a`` when both of its
    neighbours along ``a`` are empty and both of its neighbours along each other axis are set.
    So a painting on adjacent slices can make the filter work on slices along *another* axis.
    ``axis`` >= 0 keeps that array axis only (the filter's ``SetAxis``)."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    core = (slice(1, -1),) * 3
    isolated, adjacent = [], []
    for a in range(3):
        lo = [slice(1, -1)] * 3
        hi = [slice(1, -1)] * 3
        lo[a], hi[a] = slice(0, -2), slice(2, None)
        prev, nxt = m[tuple(lo)], m[tuple(hi)]
        isolated.append(~prev & ~nxt)
        adjacent.append(prev & nxt)
    inside = m[core]
    once = (isolated[0].astype(np.uint8) + isolated[1] + isolated[2]) == 1
    out: Dict[int, List[int]] = {}
    for a in range(3) if axis < 0 else (int(axis),):
        others = [b for b in range(3) if b != a]
        marks = inside & isolated[a] & once & adjacent[others[0]] & adjacent[others[1]]
        if marks.any():
            out[a] = [int(i) for i in np.flatnonzero(marks.any(axis=tuple(others)))]
    return out


def check_islands(
    mask: np.ndarray,
    labeled_slices: Optional[Sequence[int]] = None,
    axis: int = 0,
    interpolation_axis: int = -1,
) -> None:
    """Raise :class:`FillBetweenRefused` when a slice the interpolator will label holds more
    islands than it can (:data:`MAX_ISLANDS`): the ``labeled_slices`` along ``axis`` and every
    slice :func:`interpolated_slices` finds in ``mask`` (the painting the filter receives)."""
    work = {int(axis): [int(i) for i in labeled_slices]} if labeled_slices is not None else {}
    for a, found in interpolated_slices(mask, interpolation_axis).items():
        work[a] = sorted(set(work.get(a, [])) | set(found))
    for a, slices in sorted(work.items()):
        for i in slices:
            n = count_islands(np.take(mask, int(i), axis=a))
            if n > MAX_ISLANDS:
                where = (
                    f"slice {int(i)}" if a == int(axis) else f"slice {int(i)} along array axis {a}"
                )
                raise FillBetweenRefused(
                    f"Fill between slices skipped: {where} holds {n} separate islands "
                    f"(it handles at most {MAX_ISLANDS})"
                )


def interpolator_class():
    """The ``vtkITKMorphologicalContourInterpolator`` class (raises FillBetweenUnavailable)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Platform")
    try:  # inside the Slicer application
        from vtkITK import vtkITKMorphologicalContourInterpolator as cls  # type: ignore
    except ImportError:
        try:  # slicer-core wheel
            import slicer  # type: ignore

            cls = slicer.vtkITKMorphologicalContourInterpolator
            use_platform_threader()  # a script that imports slicer exits cleanly afterwards
        except (ImportError, AttributeError) as exc:
            raise FillBetweenUnavailable(
                "Fill between slices needs Slicer's vtkITK (the Slicer application or the "
                f"slicer-core package): {exc}"
            ) from None
    _CLASS = cls
    return cls


def available() -> bool:
    """True when the morphological contour interpolator can be used in this process."""
    try:
        interpolator_class()
    except FillBetweenUnavailable:
        return False
    return True


def slicer_extent(mask: np.ndarray) -> Optional[tuple]:
    """Per-axis (lo, hi) inclusive crop the effect uses for ``mask`` (None when it is empty)."""
    idx = [
        np.flatnonzero(np.asarray(mask).any(axis=tuple(a for a in range(3) if a != ax)))
        for ax in range(3)
    ]
    if any(len(i) == 0 for i in idx):
        return None
    return grown_extent([(int(i[0]), int(i[-1])) for i in idx], np.shape(mask))


def grown_extent(bounds: Sequence[tuple], shape: Sequence[int]) -> tuple:
    """The effect's crop of a painting whose voxels span ``bounds`` (per axis (lo, hi),
    inclusive): each axis grown by ``max(3, 10 %)`` of its span, clipped to ``shape``."""
    out = []
    for (lo, hi), n in zip(bounds, shape):
        margin = int(max(MINIMUM_EXTENT_MARGIN, EXTENT_GROWTH_RATIO * (hi - lo)))
        out.append((max(0, lo - margin), min(int(n) - 1, hi + margin)))
    return tuple(out)


def fill_between_gap(
    stack: np.ndarray, lo: int, hi: int, spacing_kji: Sequence[float] = (1.0, 1.0, 1.0)
) -> Optional[Tuple[int, int, np.ndarray]]:
    """Slicer's Fill between slices of a painting that holds only slices ``lo`` and ``hi`` of
    the (slices, rows, cols) boolean ``stack`` (the effect's crop and settings; what
    :func:`fill_between_slices` gives for ``labeled_slices=[lo, hi]``), on the slices strictly
    between them: ``(row offset, col offset, (hi - lo - 1, h, w) boolean block)``, or None where
    it is empty (nothing painted, or no slice in between).

    One gap at a time: the result of a gap depends on its two slices only (the interpolator, run
    on a whole painting, also lets the other painted slices change a gap's result a little), so
    a gap's result can be kept while the user paints elsewhere. Raises :class:`FillBetweenRefused`
    for a slice the interpolator would abort the process on."""
    if hi - lo < 2:
        return None
    a, b = np.asarray(stack[lo], dtype=bool), np.asarray(stack[hi], dtype=bool)
    both = a | b
    rows, cols = np.flatnonzero(both.any(axis=1)), np.flatnonzero(both.any(axis=0))
    if not len(rows):
        return None
    n = np.shape(stack)[0]
    (z0, z1), (r0, r1), (c0, c1) = grown_extent(
        [(lo, hi), (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))],
        (n,) + both.shape,
    )
    labels = np.zeros((z1 - z0 + 1, r1 - r0 + 1, c1 - c0 + 1), dtype=np.uint8)
    labels[lo - z0] = a[r0 : r1 + 1, c0 : c1 + 1]
    labels[hi - z0] = b[r0 : r1 + 1, c0 : c1 + 1]
    check_islands(labels, [lo - z0, hi - z0], 0, -1)
    result = interpolate_labelmap(labels, spacing_kji, -1)
    block = result[lo - z0 + 1 : hi - z0] > 0
    return (r0, c0, block) if block.any() else None


def interpolate_labelmap(
    labelmap: np.ndarray, spacing_kji: Sequence[float] = (1.0, 1.0, 1.0), axis: int = -1
) -> np.ndarray:
    """Run the interpolator on a KJI integer labelmap (Slicer's defaults; ``axis`` as array axis).

    ``axis`` -1 leaves the filter's own default (all axes), which is what Slicer does.
    """
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData

    lab = np.ascontiguousarray(labelmap, dtype=np.uint8)
    image = vtkImageData()
    image.SetDimensions(int(lab.shape[2]), int(lab.shape[1]), int(lab.shape[0]))  # I, J, K
    image.SetSpacing(*[float(s) for s in np.asarray(spacing_kji, dtype=float)[::-1]])
    scalars = numpy_support.numpy_to_vtk(lab.reshape(-1), deep=True)
    image.GetPointData().SetScalars(scalars)
    filt = interpolator_class()()
    if axis >= 0:
        filt.SetAxis(2 - int(axis))  # ITK/VTK axis order is I, J, K
    filt.SetInputData(image)
    filt.Update()
    out = numpy_support.vtk_to_numpy(filt.GetOutput().GetPointData().GetScalars())
    return out.reshape(lab.shape).copy()


def labeled_only(mask: np.ndarray, labeled_slices: Sequence[int], axis: int = 0) -> np.ndarray:
    """``mask`` with every slice along ``axis`` that is not in ``labeled_slices`` cleared."""
    mask = np.asarray(mask, dtype=bool)
    keep = np.zeros(mask.shape[axis], dtype=bool)
    keep[[int(i) for i in labeled_slices]] = True
    shape = [1, 1, 1]
    shape[axis] = -1
    return mask & keep.reshape(shape)


def fill_between_slices(
    mask: np.ndarray,
    labeled_slices: Optional[Sequence[int]] = None,
    axis: int = 0,
    spacing_kji: Sequence[float] = (1.0, 1.0, 1.0),
    interpolation_axis: int = -1,
) -> np.ndarray:
    """What Slicer's Fill between slices makes of ``mask`` painted on ``labeled_slices``.

    ``mask`` is a KJI boolean array; only its ``labeled_slices`` along array axis ``axis`` are used
    (all non-empty slices when None). The labelmap is cropped to the effect's extent, interpolated
    with the effect's settings, and pasted back; labeled slices come back unchanged.
    ``interpolation_axis`` -1 (the effect's choice) lets the filter pick the axes itself.
    Raises :class:`FillBetweenRefused` (and calls nothing) for a painting the filter would abort
    the process on.
    """
    mask = np.asarray(mask, dtype=bool)
    if labeled_slices is None:
        labeled_slices = nonempty_slices(mask, axis)
    return fill_between_segments([mask], [labeled_slices], axis, spacing_kji, interpolation_axis)[0]


def fill_between_segments(
    masks: Sequence[np.ndarray],
    labeled_slices: Sequence[Sequence[int]],
    axis: int = 0,
    spacing_kji: Sequence[float] = (1.0, 1.0, 1.0),
    interpolation_axis: int = -1,
) -> List[np.ndarray]:
    """What Slicer's Fill between slices makes of several segments at once: one run on their
    merged labelmap (segment ``n`` = label ``n + 1``; where two overlap the later one wins, as in
    the effect's merged labelmap), cropped to the effect's extent of them all.

    ``masks[n]`` is a KJI boolean array painted on ``labeled_slices[n]`` along ``axis``; returns
    one boolean array per segment. Raises :class:`FillBetweenRefused` (and calls nothing) for a
    painting the filter would abort the process on."""
    if len(masks) != len(labeled_slices) or not 0 < len(masks) < 256:
        raise ValueError("one list of labeled slices per mask, 1 to 255 masks")
    shape = np.shape(masks[0])
    labels = np.zeros(shape, dtype=np.uint8)
    painted = []
    for n, (mask, slices) in enumerate(zip(masks, labeled_slices)):
        p = labeled_only(mask, slices, axis)
        labels[p] = n + 1
        painted.append(p)
    outs = [np.zeros(shape, dtype=bool) for _ in masks]
    ext = slicer_extent(labels)
    if ext is None:
        return outs
    crop = tuple(slice(lo, hi + 1) for lo, hi in ext)
    # the filter sees only the crop: check the islands there
    for p, slices in zip(painted, labeled_slices):
        check_islands(
            p[crop],
            [
                int(i) - crop[axis].start
                for i in slices
                if crop[axis].start <= int(i) < crop[axis].stop
            ],
            axis,
            interpolation_axis,
        )
    result = interpolate_labelmap(labels[crop], spacing_kji, interpolation_axis)
    for n, out in enumerate(outs):
        out[crop] = result == n + 1
    return outs
