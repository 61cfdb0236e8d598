"""What the Slicer module and the effect decide without Qt: device choice, the PyTorch version
check and first-run install, engines, and the panel's choices on real MRML (slicer-core):
preselected volume, segment list, slicing axis (inferred from the painted voxels), slice views,
clearing several predictions as one undo step, reloading the package."""

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Platform")  # before slicer-core's ITK

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import slicer
import torch
import vtk
from conftest import labeled_only, runner_with

from UniverSegLogic import mrml
from UniverSegLogic.core import device
from UniverSegLogic.core.engine import resolve_device
from UniverSegLogic.core.engines import EngineStore, LoadedEngine
from UniverSegLogic.core.propagator import PropagationOptions
from UniverSegLogic.core.slices import painted_axis
from UniverSegLogic.errors import Cancelled, DeviceError, UsageError
from UniverSegLogic.mrml import panel
from UniverSegLogic.mrml.vtkglue import image_scalars, oriented_image, vtk_matrix

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "UniverSegSlicer"))
from UniverSegSlicerLib import torch_install  # noqa: E402  (the module's Qt-free helpers)

ROOT = Path(__file__).resolve().parents[2]
LOGIC = slicer.vtkSlicerSegmentationsModuleLogic

# --------------------------------------------------------------------------------------------
# devices


@pytest.mark.parametrize(
    "requested, cuda, mps, expected",
    [
        ("auto", True, True, "cuda"),  # an NVIDIA GPU first
        ("auto", True, False, "cuda"),
        ("auto", False, True, "mps"),  # Apple Silicon
        ("auto", False, False, "cpu"),
        (None, False, True, "mps"),
        ("AUTO", False, False, "cpu"),
        ("cpu", True, True, "cpu"),
        ("cuda", True, False, "cuda"),
        ("cuda:1", True, False, "cuda:1"),
        ("mps", False, True, "mps"),
        ("mps", True, True, "mps"),
    ],
)
def test_device_choice(requested, cuda, mps, expected):
    assert device.choose_device(requested, cuda, mps) == expected


@pytest.mark.parametrize(
    "requested, cuda, mps, error, message",
    [
        ("cuda", False, True, DeviceError, "sees no CUDA device"),
        ("cuda:0", False, False, DeviceError, "sees no CUDA device"),
        ("mps", True, False, DeviceError, "does not offer it"),
        ("tpu", True, True, UsageError, "auto, cpu, cuda or mps"),
        ("cuda:x", True, True, UsageError, "unknown device"),
    ],
)
def test_device_choice_refuses_what_is_not_there(requested, cuda, mps, error, message):
    with pytest.raises(error, match=message):
        device.choose_device(requested, cuda, mps)


def test_backends_read_from_the_installed_torch_and_from_torch_like_modules():
    here = device.torch_backends(torch)
    assert here == {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    assert resolve_device("auto") == device.choose_device("auto", **here)

    # test doubles for torch's backend queries (the hardware is not on this machine)
    def fake(cuda, mps=None):
        backends = SimpleNamespace() if mps is None else SimpleNamespace(mps=mps)
        return SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: cuda), backends=backends)

    apple = SimpleNamespace(is_available=lambda: True)
    assert device.torch_backends(fake(False, apple)) == {"cuda": False, "mps": True}
    assert device.torch_backends(fake(True)) == {"cuda": True, "mps": False}  # old torch

    def broken():
        raise RuntimeError("MPS backend unavailable on this macOS")

    assert device.torch_backends(fake(False, SimpleNamespace(is_available=broken)))["mps"] is False


def test_engine_resolves_devices_with_the_same_rule():
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="MPS"):
            resolve_device("mps")
    with pytest.raises(UsageError):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize(
    "error, unsupported",
    [
        # messages PyTorch raises on Apple's GPU
        (
            NotImplementedError(
                "The operator 'aten::_slow_conv2d_forward' is not currently implemented for "
                "the MPS device."
            ),
            True,
        ),
        (
            TypeError(
                "Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't "
                "support float64. Please use float32 instead."
            ),
            True,
        ),
        (RuntimeError("MPS backend out of memory"), False),
        (RuntimeError("CUDA error: operation not supported"), False),
        (ValueError("MPS not supported"), False),
    ],
)
def test_unsupported_mps_operations_are_recognised(error, unsupported):
    assert device.is_mps_unsupported(error) is unsupported


def test_the_float64_weight_composition_runs_on_the_cpu_for_any_device():
    # MPS has no float64: the engine composes its first-block kernel on the CPU
    from UniverSegLogic.core import engine

    w2, wu = torch.randn(8, 4, 3, 3), torch.randn(4, 1, 3, 3)
    k = engine._compose(w2, wu)
    assert k.dtype == torch.float64 and k.device.type == "cpu" and k.shape == (8, 1, 5, 5)


# --------------------------------------------------------------------------------------------
# PyTorch version and first-run install


@pytest.mark.parametrize(
    "version, requirement, ok",
    [
        ("2.13.0+cpu", ">=2.1", True),
        ("2.1.0", ">=2.1", True),
        ("2.0.1+cu118", ">=2.1", False),
        ("1.13.1", ">=2.1", False),
        ("2.10.0", ">=2.9", True),  # numeric, not string, comparison
        ("2.2.0a0+git", ">=2.1,<3", True),
        ("3.0", ">=2.1,<3", False),
        ("2.4", "==2.4.0", True),
        ("2.4.1", "!=2.4.1", False),
    ],
)
def test_version_requirements(version, requirement, ok):
    assert torch_install.version_satisfies(version, requirement) is ok


def test_torch_check_reads_the_installed_version_without_importing():
    check = torch_install.check_torch()
    assert check.ok and check.version == torch_install.installed_version("torch")
    assert torch.__version__.startswith(check.version.split("+")[0])
    old = torch_install.check_torch("2.0.1")
    assert not old.ok and "2.0.1 is installed but UniverSeg needs PyTorch >=2.1" in old.message
    missing = torch_install.check_torch(None, lookup=False)
    assert not missing.ok and missing.message == "PyTorch is not installed"
    assert torch_install.installed_version("no-such-distribution-universeg") is None
    with pytest.raises(UsageError):
        torch_install.version_satisfies("2.1", "~=2.1")


def test_torch_requirement_matches_the_package_metadata():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"torch{torch_install.TORCH_REQUIREMENT}"' in text


@pytest.mark.parametrize(
    "line, message, stoppable",
    [
        ("Collecting torch>=2.1", "Resolving torch>=2.1", True),
        (
            "  Downloading https://download.pytorch.org/whl/cu121/torch-2.5.1%2Bcu121-cp39-cp39-"
            "linux_x86_64.whl (780.5 MB)",
            "Downloading torch-2.5.1%2Bcu121-cp39-cp39-linux_x86_64.whl (780.5 MB)",
            True,
        ),
        ("Installing collected packages: sympy, torch", "Installing sympy, torch", False),
        ("  Attempting uninstall: torch", "Replacing torch", False),
        ("Successfully installed torch-2.5.1", "Installed torch-2.5.1", False),
        ("Requirement already satisfied: numpy", "", True),
    ],
)
def test_pip_lines_become_progress_messages(line, message, stoppable):
    status = torch_install.pip_progress(line)
    assert status.message == message and status.stoppable is stoppable


def _printer(lines, code=0, pause=0.0):
    """A real child process printing ``lines`` (pip-like output), pausing before the last."""
    script = (
        "import sys, time\n"
        f"lines = {lines!r}\n"
        "for i, line in enumerate(lines):\n"
        f"    if i == len(lines) - 1: time.sleep({pause})\n"
        "    print(line, flush=True)\n"
        f"sys.exit({code})\n"
    )
    return [sys.executable, "-c", script]


def test_install_reports_progress_and_keeps_the_gui_polled():
    messages, polls = [], []
    lines = ["Collecting torch>=2.1", "  Downloading torch-2.5.1.whl (780 MB)", "done"]
    out = torch_install.run_install(
        _printer(lines, pause=0.3), messages.append, lambda: False, lambda: polls.append(1)
    )
    assert out == lines
    assert messages == ["Resolving torch>=2.1", "Downloading torch-2.5.1.whl (780 MB)"]
    assert len(polls) >= 3  # the caller's event loop ran while the child printed nothing


def test_install_can_be_stopped_while_downloading():
    lines = ["Collecting torch", "  Downloading torch-2.5.1.whl (780 MB)", "never printed"]
    seen = []
    with pytest.raises(Cancelled, match="before anything was changed"):
        torch_install.run_install(_printer(lines, pause=30), seen.append, lambda: len(seen) >= 2)
    assert "never printed" not in seen


def test_install_is_not_stopped_once_pip_replaces_files():
    lines = ["Collecting torch", "Installing collected packages: torch", "Successfully installed"]
    seen = []
    out = torch_install.run_install(_printer(lines, pause=0.3), seen.append, lambda: len(seen) >= 2)
    assert out[-1] == "Successfully installed"


def test_failed_install_is_one_line_error():
    with pytest.raises(DeviceError, match=r"exit code 3\): ERROR: No matching distribution"):
        torch_install.run_install(
            _printer(["ERROR: No matching distribution found for torch>=99"], 3)
        )
    with pytest.raises(DeviceError, match="cannot start the installer"):
        torch_install.run_install(["/nonexistent/PythonSlicer", "-m", "light_the_torch"])


# --------------------------------------------------------------------------------------------
# engines


def test_engine_store_builds_once_with_progress_and_stops_on_cancel():
    cache = EngineStore()
    with pytest.raises(Cancelled):
        cache.get("starter", "cpu", cancel=lambda: True)
    messages = []
    loaded = cache.get("starter", "cpu", lambda f, m: messages.append(m))
    assert loaded.engine.device == "cpu" and "starter" in loaded.description
    assert messages == ["Reading the weights...", "Loading the model on cpu...", "Model ready"]
    again = cache.get("starter", "cpu", lambda f, m: messages.append(m))
    assert again.engine is loaded.engine and len(messages) == 3
    assert cache.device_for("auto") == device.choose_device("auto", **device.torch_backends(torch))


# --------------------------------------------------------------------------------------------
# the panel's choices on real MRML

SHAPE = (12, 14, 16)  # K, J, I


def _paint(seg, sid, mask, ijk_to_ras):
    extent = (0, mask.shape[2] - 1, 0, mask.shape[1] - 1, 0, mask.shape[0] - 1)
    image = oriented_image(mask.astype(np.uint8), extent, ijk_to_ras)
    assert LOGIC.SetBinaryLabelmapToSegment(image, seg, sid, LOGIC.MODE_REPLACE)


def _image(components=1, scalar=vtk.VTK_SHORT):
    image = vtk.vtkImageData()
    image.SetDimensions(SHAPE[2], SHAPE[1], SHAPE[0])
    image.AllocateScalars(scalar, components)
    image_scalars(image)[...] = 0
    return image


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    logic = LOGIC()
    logic.SetMRMLScene(scene)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    label.SetAndObserveImageData(_image())
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "image")
    volume.SetAndObserveImageData(_image())
    ijk_to_ras = np.array(
        [[-0.8, 0, 0, 10.0], [0, -0.9, 0, 20.0], [0, 0, 2.0, -5.0], [0, 0, 0, 1.0]]
    )  # RAS-flipped in-plane, thick slices: K is axial, J coronal, I sagittal
    volume.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return SimpleNamespace(
        scene=scene, label=label, volume=volume, seg=seg, ijk_to_ras=ijk_to_ras, logic=logic
    )


def test_preselected_volume_is_an_image_never_a_labelmap(scene):
    assert not panel.is_image_volume(scene.label)
    assert panel.preselect_volume(scene.scene) is scene.volume  # the labelmap comes first
    rgb = scene.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    rgb.SetAndObserveImageData(_image(3, vtk.VTK_UNSIGNED_CHAR))
    assert panel.is_image_volume(rgb)  # RGB is an image the bridge reads
    seg2 = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "on photo")
    seg2.SetReferenceImageGeometryParameterFromVolumeNode(rgb)
    assert panel.preselect_volume(scene.scene, seg2) is rgb  # the segmentation's own volume
    seg3 = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "on labels")
    seg3.SetReferenceImageGeometryParameterFromVolumeNode(scene.label)
    assert panel.preselect_volume(scene.scene, seg3) is scene.volume
    empty = slicer.vtkMRMLScene()
    assert panel.preselect_volume(empty) is None


def test_segments_added_later_are_checked_and_user_choices_are_kept(scene):
    segmentation = scene.seg.GetSegmentation()
    a = segmentation.AddEmptySegment("", "a")
    b = segmentation.AddEmptySegment("", "b")
    review = segmentation.AddEmptySegment("", "a (UniverSeg)")
    segmentation.GetSegment(review).SetTag(mrml.TAG_SOURCE, a)
    rows = panel.segment_rows(scene.seg)
    assert [(r.segment_id, r.checked, r.review_output) for r in rows] == [
        (a, True, False),
        (b, True, False),
        (review, False, True),
    ]
    choices = {b: False}  # what the panel saves: only the user's clicks
    c = segmentation.AddEmptySegment("", "c")
    assert [r.checked for r in panel.segment_rows(scene.seg, choices)] == [True, False, False, True]
    assert panel.segment_rows(scene.seg, {review: True})[2].checked
    assert panel.segment_rows(None) == [] and c


def _painted(slices, axis, shape=SHAPE, blob=None):
    """An ellipsoid painted on ``slices`` along ``axis`` (optionally another blob)."""
    k, j, i = np.indices(shape)
    c = (np.array(shape) - 1) / 2.0
    d = ((k - c[0]) / 5.0) ** 2 + ((j - c[1]) / 6.0) ** 2 + ((i - c[2]) / 7.0) ** 2
    full = d <= 1.0
    if blob is not None:
        full |= blob
    return labeled_only(full, axis, slices)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_painted_axis_is_the_axis_of_separate_painted_slices(axis):
    n = SHAPE[axis]
    assert painted_axis(_painted([2, n // 2, n - 3], axis)) == axis
    assert painted_axis(_painted([n // 2], axis)) == axis  # one slice
    brush = _painted([n // 2 - 1, n // 2, n // 2 + 1], axis)  # a 3D brush: adjacent slices
    assert painted_axis(brush) == axis
    assert painted_axis(np.zeros(SHAPE, bool)) is None


def test_painted_axis_with_two_separate_structures_on_one_slice():
    # two lungs: one painted axial slice; along I the two blobs are separate runs
    mask = np.zeros(SHAPE, bool)
    mask[6, 3:11, 2:6] = True
    mask[6, 3:11, 10:14] = True
    assert painted_axis(mask) == 0


def test_auto_axis_follows_the_painting_then_the_record_then_the_view(scene):
    segmentation = scene.seg.GetSegmentation()
    sid = segmentation.AddEmptySegment("", "liver")
    v, s = scene.volume, scene.seg
    sagittal = mrml.array_axis(v, "sagittal")
    assert sagittal == 2
    _paint(s, sid, _painted([3, 8, 12], sagittal), scene.ijk_to_ras)
    assert panel.resolve_axis(v, s, "auto") == sagittal
    assert panel.resolve_axis(v, s, "auto", [sid]) == sagittal
    assert panel.resolve_axis(v, s, "coronal") == mrml.array_axis(v, "coronal")
    # after a run along axial the record decides, though every slice now holds voxels
    from UniverSegLogic.mrml.record import Record, record_tags, set_tags

    full = _painted(range(SHAPE[0]), 0)
    _paint(s, sid, full, scene.ijk_to_ras)
    grid = mrml.nodes.grid_key(v, s)
    set_tags(segmentation.GetSegment(sid), record_tags(Record(0, grid, [2, 6], [], {3: "x"})))
    assert mrml.record.infer_axis(v, s) == 0
    set_tags(segmentation.GetSegment(sid), record_tags(Record(1, "othergrid", [2], [], {})))
    assert mrml.record.infer_axis(v, s) == painted_axis(full)  # foreign record ignored
    # nothing painted: the slice view, else axial
    empty = slicer.vtkMRMLSegmentationNode()
    scene.scene.AddNode(empty)
    assert panel.resolve_axis(v, empty, "auto") == mrml.array_axis(v, "axial")
    view = _slice_node(scene.scene, "Yellow", _normal_of(v, 1), _center_of(v))
    assert panel.resolve_axis(v, empty, "auto", slice_to_ras=view.GetSliceToRAS()) == 1


def test_segments_painted_on_two_axes_are_a_one_line_error(scene):
    segmentation = scene.seg.GetSegmentation()
    ids = [segmentation.AddEmptySegment("", f"s{n}") for n in range(3)]
    for sid, axis in zip(ids, (2, 1, 2)):
        _paint(scene.seg, sid, _painted([2, 6, 10], axis), scene.ijk_to_ras)
    with pytest.raises(mrml.MRMLError, match="more than one axis") as info:
        mrml.record.infer_axis(scene.volume, scene.seg)
    assert "coronal: 's1'" in str(info.value) and "sagittal: 's0', 's2'" in str(info.value)
    assert "\n" not in str(info.value)
    assert mrml.record.infer_axis(scene.volume, scene.seg, [ids[0], ids[2]]) == 2
    assert mrml.record.infer_axis(scene.volume, scene.seg, ids[1:2]) == 1


def _normal_of(volume, axis):
    vol = mrml.volume_from_node(volume)
    return vol.direction[:, 2 - axis]


def _center_of(volume, index=None, axis=0):
    vol = mrml.volume_from_node(volume)
    ijk = (np.array(SHAPE[::-1], float) - 1) / 2
    if index is not None:
        ijk[2 - axis] = index
    return (vol.ijk_to_ras @ np.append(ijk, 1.0))[:3]


def _slice_node(scene, name, normal, center, tilt_deg=0.0):
    """A slice node whose view shows the plane through ``center`` with ``normal`` (tilted)."""
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
    n = np.asarray(normal, float) / np.linalg.norm(normal)
    helper = np.array([0.0, 0.0, 1.0]) if abs(n[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(helper, n)
    x /= np.linalg.norm(x)
    if tilt_deg:
        t = np.radians(tilt_deg)
        n = np.cos(t) * n + np.sin(t) * x
        x = np.cross(helper, n)
        x /= np.linalg.norm(x)
    y = np.cross(n, x)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, n, center
    node.GetSliceToRAS().DeepCopy(vtk_matrix(m))
    node.UpdateMatrices()
    return node


def test_slice_views_give_the_axis_and_the_current_slice(scene):
    v = scene.volume
    for axis, name in ((0, "Red"), (1, "Green"), (2, "Yellow")):
        for index in (0, SHAPE[axis] // 2, SHAPE[axis] - 1):
            view = _slice_node(scene.scene, name, _normal_of(v, axis), _center_of(v, index, axis))
            assert mrml.nodes.slice_view_axis(v, view.GetSliceToRAS()) == axis
            assert mrml.nodes.slice_view_index(v, axis, view.GetSliceToRAS()) == index
            assert panel.current_slice(v, axis, view) == index
    tilted = _slice_node(scene.scene, "T", _normal_of(v, 0), _center_of(v, 4, 0), tilt_deg=20)
    assert mrml.nodes.slice_view_axis(v, tilted.GetSliceToRAS()) == 0  # nearest axis
    wrong = _slice_node(scene.scene, "W", _normal_of(v, 1), _center_of(v))
    with pytest.raises(mrml.MRMLError, match="shows coronal slices of image, not axial"):
        mrml.nodes.slice_view_index(v, 0, wrong.GetSliceToRAS())
    outside = _slice_node(scene.scene, "O", _normal_of(v, 0), _center_of(v, 40, 0))
    with pytest.raises(mrml.MRMLError, match="outside the volume"):
        panel.current_slice(v, 0, outside)
    with pytest.raises(mrml.MRMLError, match="no slice view"):
        panel.current_slice(v, 0, None)
    with pytest.raises(mrml.MRMLError, match="4x4"):
        mrml.nodes.slice_view_axis(v, np.eye(3))


def test_the_slice_view_for_marking_prefers_the_one_last_used(scene):
    v = scene.volume
    red = _slice_node(scene.scene, "Red", _normal_of(v, 0), _center_of(v, 3, 0))
    green = _slice_node(scene.scene, "Green", _normal_of(v, 1), _center_of(v))
    other_axial = _slice_node(scene.scene, "Red2", _normal_of(v, 0), _center_of(v, 7, 0))
    views = [red, green, other_axial]
    assert panel.pick_slice_view(v, "axial", views) is red
    assert panel.pick_slice_view(v, "axial", views, preferred=other_axial) is other_axial
    assert panel.pick_slice_view(v, "axial", views, preferred=green) is red  # wrong orientation
    assert panel.pick_slice_view(v, "sagittal", views) is None


def test_clearing_several_predictions_is_one_undo_step(scene):
    segmentation = scene.seg.GetSegmentation()
    ids = [segmentation.AddEmptySegment("", f"s{n}") for n in range(3)]
    for sid in ids[:2]:
        _paint(scene.seg, sid, _painted([2, 9], 0), scene.ijk_to_ras)

    class FullEngine:  # test double: foreground everywhere (what is erased is what matters)
        device, batch_size = "cpu", 4

        def logits(self, targets, support_images, support_labels):
            return torch.full((targets.shape[0], 1) + tuple(targets.shape[-2:]), 8.0)

    runner_with(FullEngine()).propagate(
        scene.volume, scene.seg, ids[:2], PropagationOptions(axis="axial", use_prior=False)
    )
    predicted = [mrml.slice_status(scene.volume, scene.seg, s, "axial").predicted for s in ids]
    assert predicted[0] and predicted[1] and not predicted[2]
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(segmentation)
    history.SetMaximumNumberOfStates(10)
    before = [mrml.segment_mask(scene.volume, scene.seg, s) for s in ids]
    erased = panel.clear_predictions_of(scene.volume, scene.seg, ids, history)
    assert erased == {ids[0]: len(predicted[0]), ids[1]: len(predicted[1]), ids[2]: 0}
    assert history.GetNumberOfStates() == 1  # one state for all segments
    assert history.RestorePreviousState()
    for sid, mask in zip(ids, before):
        assert np.array_equal(mrml.segment_mask(scene.volume, scene.seg, sid), mask)
    calls = []
    panel.clear_predictions_of(scene.volume, scene.seg, [ids[2]], lambda: calls.append(1))
    assert calls == []  # nothing recorded: no undo state


def test_reload_forgets_the_package_so_the_next_import_reads_the_files():
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import UniverSegLogic.mrml.panel as p1\n"
        "gone = p1.forget_modules(('UniverSegLogic',))\n"
        "assert 'UniverSegLogic.mrml.panel' in gone and 'UniverSegLogic' in gone\n"
        "assert not [m for m in sys.modules if m.startswith('UniverSegLogic')]\n"
        "import UniverSegLogic.mrml.panel as p2\n"
        "assert p2 is not p1\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_module_choices_match_the_logic():
    source = (ROOT / "UniverSegSlicer" / "UniverSegSlicer.py").read_text()
    assert "DEVICE_CHOICES = list(devices.DEVICE_NAMES)" in source
    assert device.DEVICE_NAMES == ("auto", "cpu", "cuda", "mps")
    assert re.search(r"AXIS_CHOICES = \[panel\.AXIS_AUTO, ", source)


# --------------------------------------------------------------------------------------------
# "Go to suggested slice"


def test_suggestions_interleave_segments_best_first():
    assert panel.suggested_slices_of({"a": [5, 9], "b": [2]}, ["b", "a", "c"]) == [
        ("b", 2),
        ("a", 5),
        ("a", 9),
    ]
    assert panel.suggested_slices_of({}, ["a"]) == []


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_go_to_slice_moves_a_real_slice_node_onto_that_slice(axis):
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    from conftest import rotation

    ijk = np.eye(4)  # oblique, anisotropic, off-origin: slices are still planes of the view
    ijk[:3, :3] = rotation(0, 12) @ rotation(2, 30) @ np.diag([1.1, 0.9, 2.5])
    ijk[:3, 3] = (-20, 5, 30)
    volume.SetIJKToRASMatrix(vtk_matrix(ijk))
    image = vtk.vtkImageData()
    image.SetDimensions(14, 11, 9)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    volume.SetAndObserveImageData(image)
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    normal = ijk[:3, 2 - axis] / np.linalg.norm(ijk[:3, 2 - axis])  # a view along that axis
    m = np.eye(4)
    helper = np.array([1.0, 0, 0]) if abs(normal[0]) < 0.9 else np.array([0, 1.0, 0])
    x = np.cross(helper, normal)
    x /= np.linalg.norm(x)
    m[:3, 0], m[:3, 1], m[:3, 2] = x, np.cross(normal, x), normal
    view.GetSliceToRAS().DeepCopy(vtk_matrix(m))
    view.UpdateMatrices()
    assert panel.pick_slice_view(volume, axis, [view]) is view
    n = image.GetDimensions()[2 - axis]
    for index in (0, n // 2, n - 1):
        panel.go_to_slice(volume, axis, index, view)
        assert panel.current_slice(volume, axis, view) == index
    with pytest.raises(mrml.MRMLError):
        panel.go_to_slice(volume, axis, n, view)
    with pytest.raises(mrml.MRMLError):
        panel.go_to_slice(volume, axis, 0, None)


# --------------------------------------------------------------------------------------------
# the fall-back from Apple's GPU, through the Runner (the module's and the effect's run path)


class EngineDouble:
    """Test double for InferenceEngine on ``device``: foreground (+8) on every target; on
    ``mps`` it raises ``error`` (default: what PyTorch raises for an operation the Apple GPU
    does not implement)."""

    batch_size = 4

    def __init__(self, device, error=None):
        self.device, self.error, self.calls = device, error, 0

    def logits(self, targets, support_images, support_labels):
        self.calls += 1
        if self.device == "mps":
            raise self.error or NotImplementedError(
                "The operator 'aten::foo' is not currently implemented for the MPS device."
            )
        return torch.full((targets.shape[0], 1) + tuple(targets.shape[-2:]), 8.0)


class EnginesOnAnAppleGpu(EngineStore):
    """Test double: an EngineStore on a machine whose PyTorch offers MPS (engines are
    ``EngineDouble``)."""

    def __init__(self, error=None):
        super().__init__()
        self.requests, self.error, self.made = [], error, {}

    def get(
        self, weights="starter", device="auto", progress=None, cancel=None, *, precision="auto"
    ):
        self.requests.append(device)
        chosen = "cpu" if self.mps_failed and device == "auto" else device
        chosen = "mps" if chosen == "auto" else chosen
        engine = self.made.setdefault(chosen, EngineDouble(chosen, self.error))
        return LoadedEngine(engine, f"stand-in on {chosen}", "file", "")


def _painted_segment(scene):
    sid = scene.seg.GetSegmentation().AddEmptySegment("", "s")
    _paint(scene.seg, sid, _painted([2, 9], 0), scene.ijk_to_ras)
    return sid


def test_a_run_that_fails_on_mps_reruns_on_the_cpu_with_one_note(scene):
    sid = _painted_segment(scene)
    engines = EnginesOnAnAppleGpu()
    runner = mrml.Runner(engines=engines)
    options = PropagationOptions(axis="axial", use_prior=False)
    result = runner.propagate(scene.volume, scene.seg, [sid], options)
    assert result.device == "cpu" and result.predicted_slices[sid]
    assert result.notes.count(device.MPS_FALLBACK_MESSAGE) == 1 and engines.mps_failed
    again = runner.propagate(scene.volume, scene.seg, [sid], options)
    assert again.device == "cpu" and device.MPS_FALLBACK_MESSAGE not in again.notes
    assert engines.made["mps"].calls == 1  # one attempt on the Apple GPU; then auto is the CPU
    # the Segment Editor effect's preview takes the same path
    preview = mrml.Runner(engines=EnginesOnAnAppleGpu()).preview(
        scene.volume, scene.seg, [sid], options
    )
    assert preview.job.result.device == "cpu" and device.MPS_FALLBACK_MESSAGE in preview.notes


def test_other_errors_are_not_hidden_by_the_fallback(scene):
    sid = _painted_segment(scene)
    before = mrml.segment_mask(scene.volume, scene.seg, sid)
    runner = mrml.Runner(engines=EnginesOnAnAppleGpu(RuntimeError("MPS backend out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        runner.propagate(scene.volume, scene.seg, [sid], PropagationOptions(axis="axial"))
    assert np.array_equal(mrml.segment_mask(scene.volume, scene.seg, sid), before)
