"""MRML bridge against Slicer's own libraries (slicer-core): real scene, storage nodes, segmentation
logic. The volume is an oblique, anisotropic, left-handed NRRD read by Slicer's volume reader.

Most runs use ``ConstantLogitEngine``, a test double for the inference engine (foreground
everywhere), so that what gets written where is tested independently of the network; one test runs
a real (random-weight) UniverSeg network.
"""

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Platform")  # before slicer-core's ITK

from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import slicerio
import torch
import vtk
from conftest import ConstantLogitEngineDouble, labeled_only, runner_with

from UniverSegLogic import mrml
from UniverSegLogic.core.engine import Cancelled, InferenceEngine
from UniverSegLogic.core.model import UniverSeg
from UniverSegLogic.core.propagator import TAG_DEVICE, TAG_PRECISION, PropagationOptions
from UniverSegLogic.core.slices import nonempty_slices

SHAPE = (16, 20, 24)  # K, J, I: a 24 x 20 x 16 volume
LOGIC = slicer.vtkSlicerSegmentationsModuleLogic


def _rotation(x_deg=0.0, z_deg=0.0):
    """Rotation matrix (about x, then z) from SimpleITK's Euler transform."""
    euler = sitk.Euler3DTransform((0, 0, 0), np.radians(x_deg), 0.0, np.radians(z_deg))
    return np.array(euler.GetMatrix()).reshape(3, 3)


def _ras_of_voxels(ijk_to_ras, shape):
    k, j, i = np.indices(shape)
    ijk1 = np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1).astype(float)
    return (ijk_to_ras @ ijk1)[:3].reshape((3,) + shape)


def _paint(seg_node, segment_id, mask, ijk_to_ras):
    """Store ``mask`` (on the grid ``ijk_to_ras``) as the segment's content, as an editor would."""
    extent = (0, mask.shape[2] - 1, 0, mask.shape[1] - 1, 0, mask.shape[0] - 1)
    image = mrml.vtkglue.oriented_image(mask.astype(np.uint8), extent, ijk_to_ras)
    assert LOGIC.SetBinaryLabelmapToSegment(image, seg_node, segment_id, LOGIC.MODE_REPLACE)


def _slices(mask, axis, indices):
    return np.take(mask, list(indices), axis=axis)


def stored(seg_node, segment_id):
    """A segment exactly as stored: grid matrix and sorted foreground voxel indices (I, J, K)."""
    lm = seg_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    values = mrml.vtkglue.image_scalars(lm)
    if values is None or mrml.vtkglue.extent_empty(lm.GetExtent()):
        return None, np.zeros((0, 3), int)
    m = vtk.vtkMatrix4x4()
    lm.GetImageToWorldMatrix(m)
    label = seg_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    e = lm.GetExtent()
    kji = np.argwhere(values == label) + np.array([e[4], e[2], e[0]])
    return np.round(mrml.vtkglue.np_from_vtk_matrix(m), 9), kji[:, ::-1]


def state(seg_node):
    """Everything a run may change: segments (order, names, colours, voxels, tags)."""
    segmentation = seg_node.GetSegmentation()
    out = []
    for n in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(n)
        segment = segmentation.GetSegment(sid)
        matrix, voxels = stored(seg_node, sid)
        tags = mrml.record.tags_of(segment, (mrml.TAG_LABELED, mrml.TAG_PREDICTED, mrml.TAG_SOURCE))
        out.append(
            (
                sid,
                segment.GetName(),
                tuple(np.round(segment.GetColor(), 6)),
                None if matrix is None else matrix.tobytes(),
                voxels.tobytes(),
                tuple(sorted(tags.items())),
            )
        )
    return out


def assert_same_stored(seg_node, segment_id, before):
    matrix, voxels = stored(seg_node, segment_id)
    assert np.array_equal(voxels, before[1])
    if before[0] is not None and len(voxels):
        assert np.allclose(matrix, before[0])


@pytest.fixture
def case(tmp_path):
    """Scene with an oblique anisotropic left-handed volume loaded from NRRD by Slicer, and a
    segmentation: 'target' painted on three axial slices of an ellipsoid, 'other' a block that
    overlaps the target's slices (shared labelmap layer)."""
    scene = slicer.vtkMRMLScene()
    seg_logic = LOGIC()
    seg_logic.SetMRMLScene(scene)  # registers the segmentation converter rules

    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 20.0, SHAPE).astype(np.int16)
    itk = sitk.GetImageFromArray(image)
    itk.SetSpacing((0.9, 1.2, 2.5))
    itk.SetOrigin((12.5, -30.0, 40.0))
    direction = _rotation(x_deg=10, z_deg=25) @ np.diag([1.0, -1.0, 1.0])  # left-handed
    itk.SetDirection(direction.ravel().tolist())
    path = tmp_path / "image.nrrd"
    sitk.WriteImage(itk, str(path))

    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName("image")
    scene.AddNode(volume)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    volume.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(volume)

    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)

    ijk_to_ras = mrml.nodes.local_ijk_to_ras(volume)
    ras = _ras_of_voxels(ijk_to_ras, SHAPE)
    center = ijk_to_ras @ np.array([11.5, 9.5, 7.5, 1.0])
    axis = mrml.array_axis(volume, "axial")
    d = (ras - center[:3, None, None, None]) / np.array([7.0, 8.0, 13.0])[:, None, None, None]
    ellipsoid = (d**2).sum(axis=0) <= 1.0
    present = nonempty_slices(ellipsoid, axis)
    labeled = [present[1], present[len(present) // 2], present[-2]]
    user = labeled_only(ellipsoid, axis, labeled)
    other = np.zeros(SHAPE, bool)
    other[:, 2:12, 3:14] = True

    segmentation = seg.GetSegmentation()
    target_id = segmentation.AddEmptySegment("", "target", [0.9, 0.2, 0.2])
    other_id = segmentation.AddEmptySegment("", "other", [0.2, 0.3, 0.9])
    _paint(seg, target_id, user, ijk_to_ras)
    _paint(seg, other_id, other, ijk_to_ras)
    return SimpleNamespace(
        scene=scene,
        volume=volume,
        seg=seg,
        axis=axis,
        user=user,
        labeled=labeled,
        ellipsoid=ellipsoid,
        other=other,
        target=target_id,
        other_id=other_id,
        ijk_to_ras=ijk_to_ras,
        path=path,
        itk=itk,
        tmp=tmp_path,
    )


def run(case, mode="fill", engine=None, **options):
    """prepare + run + apply, returning (job, result) so tests see the pipeline's own result."""
    options.setdefault("use_prior", False)
    runner = runner_with(engine or ConstantLogitEngineDouble())
    job = runner.prepare(
        case.volume, case.seg, [case.target], PropagationOptions(**options), mode=mode
    )
    runner.run(job)
    return job, runner.apply(job)


# --------------------------------------------------------------------------------------------


def test_slicer_reads_the_volume_and_segments_on_the_same_physical_grid(case):
    vol = mrml.volume_from_node(case.volume)
    assert vol.array.shape == SHAPE
    # through physical space only (Slicer may reverse k of a left-handed file)
    rng = np.random.default_rng(1)
    for kji in rng.integers(0, SHAPE, size=(20, 3)):
        ras = vol.ijk_to_ras @ np.array([kji[2], kji[1], kji[0], 1.0])
        lps = (ras[0] * -1, ras[1] * -1, ras[2])
        index = case.itk.TransformPhysicalPointToIndex(lps)
        assert vol.array[tuple(kji)] == case.itk.GetPixel(index)
    assert np.array_equal(mrml.segment_mask(case.volume, case.seg, case.target), case.user)
    assert np.array_equal(mrml.segment_mask(case.volume, case.seg, case.other_id), case.other)
    assert mrml.labeled_slices(case.volume, case.seg, case.target, "axial") == case.labeled
    assert mrml.axis_name(vol, case.axis) == "axial"


def test_fill_predicts_only_unlabeled_slices_and_keeps_everything_else(case):
    other_before = stored(case.seg, case.other_id)
    target_before = mrml.segment_mask(case.volume, case.seg, case.target)
    job, result = run(case, "fill")
    res = job.result.segments[0]
    assert result.segment_ids == [case.target] and result.mode == "fill"
    assert result.labeled_slices[case.target] == case.labeled
    predicted = result.predicted_slices[case.target]
    assert predicted and not set(predicted) & set(case.labeled)

    after = mrml.segment_mask(case.volume, case.seg, case.target)
    for t in range(SHAPE[case.axis]):
        got = _slices(after, case.axis, [t])
        if t in case.labeled:
            assert np.array_equal(got, _slices(case.user, case.axis, [t])), t
        elif t in predicted:
            assert np.array_equal(got, _slices(res.mask, case.axis, [t])), t
        else:
            assert np.array_equal(got, _slices(target_before, case.axis, [t])), t
    assert _slices(after, case.axis, predicted).any()  # the test double predicts foreground
    # the overlapping block is untouched, bit for bit, in the segmentation's own storage
    assert_same_stored(case.seg, case.other_id, other_before)
    assert np.array_equal(mrml.segment_mask(case.volume, case.seg, case.other_id), case.other)
    # the record is stored with the segment
    status = mrml.slice_status(case.volume, case.seg, case.target, "axial")
    assert status.labeled == case.labeled and status.predicted == predicted and not status.edited


def test_result_carries_the_suggested_slices_and_the_slice_uncertainty(case):
    job, result = run(case, "fill")
    res = job.result.segments[0]
    suggested = result.suggested_slices[case.target]
    assert suggested == res.suggested_slices(mrml.job.SUGGESTED_SLICES) and suggested
    assert not set(suggested) & set(case.labeled)
    assert all(0 <= t < SHAPE[case.axis] for t in suggested)
    unc = result.slice_uncertainty[case.target]
    assert set(unc) == set(range(SHAPE[case.axis]))
    assert all(unc[t] == 0.0 for t in case.labeled)
    assert all(unc[t] >= 0.0 for t in unc)
    # "Go to suggested slice": the world position of that slice maps back to it
    for t in suggested:
        ras = mrml.slice_center_ras(case.volume, case.axis, t)
        assert mrml.slice_index_at(case.volume, case.axis, ras) == t
    with pytest.raises(mrml.MRMLError, match="outside"):
        mrml.slice_center_ras(case.volume, case.axis, SHAPE[case.axis])


def test_new_mode_writes_a_review_segment_and_rerun_replaces_it(case):
    before = state(case.seg)
    job, result = run(case, "new")
    segmentation = case.seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    out_id = result.segment_ids[0]
    assert out_id not in (case.target, case.other_id)
    out = segmentation.GetSegment(out_id)
    assert out.GetName() == "target (UniverSeg)"
    assert np.allclose(out.GetColor(), segmentation.GetSegment(case.target).GetColor())
    assert state(case.seg)[:2] == before  # source and other segment unchanged
    review = mrml.segment_mask(case.volume, case.seg, out_id)
    assert np.array_equal(review, job.result.segments[0].mask)
    assert np.array_equal(
        _slices(review, case.axis, case.labeled), _slices(case.user, case.axis, case.labeled)
    )

    job, again = run(case, "new", support_size=1, max_extrapolation=0)
    assert again.segment_ids == [out_id]
    assert np.array_equal(
        mrml.segment_mask(case.volume, case.seg, out_id), job.result.segments[0].mask
    )
    assert not np.array_equal(job.result.segments[0].mask, review)  # really replaced
    assert segmentation.GetNumberOfSegments() == 3
    assert state(case.seg)[:2] == before


def test_annotation_loop_corrected_slices_become_labeled_untouched_ones_never(case):
    run(case, "fill")
    status = mrml.slice_status(case.volume, case.seg, case.target, "axial")
    predicted = status.predicted
    corrected = predicted[len(predicted) // 2]
    # the user corrects one predicted slice (a small square instead of the prediction)
    mask = mrml.segment_mask(case.volume, case.seg, case.target)
    take = [slice(None)] * 3
    take[case.axis] = corrected
    mask[tuple(take)] = False
    plane = mask[tuple(take)]
    plane[3:6, 4:8] = True
    mask[tuple(take)] = plane
    _paint(case.seg, case.target, mask, case.ijk_to_ras)

    status = mrml.slice_status(case.volume, case.seg, case.target, "axial")
    assert status.edited == [corrected]
    assert status.labeled == sorted(case.labeled + [corrected])
    assert corrected not in status.predicted and set(status.predicted) == set(predicted) - {
        corrected
    }

    engine = ConstantLogitEngineDouble()
    runner = runner_with(engine)
    job = runner.prepare(case.volume, case.seg, [case.target], PropagationOptions(use_prior=False))
    assert job.inputs[0].labeled_slices == sorted(case.labeled + [corrected])
    runner.run(job)
    runner.apply(job)
    after = mrml.segment_mask(case.volume, case.seg, case.target)
    assert np.array_equal(after[tuple(take)], plane)  # the correction is kept
    assert max(engine.support_counts) <= len(case.labeled) + 1  # untouched slices: no support
    status = mrml.slice_status(case.volume, case.seg, case.target, "axial")
    assert status.labeled == sorted(case.labeled + [corrected]) and not status.edited


def test_marked_empty_slice_is_labeled_and_erased_label_is_not(case):
    empty = [t for t in range(SHAPE[case.axis]) if t not in case.labeled][0]
    status = mrml.mark_slice_labeled(case.volume, case.seg, case.target, "axial", empty)
    assert empty in status.labeled and status.empty_labeled == [empty]
    job, _ = run(case, "fill")
    after = mrml.segment_mask(case.volume, case.seg, case.target)
    assert not _slices(after, case.axis, [empty]).any()  # a labeled empty slice stays empty
    assert empty not in job.result.segments[0].predicted_slices

    status = mrml.mark_slice_labeled(
        case.volume, case.seg, case.target, "axial", empty, labeled=False
    )
    assert empty not in status.labeled
    with pytest.raises(mrml.MRMLError, match="painted voxels"):
        mrml.mark_slice_labeled(
            case.volume, case.seg, case.target, "axial", case.labeled[0], labeled=False
        )

    # the user erases a painted slice completely: it is no longer labeled
    mask = mrml.segment_mask(case.volume, case.seg, case.target)
    take = [slice(None)] * 3
    take[case.axis] = case.labeled[1]
    mask[tuple(take)] = False
    _paint(case.seg, case.target, mask, case.ijk_to_ras)
    assert case.labeled[1] not in mrml.labeled_slices(case.volume, case.seg, case.target, "axial")


@pytest.mark.parametrize("mode", ["fill", "new"])
def test_cancel_mid_run_leaves_the_segmentation_identical(case, mode):
    before = state(case.seg)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2  # after the first batches have run

    with pytest.raises(Cancelled):
        runner_with(ConstantLogitEngineDouble()).propagate(
            case.volume,
            case.seg,
            [case.target],
            PropagationOptions(use_prior=False, batch_size=2),
            mode=mode,
            cancel=cancel,
        )
    assert len(calls) > 2
    assert state(case.seg) == before


def test_edit_during_the_run_is_not_overwritten(case):
    runner = runner_with(ConstantLogitEngineDouble())
    job = runner.prepare(case.volume, case.seg, [case.target], PropagationOptions(use_prior=False))
    runner.run(job)
    edited = case.user.copy()
    edited[tuple(np.argwhere(~case.user)[0])] = True  # the user paints one voxel meanwhile
    _paint(case.seg, case.target, edited, case.ijk_to_ras)
    before = state(case.seg)
    with pytest.raises(mrml.MRMLError, match="edited during the run"):
        runner.apply(job)
    assert state(case.seg) == before


def test_failure_while_writing_restores_what_was_written(case, monkeypatch):
    before = state(case.seg)
    runner = runner_with(ConstantLogitEngineDouble())
    job = runner.prepare(
        case.volume, case.seg, [case.target, case.other_id], PropagationOptions(use_prior=False)
    )
    runner.run(job)
    real = mrml.writing.write_segment
    written = []

    def fail_on_second(seg_node, volume_node, w, segment_id, *args):
        if written:
            raise RuntimeError("disk full")
        written.append(segment_id)
        return real(seg_node, volume_node, w, segment_id, *args)

    monkeypatch.setattr(mrml.writing, "write_segment", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        runner.apply(job)
    assert written == [case.target]
    assert [(s[0], s[1], s[4], s[5]) for s in state(case.seg)] == [
        (s[0], s[1], s[4], s[5]) for s in before
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"segmentIds": ["no such segment"]}, "no segment 'no such segment'"),
        ({"mode": "replace"}, "unknown output mode"),
        ({"support_sise": 4}, "unknown option 'support_sise'"),
        ({"axis": "oblique"}, "unknown axis"),
        ({"segmentIds": ["empty"]}, "no labeled slice"),
    ],
)
def test_bad_input_gives_one_line_error_and_changes_nothing(case, kwargs, message):
    case.seg.GetSegmentation().AddEmptySegment("empty", "empty")
    before = state(case.seg)
    kwargs = dict(kwargs)
    ids = kwargs.pop("segmentIds", [case.target])
    mode = kwargs.pop("mode", "fill")
    with pytest.raises(ValueError, match=message) as info:
        runner_with(ConstantLogitEngineDouble()).propagate(
            case.volume, case.seg, ids, PropagationOptions.from_mapping(kwargs), mode=mode
        )
    assert "\n" not in str(info.value)
    assert state(case.seg) == before


def test_wrong_nodes_are_refused(case):
    with pytest.raises(mrml.MRMLError, match="no input volume"):
        runner_with(ConstantLogitEngineDouble()).propagate(
            None, case.seg, None, PropagationOptions()
        )
    with pytest.raises(mrml.MRMLError, match="not a segmentation"):
        runner_with(ConstantLogitEngineDouble()).propagate(
            case.volume, case.volume, None, PropagationOptions()
        )


def test_closed_surface_segmentation_is_refused(case):
    seg = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    closed = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    seg.GetSegmentation().SetSourceRepresentationName(closed)
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(case.ijk_to_ras[:3, 3])
    sphere.SetRadius(5.0)
    sphere.Update()
    segment = slicer.vtkSegment()
    segment.SetName("ball")
    segment.AddRepresentation(closed, sphere.GetOutput())
    seg.GetSegmentation().AddSegment(segment)
    with pytest.raises(mrml.MRMLError, match="source representation"):
        runner_with(ConstantLogitEngineDouble()).propagate(
            case.volume, seg, ["ball"], PropagationOptions()
        )
    assert seg.GetSegmentation().GetSourceRepresentationName() == closed


def _linear_transform(scene, matrix):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    node.SetMatrixTransformToParent(mrml.vtkglue.vtk_matrix(matrix))
    return node


def test_common_parent_transform_is_handled_in_world_space(case):
    m = np.eye(4)
    m[:3, :3] = _rotation(x_deg=90)  # the volume's "axial" slices become coronal in the views
    m[:3, 3] = (5.0, -3.0, 7.0)
    t = _linear_transform(case.scene, m)
    case.volume.SetAndObserveTransformNodeID(t.GetID())
    case.seg.SetAndObserveTransformNodeID(t.GetID())
    other_before = stored(case.seg, case.other_id)
    assert mrml.array_axis(case.volume, "coronal") == case.axis  # world orientation is used
    runner = runner_with(ConstantLogitEngineDouble())
    job = runner.prepare(
        case.volume, case.seg, [case.target], PropagationOptions(axis="coronal", use_prior=False)
    )
    runner.run(job)
    runner.apply(job)
    after = mrml.segment_mask(case.volume, case.seg, case.target)
    res = job.result.segments[0]
    assert res.labeled_slices == case.labeled
    assert np.array_equal(
        _slices(after, case.axis, case.labeled), _slices(case.user, case.axis, case.labeled)
    )
    assert np.array_equal(
        _slices(after, case.axis, res.predicted_slices),
        _slices(res.mask, case.axis, res.predicted_slices),
    )
    assert_same_stored(case.seg, case.other_id, other_before)


def test_volume_under_its_own_transform_is_resampled_by_slicer(case):
    # shift the volume by exactly two voxels along I: segments land two voxels further
    m = np.eye(4)
    m[:3, 3] = -2 * case.ijk_to_ras[:3, 0]
    t = _linear_transform(case.scene, m)
    case.volume.SetAndObserveTransformNodeID(t.GetID())
    seen = mrml.segment_mask(case.volume, case.seg, case.target)
    assert np.array_equal(seen[:, :, 2:], case.user[:, :, :-2])
    other_before = stored(case.seg, case.other_id)
    stored_before = stored(case.seg, case.target)
    job, _ = run(case, "fill")
    res = job.result.segments[0]
    after = mrml.segment_mask(case.volume, case.seg, case.target)
    assert np.array_equal(
        _slices(after, case.axis, res.predicted_slices),
        _slices(res.mask, case.axis, res.predicted_slices),
    )
    assert_same_stored(case.seg, case.other_id, other_before)
    # the painted voxels themselves are still stored, unmoved
    kept = {tuple(v) for v in stored(case.seg, case.target)[1]}
    assert {tuple(v) for v in stored_before[1]} <= kept


def test_record_is_not_trusted_after_the_segmentation_moved(case):
    _, result = run(case, "fill")
    predicted = result.predicted_slices[case.target]
    m = np.eye(4)
    m[:3, 3] = case.ijk_to_ras[:3, 0]  # one voxel along I, segmentation only
    t = _linear_transform(case.scene, m)
    case.seg.SetAndObserveTransformNodeID(t.GetID())
    status = mrml.slice_status(case.volume, case.seg, case.target, "axial")
    assert "another volume grid" in status.note and not status.predicted
    case.seg.SetAndObserveTransformNodeID(None)
    status = mrml.slice_status(case.volume, case.seg, case.target, "axial")
    assert status.note == "" and status.predicted == predicted


def test_default_selection_skips_unpainted_segments_with_a_note_and_review_outputs(case):
    unpainted = case.seg.GetSegmentation().AddEmptySegment("", "unpainted")
    run(case, "new")
    runner = runner_with(ConstantLogitEngineDouble())
    job = runner.prepare(case.volume, case.seg, None, PropagationOptions(use_prior=False))
    assert job.source_ids == [case.target, case.other_id, unpainted]  # no review output
    before = stored(case.seg, unpainted)
    result = runner.apply(runner.run(job))
    assert result.source_ids == [case.target, case.other_id]
    assert result.skipped_ids == [unpainted]
    assert any(n.startswith("unpainted: no labeled slice") for n in result.notes)
    assert_same_stored(case.seg, unpainted, before)
    for sid in (case.target, case.other_id):
        case.seg.GetSegmentation().RemoveSegment(sid)
    with pytest.raises(mrml.MRMLError, match="no labeled slice in any segment of Segmentation"):
        runner_with(ConstantLogitEngineDouble()).prepare(
            case.volume, case.seg, None, PropagationOptions()
        )


def test_non_linear_transform_is_refused_with_a_clear_message(case):
    grid = case.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    displacement = slicer.vtkOrientedGridTransform()
    image = vtk.vtkImageData()
    image.SetDimensions(3, 3, 3)
    image.SetOrigin(-100, -100, -100)
    image.SetSpacing(100, 100, 100)
    image.AllocateScalars(vtk.VTK_DOUBLE, 3)
    mrml.vtkglue.image_scalars(image)[...] = 1.0
    displacement.SetDisplacementGridData(image)
    grid.SetAndObserveTransformFromParent(displacement)
    case.seg.SetAndObserveTransformNodeID(grid.GetID())
    before = state(case.seg)
    with pytest.raises(mrml.MRMLError, match="non-linear transform .*harden"):
        runner_with(ConstantLogitEngineDouble()).propagate(
            case.volume, case.seg, [case.target], PropagationOptions()
        )
    assert state(case.seg) == before


def test_oversampled_segmentation_keeps_its_stored_labels_bit_for_bit(case):
    """Segmentation geometry twice as fine as the volume: the change is merged on the fine grid,
    so fine voxels outside the predicted slices keep their stored values."""
    seg = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "fine")
    fine = case.ijk_to_ras.copy()
    fine[:3, :3] /= 2.0
    fine[:3, 3] -= case.ijk_to_ras[:3, :3] @ np.array([0.25, 0.25, 0.25])
    fine_shape = tuple(2 * s for s in SHAPE)
    geometry = mrml.vtkglue.geometry_image(
        (0, fine_shape[2] - 1, 0, fine_shape[1] - 1, 0, fine_shape[0] - 1), fine
    )
    seg.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry),
    )
    sid = seg.GetSegmentation().AddEmptySegment("", "target")
    # fine labels: the coarse labels plus a detail smaller than a coarse voxel
    labels = case.user.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    detail = np.zeros_like(labels)
    take = [slice(None)] * 3
    take[case.axis] = 2 * case.labeled[1]
    detail[tuple(take)] = labels[tuple(take)]
    detail_plane = np.zeros(detail[tuple(take)].shape, bool)
    detail_plane[1, 1] = True
    detail[tuple(take)] = detail_plane
    _paint(seg, sid, labels | detail, fine)
    before = stored(seg, sid)
    runner = runner_with(ConstantLogitEngineDouble())
    job = runner.prepare(case.volume, seg, [sid], PropagationOptions(use_prior=False))
    runner.run(job)
    runner.apply(job)
    res = job.result.segments[0]
    after = stored(seg, sid)
    # fine voxels whose coarse slice was not predicted are unchanged
    coarse_slice = lambda v: v[:, 2 - case.axis] // 2  # noqa: E731 - v holds (I, J, K)
    keep_before = before[1][~np.isin(coarse_slice(before[1]), res.predicted_slices)]
    keep_after = after[1][~np.isin(coarse_slice(after[1]), res.predicted_slices)]
    assert np.array_equal(keep_before, keep_after)
    assert np.allclose(after[0], fine)
    coarse = mrml.segment_mask(case.volume, seg, sid)
    assert np.array_equal(
        _slices(coarse, case.axis, res.predicted_slices),
        _slices(res.mask, case.axis, res.predicted_slices),
    )
    # the record reads back consistently: nothing counts as corrected
    assert not mrml.slice_status(case.volume, seg, sid, "axial").edited


def test_segment_content_outside_the_volume_is_kept(case):
    """A segment reaching beyond the volume (painted on a larger image) keeps what lies outside."""
    wide = case.ijk_to_ras.copy()
    wide[:3, 3] = (case.ijk_to_ras @ np.array([-8.0, 0.0, 0.0, 1.0]))[:3]
    mask = np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] + 8), bool)
    mask[:, :, 8:] = case.user
    mask[:, 5:9, 1:4] = True  # outside the volume (I < 0)
    _paint(case.seg, case.target, mask, wide)
    assert np.array_equal(mrml.segment_mask(case.volume, case.seg, case.target), case.user)

    def outside():
        matrix, voxels = stored(case.seg, case.target)
        ijk = np.linalg.solve(case.ijk_to_ras, matrix @ np.c_[voxels, np.ones(len(voxels))].T)
        ijk = np.round(ijk[:3].T).astype(int)
        return sorted(tuple(v) for v in ijk if v[0] < 0)

    outside_before = outside()
    assert len(outside_before) == SHAPE[0] * 4 * 3
    run(case, "fill")
    assert outside() == outside_before


def test_one_undo_step_restores_the_segmentation(case):
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(case.seg.GetSegmentation())
    history.SetMaximumNumberOfStates(10)
    before = state(case.seg)
    runner_with(ConstantLogitEngineDouble()).propagate(
        case.volume,
        case.seg,
        [case.target],
        PropagationOptions(use_prior=False),
        mode="new",
        undo=history,
    )
    assert history.GetNumberOfStates() == 1
    assert state(case.seg) != before
    assert history.RestorePreviousState()
    assert [(s[0], s[1], s[4], s[5]) for s in state(case.seg)] == [
        (s[0], s[1], s[4], s[5]) for s in before
    ]
    calls = []
    runner_with(ConstantLogitEngineDouble()).propagate(
        case.volume, case.seg, [case.target], PropagationOptions(), undo=lambda: calls.append(1)
    )
    assert calls == [1]


def test_saved_seg_nrrd_reads_back_with_names_colors_and_the_record(case):
    run(case, "fill")
    run(case, "new")
    path = case.tmp / "result.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    case.scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.WriteData(case.seg)

    data = slicerio.read_segmentation(str(path))
    by_name = {s["name"]: s for s in data["segments"]}
    assert set(by_name) == {"target", "other", "target (UniverSeg)"}
    segmentation = case.seg.GetSegmentation()
    for name, segment in by_name.items():
        sid = segmentation.GetSegmentIdBySegmentName(name)
        assert np.allclose(segment["color"], segmentation.GetSegment(sid).GetColor(), atol=1e-5)
    assert by_name["target"]["tags"][mrml.TAG_LABELED].startswith("v1;axis=")
    assert mrml.TAG_PREDICTED in by_name["target"]["tags"]
    assert by_name["target (UniverSeg)"]["tags"][mrml.TAG_SOURCE] == case.target
    assert "tags" not in by_name["other"] or mrml.TAG_LABELED not in by_name["other"]["tags"]
    target = slicerio.segment_mask(data, by_name["target"]).transpose(2, 1, 0)
    assert target.any()

    # reloaded in Slicer, the record still tells painted from predicted slices
    status_before = mrml.slice_status(case.volume, case.seg, case.target, "axial")
    reloaded = slicer.vtkMRMLSegmentationNode()
    case.scene.AddNode(reloaded)
    reader = slicer.vtkMRMLSegmentationStorageNode()
    case.scene.AddNode(reader)
    reader.SetFileName(str(path))
    assert reader.ReadData(reloaded)
    sid = reloaded.GetSegmentation().GetSegmentIdBySegmentName("target")
    status = mrml.slice_status(case.volume, reloaded, sid, "axial")
    assert (status.labeled, status.predicted, status.edited) == (
        status_before.labeled,
        status_before.predicted,
        [],
    )


def test_other_loaded_pair_serves_as_support(case):
    # a second volume (same file) whose segmentation has a fully painted 'target'
    volume2 = slicer.vtkMRMLScalarVolumeNode()
    case.scene.AddNode(volume2)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    case.scene.AddNode(storage)
    storage.SetFileName(str(case.path))
    volume2.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(volume2)
    seg2 = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "atlas")
    sid2 = seg2.GetSegmentation().AddEmptySegment("", "target")
    _paint(seg2, sid2, case.ellipsoid, case.ijk_to_ras)

    # the target segment of the first pair is empty: support comes from the other pair only
    empty_id = case.seg.GetSegmentation().AddEmptySegment("", "target")
    engine = ConstantLogitEngineDouble()
    runner = runner_with(engine)
    job = runner.prepare(
        case.volume,
        case.seg,
        [empty_id],
        PropagationOptions(use_prior=False),
        supportPairs=[(volume2, seg2)],
    )
    runner.run(job)
    result = runner.apply(job)
    assert result.predicted_slices[empty_id]
    assert mrml.segment_mask(case.volume, case.seg, empty_id).any()
    with pytest.raises(mrml.MRMLError, match="no segment named 'other'"):
        runner_with(engine).prepare(
            case.volume,
            case.seg,
            [case.other_id],
            PropagationOptions(),
            supportPairs=[(volume2, seg2)],
        )


def test_another_axis_needs_the_prediction_cleared_first(case):
    run(case, "fill")
    before = state(case.seg)
    with pytest.raises(mrml.MRMLError, match="clear the prediction"):
        runner_with(ConstantLogitEngineDouble()).propagate(
            case.volume, case.seg, [case.target], PropagationOptions(axis="sagittal")
        )
    assert state(case.seg) == before
    assert mrml.slice_status(case.volume, case.seg, case.target, "sagittal").conflict
    erased = mrml.clear_predictions(case.volume, case.seg, case.target)
    assert erased and not set(erased) & set(case.labeled)
    assert np.array_equal(mrml.segment_mask(case.volume, case.seg, case.target), case.user)
    runner = runner_with(ConstantLogitEngineDouble())
    job = runner.prepare(case.volume, case.seg, [case.target], PropagationOptions(axis="sagittal"))
    assert job.axis != case.axis


def test_real_network_writes_only_predicted_slices(case):
    torch.manual_seed(0)
    engine = InferenceEngine(UniverSeg(), "cpu")
    other_before = stored(case.seg, case.other_id)
    runner = runner_with(engine)
    job = runner.prepare(
        case.volume,
        case.seg,
        [case.target],
        PropagationOptions(support_size=2, max_extrapolation=0),
    )
    runner.run(job)
    result = runner.apply(job)
    res = job.result.segments[0]
    predicted = result.predicted_slices[case.target]
    assert predicted and all(case.labeled[0] < t < case.labeled[-1] for t in predicted)
    after = mrml.segment_mask(case.volume, case.seg, case.target)
    untouched = [t for t in range(SHAPE[case.axis]) if t not in predicted]
    assert np.array_equal(
        _slices(after, case.axis, untouched), _slices(case.user, case.axis, untouched)
    )
    assert np.array_equal(
        _slices(after, case.axis, predicted), _slices(res.mask, case.axis, predicted)
    )
    assert_same_stored(case.seg, case.other_id, other_before)
    # the segment's tags say how it was computed (saved with the scene and in .seg.nrrd)
    segment = case.seg.GetSegmentation().GetSegment(case.target)
    for tag, value in ((TAG_DEVICE, "cpu"), (TAG_PRECISION, engine.precision)):
        ref = vtk.reference("")
        assert segment.GetTag(tag, ref) and str(ref) == value


def test_view_helpers_find_the_axis_and_slice_of_a_slice_view(case):
    vol = mrml.volume_from_node(case.volume)
    for name in ("axial", "coronal", "sagittal"):
        a = mrml.array_axis(case.volume, name)
        normal = vol.direction[:, 2 - a]  # direction of that array axis in RAS
        assert mrml.axis_for_slice_normal(case.volume, normal) == a
        for index in (0, SHAPE[a] // 2, SHAPE[a] - 1):
            ijk = np.array([4.0, 5.0, 6.0, 1.0])
            ijk[2 - a] = index + 0.3
            assert mrml.slice_index_at(case.volume, a, vol.ijk_to_ras @ ijk) == index
    with pytest.raises(mrml.MRMLError, match="outside the volume"):
        mrml.slice_index_at(case.volume, "axial", vol.ijk_to_ras @ np.array([0, 0, -5.0, 1]))
    assert mrml.format_slices([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"


# --------------------------------------------------------------------------------------------
# the same rules as every surface (CLI, module, effect, browser app), on real MRML


def test_auto_axis_fully_labeled_runs_and_exclusive_predictions(case):
    """The runner's default axis is ``auto``; 'other' (a block on every slice: a fully labeled
    run) is left bit for bit; the target's prediction never takes other's painted voxels."""
    other_before = stored(case.seg, case.other_id)
    target_before = stored(case.seg, case.target)
    runner = runner_with(ConstantLogitEngineDouble())  # foreground everywhere
    options = PropagationOptions(axis="auto", use_prior=False)
    result = runner.propagate(case.volume, case.seg, None, options)
    assert result.axis == case.axis and result.axis_name == "axial"
    assert result.source_ids == [case.target, case.other_id]
    assert result.predicted_slices[case.other_id] == []
    assert_same_stored(case.seg, case.other_id, other_before)
    target = mrml.segment_mask(case.volume, case.seg, case.target)
    predicted = result.predicted_slices[case.target]
    on_predicted = _slices(target, case.axis, predicted)
    assert predicted and on_predicted.any()
    assert not (on_predicted & _slices(case.other, case.axis, predicted)).any()
    assert set(map(tuple, target_before[1])) <= set(map(tuple, stored(case.seg, case.target)[1]))


def test_segments_painted_on_two_axes_are_one_line_and_nothing_changes(case):
    sid = case.seg.GetSegmentation().AddEmptySegment("", "sideways")
    sideways = np.zeros(SHAPE, bool)
    take = [slice(4, 12), slice(5, 15), slice(6, 18)]
    other_axis = (case.axis + 1) % 3
    for t in (8, 12):
        take[other_axis] = t
        sideways[tuple(take)] = True
    _paint(case.seg, sid, sideways, case.ijk_to_ras)
    before = state(case.seg)
    with pytest.raises(mrml.MRMLError, match="more than one axis") as info:
        runner_with(ConstantLogitEngineDouble()).propagate(case.volume, case.seg)
    assert "\n" not in str(info.value) and "'sideways'" in str(info.value)
    assert state(case.seg) == before
