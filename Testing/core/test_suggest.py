"""Slice uncertainty and the next-slice suggestion (core/suggest.py), through the Propagator, the
MRML-free CLI report and the session evaluation.

Geometry is isolated from the network with ``ThresholdEngineDouble`` (a test double named as such,
``conftest.py``): it segments the bright pixels of a target, so the network is right and what
moves the suggestion is where the painted-slice prior (interpolation) is wrong: where the shape
changes between painted slices.
"""

import inspect
import json

import numpy as np
import pytest
from conftest import ThresholdEngineDouble, labeled_only

from UniverSegLogic.core import suggest
from UniverSegLogic.core.geometry import Volume, make_ijk_to_ras
from UniverSegLogic.core.propagator import PropagationOptions, Propagator, SegmentInput
from UniverSegLogic.core.slices import evaluation_slices, slice_extent
from UniverSegResearch import session_eval as se

# ---------------------------------------------------------------------------- phantoms


def _moving_disc(n=26, flip=False, still=False):
    """A disc of radius 7 that stays put on slices < 13 and then moves 1.8 px per slice
    (``still``: never moves; ``flip``: the moving part at the low slices); (volume, mask)."""
    k, j, i = np.mgrid[:n, :60, :40]
    kk = (n - 1 - k) if flip else k
    cj = 18.0 + (0.0 if still else 1.8) * np.maximum(0, kk - 13)
    mask = (j - cj) ** 2 + (i - 20) ** 2 <= 49
    image = np.where(mask, 900.0, -100.0).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 5, mask.shape).astype(np.float32)
    return Volume(image, make_ijk_to_ras((2.0, 1.0, 1.0))), mask


def _propagate(vol, painted, labeled, **opts):
    session = Propagator(vol, PropagationOptions(axis=0, **opts), engine=ThresholdEngineDouble())
    return session, session.propagate([SegmentInput("s", "s", painted, labeled)])


# ---------------------------------------------------------------------------- the rule itself


def _uniform(n, labeled, value=10.0):
    lab = sorted(labeled)
    scores = {i: (0.0 if i in lab else value) for i in range(n)}
    return suggest.SliceUncertainty(n, lab, scores)


def test_suggestions_are_never_labeled_distinct_and_at_most_n():
    rng = np.random.default_rng(3)
    for _ in range(60):
        n = int(rng.integers(2, 40))
        labeled = sorted(set(rng.integers(0, n, int(rng.integers(1, n + 1))).tolist()))
        scores = {i: float(rng.random() * 50) for i in range(n)}
        for i in labeled:
            scores[i] = 0.0
        want = int(rng.integers(1, 6))
        out = suggest.suggest_slices(suggest.SliceUncertainty(n, labeled, scores), want)
        assert len(out) == len(set(out)) <= want
        assert not set(out) & set(labeled)
        assert all(0 <= c < n for c in out)
        free = n - len(labeled)
        assert len(out) == min(want, free)  # every unlabeled slice has something to gain
    assert suggest.suggest_slices(_uniform(5, range(5)), 3) == []
    # no labeled slice (support from other volumes only): still spread out
    none = suggest.suggest_slices(_uniform(40, []), 3)
    assert len(set(none)) == 3 and min(abs(x - y) for x in none for y in none if x != y) >= 3


def test_uniform_uncertainty_gives_bisection_and_spread_out_suggestions():
    unc = _uniform(41, [0, 40])
    out = suggest.suggest_slices(unc, 3)
    assert out[0] == 20
    a, b = sorted(out[1:])
    assert 4 <= a <= 16 and 24 <= b <= 36  # one in each half: spread out
    assert min(abs(x - y) for x in out for y in out if x != y) >= 4
    # the longest gap first
    assert suggest.suggest_slices(_uniform(41, [0, 10, 40]), 1) == [25]


def test_uncertainty_moves_the_suggestion_and_zero_beyond_an_empty_end():
    n = 41
    unc = _uniform(n, [0, 20, 40], value=1.0)
    unc.scores.update({i: 30.0 for i in range(26, 31)})  # one region is unsure
    assert 26 <= suggest.suggest_slices(unc, 1)[0] <= 30
    # beyond the labeled range: may be picked when the uncertainty is there
    unc2 = _uniform(n, [10, 20], value=0.5)
    unc2.scores.update({i: 40.0 for i in range(0, 8)})
    assert suggest.suggest_slices(unc2, 1)[0] < 10


def test_uncertainty_of_a_propagation_is_computed_without_any_truth():
    params = set(inspect.signature(suggest.slice_uncertainty).parameters)
    assert params == {"probabilities", "mask_stack", "labeled", "prior"}
    assert set(inspect.signature(suggest.suggest_slices).parameters) == {"unc", "n"}
    stack = np.zeros((12, 8, 8), bool)
    stack[3, 2:6, 2:6] = stack[8, 2:6, 2:6] = True
    probs = {t: np.full((8, 8), 0.5 if t == 5 else 0.02, np.float32) for t in (4, 5, 6, 7)}
    unc = suggest.slice_uncertainty(probs, stack, [3, 8])
    assert set(unc.scores) == set(range(12))
    assert unc.scores[3] == unc.scores[8] == 0.0
    assert unc.scores[5] == pytest.approx(32.0 * suggest.WEIGHTS["inside_no_prior"]["margin"])
    assert unc.scores[5] > unc.scores[4] > 0
    # the painted end goes on: the slices beyond the prediction are unsure; labeled-empty: not
    assert unc.scores[2] > 0 and unc.scores[9] > 0
    stack[9] = False
    unc_empty_end = suggest.slice_uncertainty(probs, stack, [3, 8, 9])
    assert unc_empty_end.scores[10] == unc_empty_end.scores[11] == 0.0


# ---------------------------------------------------------------------------- through the Propagator


@pytest.mark.parametrize("flip", [False, True])
def test_suggestion_moves_to_where_the_phantom_changes_most(flip):
    n = 26
    labeled = [1, 14, 24] if not flip else [1, 11, 24]
    vol, truth = _moving_disc(n, flip=flip)
    session, res = _propagate(vol, labeled_only(truth, 0, labeled), labeled)
    r = res.segments[0]
    first = session.suggest_slices(r, 1)[0]
    moving = range(15, 24) if not flip else range(2, 11)
    assert first in moving, (first, r.slice_uncertainty)
    # the same painted slices on a shape that does not change: the longest gap gets it
    still_vol, still = _moving_disc(n, flip=flip, still=True)
    _, res2 = _propagate(still_vol, labeled_only(still, 0, labeled), labeled)
    still_first = res2.segments[0].suggested_slices(1)[0]
    assert still_first not in moving
    assert set(r.slice_uncertainty) == set(range(n))
    assert all(r.slice_uncertainty[i] == 0.0 for i in labeled)


def test_suggestion_may_lie_beyond_the_painted_range_and_never_past_a_confirmed_end():
    vol, truth = _moving_disc(26, still=True)  # a cylinder over every slice
    _, res = _propagate(vol, labeled_only(truth, 0, [11, 15]), [11, 15])
    r = res.segments[0]
    out = r.suggested_slices(3)
    assert any(c < 11 or c > 15 for c in out), out
    assert not set(out) & {11, 15}
    # the user confirmed that the structure ends at 16 (labeled empty): nothing suggested past it
    painted = labeled_only(truth, 0, [11, 15])
    _, res2 = _propagate(vol, painted, [11, 15, 16])
    r2 = res2.segments[0]
    assert r2.labeled_slices == [11, 15, 16]
    assert all(c < 16 for c in r2.suggested_slices(5))
    assert all(r2.slice_uncertainty[i] == 0.0 for i in range(16, 26))


def test_changing_the_truth_elsewhere_does_not_change_the_suggestion():
    vol, truth = _moving_disc(26)
    other = truth.copy()
    other[9:12, 40:50, 2:10] = True  # a different truth, same painted slices
    labeled = [1, 14, 24]
    a = _propagate(vol, labeled_only(truth, 0, labeled), labeled)[1].segments[0]
    b = _propagate(vol, labeled_only(other, 0, labeled), labeled)[1].segments[0]
    assert a.suggested_slices(3) == b.suggested_slices(3)
    assert a.slice_uncertainty == b.slice_uncertainty
    # in a session, the first pick is made before any truth beyond the start slices is used
    ext = slice_extent(truth, 0)
    start = evaluation_slices(ext[0], ext[1], 2)
    assert np.array_equal(labeled_only(truth, 0, start), labeled_only(other, 0, start))
    sessions = []
    for t in (truth, other):
        session = Propagator(vol, PropagationOptions(axis=0), engine=ThresholdEngineDouble())
        sessions.append(
            se.run_session(t, "ours_suggest", session, vol.spacing_kji, max_painted=3, target=1.1)
        )
    assert sessions[0].painted[2] == sessions[1].painted[2]


# ---------------------------------------------------------------------------- session evaluation


def test_bisection_slice_is_the_middle_of_the_longest_unlabeled_run():
    assert se.bisection_slice([3, 9], (0, 20)) == 15  # run 10..20
    assert se.bisection_slice([3, 9], (3, 12)) == 6  # runs 4..8 (5) and 10..12 (3)
    assert se.bisection_slice([2, 4], (2, 6)) == 5  # runs 3..3 and 5..6: the longer
    assert se.bisection_slice([0, 1, 2], (0, 2)) is None


def test_session_evaluation_on_a_phantom(tmp_path):
    vol, truth = _moving_disc(26)
    session = Propagator(vol, PropagationOptions(axis=0), engine=ThresholdEngineDouble())
    traces = []
    for strategy in se.STRATEGIES:
        tr = se.run_session(truth, strategy, session, vol.spacing_kji, name="disc", max_painted=8)
        traces.append(tr)
        ext = slice_extent(truth, 0)
        assert tr.painted[: tr.start_count] == evaluation_slices(ext[0], ext[1], 2)
        assert len(set(tr.painted)) == len(tr.painted) <= 8
        assert len(tr.dice) == len(tr.painted) - tr.start_count + 1
        assert all(0.0 <= d <= 1.0 for d in tr.dice)
        reached = tr.slices_to_target
        if reached is not None:
            assert tr.stop == "reached" and tr.dice[-1] >= 0.9
            assert reached == tr.counts[-1]
        else:
            assert tr.stop in ("max_painted", "no_slice_left") and max(tr.dice) < 0.9
    by = {t.strategy: t for t in traces}
    # bisection picks the middle of the longest run inside the extent
    fb = by["fbs_bisect"]
    ext = slice_extent(truth, 0)
    assert fb.painted[2] == se.bisection_slice(fb.painted[:2], ext)
    # the network is exact here: ours reaches the target, Fill between slices is slower
    assert by["ours_suggest"].slices_to_target is not None
    assert by["ours_suggest"].slices_to_target <= (by["fbs_bisect"].slices_to_target or 99)
    for t in traces:
        t.case, t.role = "phantom", "val"
    out = tmp_path / "s.json"
    se.write_json(str(out), traces, {"note": "test"}, 8)
    data = json.loads(out.read_text())
    assert set(data) == {"protocol", "summary", "sessions"}
    row = data["sessions"][0]
    assert {"mask", "strategy", "dice", "n_painted", "slices_to_090", "painted_slices"} <= set(row)
    assert set(data["summary"]["val"]) == set(se.STRATEGIES)
    figs = se.write_figures(str(tmp_path / "fig"), traces, 8)
    assert len(figs) == 2 and all(p.endswith(".png") for p in figs)


def test_evaluate_session_command_writes_the_json_and_figures(tmp_path, capsys):
    import SimpleITK as sitk
    import torch

    from UniverSegLogic.core.model import UniverSeg
    from UniverSegResearch.cli import main

    vol, truth = _moving_disc(16)
    paths = {}
    for name, arr in (("image", vol.array), ("disc", truth.astype(np.uint8))):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.0, 2.0))
        paths[name] = str(tmp_path / f"{name}.nrrd")
        sitk.WriteImage(img, paths[name])
    torch.manual_seed(0)
    torch.save(UniverSeg().state_dict(), tmp_path / "random.pt")
    out = tmp_path / "sessions.json"
    args = ["evaluate", "--session", "--image", paths["image"], "--mask", paths["disc"]]
    args += ["--weights", str(tmp_path / "random.pt"), "--device", "cpu", "--json", str(out)]
    args += ["--max-painted", "4", "--figures", str(tmp_path / "fig"), "--quiet"]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"protocol", "summary", "sessions"}
    assert data["protocol"]["max_painted"] == 4 and data["protocol"]["target_dice"] == 0.9
    assert {s["strategy"] for s in data["sessions"]} == set(se.STRATEGIES)
    for s in data["sessions"]:
        assert s["mask"] == "disc" and len(s["painted_slices"]) <= 4
        assert s["n_painted"][0] == 2 and len(s["dice"]) == len(s["n_painted"])
        assert s["slices_to_090"] is None or s["dice"][-1] >= 0.9
    assert "median_slices_to_090" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == [
        "dice_vs_painted_all.png",
        "dice_vs_painted_per_mask_all.png",
    ]
    assert main(args[:-1] + ["--strategies", "nonsense", "--quiet"]) == 2
