"""The Segment Editor effect's Qt-free logic (``UniverSegLogic.mrml.effect``) on real MRML.

Scene: an oblique, anisotropic volume with an intensity ramp; a segmentation with 'target'
painted on three slices of an ellipsoid, 'other' (a block crossing the target's slices) and
'third' (a small block). Masking is checked twice: against what each mode promises (painted
slices, voxels outside the editable area and other segments bit for bit) and against Slicer's
own Segment Editor logic (``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap``, slicer-core)
applying the same result with the same settings.

``HalfPlaneEngine`` is a test double for the inference engine (foreground on the left half of
every canvas), so that predictions hold both foreground and background and the tests see where
each voxel goes independently of the network.
"""

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Platform")  # before slicer-core's ITK

from types import SimpleNamespace

import numpy as np
import pytest
import slicer
import torch
import vtk
from conftest import runner_with

from UniverSegLogic import mrml
from UniverSegLogic.core.propagator import PropagationOptions
from UniverSegLogic.core.slices import nonempty_slices
from UniverSegLogic.mrml import effect
from UniverSegLogic.mrml.vtkglue import image_scalars, np_from_vtk_matrix, oriented_image

SHAPE = (16, 20, 24)  # K, J, I
LOGIC = slicer.vtkSlicerSegmentationsModuleLogic
SEG = slicer.vtkMRMLSegmentationNode


class HalfPlaneEngine:
    """Test double for ``InferenceEngine``: foreground (+8) on the left half of each canvas,
    background (-8) on the right half."""

    device = "cpu"
    batch_size = 4

    def logits(self, targets, support_images, support_labels):
        n, w = targets.shape[0], targets.shape[-1]
        out = torch.full((n, 1) + tuple(targets.shape[-2:]), -8.0)
        out[..., : w // 2] = 8.0
        return out


def _paint(seg_node, segment_id, mask, ijk_to_ras):
    extent = (0, mask.shape[2] - 1, 0, mask.shape[1] - 1, 0, mask.shape[0] - 1)
    image = oriented_image(mask.astype(np.uint8), extent, ijk_to_ras)
    assert LOGIC.SetBinaryLabelmapToSegment(image, seg_node, segment_id, LOGIC.MODE_REPLACE)


def stored(seg_node, segment_id):
    """A segment exactly as stored: its foreground voxels as world-grid (I, J, K) indices."""
    lm = seg_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    values = image_scalars(lm)
    if values is None or mrml.vtkglue.extent_empty(lm.GetExtent()):
        return frozenset()
    label = seg_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    m = vtk.vtkMatrix4x4()
    lm.GetImageToWorldMatrix(m)
    e = lm.GetExtent()
    kji = np.argwhere(values == label) + np.array([e[4], e[2], e[0]])
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    ras = (np_from_vtk_matrix(m) @ ijk1.T)[:3].T
    return frozenset(map(tuple, np.round(ras, 4)))


def state(seg_node):
    """Every segment's id, name, colour, stored voxels and UniverSeg tags."""
    segmentation = seg_node.GetSegmentation()
    out = []
    for n in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(n)
        segment = segmentation.GetSegment(sid)
        tags = mrml.record.tags_of(segment, (mrml.TAG_LABELED, mrml.TAG_PREDICTED))
        out.append((sid, segment.GetName(), tuple(segment.GetColor()), stored(seg_node, sid), tags))
    return out


@pytest.fixture
def case():
    scene = slicer.vtkMRMLScene()
    seg_logic = LOGIC()
    seg_logic.SetMRMLScene(scene)  # registers the segmentation converter rules

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "image")
    image = vtk.vtkImageData()
    image.SetDimensions(SHAPE[2], SHAPE[1], SHAPE[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    k, j, i = np.indices(SHAPE)
    image_scalars(image)[...] = (10 * i + 3 * j + k).astype(np.int16)  # intensity ramp along I
    volume.SetAndObserveImageData(image)
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    ijk_to_ras = np.array(
        [
            [0.9 * c, -1.2 * s, 0, 12.5],
            [0.9 * s, 1.2 * c, 0, -30.0],
            [0, 0, 2.5, 40.0],
            [0, 0, 0, 1],
        ]
    )
    volume.SetIJKToRASMatrix(mrml.vtkglue.vtk_matrix(ijk_to_ras))

    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    axis = mrml.array_axis(volume, "axial")
    assert axis == 0

    d = (np.stack([k, j, i]) - np.array([7.5, 9.5, 11.5])[:, None, None, None]) / np.array(
        [6.0, 7.0, 9.0]
    )[:, None, None, None]
    ellipsoid = (d**2).sum(axis=0) <= 1.0
    present = nonempty_slices(ellipsoid, axis)
    labeled = [present[1], present[len(present) // 2], present[-2]]
    user = np.zeros(SHAPE, bool)
    user[labeled] = ellipsoid[labeled]
    other = np.zeros(SHAPE, bool)
    other[:, 2:12, 3:14] = True
    third = np.zeros(SHAPE, bool)
    third[:, 14:18, 16:22] = True

    segmentation = seg.GetSegmentation()
    ids = SimpleNamespace(
        target=segmentation.AddEmptySegment("", "target", [0.9, 0.2, 0.2]),
        other=segmentation.AddEmptySegment("", "other", [0.2, 0.3, 0.9]),
        third=segmentation.AddEmptySegment("", "third", [0.2, 0.8, 0.2]),
    )
    _paint(seg, ids.target, user, ijk_to_ras)
    _paint(seg, ids.other, other, ijk_to_ras)
    _paint(seg, ids.third, third, ijk_to_ras)
    return SimpleNamespace(
        scene=scene,
        volume=volume,
        seg=seg,
        ids=ids,
        axis=axis,
        labeled=labeled,
        user=user,
        other=other,
        third=third,
        intensity=image_scalars(image).copy(),
        ijk_to_ras=ijk_to_ras,
    )


def compute(case, segment_ids=None):
    return runner_with(HalfPlaneEngine()).preview(
        case.volume,
        case.seg,
        segment_ids or [case.ids.target],
        PropagationOptions(axis="axial", use_prior=False),
    )


def mask_of(case, sid):
    return mrml.segment_mask(case.volume, case.seg, sid)


def region_of(preview, index=0):
    """Slices Apply may write (predicted, not labeled), as a boolean KJI mask."""
    res = preview.job.result.segments[index]
    region = np.zeros(SHAPE, bool)
    region[sorted(set(res.predicted_slices) - set(res.labeled_slices))] = True
    return region, res.mask


# --------------------------------------------------------------------------------------------
# preview, cancel, apply, undo


def test_preview_changes_nothing_shows_what_apply_writes_and_cancel_restores(case):
    before = state(case.seg)
    preview = compute(case)
    node = preview.show()
    assert state(case.seg) == before  # the segmentation is untouched by the preview
    assert node.GetScene() is case.scene and node is not case.seg
    assert node.GetName() == "Segmentation preview"
    shown = mrml.segment_mask(case.volume, node, case.ids.target)
    region, predicted = region_of(preview)
    assert np.array_equal(shown, np.where(region, predicted, case.user))
    assert shown[region].any() and not shown[region].all()  # foreground and background
    preview.discard()
    assert node.GetScene() is None
    assert state(case.seg) == before


def test_apply_writes_the_preview_keeps_painted_slices_and_other_segments(case):
    others = {sid: stored(case.seg, sid) for sid in (case.ids.other, case.ids.third)}
    preview = compute(case)
    shown = mrml.segment_mask(case.volume, preview.show(), case.ids.target)
    painted = [case.seg.GetSegmentation().GetSegment(case.ids.target)]
    result = preview.apply()
    after = mask_of(case, case.ids.target)
    assert np.array_equal(after, shown)
    assert np.array_equal(after[case.labeled], case.user[case.labeled])
    for sid, voxels in others.items():
        assert stored(case.seg, sid) == voxels
    assert result.segment_ids == [case.ids.target] and result.overwritten == {}
    assert preview.preview_node is None and painted[0].GetName() == "target"
    status = mrml.slice_status(case.volume, case.seg, case.ids.target, "axial")
    assert status.labeled == case.labeled
    assert status.predicted == result.predicted_slices[case.ids.target]


def test_apply_is_one_undo_step(case):
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(case.seg.GetSegmentation())
    history.SetMaximumNumberOfStates(10)
    before = state(case.seg)
    preview = compute(case)
    preview.show()
    mask = effect.EditMask(overwrite="all")
    preview.apply(mask, undo=history)
    assert history.GetNumberOfStates() == 1
    assert state(case.seg) != before
    assert history.RestorePreviousState()
    assert state(case.seg) == before


def test_edit_after_the_preview_is_refused_and_nothing_written(case):
    preview = compute(case)
    preview.show()
    edited = case.user.copy()
    edited[case.labeled[0], 0, 0] = True
    _paint(case.seg, case.ids.target, edited, case.ijk_to_ras)
    before = state(case.seg)
    calls = []
    with pytest.raises(mrml.MRMLError, match="edited since the preview.*press Update"):
        preview.apply(undo=lambda: calls.append(1))
    assert calls == [] and state(case.seg) == before


def test_failure_while_writing_restores_every_segment(case, monkeypatch):
    before = state(case.seg)
    preview = compute(case)
    real = effect.store_labelmap
    calls = []

    def failing(node, sid, *args):
        calls.append(sid)
        if len(calls) == 2:
            raise mrml.MRMLError("simulated failure")
        real(node, sid, *args)

    monkeypatch.setattr(effect, "store_labelmap", failing)
    with pytest.raises(mrml.MRMLError, match="simulated"):
        preview.apply(effect.EditMask(overwrite="all"))
    assert len(calls) == 2
    monkeypatch.setattr(effect, "store_labelmap", real)
    assert state(case.seg) == before


# --------------------------------------------------------------------------------------------
# masking: what each mode promises, and Slicer's own editor logic as the reference


def slicer_editor_result(case, final_target, mask, seg=None, extent=None, grid=None):
    """The target as Slicer's Segment Editor logic stores it when it sets ``final_target``
    (over ``extent`` of ``grid``; default: the volume grid) with ``mask``'s settings, on a copy
    of the segmentation ``seg`` (default: the case's). Returns the copy's target voxels over
    that extent."""
    seg = seg or case.seg
    if extent is None:
        extent, grid = (0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1), case.ijk_to_ras
    copy = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "copy")
    copy.CreateDefaultDisplayNodes()
    copy.GetSegmentation().DeepCopy(seg.GetSegmentation())
    display, copy_display = seg.GetDisplayNode(), copy.GetDisplayNode()
    for n in range(seg.GetSegmentation().GetNumberOfSegments()):
        sid = seg.GetSegmentation().GetNthSegmentID(n)
        copy_display.SetSegmentVisibility(sid, display.GetSegmentVisibility(sid))
    editor = case.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetAndObserveSegmentationNode(copy)
    editor.SetAndObserveSourceVolumeNode(case.volume)
    editor.SetSelectedSegmentID(case.ids.target)
    editor.SetMaskMode(mask.mask_mode)
    editor.SetMaskSegmentID(mask.mask_segment_id)
    editor.SetOverwriteMode(editor.OverwriteNone)
    if mask.intensity_range is not None:
        editor.SetSourceVolumeIntensityMask(True)
        editor.SetSourceVolumeIntensityMaskRange(*mask.intensity_range)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(case.scene)
    logic.SetSegmentEditorNode(editor)
    assert logic.ResetModifierLabelmapToDefault()
    modifier = oriented_image(final_target.astype(np.uint8), extent, grid)
    logic.ModifySegmentByLabelmap(
        copy, case.ids.target, modifier, logic.ModificationModeSet, False, False
    )
    out = mrml.writing.segment_values(copy, case.ids.target, extent)
    case.scene.RemoveNode(copy)
    case.scene.RemoveNode(editor)
    return out


MASKS = {
    "inside all segments": lambda ids: effect.EditMask(1),
    "inside visible segments": lambda ids: effect.EditMask(2),
    "outside all segments": lambda ids: effect.EditMask(3),
    "outside visible segments": lambda ids: effect.EditMask(4),
    "inside one segment": lambda ids: effect.EditMask(5, ids.other),
    "intensity range": lambda ids: effect.EditMask(intensity_range=(80, 150)),
    "outside all + intensity": lambda ids: effect.EditMask(3, intensity_range=(60, 200)),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_masking_mode_keeps_what_it_promises_and_matches_slicer(case, name):
    mask = MASKS[name](case.ids)
    case.seg.GetDisplayNode().SetSegmentVisibility(case.ids.third, False)
    others = {sid: stored(case.seg, sid) for sid in (case.ids.other, case.ids.third)}
    preview = compute(case)
    region, predicted = region_of(preview)
    unmasked = np.where(region, predicted, case.user)

    # the editable area the mode describes, on this (volume = segmentation) grid
    inside_all = case.user | case.other | case.third
    visible = case.user | case.other
    ramp_ok = np.ones(SHAPE, bool)
    if mask.intensity_range is not None:
        lo, hi = mask.intensity_range
        ramp_ok = (case.intensity >= lo) & (case.intensity <= hi)
    area = {
        0: np.ones(SHAPE, bool),
        1: inside_all,
        2: visible,
        3: ~(case.other | case.third),  # the edited segment itself stays editable
        4: ~case.other,
        5: case.other,
    }[mask.mask_mode] & ramp_ok

    reference = slicer_editor_result(case, unmasked, mask) > 0  # Slicer's editor, on a copy
    shown = mrml.segment_mask(case.volume, preview.show(mask), case.ids.target)
    result = preview.apply(mask)
    after = mask_of(case, case.ids.target)
    assert np.array_equal(after, shown)  # the preview showed what was written
    assert np.array_equal(after, reference)  # as Slicer's Segment Editor masks it
    assert not np.array_equal(reference, unmasked)
    assert np.array_equal(after, np.where(area, unmasked, case.user))
    assert np.array_equal(after[case.labeled], case.user[case.labeled])  # painted slices
    assert np.array_equal(after[~area], case.user[~area])  # not editable: as before
    assert (after != case.user).any() and (~area & region & predicted).any()
    assert result.masked_voxels[case.ids.target] == int((~area & region & predicted).sum())
    for sid, voxels in others.items():
        assert stored(case.seg, sid) == voxels  # other segments untouched


def test_intensity_mask_reads_the_first_component_of_an_rgb_source(case):
    rgb = vtk.vtkImageData()
    rgb.SetDimensions(SHAPE[2], SHAPE[1], SHAPE[0])
    rgb.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    values = image_scalars(rgb)
    values[..., 0] = np.clip(case.intensity, 0, 255)
    values[..., 1] = 255 - values[..., 0]
    values[..., 2] = 7
    source = case.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    source.SetAndObserveImageData(rgb)
    source.SetIJKToRASMatrix(mrml.vtkglue.vtk_matrix(case.ijk_to_ras))
    mask = effect.EditMask(intensity_range=(80, 150))
    preview = compute(case)
    region, predicted = region_of(preview)
    preview.apply(mask, sourceVolumeNode=source)
    area = (values[..., 0] >= 80) & (values[..., 0] <= 150)
    expected = np.where(area, np.where(region, predicted, case.user), case.user)
    assert np.array_equal(mask_of(case, case.ids.target), expected)


def test_intensity_mask_needs_a_source_volume(case):
    preview = compute(case)
    with pytest.raises(mrml.MRMLError, match="source volume"):
        effect.editable_region(
            case.seg,
            case.ids.target,
            (0, 1, 0, 1, 0, 1),
            case.ijk_to_ras,
            effect.EditMask(intensity_range=(0, 1)),
        )
    assert preview.preview_node is None


# --------------------------------------------------------------------------------------------
# other segments


@pytest.mark.parametrize("mode", ["none", "visible", "all"])
def test_overwrite_modes_change_other_segments_only_under_the_prediction(case, mode):
    case.seg.GetDisplayNode().SetSegmentVisibility(case.ids.third, False)
    third = case.third.copy()
    third[case.labeled[0] + 1, 14:18, 4:10] = True  # reaches under the prediction
    _paint(case.seg, case.ids.third, third, case.ijk_to_ras)
    preview = compute(case)
    region, predicted = region_of(preview)
    written = region & predicted
    assert (written & case.other).any() and (written & third).any()
    result = preview.apply(effect.EditMask(overwrite=mode))
    other_after = mask_of(case, case.ids.other)
    third_after = mask_of(case, case.ids.third)
    if mode == "none":
        assert np.array_equal(other_after, case.other) and np.array_equal(third_after, third)
        assert result.overwritten == {}
    if mode in ("visible", "all"):
        assert np.array_equal(other_after, case.other & ~written)
        assert result.overwritten[case.ids.other] == int((case.other & written).sum())
    if mode == "visible":
        assert np.array_equal(third_after, third)  # hidden: untouched
    if mode == "all":
        assert np.array_equal(third_after, third & ~written)
    # the propagated segment is what it would be without overwriting
    assert np.array_equal(mask_of(case, case.ids.target), np.where(region, predicted, case.user))


def test_propagated_segments_do_not_erase_each_other(case):
    painted_other = np.zeros(SHAPE, bool)
    painted_other[case.labeled] = case.other[case.labeled]
    _paint(case.seg, case.ids.other, painted_other, case.ijk_to_ras)
    preview = compute(case, [case.ids.target, case.ids.other])
    preview.apply(effect.EditMask(overwrite="all"))
    finals = []
    for index, (sid, painted) in enumerate(
        [(case.ids.target, case.user), (case.ids.other, painted_other)]
    ):
        region, predicted = region_of(preview, index)
        finals.append(mask_of(case, sid))
        assert np.array_equal(finals[-1], np.where(region, predicted, painted))
    assert (finals[0] & finals[1]).any()  # their predictions overlap; both kept


# --------------------------------------------------------------------------------------------
# settings and segment choice


def test_edit_mask_reads_the_segment_editor_node(case):
    editor = case.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    assert effect.EditMask.from_segment_editor_node(editor) == effect.EditMask()
    editor.SetMaskMode(SEG.EditAllowedOutsideVisibleSegments)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(-100, 250.5)
    editor.SetOverwriteMode(editor.OverwriteAllSegments)
    mask = effect.EditMask.from_segment_editor_node(editor)
    assert mask == effect.EditMask(4, "", (-100.0, 250.5), "none")  # others untouched by default
    assert effect.EditMask.from_segment_editor_node(editor, True).overwrite == "all"
    editor.SetOverwriteMode(editor.OverwriteVisibleSegments)
    assert effect.EditMask.from_segment_editor_node(editor, True).overwrite == "visible"
    editor.SetOverwriteMode(editor.OverwriteNone)
    assert effect.EditMask.from_segment_editor_node(editor, True).overwrite == "none"
    editor.SetMaskMode(SEG.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(case.ids.other)
    assert effect.EditMask.from_segment_editor_node(editor).mask_segment_id == case.ids.other
    assert "outside visible segments" in mask.describe() and "untouched" in mask.describe()
    with pytest.raises(mrml.MRMLError, match="overwrite mode"):
        effect.EditMask(overwrite="some")


def test_effect_segments_are_the_visible_ones_and_unpainted_ones_are_skipped_with_a_note(case):
    ids, statuses = effect.effect_segments(case.volume, case.seg, "axial")
    assert ids == [case.ids.target, case.ids.other, case.ids.third]
    case.seg.GetDisplayNode().SetSegmentVisibility(case.ids.third, False)
    empty = case.seg.GetSegmentation().AddEmptySegment("", "empty")
    ids, statuses = effect.effect_segments(case.volume, case.seg, "axial")
    assert ids == [case.ids.target, case.ids.other, empty]
    assert [s.segment_id for s in statuses] == [case.ids.target, case.ids.other, empty]
    assert statuses[0].labeled == case.labeled
    preview = compute(case, ids)  # what the effect's Initialize runs
    assert preview.segment_ids == [case.ids.target, case.ids.other]
    assert any(n.startswith("empty: no labeled slice") for n in preview.notes)
    assert preview.apply().skipped_ids == [empty]
    assert not mask_of(case, empty).any()
    for sid in (case.ids.target, case.ids.other):
        case.seg.GetSegmentation().RemoveSegment(sid)
    assert effect.effect_segments(case.volume, case.seg, "axial")[0] == []  # nothing painted


def test_masking_on_an_oversampled_segmentation_works_on_its_own_grid(case):
    """Segmentation grid twice as fine as the volume, 'other' shifted by one fine voxel (a
    boundary the volume grid cannot represent): "outside all segments" keeps the target's
    stored fine voxels under 'other', as Slicer's editor does."""
    seg = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "fine")
    seg.CreateDefaultDisplayNodes()
    fine = case.ijk_to_ras.copy()
    fine[:3, :3] /= 2.0
    fine[:3, 3] -= case.ijk_to_ras[:3, :3] @ np.array([0.25, 0.25, 0.25])
    fine_shape = tuple(2 * n for n in SHAPE)
    full = (0, fine_shape[2] - 1, 0, fine_shape[1] - 1, 0, fine_shape[0] - 1)
    seg.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(
            mrml.vtkglue.geometry_image(full, fine)
        ),
    )
    up = lambda m: m.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # noqa: E731
    target = seg.GetSegmentation().AddEmptySegment(case.ids.target, "target")
    other = seg.GetSegmentation().AddEmptySegment(case.ids.other, "other")
    _paint(seg, target, up(case.user), fine)
    other_fine = np.roll(up(case.other), 1, axis=2)
    _paint(seg, other, other_fine, fine)
    preview = runner_with(HalfPlaneEngine()).preview(
        case.volume, seg, [target], PropagationOptions(axis="axial", use_prior=False)
    )
    mask = effect.EditMask(3)
    (plain,), _ = preview.plans(effect.EditMask())
    (masked,), _ = preview.plans(mask)
    assert masked.extent == plain.extent and np.allclose(masked.grid, fine)
    current = mrml.writing.segment_values(seg, target, plain.extent)
    blocked = effect.place_values(other_fine.astype(np.uint8), full, plain.extent) > 0
    expected = np.where(blocked, current, plain.final)
    reference = slicer_editor_result(case, plain.final, mask, seg, plain.extent, fine)
    preview.apply(mask)
    after = mrml.writing.segment_values(seg, target, plain.extent)
    assert np.array_equal(after, expected)
    assert np.array_equal(after, reference)
    assert (blocked & (plain.final != current)).any()  # the mask did keep something
