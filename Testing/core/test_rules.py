"""The rules defined once in core/: the evaluation's slice rule, Dice, non-empty slices and
extents, the typical gap, prediction targets, a fully labeled run, the axis ``auto`` means,
exclusive predictions, and atomic output."""

import os
import stat

import numpy as np
import pytest

from UniverSegLogic.core.atomic import atomic_output, temporary_name, write_text
from UniverSegLogic.core.metrics import dice, dice_unlabeled
from UniverSegLogic.core.restack import resolve_overlaps
from UniverSegLogic.core.slices import (
    auto_axis,
    evaluation_slices,
    extrapolation_slices,
    labeled_run,
    nonempty_slices,
    prediction_targets,
    slice_extent,
    slice_wise_axis,
    typical_gap,
)
from UniverSegLogic.errors import GeometryError, OutputError

# ----------------------------------------------------------------------- the slice rule


@pytest.mark.parametrize(
    "z0,z1,k,want",
    [
        (0, 29, 2, [7, 22]),  # floor(0.5*29/2 + .5) = 7, floor(1.5*29/2 + .5) = 22
        (0, 29, 3, [5, 15, 24]),  # 5.33 -> 5, 15 -> 15, 24.67 -> 24
        (4, 19, 5, [6, 9, 12, 15, 18]),  # 4 + floor((i + .5) * 3 + .5)
        (10, 17, 8, [10, 11, 12, 13, 14, 15, 16, 17]),
        (3, 3, 3, [3]),  # a one-slice structure: duplicates collapse
        (0, 1, 4, [0, 1]),
    ],
)
def test_evaluation_slice_rule(z0, z1, k, want):
    assert evaluation_slices(z0, z1, k) == want


def test_evaluation_slices_follow_the_mask_extent_along_the_axis():
    m = np.zeros((6, 40, 8), dtype=bool)
    m[2, 5:36, 3] = True
    assert slice_extent(m, 1) == (5, 35)
    assert slice_extent(m, 0) == (2, 2)
    assert slice_extent(np.zeros((3, 3, 3)), 0) is None
    assert evaluation_slices(*slice_extent(m, 1), 3) == [10, 20, 30]
    assert nonempty_slices(m, 0) == [2] and nonempty_slices(m, 2) == [3]
    with pytest.raises(ValueError):
        evaluation_slices(0, 10, 0)


def test_the_training_sampler_uses_the_same_slice_rule():
    from UniverSegResearch.train import labeled_positions

    for z0, z1, k in [(0, 29, 2), (4, 19, 5), (10, 17, 8), (0, 99, 3)]:
        assert sorted(set(int(x) for x in labeled_positions(z0, z1, k))) == evaluation_slices(
            z0, z1, k
        )


# ----------------------------------------------------------------------- Dice


def test_dice_and_dice_unlabeled_on_crafted_masks():
    truth = np.zeros((4, 5, 5), dtype=bool)
    pred = np.zeros_like(truth)
    truth[1, 0, :4] = True  # slice 1: truth 4, pred 4, overlap 4 (a labeled slice)
    pred[1, 0, :4] = True
    truth[2, 0, :2] = True  # slice 2: truth 2, pred 3, overlap 1
    pred[2, 0, 1:4] = True
    pred[3, 4, 4] = True  # slice 3: one false positive
    # whole volume: 2 * (4 + 1) / (6 + 8)
    assert dice(pred, truth) == pytest.approx(10 / 14)
    # slice 1 labeled: hidden slices 0, 2, 3 -> 2 * 1 / (2 + 4)
    assert dice_unlabeled(pred, truth, [1]) == pytest.approx(2 / 6)
    # the same along another axis: move the slice axis to position 2
    assert dice_unlabeled(
        np.moveaxis(pred, 0, 2), np.moveaxis(truth, 0, 2), [1], axis=2
    ) == pytest.approx(2 / 6)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dice(np.ones(3, bool), np.zeros(3, bool)) == 0.0
    # per slice: slice 0 empty in both -> 1, slice 1 -> 1, slice 2 -> 2/5, slice 3 -> 0
    assert np.allclose(dice(pred, truth, axis=(1, 2)), [1.0, 1.0, 0.4, 0.0])


# ----------------------------------------------------------------------- typical gap, targets


def test_typical_gap_is_the_mean_gap_or_an_eighth_of_the_stack():
    assert typical_gap([4, 10, 22], 40) == 9.0
    assert typical_gap([22, 4, 10], 40) == 9.0  # order does not matter
    assert typical_gap([7], 40) == 5.0
    assert typical_gap([7], 9) == 2.0  # at least 2
    assert extrapolation_slices([4, 10, 22], 40, 0.35) == 4  # ceil(0.35 * 9)


def test_prediction_targets_stop_at_an_end_labeled_empty():
    assert prediction_targets(20, [5, 9], (True, True), 2) == [3, 4, 6, 7, 8, 10, 11]
    assert prediction_targets(20, [5, 9], (True, False), 2) == [3, 4, 6, 7, 8]
    assert prediction_targets(10, [1, 8], (True, True), 5) == [0, 2, 3, 4, 5, 6, 7, 9]


# ----------------------------------------------------------------------- atomic output


def test_atomic_output_replaces_keeping_permissions_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.seg.nrrd"
    target.write_text("old")
    os.chmod(target, 0o600)
    write_text(str(target), "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600  # medical data stays private
    with pytest.raises(RuntimeError):
        with atomic_output(str(target)) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["result.seg.nrrd"]


def test_atomic_output_handles_long_names_and_reports_os_errors_in_one_line(tmp_path):
    long_name = "x" * 241 + ".seg.nrrd"  # a legal 250-character name
    write_text(str(tmp_path / long_name), "ok")
    assert (tmp_path / long_name).read_text() == "ok"
    tmp = temporary_name(str(tmp_path / long_name))
    assert len(os.path.basename(tmp)) < 80 and tmp.endswith(".seg.nrrd")
    with pytest.raises(OutputError, match="is a folder"):
        write_text(str(tmp_path), "x")
    with pytest.raises(OutputError, match="does not exist"):
        write_text(str(tmp_path / "missing" / "a.json"), "x")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o500)
        with pytest.raises(OutputError, match="permission denied"):
            write_text(str(ro / "a.json"), "x")


# ----------------------------------------------------------------------- a fully labeled run


@pytest.mark.parametrize(
    "labeled,run",
    [([4, 5, 6, 7], True), ([7, 6], True), ([4], False), ([4, 6], False), ([4, 5, 7], False)],
)
def test_a_fully_labeled_run_is_adjacent_labeled_slices_without_a_gap(labeled, run):
    assert labeled_run(labeled) is run


# ----------------------------------------------------------------------- axis "auto"


def _slabs(axis, slices, shape=(20, 22, 24), box=(slice(5, 15), slice(6, 16), slice(4, 18))):
    mask = np.zeros(shape, bool)
    for t in slices:
        take = list(box)
        take[axis] = t
        mask[tuple(take)] = True
    return mask


def test_auto_axis_is_the_axis_the_painted_slices_lie_on():
    assert auto_axis({"a": _slabs(1, [7, 10, 13]), "b": _slabs(1, [9])}) == 1
    assert slice_wise_axis(_slabs(2, [8, 12])) == 2
    assert auto_axis({}) is None and auto_axis({"a": np.zeros((4, 4, 4), bool)}) is None


def test_auto_axis_on_two_axes_is_one_line_naming_the_segments():
    names = {0: "axial", 1: "coronal", 2: "sagittal"}
    with pytest.raises(GeometryError) as err:
        auto_axis({"liver": _slabs(0, [6, 12]), "spleen": _slabs(2, [8, 14])}, label=names.get)
    text = str(err.value)
    assert "\n" not in text and "more than one axis" in text
    assert "axial: 'liver'" in text and "sagittal: 'spleen'" in text


def test_a_solid_painting_tells_no_axis_and_a_known_axis_counts():
    solid = np.zeros((20, 22, 24), bool)
    solid[3:12, 5:9, 2:20] = True  # a structure labeled on every slice
    assert slice_wise_axis(solid) is None
    assert auto_axis({"spine": solid, "liver": _slabs(2, [5, 9, 13])}) == 2
    assert auto_axis({"spine": solid}) == 1  # nothing else: the fewest non-empty slices
    with pytest.raises(GeometryError):
        auto_axis({"liver": _slabs(2, [5, 9])}, known={"kidney": 0})
    assert auto_axis({"liver": _slabs(2, [5, 9])}, known={"liver": 0}) == 0


# ----------------------------------------------------------------------- exclusive predictions


def test_a_contested_voxel_goes_to_the_more_probable_segment_and_painted_voxels_stay():
    shape = (3, 2, 2)
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    pa, pb = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    a[1], pa[1] = True, 0.9  # slice 1 predicted by both
    b[1], pb[1] = True, 0.6
    pb[1, 0, 0] = 0.95  # ... except one voxel b is surer of
    a[0], pa[0] = True, 1.0  # slice 0 painted in a
    b[0, 0, 0], pb[0, 0, 0] = True, 0.99  # b predicts there: loses to the painting
    a[2, 0, 0], pa[2, 0, 0] = True, 0.7  # slice 2: a painted voxel of b (labeled in b)
    b[2, 0, 0] = True
    lost = resolve_overlaps([a, b], [pa, pb], [[0], [2]], 0)
    assert not (a & b).any()
    assert a[1].sum() == 3 and b[1, 0, 0] and b[1].sum() == 1  # each voxel to the surer one
    assert a[0].all() and not b[0].any()  # painted voxels stay, the prediction yields
    assert b[2, 0, 0] and not a[2, 0, 0]
    assert lost == [2, 4]


def test_a_tie_goes_to_the_first_segment_and_keep_out_is_never_taken():
    a, b = np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool)
    p = np.full((2, 2, 2), 0.8, np.float32)
    keep_out = np.zeros((2, 2, 2), bool)
    keep_out[1, 1, 1] = True
    resolve_overlaps([a, b], [p, p.copy()], [[], []], 0, keep_out=keep_out)
    assert a.sum() == 7 and not b.any() and not a[1, 1, 1]
    single = np.ones((2, 2, 2), bool)
    assert resolve_overlaps([single], [p], [[]], 0) == [0] and single.all()
