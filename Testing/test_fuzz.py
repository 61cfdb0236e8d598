"""Property tests: random volumes, grids, paintings and options through the real MRML bridge
(slicer-core) and the real command line, checking after every run what UniverSeg promises:

* the painted voxels of the segmentation's own grid are kept bit for bit, and so is every voxel
  outside the slices the run wrote (the labeled slices read back unchanged on the volume grid);
* other segments are kept bit for bit;
* nothing but the project's one error type (:class:`UniverSegError`) escapes, and a failed run
  changes nothing and leaves nothing behind (no segment, no file, no temporary file).

Runs are seeded (``UNIVERSEG_FUZZ_SEED``, default below) so CI is reproducible; the number of
cases (``UNIVERSEG_FUZZ_CASES`` for the bridge, a sixth of it for the CLI, whose runs use the real
network) and the seed are printed.
The bridge uses ``ThresholdEngineDouble`` (a test double: foreground where the image is bright)
so that what is written where depends on geometry only.
"""

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Platform")  # before slicer-core's ITK

import collections
import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from conftest import ThresholdEngineDouble, rotation, runner_with, write_volume_file
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from UniverSegLogic import mrml
from UniverSegLogic.cli import main
from UniverSegLogic.core.geometry import Volume, make_ijk_to_ras
from UniverSegLogic.core.io import Segment, Segmentation, read_segmentation, write_segmentation
from UniverSegLogic.core.propagator import PropagationOptions
from UniverSegLogic.errors import UniverSegError

SEED = int(os.environ.get("UNIVERSEG_FUZZ_SEED", "20260901"))
CASES = int(os.environ.get("UNIVERSEG_FUZZ_CASES", "200"))
LOGIC = slicer.vtkSlicerSegmentationsModuleLogic
EPS = 1e-6  # the promise is stated with the cell rule floor(x + 0.5 + EPS) (mrml/gridmap.py)


def _report(capsys, text):
    with capsys.disabled():
        print(f"\n{text}", flush=True)


# ------------------------------------------------------------------------------ MRML material


def _matrix(spacing, origin, direction):
    return make_ijk_to_ras(spacing, origin, direction)


def _vol_node(scene, array, ijk_to_ras):
    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    mrml.vtkglue.image_scalars(image)[...] = array
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(mrml.vtkglue.vtk_matrix(ijk_to_ras))
    return node


def _paint(seg_node, segment_id, mask, extent, grid):
    image = mrml.vtkglue.oriented_image(mask.astype(np.uint8), extent, grid)
    assert LOGIC.SetBinaryLabelmapToSegment(image, seg_node, segment_id, LOGIC.MODE_REPLACE)


def _stored(seg_node, segment_id, grid0):
    """Painted voxels of a segment as a set of (I, J, K) indices of the original grid ``grid0``."""
    lm = seg_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if lm is None or mrml.vtkglue.extent_empty(lm.GetExtent()):
        return frozenset()
    values = mrml.vtkglue.image_scalars(lm)
    if values is None:
        return frozenset()
    label = seg_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    m = vtk.vtkMatrix4x4()
    lm.GetImageToWorldMatrix(m)
    e = lm.GetExtent()
    ijk = (np.argwhere(values == label) + np.array([e[4], e[2], e[0]]))[:, ::-1]
    to0 = np.linalg.solve(grid0, mrml.vtkglue.np_from_vtk_matrix(m))
    idx = (to0[:3, :3] @ ijk.T + to0[:3, 3:4]).T
    rounded = np.round(idx)
    assert np.allclose(idx, rounded, atol=1e-4), "a segment was moved off its own grid"
    return frozenset(map(tuple, rounded.astype(int)))


def _tags(seg_node):
    segmentation = seg_node.GetSegmentation()
    out = []
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        names = (mrml.TAG_LABELED, mrml.TAG_PREDICTED, mrml.TAG_SOURCE)
        out.append(
            (
                segmentation.GetNthSegmentID(n),
                segment.GetName(),
                tuple(sorted(mrml.record.tags_of(segment, names).items())),
            )
        )
    return out


def _volume_cells(grid, vol_ijk_to_seg, ijk):
    """Volume cell (I, J, K) of each segmentation voxel centre, by the promised cell rule."""
    a = np.linalg.solve(vol_ijk_to_seg, grid)
    x = a[:3, :3] @ np.asarray(ijk, dtype=float).T + a[:3, 3:4]
    return np.floor(x + 0.5 + EPS).astype(int).T


@st.composite
def bridge_cases(draw):
    shape = tuple(draw(st.integers(5, 14)) for _ in range(3))  # K, J, I
    spacing = [draw(st.sampled_from([0.6, 1.0, 1.3, 2.5])) for _ in range(3)]
    direction = rotation(draw(st.integers(0, 2)), draw(st.floats(-40, 40)))
    if draw(st.booleans()):
        direction = direction @ np.diag([1.0, -1.0, 1.0])  # left-handed
    V = _matrix(spacing, [draw(st.floats(-50, 50)) for _ in range(3)], direction)
    kind = draw(
        st.sampled_from(["same", "shift", "tilt", "oversampled", "coarse", "tilt+shift", "moved"])
    )
    S = V.copy()
    if "shift" in kind:
        d = [draw(st.sampled_from([0.0, 0.5, -0.5, 0.25, 1.5, 0.37])) for _ in range(3)]
        S[:3, 3] = (V @ np.array([*d, 1.0]))[:3]
    if "tilt" in kind:
        r = np.eye(4)
        r[:3, :3] = rotation(draw(st.integers(0, 2)), draw(st.sampled_from([5, 20, -7, 13.3])))
        c = V @ np.array([*(np.array(shape[::-1]) / 2 - 0.5), 1.0])
        t, ti = np.eye(4), np.eye(4)
        t[:3, 3], ti[:3, 3] = c[:3], -c[:3]
        S = t @ r @ ti @ S
    if kind == "oversampled":
        f = draw(st.sampled_from([2, 3]))
        S[:3, :3] = V[:3, :3] / f
        S[:3, 3] = (V @ np.array([*([-(f - 1) / (2 * f)] * 3), 1.0]))[:3]
    if kind == "coarse":
        f = np.array([draw(st.sampled_from([1, 2])) for _ in range(3)], float)
        S[:3, :3] = V[:3, :3] * f
    moved = None
    if kind == "moved":  # the segmentation node under its own (rigid) transform
        moved = np.eye(4)
        moved[:3, :3] = rotation(draw(st.integers(0, 2)), draw(st.floats(-15, 15)))
        moved[:3, 3] = [draw(st.floats(-3, 3)) for _ in range(3)]
    # the segmentation's extent: covering the volume (plus a margin beyond it)
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, shape[2] - 1)
            for j in (0, shape[1] - 1)
            for k in (0, shape[0] - 1)
        ]
    ).T
    seg_to_world = np.linalg.inv(moved) if moved is not None else np.eye(4)
    idx = np.linalg.solve(S, seg_to_world @ V @ corners)[:3]
    margin = draw(st.integers(0, 2))
    lo = np.floor(idx.min(axis=1)).astype(int) - margin
    hi = np.ceil(idx.max(axis=1)).astype(int) + margin
    axis = draw(st.integers(0, 2))  # array axis of the volume
    return dict(
        shape=shape,
        V=V,
        S=S,
        kind=kind,
        moved=moved,
        extent=(int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])),
        axis=axis,
        axis_spec=draw(st.sampled_from([axis, str(axis), "name"])),
        slabs=sorted(set(draw(st.lists(st.integers(0, shape[axis] - 1), min_size=1, max_size=4)))),
        painting=draw(st.sampled_from(["blob", "islands", "voxels", "speckle", "seg-slices"])),
        outside=draw(st.booleans()),
        empty_labeled=draw(st.booleans()),
        other=draw(st.booleans()),
        mode=draw(st.sampled_from(["fill", "fill", "new"])),
        support_size=draw(st.integers(1, 4)),
        max_extrapolation=draw(st.sampled_from([None, 0, 2, -1])),
        use_prior=draw(st.booleans()),
        correct_and_rerun=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _build(case):
    rng = np.random.default_rng(case["seed"])
    shape, V, S, ext = case["shape"], case["V"], case["S"], case["extent"]
    scene = slicer.vtkMRMLScene()
    logic = LOGIC()
    logic.SetMRMLScene(scene)
    k, j, i = np.indices(shape)
    c = np.array(shape) / 2
    blob = ((k - c[0]) / (shape[0] / 2.5)) ** 2 + ((j - c[1]) / (shape[1] / 3)) ** 2 + (
        (i - c[2]) / (shape[2] / 3)
    ) ** 2 <= 1
    image = np.where(blob, 900, 0) + rng.integers(0, 100, shape)
    volume = _vol_node(scene, image.astype(np.int16), V)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    if case["moved"] is not None:
        t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
        t.SetMatrixTransformToParent(mrml.vtkglue.vtk_matrix(case["moved"]))
        seg.SetAndObserveTransformNodeID(t.GetID())
    sshape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    sk, sj, si = np.indices(sshape)
    ijk = np.stack([si + ext[0], sj + ext[2], sk + ext[4]], -1).reshape(-1, 3)
    seg_to_vol = np.linalg.solve(
        (np.linalg.inv(case["moved"]) if case["moved"] is not None else np.eye(4)) @ V, S
    )
    x = (seg_to_vol[:3, :3] @ ijk.T + seg_to_vol[:3, 3:4]).T.reshape(sshape + (3,))  # vol I,J,K
    along = x[..., 2 - case["axis"]]
    in_slabs = np.isin(np.floor(along + 0.5 + EPS).astype(int), case["slabs"])
    centre = np.array(shape[::-1]) / 2 - 0.5
    radius = np.array(shape[::-1]) / 3
    painting = case["painting"]
    if painting == "blob":
        paint = in_slabs & ((((x - centre) / radius) ** 2).sum(-1) <= 1)
    elif painting == "islands":
        paint = np.zeros(sshape, bool)
        for _ in range(int(rng.integers(2, 8))):
            p = centre + rng.uniform(-1, 1, 3) * radius
            paint |= in_slabs & ((((x - p) / rng.uniform(0.6, 2.0, 3)) ** 2).sum(-1) <= 1)
    elif painting == "voxels":
        paint = np.zeros(sshape, bool)
        cand = np.argwhere(in_slabs)
        if len(cand):
            for v in cand[rng.choice(len(cand), size=min(len(cand), 3), replace=False)]:
                paint[tuple(v)] = True
    elif painting == "speckle":
        paint = in_slabs & (rng.random(sshape) < rng.uniform(0.05, 0.4))
    else:  # whole slices of the segmentation's own grid (cross volume slabs when tilted)
        axis_s = int(np.argmax(np.abs(seg_to_vol[2 - case["axis"], :3])))
        planes = rng.choice(sshape[2 - axis_s], size=min(2, sshape[2 - axis_s]), replace=False)
        paint = np.isin(np.indices(sshape)[2 - axis_s], planes) & (
            (((x - centre) / radius) ** 2).sum(-1) <= 1.5
        )
    if case["outside"]:  # voxels beyond the volume (a segment painted on a larger image)
        beyond = np.any((x < -0.5 - EPS) | (x > np.array(shape[::-1]) - 0.5), axis=-1)
        paint |= beyond & (rng.random(sshape) < 0.3)
    segmentation = seg.GetSegmentation()
    target = segmentation.AddEmptySegment("", "target", [0.9, 0.2, 0.2])
    if paint.any():
        _paint(seg, target, paint, ext, S)
    other = None
    if case["other"]:
        other = segmentation.AddEmptySegment("", "other", [0.2, 0.3, 0.9])
        _paint(seg, other, rng.random(sshape) < 0.2, ext, S)
    return scene, volume, seg, target, other


def _axis_arg(case, volume):
    if case["axis_spec"] == "name":
        vol = mrml.volume_from_node(volume)
        return mrml.axis_name(vol, case["axis"])
    return case["axis_spec"]


def _check_run(case, volume, seg, target, other, S, axis_arg, counter):
    """One propagation with every invariant checked; returns the result (None on an error)."""
    before_target = _stored(seg, target, S)
    before_other = _stored(seg, other, S) if other else None
    before_tags = _tags(seg)
    n_before = seg.GetSegmentation().GetNumberOfSegments()
    read_before = mrml.segment_mask(volume, seg, target)
    status = mrml.slice_status(volume, seg, target, axis_arg)
    try:
        result = runner_with(ThresholdEngineDouble()).propagate(
            volume,
            seg,
            [target],
            PropagationOptions(
                axis=axis_arg,
                support_size=case["support_size"],
                max_extrapolation=case["max_extrapolation"],
                use_prior=case["use_prior"],
            ),
            mode=case["mode"],
        )
    except UniverSegError as exc:  # the only kind of error allowed: then nothing changed
        counter["error: " + type(exc).__name__] += 1
        assert "\n" not in str(exc)
        assert seg.GetSegmentation().GetNumberOfSegments() == n_before
        assert _stored(seg, target, S) == before_target
        assert other is None or _stored(seg, other, S) == before_other
        assert _tags(seg) == before_tags
        return None
    counter["ok " + case["mode"]] += 1
    after_target = _stored(seg, target, S)
    if other:
        assert _stored(seg, other, S) == before_other, "another segment changed"
    axis = result.axis
    if case["mode"] == "new":
        assert after_target == before_target, "new mode changed the source segment"
        return result
    # fill: a voxel may change only if its centre lies in a slice this run wrote ...
    written = (set(result.predicted_slices[target]) | set(status.predicted)) - set(
        result.labeled_slices[target]
    )
    vol_ijk_to_seg = (
        np.linalg.inv(_parent(seg)) @ _parent(volume) @ mrml.nodes.local_ijk_to_ras(volume)
    )
    changed = sorted(before_target ^ after_target)
    if changed:
        cells = _volume_cells(S, vol_ijk_to_seg, changed)
        inside = np.all((cells >= 0) & (cells < np.array(case["shape"][::-1])), axis=1)
        slab = cells[:, 2 - axis]
        bad = [v for v, ok, t in zip(changed, inside, slab) if not ok or t not in written]
        assert not bad, f"voxels outside the written slices changed: {bad[:5]}"
    # ... and a painted voxel is never erased (previous predictions are ours to replace)
    if not status.predicted:
        assert before_target <= after_target, "painted voxels were erased"
    # the labeled slices read back exactly as before
    read_after = mrml.segment_mask(volume, seg, target)
    for t in result.labeled_slices[target]:
        assert np.array_equal(np.take(read_after, t, axis), np.take(read_before, t, axis)), t
    return result


def _parent(node):
    return mrml.nodes.parent_to_world(node)


def _erase_slab(seg, segment_id, volume, axis, t):
    """Erase, on the segment's own grid, every voxel whose centre lies in volume slice ``t``."""
    lm = seg.GetBinaryLabelmapInternalRepresentation(segment_id)
    m = vtk.vtkMatrix4x4()
    lm.GetImageToWorldMatrix(m)
    grid = mrml.vtkglue.np_from_vtk_matrix(m)
    e = lm.GetExtent()
    label = seg.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    values = mrml.vtkglue.image_scalars(lm) == label
    kji = np.argwhere(np.ones(values.shape, bool)) + np.array([e[4], e[2], e[0]])
    vol_ijk_to_seg = (
        np.linalg.inv(_parent(seg)) @ _parent(volume) @ mrml.nodes.local_ijk_to_ras(volume)
    )
    cells = _volume_cells(grid, vol_ijk_to_seg, kji[:, ::-1])
    values[(cells[:, 2 - axis] == t).reshape(values.shape)] = False
    _paint(seg, segment_id, values, e, grid)


def test_bridge_keeps_painted_voxels_and_other_segments_on_any_grid(capsys):
    counter = collections.Counter()

    @seed(SEED)
    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=bridge_cases())
    def run(case):
        counter["cases"] += 1
        counter["grid " + case["kind"]] += 1
        scene, volume, seg, target, other = _build(case)
        axis_arg = _axis_arg(case, volume)
        if case["empty_labeled"]:
            try:
                free = [
                    t
                    for t in range(case["shape"][case["axis"]])
                    if t not in mrml.labeled_slices(volume, seg, target, axis_arg)
                ]
                if free:
                    mrml.mark_slice_labeled(volume, seg, target, axis_arg, free[0])
            except UniverSegError:
                counter["mark refused"] += 1
        result = _check_run(case, volume, seg, target, other, case["S"], axis_arg, counter)
        if result is not None and case["mode"] == "fill" and case["correct_and_rerun"]:
            predicted = result.predicted_slices[target]
            if predicted:  # the user erases a predicted slice on the segment's own grid
                _erase_slab(seg, target, volume, result.axis, predicted[len(predicted) // 2])
                counter["reruns"] += 1
                _check_run(
                    dict(case, mode="fill"),
                    volume,
                    seg,
                    target,
                    other,
                    case["S"],
                    axis_arg,
                    counter,
                )

    run()
    details = ", ".join(f"{k} {v}" for k, v in sorted(counter.items()) if k != "cases")
    _report(
        capsys,
        f"fuzz (MRML bridge): seed {SEED}, {counter['cases']} generated cases, nothing found "
        f"[{details}]",
    )
    assert counter["cases"] >= CASES


# ---------------------------------------------------------------------------- command line


NAMES = st.sampled_from(["ball", "Läsion 日本 ü", "box", "ü", "a b", "Läsion 日本 ü", "ball"])


@st.composite
def cli_cases(draw):
    shape = tuple(draw(st.integers(4, 8)) for _ in range(3))
    n_segments = draw(st.integers(1, 3))
    # mostly valid runs; about one in three breaks exactly one thing
    broken = draw(
        st.sampled_from([None] * 6 + ["out", "axis", "labeled", "support", "segments", "--"])
    )
    return dict(
        shape=shape,
        spacing=[draw(st.sampled_from([0.7, 1.0, 2.5])) for _ in range(3)],
        angle=draw(st.floats(-30, 30)),
        image_format=draw(st.sampled_from([".nrrd", ".nii.gz", ".mha"])),
        labels_format=draw(st.sampled_from([".seg.nrrd", ".seg.nrrd", ".nii.gz"])),
        names=[draw(NAMES) for _ in range(n_segments)],
        paintings=[
            draw(st.sampled_from(["slices", "slices", "speckle", "empty", "voxel"]))
            for _ in range(n_segments)
        ],
        segments=draw(
            st.sampled_from(
                ["unknown"] if broken == "segments" else [None, "first", "by-id", "by-name"]
            )
        ),
        axis=draw(
            st.sampled_from(
                ["oblique", "3"] if broken == "axis" else ["axial", "coronal", "sagittal", "0", "2"]
            )
        ),
        labeled=draw(
            st.sampled_from(
                [["x"], ["99"], ["nobody:1"]]
                if broken == "labeled"
                else [[], [], ["2"], ["1,3"], ["first:0"]]
            )
        ),
        support_size=draw(st.sampled_from([0, -2] if broken == "support" else [None, 1, 3])),
        no_prior=draw(st.booleans()),
        out=draw(
            st.sampled_from(
                ["labels", "image", "folder", "missing-folder", "long-name"]
                if broken == "out"
                else ["new", "new", "existing", "long-legal-name"]
            )
        ),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_cli_keeps_painted_slices_names_and_inputs_or_fails_in_one_line(tmp_path_factory, capsys):
    counter = collections.Counter()
    root = tmp_path_factory.mktemp("fuzzcli")

    @seed(SEED)
    @settings(
        max_examples=max(1, CASES // 6),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(case=cli_cases())
    def run(case):
        counter["cases"] += 1
        rng = np.random.default_rng(case["seed"])
        d = root / f"case{counter['cases']}"
        d.mkdir()
        shape = case["shape"]
        vol = Volume(
            rng.normal(0, 50, shape).astype(np.float32),
            make_ijk_to_ras(case["spacing"], (3.0, -4.0, 5.0), rotation(2, case["angle"])),
        )
        image_path = d / f"image{case['image_format']}"
        write_volume_file(image_path, vol)
        masks = []
        for painting in case["paintings"]:
            m = np.zeros(shape, bool)
            if painting == "slices":
                for t in rng.choice(shape[0], size=min(2, shape[0]), replace=False):
                    m[t] = rng.random(shape[1:]) < 0.5
            elif painting == "speckle":
                m = rng.random(shape) < 0.1
            elif painting == "voxel":
                m[tuple(rng.integers(0, shape))] = True
            masks.append(m)
        from UniverSegLogic.core.io import read_image

        ref = read_image(str(image_path))
        segments = [
            Segment(n, m, (0.5, 0.5, 0.5), f"id{i}", {})
            for i, (n, m) in enumerate(zip(case["names"], masks))
        ]
        if case["labels_format"] == ".seg.nrrd":
            labels_path = d / "labels.seg.nrrd"
            write_segmentation(str(labels_path), Segmentation(ref, segments))
        else:
            labels_path = d / "labels.nii.gz"
            lab = np.zeros(shape, np.uint8)
            for v, m in enumerate(masks, start=1):
                lab[m] = v
            img = sitk.GetImageFromArray(lab)
            img.CopyInformation(sitk.ReadImage(str(image_path)))
            sitk.WriteImage(img, str(labels_path))
        labels_in = read_segmentation(str(labels_path), ref)
        out = {
            "new": d / "out.seg.nrrd",
            "existing": d / "old.seg.nrrd",
            "labels": labels_path,
            "image": image_path,
            "folder": d,
            "missing-folder": d / "nowhere" / "out.seg.nrrd",
            "long-name": d / ("x" * 300 + ".seg.nrrd"),
            "long-legal-name": d / ("y" * 241 + ".seg.nrrd"),
        }[case["out"]]
        if case["out"] == "existing":
            out.write_bytes(b"previous result")
        ids = [s.id for s in labels_in.segments]
        first = labels_in.segments[0].name if labels_in.segments else "nothing"
        args = ["propagate", "--image", str(image_path), "--labels", str(labels_path)]
        args += ["--out", str(out), "--quiet", "--device", "cpu", "--weights", "starter"]
        chosen = None
        if case["segments"] == "first":
            chosen = ids[:1]
        elif case["segments"] == "by-name":
            chosen = [first]
        elif case["segments"] == "by-id":
            chosen = ids[-1:]
        elif case["segments"] == "unknown":
            chosen = ["no such segment"]
        if chosen:
            args += ["--segments", ",".join(chosen)]
        args += ["--axis", case["axis"]]
        for spec in case["labeled"]:
            args += ["--labeled-slices", spec.replace("first", first)]
        if case["support_size"] is not None:
            args += ["--support-size", str(case["support_size"])]
        if case["no_prior"]:
            args.append("--no-prior")
        inputs = {p: _digest(p) for p in (image_path, labels_path)}
        old_out = _digest(out) if out.is_file() else None
        code = main(args)
        captured = capsys.readouterr()
        counter[f"exit {code}"] += 1
        assert code in (0, 2), (case, captured.err)
        assert {p: _digest(p) for p in inputs} == inputs, "an input file changed"
        assert not [p for p in d.rglob(".partial-*")], "a temporary file was left behind"
        if code == 2:
            lines = [x for x in captured.err.splitlines() if x.strip()]
            assert len(lines) == 1 and "error:" in lines[0], captured.err
            if old_out is not None:
                assert _digest(out) == old_out, "a failed run replaced the old output"
            elif case["out"] in ("new", "long-legal-name", "long-name", "missing-folder"):
                assert not os.path.lexists(out)
            return
        result = read_segmentation(str(out), ref)
        assert [s.name for s in result.segments] == [s.name for s in labels_in.segments]
        assert [s.id for s in result.segments] == ids
        from UniverSegLogic.core.geometry import resolve_axis

        axis = resolve_axis(ref, case["axis"] if not case["axis"].isdigit() else int(case["axis"]))
        for s_in, s_out in zip(labels_in.segments, result.segments):
            painted = [t for t in range(shape[axis]) if np.take(s_in.mask, t, axis).any()]
            for t in painted:  # painted slices bit for bit, whatever was selected or listed
                assert np.array_equal(np.take(s_out.mask, t, axis), np.take(s_in.mask, t, axis))
            if chosen and s_in.id not in chosen and s_in.name not in chosen:
                assert np.array_equal(s_out.mask, s_in.mask), "an unselected segment changed"

    run()
    details = ", ".join(f"{k} {v}" for k, v in sorted(counter.items()) if k != "cases")
    _report(
        capsys,
        f"fuzz (command line): seed {SEED}, {counter['cases']} generated cases, nothing found "
        f"[{details}]",
    )
    assert counter["cases"] >= max(1, CASES // 6)
