"""Bring a labeled reference volume onto a target's grid, so that its slices can be support.

Cohort labeling takes its support from reference volumes. The :class:`Propagator` matches a
support slice to a target slice by their relative position along the slicing axis, which is only
meaningful when the two volumes show the anatomy at the same place. This module makes it so: it
resamples the reference image (linear) and its masks (nearest neighbour) onto the target grid
through a transform from the target's physical space to the reference's, found by one of

* ``extent`` (default): one scale and shift per physical axis, found by matching the two
  volumes' intensity profiles along that axis (the mean windowed intensity of each 2 mm slab;
  normalized cross-correlation over scales 1/2..2 and every shift that keeps 60% overlap). Fast
  (about half a second) and deterministic; it recovers shifts, a different field of view and a
  different resolution, and needs no threshold or body outline;
* ``affine``: a SimpleITK affine registration (Mattes mutual information, three resolution
  levels) started from the ``extent`` transform;
* ``none``: the physical coordinates as stored (for volumes already in one frame).

Where a volume holds image data (:func:`data_region`): everything but the padding at its border,
i.e. the whole planes along any array axis that hold one single value, as a shifted or cropped
field of view leaves them (-1024, the scanner's padding value, 0, ...). No real image has a whole
plane of one value; structures are never predicted where the target has no data or where no
reference had data once aligned (:attr:`AlignedReference.valid`), and
:attr:`AlignedReference.outside` says how much of each reference structure the alignment puts
outside the target's data.

:func:`register` also offers ``deformable`` (affine, then a B-spline), used only by the atlas
baseline of the evaluation (:mod:`UniverSegResearch.cohort_eval`). Every random choice of
the registrations (the metric's voxel sampling) uses :data:`REGISTRATION_SEED`: SimpleITK's seed 0
would mean "from the wall clock", so a fixed nonzero seed makes them reproducible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..core.geometry import Volume
from ..errors import UsageError

ALIGN_METHODS = ("extent", "affine", "none")
REGISTRATION_KINDS = ("extent", "affine", "deformable", "none")
#: Seed of the registrations' random voxel sampling (nonzero: SimpleITK's 0 means the clock).
REGISTRATION_SEED = 20261202
#: Range of the per-axis scale of the ``extent`` alignment.
EXTENT_SCALE_RANGE = (0.5, 2.0)
#: Sampling step of the intensity profiles matched by the ``extent`` alignment (mm).
PROFILE_STEP_MM = 2.0
#: Least overlap of two matched profiles, as a fraction of the shorter one.
MIN_OVERLAP = 0.6
#: B-spline control points, about this far apart (mm).
BSPLINE_MESH_MM = 50.0
#: Voxel size (mm, at least) of the grid the B-spline stage registers on (its pyramid: twice
#: that, then that): with control points 50 mm apart, finer voxels add cost (over 7 minutes for
#: a 512x512x20 CT on one thread, 90 s for a 30x106x118 one at 3 mm), not accuracy.
BSPLINE_GRID_MM = 6.0
#: Fraction of the grid's voxels the B-spline stage's metric samples: each control point's
#: support spans about 200 mm, so 5% still gives it thousands of samples.
BSPLINE_SAMPLING = 0.05
#: Metric evaluations per pyramid level, at most (L-BFGS-B's iterations do not bound its line
#: searches; the metric has flattened out well before this on the CT pairs).
BSPLINE_EVALUATIONS = 100


@dataclass
class AlignedReference:
    """A reference volume resampled onto a target grid."""

    image: Volume
    masks: Dict[str, np.ndarray]
    method: str
    seconds: float
    #: the transform (target physical LPS point -> reference point), as SimpleITK parameters
    parameters: List[float] = field(default_factory=list)
    #: target voxels (KJI, bool) where the reference has image data once aligned; None: every one
    valid: Optional[np.ndarray] = None
    #: by structure: the share of its reference voxels that the alignment puts outside the
    #: target's data region (computed when that region is given; empty when the transform has
    #: no inverse)
    outside: Dict[str, float] = field(default_factory=dict)


def data_box(array: np.ndarray) -> Tuple[slice, ...]:
    """The box of ``array`` left once every border plane (along any axis) that holds one single
    value is stripped, repeatedly (a shift along two axes leaves padding slabs on both). Only
    the planes at the box's faces are read, so a volume without padding costs six planes."""
    lo, hi = [0] * array.ndim, list(array.shape)

    def constant(ax: int, index: int) -> bool:
        box = tuple(index if a == ax else slice(lo[a], hi[a]) for a in range(array.ndim))
        plane = array[box]
        return bool(plane.min() == plane.max())

    changed = True
    while changed:
        changed = False
        for ax in range(array.ndim):
            while lo[ax] < hi[ax] and constant(ax, lo[ax]):
                lo[ax] += 1
                changed = True
            while hi[ax] > lo[ax] and constant(ax, hi[ax] - 1):
                hi[ax] -= 1
                changed = True
            if lo[ax] >= hi[ax]:
                return tuple(slice(0, 0) for _ in range(array.ndim))
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def data_region(volume: Volume) -> np.ndarray:
    """Voxels of ``volume`` (KJI, bool) that hold image data: all but the padding slabs at its
    border (:func:`data_box`)."""
    region = np.zeros(volume.array.shape, dtype=bool)
    region[data_box(volume.array)] = True
    return region


def axis_profiles(image) -> List[Tuple[np.ndarray, np.ndarray]]:
    """For each physical axis (LPS x, y, z): (positions in mm, mean windowed intensity of the
    slab at each position) along the array axis that runs closest to it."""
    import SimpleITK as sitk

    from ..core.canvas import intensity_window, scale_intensity

    array = sitk.GetArrayFromImage(image)  # KJI
    norm = scale_intensity(array, intensity_window(array))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    out = []
    for world in range(3):
        ijk = int(np.argmax(np.abs(direction[world])))  # array index axis closest to it
        kji = 2 - ijk
        other = tuple(a for a in range(3) if a != kji)
        profile = norm.mean(axis=other)
        step = direction[world, ijk] * spacing[ijk]
        positions = origin[world] + step * np.arange(array.shape[kji])
        if step < 0:
            positions, profile = positions[::-1], profile[::-1]
        out.append((positions, profile.astype(np.float64)))
    return out


def match_profiles(reference, target) -> Tuple[float, float]:
    """(scale, shift) with reference position = scale * target position + shift that best
    correlates two 1-D intensity profiles (scales :data:`EXTENT_SCALE_RANGE`, overlap of at
    least :data:`MIN_OVERLAP` of the shorter profile)."""
    (rp, rv), (tp, tv) = reference, target
    grid_r = np.arange(rp[0], rp[-1] + 1e-9, PROFILE_STEP_MM)
    ref = np.interp(grid_r, rp, rv)
    best = (-np.inf, 1.0, float(np.mean(rp) - np.mean(tp)))
    for scale in np.exp(
        np.linspace(np.log(EXTENT_SCALE_RANGE[0]), np.log(EXTENT_SCALE_RANGE[1]), 25)
    ):
        # the target profile on reference millimetres, then every integer shift of it
        length = (tp[-1] - tp[0]) * scale
        grid_t = np.arange(0.0, length + 1e-9, PROFILE_STEP_MM)
        tgt = np.interp(tp[0] + grid_t / scale, tp, tv)
        need = MIN_OVERLAP * min(len(ref), len(tgt))
        for offset in range(-len(tgt) + 1, len(ref)):
            lo_r, hi_r = max(0, offset), min(len(ref), offset + len(tgt))
            if hi_r - lo_r < need:
                continue
            a = ref[lo_r:hi_r]
            b = tgt[lo_r - offset : hi_r - offset]
            sa, sb = a.std(), b.std()
            if sa < 1e-6 or sb < 1e-6:
                continue
            ncc = float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))
            if ncc > best[0]:
                # reference mm = grid_r[0] + (offset + k) * step where target mm = tp[0] + k * step / scale
                shift = grid_r[0] + offset * PROFILE_STEP_MM - scale * tp[0]
                best = (ncc, float(scale), float(shift))
    return best[1], best[2]


def extent_transform(reference, target):
    """The ``extent`` alignment: a SimpleITK transform from target to reference points, one
    scale and shift per physical axis, found by matching the intensity profiles of the two
    volumes along each axis (:func:`match_profiles`)."""
    import SimpleITK as sitk

    scales, shifts = [], []
    for r, t in zip(axis_profiles(reference), axis_profiles(target)):
        s, d = match_profiles(r, t)
        scales.append(s)
        shifts.append(d)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in np.diag(scales).reshape(-1)])
    transform.SetTranslation([float(v) for v in shifts])
    return transform


def _registration(fixed, moving, transform, levels, iterations, seed):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(levels[0])
    reg.SetSmoothingSigmasPerLevel(levels[1])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(transform, inPlace=False)
    return reg


def affine_registration(reference, target, initial=None, seed: int = REGISTRATION_SEED):
    """Affine transform (target -> reference points) by mutual information, started from
    ``initial`` (default: :func:`extent_transform`)."""
    import SimpleITK as sitk

    fixed = sitk.Cast(target, sitk.sitkFloat32)
    moving = sitk.Cast(reference, sitk.sitkFloat32)
    start = sitk.AffineTransform(
        initial if initial is not None else extent_transform(reference, target)
    )
    reg = _registration(fixed, moving, start, ([4, 2, 1], [2, 1, 0]), 100, seed)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=100, relaxationFactor=0.5
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    try:
        return reg.Execute(fixed, moving)
    except RuntimeError:  # the optimizer left the image overlap: keep the starting alignment
        return start


def working_grid(image, spacing_mm: float):
    """``image`` (float32) on a grid of the same extent and direction with voxels of at least
    ``spacing_mm`` per axis, Gaussian-smoothed first where it is coarsened (no aliasing)."""
    import SimpleITK as sitk

    old = np.array(image.GetSpacing(), dtype=np.float64)
    new = np.maximum(old, float(spacing_mm))
    image = sitk.Cast(image, sitk.sitkFloat32)
    if np.allclose(new, old):
        return image
    size = np.maximum(1, np.round(np.array(image.GetSize()) * old / new)).astype(int)
    new = np.array(image.GetSize()) * old / size  # the same extent exactly
    sigma = [float(max(0.01, (n - o) / 2.0)) for n, o in zip(new, old)]
    smoothed = sitk.SmoothingRecursiveGaussian(image, sigma)
    grid = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    grid.SetSpacing([float(v) for v in new])
    grid.SetDirection(image.GetDirection())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ ((new - old) / 2.0)
    grid.SetOrigin([float(v) for v in origin])
    return sitk.Resample(smoothed, grid, sitk.Transform(), sitk.sitkLinear, 0.0)


def deformable_registration(reference, target, affine, seed: int = REGISTRATION_SEED):
    """``affine`` followed by a B-spline transform (control points about
    :data:`BSPLINE_MESH_MM` apart, registered on the target resampled to voxels of at least
    :data:`BSPLINE_GRID_MM`), target -> reference."""
    import SimpleITK as sitk

    fixed = working_grid(target, BSPLINE_GRID_MM)
    moving = sitk.Resample(
        sitk.Cast(reference, sitk.sitkFloat32), fixed, affine, sitk.sitkLinear, 0.0
    )
    extent = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    mesh = [max(1, int(round(e / BSPLINE_MESH_MM))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = _registration(fixed, moving, bspline, ([2, 1], [1, 0]), 50, seed)
    reg.SetMetricSamplingPercentage(BSPLINE_SAMPLING, seed)
    reg.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5,
        numberOfIterations=50,
        maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=BSPLINE_EVALUATIONS,
    )
    try:
        warp = reg.Execute(fixed, moving)
    except RuntimeError:
        return affine
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(warp)
    return composite


def register(reference, target, kind: str = "extent", seed: int = REGISTRATION_SEED):
    """Transform from ``target`` to ``reference`` points (SimpleITK images) of one ``kind``."""
    import SimpleITK as sitk

    if kind == "none":
        return sitk.Transform(3, sitk.sitkIdentity)
    if kind == "extent":
        return extent_transform(reference, target)
    if kind == "affine":
        return affine_registration(reference, target, seed=seed)
    if kind == "deformable":
        return deformable_registration(
            reference, target, affine_registration(reference, target, seed=seed), seed
        )
    raise UsageError(f"alignment must be one of {', '.join(REGISTRATION_KINDS)}, got {kind!r}")


def _warp(mask: np.ndarray, source: Volume, grid, transform) -> np.ndarray:
    """``mask`` (KJI, on ``source``'s grid) on the SimpleITK image ``grid`` through
    ``transform`` (grid points -> source points), nearest neighbour, 0 outside ``source``."""
    import SimpleITK as sitk

    from ..core.io import volume_to_sitk

    m = volume_to_sitk(Volume(np.asarray(mask, dtype=np.uint8), source.ijk_to_ras))
    warped = sitk.Resample(m, grid, transform, sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(warped).astype(bool)


def _grid_of(volume: Volume):
    from ..core.io import volume_to_sitk

    return volume_to_sitk(Volume(np.zeros(volume.array.shape, np.uint8), volume.ijk_to_ras))


def resample_onto(target: Volume, reference: Volume, masks: Dict[str, np.ndarray], transform=None):
    """(reference image on the target grid, masks on the target grid) through ``transform``
    (target -> reference points; None: the stored physical coordinates)."""
    import SimpleITK as sitk

    from ..core.io import volume_to_sitk

    if transform is None:
        transform = sitk.Transform(3, sitk.sitkIdentity)

    grid = _grid_of(target)
    ref = volume_to_sitk(reference)
    low = float(np.min(reference.array)) if reference.array.size else 0.0
    image = sitk.Resample(sitk.Cast(ref, sitk.sitkFloat32), grid, transform, sitk.sitkLinear, low)
    out_masks = {name: _warp(mask, reference, grid, transform) for name, mask in masks.items()}
    return Volume(sitk.GetArrayFromImage(image), target.ijk_to_ras), out_masks


def outside_shares(
    reference: Volume,
    masks: Dict[str, np.ndarray],
    target: Volume,
    target_region: np.ndarray,
    transform,
) -> Dict[str, float]:
    """By structure: the share of its reference voxels that ``transform`` (target -> reference
    points) puts outside ``target_region`` (the target's data, or off its grid). Empty when the
    transform has no inverse."""
    try:
        inverse = transform.GetInverse()
    except (RuntimeError, AttributeError):
        return {}
    inside = _warp(target_region, target, _grid_of(reference), inverse)
    shares = {}
    for name, mask in masks.items():
        n = int(np.count_nonzero(mask))
        shares[name] = float(np.count_nonzero(mask & ~inside)) / n if n else 0.0
    return shares


def align_reference(
    reference: Volume,
    masks: Dict[str, np.ndarray],
    target: Volume,
    method: str = "extent",
    seed: int = REGISTRATION_SEED,
    target_region: Optional[np.ndarray] = None,
) -> AlignedReference:
    """``reference`` and its ``masks`` resampled onto the grid of ``target`` by ``method``
    (:data:`REGISTRATION_KINDS`), with where the reference has data on that grid; with
    ``target_region`` (:func:`data_region` of the target), also how much of each structure
    falls outside it."""
    from ..core.io import volume_to_sitk

    if method not in REGISTRATION_KINDS:
        raise UsageError(f"alignment must be one of {', '.join(ALIGN_METHODS)}, got {method!r}")
    t0 = time.perf_counter()
    transform = register(volume_to_sitk(reference), volume_to_sitk(target), method, seed)
    image, out = resample_onto(target, reference, masks, transform)
    valid = _warp(data_region(reference), reference, _grid_of(target), transform)
    outside = {}
    if target_region is not None:
        outside = outside_shares(reference, masks, target, target_region, transform)
    try:
        params = [float(v) for v in transform.GetParameters()] if method != "deformable" else []
    except RuntimeError:
        params = []
    return AlignedReference(image, out, method, time.perf_counter() - t0, params, valid, outside)
