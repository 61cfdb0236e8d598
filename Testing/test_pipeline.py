"""Volume pipeline: predictions land on the slices and voxels they belong to; user labels kept.

Geometry is isolated from the network with ``ThresholdEngineDouble`` (a test double named as such):
it "segments" a target slice as the pixels brighter than mid-grey, so for an image whose bright
region *is* the structure, a correct pipeline reproduces the structure on every slice.
"""

import numpy as np
import pytest
import torch

from UniverSegLogic.core.engine import Cancelled, InferenceEngine
from UniverSegLogic.core.geometry import GeometryError, Volume, make_ijk_to_ras
from UniverSegLogic.core.model import UniverSeg
from UniverSegLogic.core.pipeline import (
    PropagationOptions,
    PropagationRequest,
    SegmentRequest,
    propagate,
)
from UniverSegLogic.core.support import SupportError


class ThresholdEngineDouble:
    """Test double for InferenceEngine: logit = 40 * (target - 0.5); ignores the support."""

    device = "cpu"
    batch_size = 5

    def __init__(self):
        self.calls = 0

    def logits(self, targets, support_images, support_labels):
        assert support_images.shape[0] >= 1 and support_images.shape == support_labels.shape
        self.calls += 1
        return 40.0 * (targets.float() - 0.5)


def _rot(deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.array(
        [[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]]
    )


def phantom(shape=(18, 26, 34), spacing=(0.9, 1.4, 2.5)):
    """Oblique, anisotropic volume with non-zero origin holding an off-centre ellipsoid whose
    cross-section changes from slice to slice along every axis."""
    m = make_ijk_to_ras(spacing, (-60.0, 33.5, -12.25), _rot(25) @ np.diag([1, -1, 1]))
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    inside = (((k - 7.5) / 6.5) ** 2 + ((j - 11) / 8.0) ** 2 + ((i - 19) / 11.0) ** 2) <= 1.0
    inside &= ~((k > 9) & (j < 10))  # break the symmetry
    image = np.where(inside, 900.0, -100.0).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 5, shape).astype(np.float32)
    return Volume(image, m), inside


def _labeled_only(mask, axis, labeled):
    out = np.zeros_like(mask)
    idx = [slice(None)] * 3
    for t in labeled:
        idx[axis] = t
        out[tuple(idx)] = mask[tuple(idx)]
    return out


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("axis", [0, 1, 2, "axial", "coronal", "sagittal"])
def test_predictions_land_on_their_slices(axis):
    vol, truth = phantom()
    from UniverSegLogic.core.geometry import resolve_axis

    a = resolve_axis(vol, axis)
    extent = np.flatnonzero(np.moveaxis(truth, a, 0).reshape(truth.shape[a], -1).any(1))
    labeled = [int(extent[1]), int(extent[len(extent) // 2]), int(extent[-2])]
    user = _labeled_only(truth, a, labeled)
    opts = PropagationOptions(axis=axis, use_prior=False, max_extrapolation=-1)
    res = propagate(
        PropagationRequest(vol, [SegmentRequest("blob", user)], opts),
        engine=ThresholdEngineDouble(),
    )
    r = res.segments[0]
    assert res.axis == a and r.labeled_slices == labeled
    assert set(r.predicted_slices) == set(range(truth.shape[a])) - set(labeled)
    t_stack, p_stack = np.moveaxis(truth, a, 0), np.moveaxis(r.mask, a, 0)
    for t in range(truth.shape[a]):
        # each slice agrees with its own truth (a shifted or swapped slice would not)
        if not t_stack[t].any():
            assert not p_stack[t].any(), t
        elif t_stack[t].sum() > 3:  # a lone voxel may vanish in the canvas round trip
            assert p_stack[t].any(), t
        if t_stack[t].sum() > 20:
            assert _dice(p_stack[t], t_stack[t]) > 0.85, t
    assert _dice(r.mask, truth) > 0.95


def test_labeled_slices_are_kept_bit_for_bit_and_segments_are_independent():
    vol, truth = phantom()
    # the user's painting disagrees with the image on purpose: it must survive unchanged
    user_a = _labeled_only(truth, 0, [3, 8, 12])
    user_a[8, :4, :4] = True
    user_a[8, 10:14, 15:20] = False
    other = np.zeros_like(truth)
    other[5, 2:6, 3:9] = True
    other[11, 2:7, 3:9] = True
    opts = PropagationOptions(axis=0, use_prior=False)
    res = propagate(
        PropagationRequest(vol, [SegmentRequest("a", user_a), SegmentRequest("b", other)], opts),
        engine=ThresholdEngineDouble(),
    )
    ra, rb = res.get("a"), res.get("b")
    for t in (3, 8, 12):
        assert np.array_equal(ra.mask[t], user_a[t])
    for t in (5, 11):
        assert np.array_equal(rb.mask[t], other[t])
    assert ra.labeled_slices == [3, 8, 12] and rb.labeled_slices == [5, 11]
    # unlabeled slices are predictions, never copies of the other segment
    assert set(ra.predicted_slices).isdisjoint({3, 8, 12})
    assert res.segments[0].probability.dtype == np.float32


def test_explicit_labeled_slices_include_confirmed_empty_ones():
    vol, truth = phantom()
    user = _labeled_only(truth, 0, [4, 9])
    opts = PropagationOptions(axis=0, use_prior=False, max_extrapolation=-1)
    res = propagate(
        PropagationRequest(vol, [SegmentRequest("a", user, [4, 9, 16])], opts),
        engine=ThresholdEngineDouble(),
    )
    r = res.segments[0]
    assert r.labeled_slices == [4, 9, 16]
    assert not r.mask[16].any()  # the confirmed-empty slice stays empty
    assert 16 not in r.predicted_slices


def test_progress_and_cancel():
    vol, truth = phantom()
    user = _labeled_only(truth, 0, [3, 12])
    seen = []
    req = PropagationRequest(vol, [SegmentRequest("a", user)], PropagationOptions(axis=0))
    propagate(req, progress=lambda f, m: seen.append(f), engine=ThresholdEngineDouble())
    assert seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen) and seen == sorted(seen)
    calls = []
    engine = ThresholdEngineDouble()
    with pytest.raises(Cancelled):
        propagate(req, cancel=lambda: len(calls.append(1) or calls) > 2, engine=engine)
    assert engine.calls <= 2


def test_input_errors():
    vol, truth = phantom()
    eng = ThresholdEngineDouble()
    with pytest.raises(SupportError, match="no labeled slice"):
        propagate(
            PropagationRequest(
                vol, [SegmentRequest("empty", np.zeros_like(truth))], PropagationOptions(axis=0)
            ),
            engine=eng,
        )
    with pytest.raises(GeometryError, match="does not match"):
        propagate(
            PropagationRequest(
                vol, [SegmentRequest("bad", truth[:-1])], PropagationOptions(axis=0)
            ),
            engine=eng,
        )
    with pytest.raises(SupportError):
        propagate(
            PropagationRequest(vol, [SegmentRequest("a", truth, [99])], PropagationOptions(axis=0)),
            engine=eng,
        )
    assert eng.calls == 0


def test_real_network_runs_end_to_end():
    """The real (random-weight) network through the real engine: shapes, ranges, labels kept."""
    torch.manual_seed(0)
    vol, truth = phantom(shape=(10, 16, 20))
    user = _labeled_only(truth, 0, [3, 6])
    res = propagate(
        PropagationRequest(
            vol, [SegmentRequest("a", user)], PropagationOptions(axis=0, support_size=2)
        ),
        engine=InferenceEngine(UniverSeg(), "cpu", batch_size=4),
    )
    r = res.segments[0]
    assert r.mask.shape == truth.shape and r.probability.shape == truth.shape
    assert 0.0 <= r.probability.min() and r.probability.max() <= 1.0
    assert np.array_equal(r.mask[[3, 6]], user[[3, 6]])
    assert r.predicted_slices
