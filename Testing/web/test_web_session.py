"""The browser app's session logic in plain Python: a real trame-slicer SlicerApp (Slicer's MRML
scene and Segment Editor logic from slicer-core, no web server), the real starter weights, the
sample chest CT with 3 painted slices of "right lung"."""

import asyncio
import gzip
import os
import re

import numpy as np
import pytest

pytest.importorskip(
    "trame_slicer", reason="the browser app needs trame-slicer (pip install -e '.[test]')"
)

import slicerio  # noqa: E402

from UniverSegLogic import mrml  # noqa: E402
from UniverSegLogic.core.propagator import PropagationOptions  # noqa: E402
from UniverSegLogic.errors import Cancelled, InputError, UsageError  # noqa: E402
from UniverSegLogic.web.sample import write_sample  # noqa: E402
from UniverSegLogic.web.session import AnnotationSession, UnsavedChanges  # noqa: E402


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture()
def session(sample, tmp_path):
    from trame_slicer.core import SlicerApp

    image, seg, _ = sample
    s = AnnotationSession(
        SlicerApp(), out_path=tmp_path / "out.seg.nrrd", options=PropagationOptions(device="cpu")
    )
    s.load_image(image)
    s.load_segmentation(seg)
    yield s
    s.close()


def _stored(s):
    """(mask on the volume grid, tags) of the active segment: what a run must not change."""
    sid = s.active_segment_id
    segment = s.segmentation.GetSegment(sid)
    tags = {t: mrml.record.get_tag(segment, t) for t in (mrml.TAG_LABELED, mrml.TAG_PREDICTED)}
    return mrml.segment_mask(s.volume_node, s.segmentation_node, sid), tags


def test_loaded_sample_reads_as_three_labeled_slices(session, sample):
    assert session.status_lines("axial") == ["right lung: 3 labeled"]
    (status,) = session.statuses("axial")
    assert status.labeled == sample[2]
    assert [row["name"] for row in session.segments()] == ["right lung"]


def test_propagate_writes_predictions_as_one_undo_step_and_save_keeps_everything(session, sample):
    image, seg_path, labeled = sample
    before, _ = _stored(session)
    report = asyncio.run(session.propagate("auto"))  # the axis the painted slices lie on
    assert report.axis_name == "axial" and "predicted 1 slices" not in report.message()
    (line,) = session.status_lines("axial")
    assert re.fullmatch(r"right lung: 3 labeled, \d+ predicted", line)
    (status,) = session.statuses("axial")
    assert report.predicted == len(status.predicted) > 0
    assert report.suggested and not set(report.suggested) & set(status.labeled)
    after, tags = _stored(session)
    for t in labeled:
        assert np.array_equal(after[t], before[t])
    assert all(after[t].any() for t in status.predicted if min(labeled) < t < max(labeled))
    assert tags[mrml.TAG_PREDICTED]

    path = session.save()
    data = slicerio.read_segmentation(str(path))
    (saved,) = data["segments"]
    (given,) = slicerio.read_segmentation(str(seg_path))["segments"]
    assert saved["name"] == "right lung"
    assert np.allclose(saved["color"], given["color"], atol=1e-4)
    assert saved["tags"][mrml.TAG_LABELED].endswith("slices=" + ",".join(map(str, labeled)))
    assert saved["tags"][mrml.TAG_PREDICTED] == tags[mrml.TAG_PREDICTED]

    session.undo()  # the whole run is one step
    assert session.status_lines("axial") == ["right lung: 3 labeled"]
    assert np.array_equal(_stored(session)[0], before)
    session.redo()
    assert session.status_lines("axial") == [line]


def test_cancel_leaves_the_segmentation_as_it_was(session):
    before = _stored(session)

    def progress(fraction, message):
        session.cancel()  # as the page's Cancel button does, from the first progress report

    with pytest.raises(Cancelled, match="cancelled"):
        asyncio.run(session.propagate("axial", progress))
    after = _stored(session)
    assert np.array_equal(after[0], before[0]) and after[1] == before[1]
    assert not session.undo_stack.can_undo()
    assert not session.running


def test_actions_are_refused_while_a_run_is_computing(session):
    async def scenario():
        task = asyncio.ensure_future(session.propagate("axial"))
        await asyncio.sleep(0)  # the run has started in its worker thread
        errors = []
        for action in (
            session.save,
            session.undo,
            lambda: session.add_segment("x"),
            lambda: session.load_image("x.nrrd"),
            lambda: session.prepare("axial"),
        ):
            with pytest.raises(UsageError, match="a propagation is running") as info:
                action()
            errors.append(info.value)
        await task
        return errors

    assert len(asyncio.run(scenario())) == 5
    assert "predicted" in session.status_lines("axial")[0]


def test_segments_marks_and_clearing_follow_the_annotation_loop(session):
    sid = session.add_segment("left lung")
    assert session.active_segment_id == sid
    assert [r["name"] for r in session.segments()] == ["right lung", "left lung"]
    with pytest.raises(UsageError, match="exists already"):
        session.add_segment("left lung")
    session.mark_slice("axial", 5)  # an empty slice the user says holds no left lung
    assert session.status_lines("axial")[1] == "left lung: 1 labeled, 1 empty"
    with pytest.raises(UsageError, match="unknown effect"):
        session.set_effect("laser")
    session.set_effect("paint", 8)
    assert session.editor.get_active_effect_name().endswith(".SegmentationEffectPaint")

    session.select_segment(session.segment_ids()[0])
    asyncio.run(session.propagate("axial"))
    assert "predicted" in session.status_lines("axial")[0]
    erased = session.clear_predictions()
    assert erased and session.status_lines("axial")[0] == "right lung: 3 labeled"


def test_bad_files_change_nothing(session, tmp_path):
    # a private file outside the upload folder (as /etc/shadow or another user's data would be)
    secret = tmp_path / "private.raw"
    secret.write_bytes(bytes(range(256)) * 4)
    os.chmod(secret, 0o600)
    points_at_it = (
        b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 16 16\nencoding: raw\n"
        + f"data file: {secret}\n\n".encode()
    )
    meta = (
        "ObjectType = Image\nNDims = 3\nDimSize = 16 16 4\nElementType = MET_UCHAR\n"
        f"ElementDataFile = {secret}\n"
    ).encode()
    bomb = (  # 1 MiB that gzip-expands to 1 GiB
        b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 1024 1024 1024\nencoding: gzip\n\n"
        + gzip.compress(bytes(2**20), 9) * 1024
    )
    volume, seg = session.volume_node, session.segmentation_node
    nodes = session.scene.GetNumberOfNodes()
    lines = session.status_lines("axial")
    truncated = tmp_path / "cut.nrrd"
    truncated.write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 64\nencoding: raw\n\n" + b"\0" * 100
    )
    broken_seg = tmp_path / "broken.seg.nrrd"
    broken_seg.write_bytes(truncated.read_bytes().replace(b"\n\n", b"\nSegment0_ID:=x\n\n", 1))
    attempts = [
        lambda: session.load_image(tmp_path / "missing.nrrd"),
        lambda: session.upload("image", "notes.txt", b"hello"),
        lambda: session.upload("image", "ct.nrrd", b"not a nrrd at all"),
        lambda: session.upload("image", "cut.nrrd", truncated.read_bytes()),
        lambda: session.upload("segmentation", "broken.seg.nrrd", broken_seg.read_bytes()),
        lambda: session.upload("segmentation", "../up.seg.nrrd", broken_seg.read_bytes()),
        lambda: session.upload("image", "big.nrrd", b"NRRD" + b"\0" * 10, size=2**40),
        lambda: session.upload("image", "private.nrrd", points_at_it),
        lambda: session.upload("image", "private.mha", meta),
        lambda: session.upload("segmentation", "private.seg.nrrd", points_at_it),
        lambda: session.upload("image", "bomb.nrrd", bomb),
    ]
    for attempt in attempts:
        with pytest.raises(InputError) as info:
            attempt()
        assert "\n" not in str(info.value)
        assert session.volume_node is volume and session.segmentation_node is seg
        assert session.scene.GetNumberOfNodes() == nodes
        assert session.status_lines("axial") == lines
    assert not (tmp_path.parent / "up.seg.nrrd").exists()
    assert list(tmp_path.glob("*.partial*")) == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_of_real_size_uploads_and_loads(session, sample, tmp_path, suffix):
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(sample[0]))
    path = tmp_path / f"chest{suffix}"
    sitk.WriteImage(ct, str(path))
    assert path.stat().st_size > 256 * 1024  # the old check read only the first 64 KiB
    session.upload("image", path.name, path.read_bytes(), discard_changes=True)
    assert session.volume_node.GetName() == "chest"
    loaded = slicer_array(session.volume_node)
    assert np.array_equal(loaded, sitk.GetArrayFromImage(ct))


def slicer_array(volume_node):
    from trame_slicer.utils import vtk_image_to_np

    return vtk_image_to_np(volume_node.GetImageData())


def test_opening_a_file_over_unsaved_changes_asks_first(session, sample, tmp_path):
    image, seg_path, _ = sample
    seg = session.segmentation_node
    sid = session.add_segment("left lung")  # an undo step: unsaved
    assert session.has_unsaved_changes()
    for kind, name, data in (
        ("image", "other.nrrd", image.read_bytes()),
        ("segmentation", "other.seg.nrrd", seg_path.read_bytes()),
    ):
        with pytest.raises(UnsavedChanges, match=r"^Opening other\..* would discard the unsaved"):
            session.upload(kind, name, data)
        assert session.segmentation_node is seg and sid in session.segment_ids()
    with pytest.raises(UnsavedChanges):
        session.load_image(image)
    # a bad file is refused for what it is, before the question
    with pytest.raises(InputError, match="not a usable"):
        session.upload("image", "bad.nrrd", b"not an image")

    session.undo()  # back to the file as loaded: nothing to lose
    assert not session.has_unsaved_changes()
    session.redo()
    session.save()  # saved: nothing to lose
    assert not session.has_unsaved_changes()
    session.select_segment(session.segment_ids()[0])
    session.mark_slice("axial", 2)  # a slice mark is a change too (not an undo step)
    assert session.has_unsaved_changes()
    session.save_bytes()  # downloaded: nothing to lose
    assert not session.has_unsaved_changes()
    session.add_segment("spleen")
    session.upload("segmentation", "other.seg.nrrd", seg_path.read_bytes(), discard_changes=True)
    assert session.segmentation_node is not seg and not session.has_unsaved_changes()
    assert [row["name"] for row in session.segments()] == ["right lung"]


def test_upload_replaces_the_image_and_download_bytes_read_back(session, sample):
    image, seg_path, _ = sample
    name = session.upload("image", "chest.nrrd", image.read_bytes())
    assert name == "chest.nrrd" and session.volume_node.GetName() == "chest"
    assert session.segment_ids() == []  # a new image starts a new segmentation
    session.upload("segmentation", "three.seg.nrrd", seg_path.read_bytes())
    assert session.status_lines("axial") == ["right lung: 3 labeled"]
    data = session.save_bytes()
    assert data[:4] == b"NRRD" and b"Segment0_Name:=right lung" in data
    assert session.download_name() == "three.seg.nrrd"


def test_output_path_rules(sample, tmp_path):
    from trame_slicer.core import SlicerApp

    with pytest.raises(UsageError, match=".seg.nrrd"):
        AnnotationSession(SlicerApp(), out_path=tmp_path / "out.nrrd")
    s = AnnotationSession(SlicerApp())
    try:
        with pytest.raises(InputError, match="load an image"):
            s.upload("segmentation", "x.seg.nrrd", sample[1].read_bytes())
        s.load_image(sample[0])
        with pytest.raises(UsageError, match="no --out"):
            s.save()
    finally:
        s.close()
