"""The propagation method: painted-slice prior, fusion rules, extent rule, calibration.

The network is the real UniverSeg (fixed-seed random weights, or the shipped starter weights when
present); Fill between slices is the real vtkITK interpolator from slicer-core.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_phantom, random_engine

from UniverSegLogic.core.fill_between import available
from UniverSegLogic.core.prior import (
    FeatureSource,
    FusionParams,
    LogisticRule,
    OutsideChain,
    ShapePrior,
    fused_probabilities,
    keep_overlapping,
    signed_distance,
)
from UniverSegLogic.core.propagator import PropagationOptions, Propagator, SegmentInput
from UniverSegLogic.core.slices import evaluation_slices
from UniverSegResearch import calibrate as cal

RESOURCES = Path(__file__).resolve().parents[2] / "Resources"
needs_vtkitk = pytest.mark.skipif(not available(), reason="slicer-core / vtkITK not importable")


def disc(shape, r, centre=None):
    j, i = np.mgrid[: shape[0], : shape[1]]
    cj, ci = centre if centre is not None else (shape[0] / 2 - 0.5, shape[1] / 2 - 0.5)
    return (j - cj) ** 2 + (i - ci) ** 2 <= r * r


# ----------------------------------------------------------------------- the prior


def test_interpolated_sdf_of_two_discs_is_the_intermediate_disc():
    stack = np.zeros((9, 64, 64), dtype=bool)
    stack[0] = disc((64, 64), 8)
    stack[8] = disc((64, 64), 20)
    prior = ShapePrior(stack, [0, 8], (2.0, 0.5, 0.5))
    for t, r_want in ((2, 11), (4, 14), (6, 17)):
        inside = prior.distance(t) <= 0
        r_got = np.sqrt(inside.sum() / np.pi)
        assert abs(r_got - r_want) < 0.6, (t, r_got)
        # and it is the disc, not just its area
        assert (inside ^ disc((64, 64), r_want)).sum() <= 2 * np.pi * r_want  # one-pixel ring
    assert prior.distance(0) is None and prior.distance(9) is None  # painted / outside


def test_sdf_uses_pixel_spacing_and_an_empty_labeled_slice_shrinks_the_shape():
    m = np.zeros((20, 40), dtype=bool)
    m[:, 10:30] = True  # a band 20 columns wide
    d = signed_distance(m, (1.0, 2.0))  # columns are 2 mm
    assert d[5, 20] == pytest.approx(-20.0, abs=2.1)  # 10 columns from the edge = 20 mm
    assert d[5, 0] == pytest.approx(20.0, abs=2.1)
    rough = np.random.default_rng(0).random((30, 30)) > 0.6
    assert np.array_equal(signed_distance(rough, (1.0, 2.5)) <= 0, rough)  # zero level = mask
    stack = np.zeros((5, 40, 40), dtype=bool)
    stack[0] = disc((40, 40), 12)  # slice 4 is labeled and empty: the structure ends
    prior = ShapePrior(stack, [0, 4], (1.0, 1.0, 1.0))
    areas = [int((prior.distance(t) <= 0).sum()) for t in (1, 2, 3)]
    # shrinks to (almost) nothing half-way, nothing after
    assert stack[0].sum() > areas[0] > 0.3 * stack[0].sum() and areas[1] <= 5 and areas[2] == 0
    both_empty = ShapePrior(np.zeros((5, 8, 8), bool), [0, 4], (1.0, 1.0, 1.0))
    assert (both_empty.distance(2) > 0).all()


def test_features_inside_and_beyond_the_painted_range():
    stack = np.zeros((12, 32, 32), dtype=bool)
    stack[3] = disc((32, 32), 6)
    stack[7] = disc((32, 32), 6)
    prior = ShapePrior(stack, [3, 7], (2.0, 1.0, 1.0))
    logit = np.full((32, 32), 30.0, np.float32)
    region, f = prior.features(5, logit)
    assert region == "inside"
    assert f.get("model").max() == 12.0  # clipped
    assert float(f.get("gap").max()) == pytest.approx(1.0)  # half-way
    r = np.sqrt(stack[3].sum() / np.pi)
    assert float(f.get("gap_r").max()) == pytest.approx(4 * 2.0 / r)
    centre = f.get("sdf_n")[16, 16]
    assert -1.1 < centre < -0.6  # about one radius inside (distance to the boundary pixels)
    assert np.allclose(f.get("sdf_n*gap"), f.get("sdf_n") * f.get("gap"))
    region, f = prior.features(9, logit)
    assert region == "outside"
    assert float(f.get("beyond").max()) == pytest.approx(2 / 4)
    with pytest.raises(KeyError):
        f.get("sdf_n")  # no interpolation beyond the range


def test_logistic_rule_and_fusion_params_round_trip(tmp_path):
    feats = FeatureSource(
        {"a": np.array([[1.0, 2.0]]), "b": lambda: np.array([[3.0, -1.0]])}, (1, 2)
    )
    rule = LogisticRule(["a", "b", "a*b"], [1.0, 2.0, 0.5], -1.0)
    assert np.allclose(rule.logit(feats), [[-1 + 1 + 6 + 1.5, -1 + 2 - 2 - 1.0]])
    p = FusionParams(
        inside=LogisticRule(["model", "fbs_n"], [1.0, -3.0], 0.5),
        inside_no_fbs=LogisticRule(["model", "sdf_n"], [1.0, -4.0], 0.2),
        extrapolation_gaps=0.75,
        chain_outside=False,
        source="test",
    )
    path = tmp_path / "f.json"
    p.save(path, {"weights": "x"})
    q = FusionParams.load(path)
    assert q == p
    assert q.uses_fbs()
    assert q.inside_rule(True) is q.inside and q.inside_rule(False) is q.inside_no_fbs
    assert not FusionParams().uses_fbs()


def test_outside_chain_keeps_overlapping_regions_and_stops_once_empty():
    stack = np.zeros((10, 20, 20), dtype=bool)
    stack[2, 5:10, 5:10] = True
    stack[5, 5:10, 5:10] = True
    prior = ShapePrior(stack, [2, 5], (1.0, 1.0, 1.0))
    params = FusionParams(outside=LogisticRule(["model"], [1.0], 0.0))
    chain = OutsideChain(prior, params, 5)
    lg = np.full((20, 20), -5.0, np.float32)
    lg[6:9, 6:9] = 5.0  # overlaps the painted end slice: kept
    lg[15:18, 15:18] = 5.0  # a detached false positive: dropped
    p6 = chain.push(6, lg)
    assert (p6 >= 0.5).sum() == 9 and p6[16, 16] == 0.0
    lg7 = np.full((20, 20), -5.0, np.float32)
    lg7[15:18, 15:18] = 5.0  # nothing overlaps slice 6 any more: the chain stops
    assert not (chain.push(7, lg7) >= 0.5).any() and chain.stopped
    assert not chain.push(8, np.full((20, 20), 9.0, np.float32)).any()
    assert keep_overlapping(np.ones((3, 3), bool), np.zeros((3, 3), bool)).sum() == 0


def test_fused_probabilities_skips_the_network_once_a_side_has_stopped():
    stack = np.zeros((30, 16, 16), dtype=bool)
    stack[10, 4:12, 4:12] = True
    stack[14, 4:12, 4:12] = True
    prior = ShapePrior(stack, [10, 14], (1.0, 1.0, 1.0))
    asked = []

    def network(ts):
        asked.extend(ts)
        return {t: np.full((16, 16), -8.0, np.float32) for t in ts}

    skipped = []
    params = FusionParams(
        inside=LogisticRule(["sdf_n"], [-10.0]), outside=LogisticRule(["model"], [1.0])
    )
    probs = fused_probabilities(
        prior,
        params,
        list(range(0, 10)) + [11, 12, 13] + list(range(15, 30)),
        network,
        batch=2,
        skip=skipped.append,
    )
    assert set(asked) == {11, 12, 13, 9, 8, 15, 16}  # one batch per side, then stop
    assert sum(skipped) == (10 - 2) + (15 - 2)
    assert all((probs[t] >= 0.5).sum() == 64 for t in (11, 12, 13))  # the prior carries


# ----------------------------------------------------------------------- the pipeline


def _phantom():
    return blob_phantom()


def _engine():
    return random_engine()


def _propagate(vol, mask, labeled=None, fusion=None, engine=None, **options):
    opts = PropagationOptions(axis=0, support_size=2, **options)
    session = Propagator(vol, opts, engine=engine or _engine(), fusion=fusion)
    return session.propagate([SegmentInput("b", "b", mask, labeled)])


@pytest.mark.parametrize("use_fbs", [False, True])
def test_labeled_slices_are_never_altered(use_fbs):
    if use_fbs and not available():
        pytest.skip("vtkITK not importable")
    vol, blob = _phantom()
    user = np.zeros_like(blob)
    user[[4, 8, 12]] = blob[[4, 8, 12]]
    user[8, :3, :3] = True  # paint that disagrees with the image
    user[8, 12:16, 13:17] = False
    fusion = FusionParams(
        inside=LogisticRule(["model", "fbs_n" if use_fbs else "sdf_n"], [1.0, -5.0])
    )
    r = _propagate(vol, user, fusion=fusion).segments[0]
    assert r.labeled_slices == [4, 8, 12]
    assert np.array_equal(r.mask[[4, 8, 12]], user[[4, 8, 12]])
    assert np.array_equal(r.probability[[4, 8, 12]], user[[4, 8, 12]].astype(np.float32))
    assert not set(r.predicted_slices) & {4, 8, 12}


@needs_vtkitk
def test_a_fill_between_rule_reproduces_fill_between_slices_inside_the_range():
    from UniverSegLogic.core.fill_between import fill_between_slices

    vol, blob = _phantom()
    user = np.zeros_like(blob)
    user[[4, 11]] = blob[[4, 11]]
    fusion = FusionParams(
        inside=LogisticRule(["fbs"], [20.0]), outside=LogisticRule(["one"], [0.0], -50.0)
    )
    r = _propagate(vol, user, fusion=fusion).segments[0]
    want = fill_between_slices(user, [4, 11], 0, vol.spacing_kji)
    assert np.array_equal(r.mask[4:12], want[4:12])
    assert not r.mask[:4].any() and not r.mask[12:].any()


def test_no_extrapolation_beyond_a_labeled_empty_end_slice():
    vol, blob = _phantom()
    user = np.zeros_like(blob)
    user[[5, 9]] = blob[[5, 9]]
    r = _propagate(vol, user, [5, 9, 11]).segments[0]
    assert max(r.predicted_slices) < 11 and not r.mask[11:].any()
    assert min(r.predicted_slices) < 5  # the other end still extrapolates


# ----------------------------------------------------------------------- calibration


def test_fit_logistic_recovers_known_weights():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20000, 2)).astype(np.float32)
    z = 2.0 * X[:, 0] - 1.0 * X[:, 1] + 0.5
    y = rng.random(20000) < 1 / (1 + np.exp(-z))
    w, b = cal.fit_logistic(X, y, np.ones(20000, np.float32), l2=0.0)
    assert np.allclose(w, [2.0, -1.0], atol=0.1) and abs(b - 0.5) < 0.1


def _synthetic_episodes(n=4):
    """Episodes whose 'network' sees the truth through noise: calibration must use it."""
    rng = np.random.default_rng(0)
    eps = []
    for e in range(n):
        k, j, i = np.mgrid[:14, :24, :24]
        r = 5 + e
        truth = ((j - 12) ** 2 + (i - 12 - e) ** 2) <= (r * np.sin(np.pi * (k + 0.5) / 14)) ** 2
        ext = (
            int(np.flatnonzero(truth.any((1, 2)))[0]),
            int(np.flatnonzero(truth.any((1, 2)))[-1]),
        )
        for kk in (2, 3):
            lab = evaluation_slices(ext[0], ext[1], kk)
            logits = {
                t: (6.0 * (truth[t] - 0.5) + rng.normal(0, 2, truth[t].shape)).astype(np.float32)
                for t in range(14)
                if t not in lab
            }
            eps.append(
                cal.Episode(f"case{e % 2}", f"s{e}", kk, (2.0, 1.0, 1.0), truth, lab, logits, None)
            )
    return eps


def test_calibration_learns_to_use_an_informative_network():
    eps = _synthetic_episodes()
    params, report = cal.calibrate(eps, inside_sets=["sdf_gap"], outside_sets=["model_nb"])
    assert report["chosen"] == "sdf_gap+model_nb"
    assert set(report["candidates"]) == {"sdf_gap+model_nb"}
    w = dict(zip(params.inside.features, params.inside.weights))
    assert w["model"] > 0 and w["sdf_n"] < 0
    prior_only = FusionParams(
        inside=LogisticRule(["sdf_n"], [-20.0]), outside=LogisticRule(["one"], [0.0], -50.0)
    )
    assert cal.objective(cal.score(eps, params)) > cal.objective(cal.score(eps, prior_only)) + 0.02


def test_episode_cache_round_trip(tmp_path):
    ep = _synthetic_episodes(1)[0]
    ep.fbs = ep.truth.copy()
    ep.save(str(tmp_path / "e.npz"))
    back = cal.Episode.load(str(tmp_path / "e.npz"))
    assert back.name == ep.name and back.k == ep.k and back.labeled == ep.labeled
    assert np.array_equal(back.truth, ep.truth) and np.array_equal(back.fbs, ep.fbs)
    assert set(back.logits) == set(ep.logits)
    t = next(iter(ep.logits))
    assert np.allclose(back.logits[t], ep.logits[t], atol=0.01)


def test_shipped_fusion_is_valid_when_present():
    path = RESOURCES / "starter_fusion.json"
    if not path.is_file():
        pytest.skip("no calibrated fusion shipped yet")
    p = FusionParams.load(path)
    assert "calibrated" in p.source
    stack = np.zeros((9, 16, 16), dtype=bool)
    stack[2] = disc((16, 16), 4)
    stack[6] = disc((16, 16), 5)
    prior = ShapePrior(stack, [2, 6], (2.0, 1.0, 1.0), stack.copy())
    lg = np.zeros((16, 16), np.float32)
    for t in (4, 8):  # every feature the file names exists
        region, f = prior.features(t, lg)
        rules = (
            [p.inside] + ([p.inside_no_fbs] if p.inside_no_fbs else [])
            if region == "inside"
            else [p.outside]
        )
        for rule in rules:
            assert rule.logit(f).shape == (16, 16)
    data = json.loads(path.read_text())
    assert data["inside"]["features"] == p.inside.features


@needs_vtkitk
def test_calibration_scores_exactly_what_a_propagation_does():
    """predict_episode (fusion on cached logits) == Propagator (network + fusion), slice by slice."""
    from UniverSegLogic.core.fill_between import fill_between_slices, labeled_only

    vol, blob = _phantom()
    lab = evaluation_slices(2, 14, 3)
    painted = labeled_only(blob, lab, 0)
    fusion = FusionParams(
        inside=LogisticRule(
            ["model", "model_nb", "sdf_n", "fbs_n", "sdf_n*gap"], [0.3, 0.2, -2.0, -2.0, -1.0], 0.1
        ),
        outside=LogisticRule(["model", "model_nb"], [0.5, 0.3], 0.2),
        extrapolation_gaps=1.0,
    )
    opts = PropagationOptions(axis=0, support_size=2)
    session = Propagator(vol, opts, engine=_engine(), fusion=fusion)
    segment = SegmentInput("b", "b", painted, lab)
    plan, logits = session.network_logits(segment, 8)
    frame = session.frame
    ep = cal.Episode(
        "c",
        "b",
        3,
        frame.spacing,
        frame.to_frame(blob),
        lab,
        logits,
        fill_between_slices(plan.mask_stack, lab, 0, frame.spacing),
    )
    want = cal.predict_episode(ep, fusion)
    got = session.propagate([segment]).segments[0].mask
    assert np.array_equal(frame.to_frame(got), want)
