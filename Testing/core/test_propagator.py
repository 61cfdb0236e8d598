"""The Propagator session: predictions land on the slices and voxels they belong to; user labels
kept; options validated where they enter; a re-run after one edit recomputes only the gaps next to
the edit and gives exactly the masks of a fresh session.

Geometry is isolated from the network with ``ThresholdEngineDouble`` (a test double named as such,
``conftest.py``): it "segments" a target slice as the pixels brighter than mid-grey, so for an image
whose bright region *is* the structure, a correct propagation reproduces it on every slice.
"""

import numpy as np
import pytest
from conftest import (
    ThresholdEngineDouble,
    blob_phantom,
    labeled_only,
    oblique_phantom,
    random_engine,
)

from UniverSegLogic.core.geometry import GeometryError, resolve_axis
from UniverSegLogic.core.metrics import dice
from UniverSegLogic.core.propagator import (
    PropagationOptions,
    Propagator,
    SegmentInput,
    slice_fingerprint,
)
from UniverSegLogic.core.slices import nonempty_slices
from UniverSegLogic.errors import Cancelled, SupportError, UniverSegError, UsageError


def _seg(key, mask, labeled=None, name=None):
    return SegmentInput(key, name or key, mask, labeled)


@pytest.mark.parametrize("axis", [0, 1, 2, "axial", "coronal", "sagittal"])
def test_predictions_land_on_their_slices(axis):
    vol, truth = oblique_phantom()
    a = resolve_axis(vol, axis)
    extent = nonempty_slices(truth, a)
    labeled = [extent[1], extent[len(extent) // 2], extent[-2]]
    user = labeled_only(truth, a, labeled)
    opts = PropagationOptions(axis=axis, use_prior=False, max_extrapolation=-1)
    res = Propagator(vol, opts, engine=ThresholdEngineDouble()).propagate([_seg("blob", user)])
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
            assert dice(p_stack[t], t_stack[t]) > 0.85, t
    assert dice(r.mask, truth) > 0.95


def test_labeled_slices_are_kept_bit_for_bit_and_segments_are_matched_by_key():
    vol, truth = oblique_phantom()
    # the user's painting disagrees with the image on purpose: it must survive unchanged
    user_a = labeled_only(truth, 0, [3, 8, 12])
    user_a[8, :4, :4] = True
    user_a[8, 10:14, 15:20] = False
    other = np.zeros_like(truth)
    other[5, 2:6, 3:9] = True
    other[11, 2:7, 3:9] = True
    opts = PropagationOptions(axis=0, use_prior=False)
    # two segments with the same name: results come back by key, never by name
    res = Propagator(vol, opts, engine=ThresholdEngineDouble()).propagate(
        [_seg("1", user_a, name="same"), _seg("2", other, name="same")]
    )
    ra, rb = res.get("1"), res.get("2")
    for t in (3, 8, 12):
        assert np.array_equal(ra.mask[t], user_a[t])
    for t in (5, 11):
        assert np.array_equal(rb.mask[t], other[t])
    assert ra.labeled_slices == [3, 8, 12] and rb.labeled_slices == [5, 11]
    assert set(ra.predicted_slices).isdisjoint({3, 8, 12})
    assert res.segments[0].probability.dtype == np.float32


def test_listed_slices_add_to_the_painted_ones_and_keep_confirmed_empty_ones_empty():
    vol, truth = oblique_phantom()
    user = labeled_only(truth, 0, [4, 9])
    opts = PropagationOptions(axis=0, use_prior=False, max_extrapolation=-1)
    session = Propagator(vol, opts, engine=ThresholdEngineDouble())
    r = session.propagate([_seg("a", user, [9, 16])]).segments[0]
    assert r.labeled_slices == [4, 9, 16]  # painted 4 is not in the list: still labeled
    assert np.array_equal(r.mask[4], user[4]) and np.array_equal(r.mask[9], user[9])
    assert not r.mask[16].any()  # the confirmed-empty slice stays empty
    assert 16 not in r.predicted_slices


def test_progress_and_cancel():
    vol, truth = oblique_phantom()
    user = labeled_only(truth, 0, [3, 12])
    seen = []
    opts = PropagationOptions(axis=0)
    Propagator(vol, opts, engine=ThresholdEngineDouble()).propagate(
        [_seg("a", user)], progress=lambda f, m: seen.append(f)
    )
    assert seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen) and seen == sorted(seen)
    calls = []
    engine = ThresholdEngineDouble()
    with pytest.raises(Cancelled):
        Propagator(vol, opts, engine=engine).propagate(
            [_seg("a", user)], cancel=lambda: len(calls.append(1) or calls) > 2
        )
    assert engine.calls <= 2


def test_input_errors_raise_the_project_error_before_any_computation():
    vol, truth = oblique_phantom()
    eng = ThresholdEngineDouble()
    session = Propagator(vol, PropagationOptions(axis=0), engine=eng)
    with pytest.raises(SupportError, match="no labeled slice"):
        session.propagate([_seg("empty", np.zeros_like(truth))])
    with pytest.raises(GeometryError, match="does not match"):
        session.propagate([_seg("bad", truth[:-1])])
    with pytest.raises(SupportError, match="outside"):
        session.propagate([_seg("a", truth, [99])])
    with pytest.raises(UsageError, match="share the key"):
        session.propagate([_seg("a", truth), _seg("a", truth)])
    assert eng.calls == 0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"support_size": "2"}, "support_size must be an integer"),
        ({"support_size": 0}, "support_size must be at least 1"),
        ({"batch_size": -1}, "batch_size must be at least 1"),
        ({"ensemble": 0}, "ensemble must be at least 1"),
        ({"flips": "yes"}, "flips must be True or False"),
        ({"max_extrapolation": -2}, "max_extrapolation must be at least -1"),
        ({"axis": 1.5}, "axis must be"),
        ({"colour": 3}, "unknown option 'colour'"),
    ],
)
def test_options_are_validated_where_they_enter(values, message):
    with pytest.raises(UsageError, match=message) as info:
        PropagationOptions.from_mapping(values)
    assert isinstance(info.value, UniverSegError)


def test_a_batch_size_of_one_session_never_leaks_into_another():
    vol, truth = oblique_phantom()
    user = labeled_only(truth, 0, [3, 8, 12])
    engine = ThresholdEngineDouble()
    a = Propagator(vol, PropagationOptions(axis=0, batch_size=1, use_prior=False), engine=engine)
    a.propagate([_seg("a", user)])
    assert engine.batch_size == 5  # the session's batch size is its own, not the engine's
    b = Propagator(vol, PropagationOptions(axis=0, use_prior=False), engine=engine)
    r = b.propagate([_seg("a", user)]).segments[0]
    assert b.batch_size == 5 and r.mask.any() and r.predicted_slices


def test_real_network_runs_end_to_end():
    """The real (random-weight) network through the real engine: shapes, ranges, labels kept."""
    vol, truth = oblique_phantom(shape=(10, 16, 20))
    user = labeled_only(truth, 0, [3, 6])
    session = Propagator(vol, PropagationOptions(axis=0, support_size=2), engine=random_engine())
    r = session.propagate([_seg("a", user)]).segments[0]
    assert r.mask.shape == truth.shape and r.probability.shape == truth.shape
    assert 0.0 <= r.probability.min() and r.probability.max() <= 1.0
    assert np.array_equal(r.mask[[3, 6]], user[[3, 6]])
    assert r.predicted_slices


# ----------------------------------------------------------------------------- the session


def test_a_rerun_after_one_edit_runs_the_network_only_for_the_gaps_next_to_it():
    vol, truth = blob_phantom()
    painted = labeled_only(truth, 0, [2, 6, 10, 14])
    engine = ThresholdEngineDouble()
    session = Propagator(vol, PropagationOptions(axis=0, max_extrapolation=0), engine=engine)
    first = session.propagate([_seg("a", painted)])
    assert first.network_runs == 3 * 3 and first.network_reused == 0  # 3 gaps of 3 targets
    again = session.propagate([_seg("a", painted)])
    assert again.network_runs == 0  # nothing changed: nothing recomputed
    assert np.array_equal(again.segments[0].mask, first.segments[0].mask)
    # the user corrects slice 6: only the gaps (2, 6) and (6, 10) change support
    edited = painted.copy()
    edited[6, 10:14, 10:14] = ~edited[6, 10:14, 10:14]
    rerun = session.propagate([_seg("a", edited)])
    assert rerun.network_runs == 6 and rerun.network_reused == 3
    # correcting a predicted slice (8) makes it labeled: the gap (6, 10) splits in two
    edited[8] = truth[8]
    rerun = session.propagate([_seg("a", edited)])
    assert rerun.network_runs == 2 and rerun.segments[0].labeled_slices == [2, 6, 8, 10, 14]


def test_a_rerun_gives_exactly_the_masks_of_a_fresh_session():
    """Real engine, shape prior on (Fill between slices where importable): the cached re-run and a
    new session on the edited painting agree bit for bit."""
    vol, truth = blob_phantom()
    engine = random_engine()
    painted = labeled_only(truth, 0, [3, 8, 12])
    session = Propagator(vol, PropagationOptions(axis=0), engine=engine)
    session.propagate([_seg("a", painted)])
    edited = painted.copy()
    edited[10] = truth[10]  # a corrected slice in the last gap
    rerun = session.propagate([_seg("a", edited)])
    fresh = Propagator(vol, PropagationOptions(axis=0), engine=engine).propagate(
        [_seg("a", edited)]
    )
    assert rerun.network_reused > 0 and rerun.network_runs < fresh.network_runs
    assert np.array_equal(rerun.segments[0].mask, fresh.segments[0].mask)
    assert np.array_equal(rerun.segments[0].probability, fresh.segments[0].probability)


def test_slice_fingerprints_tell_labels_apart():
    a = np.zeros((5, 6), bool)
    b = a.copy()
    b[2, 3] = True
    assert slice_fingerprint(a) != slice_fingerprint(b)
    assert slice_fingerprint(a) != slice_fingerprint(np.zeros((6, 5), bool))
    assert slice_fingerprint(b) == slice_fingerprint(b.copy())


def test_notes_for_hand_set_fusion_are_given_once(tmp_path):
    vol, truth = blob_phantom()
    painted = labeled_only(truth, 0, [3, 8, 12])
    session = Propagator(
        vol,
        PropagationOptions(axis=0, weights=str(tmp_path / "custom.pt")),
        engine=ThresholdEngineDouble(),
    )
    first = session.propagate([_seg("a", painted)])
    assert any("hand-set defaults" in n for n in first.notes)
    assert session.propagate([_seg("a", painted)]).notes == []


# ------------------------------------------------------------------- the same rules everywhere


def test_a_segment_without_a_labeled_slice_is_skipped_with_a_note():
    vol, truth = oblique_phantom()
    user = labeled_only(truth, 0, [5, 10])
    session = Propagator(vol, PropagationOptions(axis=0), engine=ThresholdEngineDouble())
    res = session.propagate([_seg("fresh", np.zeros_like(truth)), _seg("blob", user)])
    assert [s.key for s in res.segments] == ["blob"] and res.skipped == ["fresh"]
    assert any(n.startswith("fresh: no labeled slice") and "skipped" in n for n in res.notes)
    with pytest.raises(KeyError):
        res.get("fresh")


def test_a_fully_labeled_run_is_left_bit_for_bit():
    vol, truth = oblique_phantom()
    a = 0
    extent = nonempty_slices(truth, a)
    run = labeled_only(truth, a, extent)  # every slice of the structure labeled
    session = Propagator(vol, PropagationOptions(axis=a), engine=ThresholdEngineDouble())
    r = session.propagate([_seg("spine", run)]).segments[0]
    assert r.predicted_slices == [] and np.array_equal(r.mask, run)
    # a gap inside the run, or an explicit extrapolation, is still predicted
    gap = labeled_only(truth, a, [t for t in extent if t != extent[3]])
    assert extent[3] in session.propagate([_seg("spine", gap)]).segments[0].predicted_slices
    wide = Propagator(
        vol, PropagationOptions(axis=a, max_extrapolation=1), engine=ThresholdEngineDouble()
    )
    assert wide.propagate([_seg("spine", run)]).segments[0].predicted_slices


def test_predicted_segments_do_not_overlap_and_painted_voxels_stay():
    vol, truth = oblique_phantom()
    # two segments painted on different slices of the same structure: both predict it
    first = labeled_only(truth, 0, [3, 9])
    second = labeled_only(truth, 0, [6, 12])
    session = Propagator(
        vol, PropagationOptions(axis=0, use_prior=False), engine=ThresholdEngineDouble()
    )
    res = session.propagate([_seg("first", first), _seg("second", second)])
    a, b = res.get("first").mask, res.get("second").mask
    assert not (a & b).any()
    assert np.array_equal(a[[3, 9]], first[[3, 9]]) and np.array_equal(b[[6, 12]], second[[6, 12]])
    assert a.any() and b.any() and (a | b)[7].sum() == truth[7].sum()


def test_the_device_comes_from_one_place():
    vol, _ = oblique_phantom()
    with pytest.raises(UsageError, match="one device"):
        Propagator(vol, PropagationOptions(axis=0, device="cuda"), engine=ThresholdEngineDouble())
    from UniverSegLogic.core.engines import EngineStore

    with pytest.raises(UsageError, match="not both"):
        Propagator(
            vol, PropagationOptions(axis=0), engine=ThresholdEngineDouble(), engines=EngineStore()
        )
