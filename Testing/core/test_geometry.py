"""Geometry: axis names through the direction matrix, the canonical slice frame, the canvas."""

import numpy as np
import pytest
import torch
from conftest import rotation

from UniverSegLogic.core.canvas import Canvas, intensity_window, scale_intensity
from UniverSegLogic.core.geometry import (
    GeometryError,
    SliceFrame,
    Volume,
    make_ijk_to_ras,
    resolve_axis,
)


def oblique_volume(shape=(12, 17, 23), perm=(0, 1, 2), flips=(1, -1, 1)):
    """Anisotropic, oblique (rotated ~20 degrees), non-zero origin; IJK axes permuted/flipped."""
    d = np.eye(3)[:, list(perm)] * np.array(flips)
    d = rotation(0, 15) @ rotation(2, 20) @ d
    m = make_ijk_to_ras((0.8, 1.3, 3.0), (-41.5, 17.25, 102.0), d)
    return Volume(np.random.default_rng(0).random(shape).astype(np.float32), m)


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_axis_names_follow_the_direction_matrix(perm):
    v = oblique_volume(perm=perm)
    # IJK axis c points (mostly) along RAS axis perm[c]; array axis = 2 - c
    for name, ras in (("sagittal", 0), ("coronal", 1), ("axial", 2)):
        c = list(perm).index(ras)
        assert resolve_axis(v, name) == 2 - c
    assert resolve_axis(v, 1) == 1 and resolve_axis(v, "2") == 2
    with pytest.raises(GeometryError):
        resolve_axis(v, "oblique")
    with pytest.raises(GeometryError):
        resolve_axis(v, 3)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_frame_round_trip_and_slice_identity(axis):
    v = oblique_volume(perm=(2, 0, 1), flips=(-1, 1, -1))
    f = SliceFrame.of(v, axis)
    stack = f.to_frame(v.array)
    assert np.array_equal(f.from_frame(stack), v.array)
    # slice t of the stack holds exactly the voxels whose index along `axis` is t
    marker = np.zeros(v.array.shape, np.int32)
    idx = [slice(None)] * 3
    idx[axis] = 5
    marker[tuple(idx)] = 1
    assert np.flatnonzero(
        f.to_frame(marker).reshape(f.to_frame(marker).shape[0], -1).any(1)
    ).tolist() == [5]
    assert f.spacing[0] == pytest.approx(v.spacing_kji[axis])


def test_frames_of_differently_stored_volumes_agree():
    """Two volumes of the same anatomy stored with flipped/permuted axes give the same slices."""
    rng = np.random.default_rng(1)
    a = Volume(rng.random((6, 7, 8)).astype(np.float32), make_ijk_to_ras((1, 1, 2), (0, 0, 0)))
    # same world content stored differently: b[j, k, 7 - i] = a[k, j, i]
    arr_b = a.array[:, :, ::-1].transpose(1, 0, 2)
    d = np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], float)  # I_b -> -R, J_b -> +S, K_b -> +A
    m = make_ijk_to_ras((1, 2, 1), (7, 0, 0), d)
    b = Volume(arr_b.copy(), m)
    for name in ("axial", "coronal", "sagittal"):
        fa, fb = SliceFrame.of(a, name), SliceFrame.of(b, name)
        sa, sb = fa.to_frame(a.array), fb.to_frame(b.array)
        # slices keep their stored order; b stores R->L, so its sagittal order is reversed
        assert fb.slice_reversed == (name == "sagittal") and not fa.slice_reversed
        if fb.slice_reversed:
            sb = sb[::-1]
        assert np.array_equal(sa, sb), name
        n = sa.shape[0]
        same_slice_in_b = np.arange(n)[::-1] if fb.slice_reversed else np.arange(n)
        assert np.allclose(
            fa.relative_position(np.arange(n), n), fb.relative_position(same_slice_in_b, n)
        )


def test_bad_volumes():
    with pytest.raises(GeometryError, match="3D"):
        Volume(np.zeros((4, 4)))
    with pytest.raises(GeometryError, match="singular"):
        Volume(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize(
    "rows,cols,sr,sc",
    [(40, 90, 1.0, 1.0), (90, 40, 0.7, 1.9), (512, 300, 0.5, 0.5), (20, 20, 3.0, 3.0)],
)
def test_canvas_keeps_aspect_and_position(rows, cols, sr, sc):
    c = Canvas.for_slices(rows, cols, sr, sc)
    er, ec = rows * sr, cols * sc
    assert max(c.inner) == 128
    assert c.inner[0] / c.inner[1] == pytest.approx(er / ec, rel=0.03)
    # a block label goes to the canvas and comes back on the same pixels
    m = np.zeros((1, rows, cols), np.float32)
    m[0, rows // 4 : rows // 2, cols // 3 : (2 * cols) // 3] = 1
    back = c.from_canvas(c.to_canvas(torch.from_numpy(m))).numpy() >= 0.5
    centroid = np.argwhere(m[0] > 0).mean(0)
    assert np.abs(np.argwhere(back[0]).mean(0) - centroid).max() < max(
        rows / c.inner[0], cols / c.inner[1]
    )
    inter = np.logical_and(back[0], m[0] > 0).sum()
    assert 2 * inter / (back.sum() + m.sum()) > 0.9
    # the canvas is zero outside the resized slice
    full = c.to_canvas(torch.ones(1, rows, cols))[0, 0]
    top, left = c.offset
    assert full[top : top + c.inner[0], left : left + c.inner[1]].min() > 0.99
    assert full.sum().item() == pytest.approx(c.inner[0] * c.inner[1], rel=0.02)


def test_intensity_scaling_is_per_volume():
    arr = np.linspace(-1000, 3000, 10000, dtype=np.float32).reshape(10, 10, 100)
    lo, hi = intensity_window(arr)
    assert lo == pytest.approx(-980, abs=1) and hi == pytest.approx(2980, abs=1)
    s = scale_intensity(arr, (lo, hi))
    assert s.min() == 0.0 and s.max() == 1.0 and s.dtype == np.float32
    const = scale_intensity(np.full((3, 3, 3), 7.0), intensity_window(np.full((3, 3, 3), 7.0)))
    assert np.isfinite(const).all()
