"""The fusion works in a region around the painting (``core.region``): it keeps every painted
voxel, and never cuts a structure that grows beyond the painted slices' extent -- the masks are
those of fusing whole slices. The network is a named test double (the image thresholded): these
tests are about geometry, not about the network."""

import numpy as np
import pytest
import torch
from conftest import ThresholdEngineDouble

from UniverSegLogic.core import restack
from UniverSegLogic.core.geometry import SliceFrame, Volume, make_ijk_to_ras
from UniverSegLogic.core.propagator import PropagationOptions, Propagator, SegmentInput
from UniverSegLogic.core.region import Region, bounding_box, canvas_footprints
from UniverSegLogic.core.restack import assemble_probability, probability_at, resolve_overlaps
from UniverSegLogic.core.slices import network_slices, network_step

SHAPE = (19, 160, 150)  # slices finer than the 128-pixel canvas: regions are used
PAINTED = [4, 9, 14]


def _ellipse(shape, cy, cx, ry, rx):
    y, x = np.mgrid[: shape[0], : shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def _phantom():
    """A structure of radius ~14 px on the painted slices that swells to ~45 px between two of
    them and grows again beyond the last one, plus a bright object far away on one slice."""
    truth = np.zeros(SHAPE, bool)
    radius = {t: 14 for t in range(SHAPE[0])}
    radius.update({6: 40, 7: 45, 8: 30, 15: 30, 16: 38})
    for t, r in radius.items():
        if 2 <= t <= 16:
            truth[t] = _ellipse(SHAPE[1:], 80, 70, r, r * 0.9)
    image = truth.astype(np.float32)
    image[11][_ellipse(SHAPE[1:], 20, 130, 8, 8)] = 1.0  # another object
    image += np.random.default_rng(0).normal(0, 0.05, SHAPE).astype(np.float32)
    painted = np.zeros_like(truth)
    painted[PAINTED] = truth[PAINTED]
    return Volume(image, make_ijk_to_ras((0.8, 0.8, 1.0))), truth, painted


def _run(volume, painted, regions):
    session = Propagator(
        volume,
        PropagationOptions(axis=0, device="cpu"),
        engine=ThresholdEngineDouble(),
        regions=regions,
    )
    return session.propagate([SegmentInput("s", "structure", painted)]).segments[0]


def test_regions_give_the_masks_of_whole_slices_and_follow_a_structure_that_grows():
    volume, truth, painted = _phantom()
    ours = _run(volume, painted, regions=True)
    whole = _run(volume, painted, regions=False)
    assert np.array_equal(ours.mask, whole.mask)
    # every painted voxel kept, bit for bit
    assert np.array_equal(ours.mask[PAINTED], painted[PAINTED])
    # the structure grows far beyond the painted slices' extent, between them and beyond the
    # last one, and the prediction follows it there
    box = bounding_box([painted[t] for t in PAINTED])
    outside_box = np.ones(SHAPE[1:], bool)
    outside_box[box[0] : box[1], box[2] : box[3]] = False
    for t in (7, 16):
        assert (ours.mask[t] & truth[t] & outside_box).sum() > 500, t
    # slices away from the swellings were fused in a region smaller than the slice
    regions = {t: r for t, (r, _) in ours.probabilities.items()}
    assert any(not r.is_full for r in regions.values())
    assert regions[16].is_full  # the growth beyond the last slice went on outside its region
    # probabilities agree too where a region was used, to the float rounding of the signed
    # distances of a crop; outside the region nothing is foreground
    for t, (region, p) in ours.probabilities.items():
        full_p = whole.probabilities[t][1]
        np.testing.assert_allclose(p, region.crop(full_p), rtol=0, atol=1e-5, err_msg=str(t))
        assert (region.embed(np.ones(region.shape, bool), fill=False) | (full_p < 0.5)).all()


def test_region_geometry():
    r = Region.around((10, 20, 30, 40), 100, 80, (5, 50))
    assert (r.r0, r.r1, r.c0, r.c1, r.shape) == (5, 25, 0, 80, (20, 80))
    assert Region.around(None, 100, 80, (5, 5)).is_full
    m = np.zeros(r.shape, bool)
    m[5, 0] = True  # on the slice's own left edge: nothing can go on there
    assert not r.touches_border(m)
    m[0, 5] = True  # on the region's top side, inside the slice
    assert r.touches_border(m)
    plane = np.zeros((100, 80), bool)
    plane[12, 33] = plane[17, 38] = True
    assert bounding_box([plane, (plane[10:, :], 3, 0)]) == (12 - 10 + 3, 18, 33, 39)
    assert bounding_box([np.zeros((4, 4), bool)]) is None


@pytest.mark.parametrize("native,inner", [(512, 128), (160, 128), (128, 128), (301, 97)])
def test_canvas_footprints_are_the_lower_bilinear_sources(native, inner):
    first, last = canvas_footprints(native, inner)
    covered = np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last) if b >= a])
    assert np.array_equal(np.sort(covered), np.arange(native))  # each pixel exactly once
    # a native pixel's value only mixes its footprint's canvas pixel and the next one
    for c in range(inner):
        x = torch.zeros(1, 1, inner, 1)
        x[0, 0, c] = 1.0
        y = torch.nn.functional.interpolate(x, size=(native, 1), mode="bilinear")[0, 0, :, 0]
        users = np.flatnonzero(y.numpy() > 0)
        owners = {int(np.searchsorted(last, u)) for u in users}
        assert owners <= {c - 1, c}, (c, owners)


def test_the_network_runs_on_thin_slices_at_a_step_and_every_run_keeps_its_ends():
    assert network_step(0.85, 3.05) == 4 and network_step(5.0, 3.05) == 1
    assert network_step(1.0, 1.0) == 1 and network_step(1.0, 1.7) == 2
    targets = list(range(3, 10)) + list(range(11, 20)) + list(range(21, 24))
    computed, between = network_slices([10, 20], targets, 3)
    assert {3, 9, 11, 19, 21, 23} <= set(computed)
    assert set(computed) | set(between) == set(targets)
    assert all(a < t < b and a in computed and b in computed for t, (a, b) in between.items())
    # a gap's choice depends on the gap alone: adding a labeled slice elsewhere keeps it
    again, _ = network_slices([10, 20, 30], targets + list(range(25, 30)), 3)
    assert [t for t in computed if 10 < t < 20] == [t for t in again if 10 < t < 20]
    assert network_slices([10, 20], targets, 1) == (sorted(targets), {})


@pytest.mark.parametrize(
    "axis,row,col,flip_rows,flip_cols",
    [
        (0, 1, 2, False, False),
        (1, 0, 2, True, False),
        (2, 1, 0, True, True),
        (0, 2, 1, False, True),
    ],
)
def test_the_probability_at_voxels_is_the_assembled_probability(
    axis, row, col, flip_rows, flip_cols, monkeypatch
):
    """Overlaps between segments are settled from the probability at the contested voxels only
    (a clinical volume's float32 probability is never built): the values must be those of the
    assembled volume, in every frame, and the overlaps settled the same way."""
    rng = np.random.default_rng(axis * 4 + row)
    shape = (9, 12, 11)
    frame = SliceFrame(axis, row, col, flip_rows, flip_cols, (1.0, 1.0, 1.0))
    n_rows, n_cols = shape[row], shape[col]
    segments = []
    for s in range(3):
        user = rng.random(shape) > 0.6
        labeled = [1, 6] if s != 1 else [3]
        probs = {}
        for t in range(shape[axis]):
            if t in labeled or t == 8:
                continue
            region = Region.around((2 + s, 7, 1, 6 + s), n_rows, n_cols, (1, 2))
            probs[t] = (region, rng.random(region.shape).astype(np.float32))
        segments.append((user, labeled, probs))
    where = np.nonzero(np.ones(shape, bool))
    for user, labeled, probs in segments:
        full = assemble_probability(frame, user, labeled, probs)
        assert np.array_equal(probability_at(frame, user, labeled, probs, where), full[where])
    masks_a = [assemble_probability(frame, *seg) >= 0.5 for seg in segments]
    masks_b = [m.copy() for m in masks_a]
    lost_a = resolve_overlaps(
        masks_a,
        [assemble_probability(frame, *seg) for seg in segments],
        [s[1] for s in segments],
        axis,
    )
    # contested voxels found block by block: blocks of 2 slices give what one block gives
    monkeypatch.setattr(restack, "CLAIM_BLOCK_SLICES", 2)
    lost_b = resolve_overlaps(
        masks_b,
        [lambda w, seg=seg: probability_at(frame, *seg, w) for seg in segments],
        [s[1] for s in segments],
        axis,
    )
    assert sum(lost_a) > 0 and lost_a == lost_b
    assert all(np.array_equal(a, b) for a, b in zip(masks_a, masks_b))
