"""The learned fusion (core/fusion_net.py): loading, the seam in the propagation, the fallback,
and reproducible training (UniverSegResearch/fusion_data.py, fusion_train.py)."""

import numpy as np
import pytest
import torch
from conftest import ThresholdEngineDouble, blob_phantom, labeled_only

from UniverSegLogic.core import fusion_net
from UniverSegLogic.core.fusion_net import (
    CHANNELS,
    FusionNet,
    FusionUNet,
    LearnedFusion,
    fusion_net_for,
    load_fusion_net,
    parameter_count,
    save_fusion_net,
)
from UniverSegLogic.core.propagator import PropagationOptions, Propagator, SegmentInput
from UniverSegLogic.core.weights import resource_file
from UniverSegLogic.errors import UsageError, WeightsError


def _net(seed=0, scale=None) -> FusionNet:
    """A fusion net with seeded random weights; ``scale``: also give the (zero-initialised)
    output layer random weights of that size, so that the correction is far from zero."""
    torch.manual_seed(seed)
    model = FusionUNet()
    if scale is not None:
        torch.nn.init.normal_(model.out.weight, std=scale)
        torch.nn.init.constant_(model.out.bias, 0.5 * scale)
    return FusionNet(model.eval(), None, "test net")


def _session(vol, engine, fusion_model):
    return Propagator(vol, PropagationOptions(axis=0, fusion_model=fusion_model), engine=engine)


def test_the_shipped_learned_fusion_loads_with_weights_only():
    path = resource_file(fusion_net.RESOURCE)
    assert path is not None, "Resources/starter_fusion_net.pt is missing"
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    assert state["format"] == fusion_net.FORMAT and list(state["channels"]) == list(CHANNELS)
    net = load_fusion_net(str(path))
    assert 50_000 < parameter_count(net.model) < 500_000
    assert net.model.out.weight.abs().sum() > 0  # trained: the correction is not zero
    got, note = fusion_net_for("starter", "auto")
    assert got is not None and note == ""
    # a copy of the starter weights given by path gets it too (by content, not by name)
    copy, note = fusion_net_for(str(resource_file("starter_weights.pt")), "auto")
    assert copy is not None and note == ""


def test_the_file_form_round_trips_and_bad_files_are_one_line_errors(tmp_path):
    net = _net(3, scale=0.1)
    net.extrapolation_gaps = 0.5
    save_fusion_net(net, str(tmp_path / "f.pt"))
    back = load_fusion_net(str(tmp_path / "f.pt"))
    assert back.extrapolation_gaps == 0.5
    for k, v in net.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError) as e:
        load_fusion_net(str(tmp_path / "bad.pt"))
    assert "\n" not in str(e.value)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="not a learned-fusion file"):
        load_fusion_net(str(tmp_path / "other.pt"))
    with pytest.raises(WeightsError, match="not found"):
        fusion_net_for("starter", str(tmp_path / "absent.pt"))
    with pytest.raises(UsageError):
        PropagationOptions(fusion_model="neural")
    assert fusion_net_for("starter", "logistic") == (None, "")
    none, note = fusion_net_for(str(tmp_path / "other_weights.pt"), "learned")
    assert none is None and "logistic fusion rule" in note
    save_fusion_net(net, str(tmp_path / "other_weights.pt.fusion_net.pt"))  # its own sidecar
    got, note = fusion_net_for(str(tmp_path / "other_weights.pt"), "auto")
    assert got is not None and got.extrapolation_gaps == 0.5 and note == ""


class _Payload:
    """A pickled object a weights file must never bring in."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_learned_fusion_file_holding_objects_or_too_many_entries_is_refused(tmp_path):
    """Only tensors and plain containers load (``weights_only=True``); the zip directory is
    bounded before anything is inflated (core/weights.py check_archive)."""
    net = _net(4)
    state = net.state()
    state["info"] = {"payload": _Payload()}
    torch.save(state, tmp_path / "pickled.pt")
    with pytest.raises(WeightsError, match="cannot read the learned fusion") as e:
        load_fusion_net(str(tmp_path / "pickled.pt"))
    assert "\n" not in str(e.value)
    state = net.state()
    state["info"] = {f"t{i}": torch.zeros(1) for i in range(200)}
    torch.save(state, tmp_path / "many.pt")
    with pytest.raises(WeightsError, match="zip entries"):
        load_fusion_net(str(tmp_path / "many.pt"))
    with pytest.raises(WeightsError):
        fusion_net_for("starter", str(tmp_path / "many.pt"))


def test_an_untrained_net_is_exactly_the_logistic_rule(starter_engine, tmp_path):
    """The correction starts at zero: the seam itself changes nothing."""
    vol, blob = blob_phantom()
    painted = labeled_only(blob, 0, [4, 11])
    zero = FusionNet(FusionUNet().eval(), None, "untrained")
    assert not any(p.abs().sum() for p in zero.model.out.parameters())
    save_fusion_net(zero, str(tmp_path / "zero.pt"))
    seg = [SegmentInput("b", "b", painted)]
    want = _session(vol, starter_engine, "logistic").propagate(seg).segments[0]
    got = _session(vol, starter_engine, str(tmp_path / "zero.pt")).propagate(seg).segments[0]
    assert np.array_equal(got.probability, want.probability)
    assert got.predicted_slices == want.predicted_slices


def test_the_learned_fusion_never_changes_painted_slices(starter_engine, tmp_path):
    vol, blob = blob_phantom()
    user = labeled_only(blob, 0, [4, 8, 12])
    user[8, :3, :3] = True  # paint that disagrees with the image
    user[8, 12:16, 13:17] = False
    seg = [SegmentInput("b", "b", user)]
    logistic = _session(vol, starter_engine, "logistic").propagate(seg).segments[0]
    save_fusion_net(_net(1, scale=0.5), str(tmp_path / "loud.pt"))
    for model in (str(tmp_path / "loud.pt"), "auto"):
        r = _session(vol, starter_engine, model).propagate(seg).segments[0]
        assert r.labeled_slices == [4, 8, 12]
        assert np.array_equal(r.mask[[4, 8, 12]], user[[4, 8, 12]])
        assert np.array_equal(r.probability[[4, 8, 12]], user[[4, 8, 12]].astype(np.float32))
        if model != "auto":  # the loud net does change the predicted slices
            assert not np.array_equal(r.probability, logistic.probability)


def test_a_missing_learned_fusion_falls_back_on_the_logistic_rule(starter_engine, monkeypatch):
    vol, blob = blob_phantom()
    seg = [SegmentInput("b", "b", labeled_only(blob, 0, [4, 11]))]
    want = _session(vol, starter_engine, "logistic").propagate(seg)
    assert want.notes == []
    monkeypatch.setattr(fusion_net, "RESOURCE", "no_such_fusion_net.pt")
    session = _session(vol, starter_engine, "auto")
    assert session.refine is None
    got = session.propagate(seg)
    assert any("learned fusion" in n and "missing" in n for n in got.notes)
    assert np.array_equal(got.segments[0].probability, want.segments[0].probability)


def _large_phantom():
    """Slices finer than the 128-pixel canvas (fusion regions and learned windows are used): a
    structure that swells between two painted slices and grows again beyond the last one."""
    from UniverSegLogic.core.geometry import Volume, make_ijk_to_ras

    shape, painted_at = (19, 160, 150), [4, 9, 14]
    y, x = np.mgrid[: shape[1], : shape[2]]
    truth = np.zeros(shape, bool)
    for t in range(2, 17):
        r = {6: 40, 7: 45, 8: 30, 15: 30, 16: 38}.get(t, 14)
        truth[t] = ((y - 80) / r) ** 2 + ((x - 70) / (0.9 * r)) ** 2 <= 1
    image = truth.astype(np.float32)
    image += np.random.default_rng(0).normal(0, 0.05, shape).astype(np.float32)
    painted = np.zeros_like(truth)
    painted[painted_at] = truth[painted_at]
    return Volume(image, make_ijk_to_ras((0.8, 0.8, 1.0))), painted


def test_the_learned_fusion_gives_the_same_masks_in_regions_and_on_whole_slices():
    """On large slices the net sees and corrects the rectangle around each gap's painting
    whether or not the logistic rule is fused in a region: the masks are those of whole slices
    (and the net does change them)."""
    volume, painted = _large_phantom()

    def run(model, regions):
        session = Propagator(
            volume,
            PropagationOptions(axis=0, device="cpu", fusion_model=model),
            engine=ThresholdEngineDouble(),
            regions=regions,
        )
        assert (session.refine is not None) == (model == "learned")
        return session.propagate([SegmentInput("s", "structure", painted)]).segments[0]

    ours, whole = run("learned", True), run("learned", False)
    assert np.array_equal(ours.mask, whole.mask)
    assert np.array_equal(ours.mask[[4, 9, 14]], painted[[4, 9, 14]])
    assert not np.array_equal(ours.mask, run("logistic", True).mask)


def test_a_rerun_with_the_learned_fusion_gives_the_masks_of_a_fresh_session(starter_engine):
    """A corrected slice changes the typical gap, which the net reads beyond the painted ends:
    the cached ends are not reused then (masks bit for bit those of a new session)."""
    vol, truth = blob_phantom()
    painted = labeled_only(truth, 0, [3, 8, 12])
    session = _session(vol, starter_engine, "learned")
    session.propagate([SegmentInput("a", "a", painted)])
    edited = painted.copy()
    edited[10] = truth[10]
    rerun = session.propagate([SegmentInput("a", "a", edited)]).segments[0]
    fresh = _session(vol, starter_engine, "learned").propagate([SegmentInput("a", "a", edited)])
    assert np.array_equal(rerun.mask, fresh.segments[0].mask)
    assert np.array_equal(rerun.probability, fresh.segments[0].probability)


def test_the_net_is_applied_on_the_canvas_and_returns_native_slices(starter_engine):
    """LearnedFusion's inputs have the channel layout and the output the slice's own grid."""
    from UniverSegLogic.core.prior import FusionParams, ShapePrior

    vol, blob = blob_phantom()
    session = _session(vol, starter_engine, "logistic")
    stack, frame = session.stack, session.frame
    painted = frame.to_frame(labeled_only(blob, 0, [4, 11]))
    prior = ShapePrior(painted, [4, 11], frame.spacing, None)
    logits = {t: np.full(painted.shape[1:], 2.0, np.float32) for t in (6, 7, 13)}
    items = {}
    for t in (6, 13):
        region, f = prior.features(t, logits[t], logits)
        rule = FusionParams().inside if region == "inside" else FusionParams().outside
        items[t] = (region, f, rule.logit(f))
    images = stack.canvas_images  # the session's own canvas images
    x = fusion_net.build_inputs(prior, items, stack.canvas, images)
    assert x.shape == (2, len(CHANNELS), 128, 128) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], images([6])[0, 0])
    out = LearnedFusion(_net(2, scale=0.2), stack.canvas, images)(prior, items)
    assert sorted(out) == [6, 13] and out[6].shape == painted.shape[1:]
    assert out[6].dtype == np.float32 and not np.array_equal(out[6], items[6][2])


# ----------------------------------------------------------------------- training


def _tiny_cases():
    from UniverSegResearch.fusion_data import TrainingCase

    vol, blob = blob_phantom()
    inner = blob.copy()
    inner[:, :, :15] = False
    return [TrainingCase("blob", vol, {"blob": blob, "half": inner}, "test phantom", "none")]


def test_training_samples_and_weights_are_reproducible(starter_engine, tmp_path):
    """Same seed -> byte-identical samples and bit-identical weights; a run resumed from its
    checkpoint ends exactly where an uninterrupted one does; another seed differs."""
    from UniverSegResearch import fusion_data, fusion_train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the training's fixed thread count
    try:
        _reproducible(fusion_data, fusion_train, starter_engine, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _reproducible(fusion_data, fusion_train, starter_engine, tmp_path):
    cases = _tiny_cases()
    a = fusion_data.build_samples(cases, starter_engine, str(tmp_path / "a"), 0, 1)
    b = fusion_data.build_samples(cases, starter_engine, str(tmp_path / "b"), 0, 1)
    sa, sb = fusion_data.load_samples(a), fusion_data.load_samples(b)
    assert sa["x"].shape[0] >= 6 and sa["x"].shape[1:] == (12, 96, 96)
    for k in sa:
        assert np.array_equal(sa[k], sb[k])

    def run(name, seed, stop=None):
        kw = dict(steps=4, batch=3, lr=1e-3, widths=(4, 8), seed=seed, every=2)
        path = tmp_path / name
        fusion_train.train("", str(path), sample_paths=a, stop_at=stop, **kw)
        if stop is not None:
            fusion_train.train("", str(path), sample_paths=a, **kw)
        return torch.load(path / "step_000004.pt", weights_only=True)["state_dict"]

    one, two = run("one", 0), run("two", 0)
    resumed, other = run("resumed", 0, stop=2), run("other", 1)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert all(torch.equal(one[k], resumed[k]) for k in one)
    assert not all(torch.equal(one[k], other[k]) for k in one)
    assert one["out.weight"].abs().sum() > 0  # it did learn something
