"""A user's script on slicer-core ends with exit code 0.

The script does what a user's would: import ``slicer``, build a scene, read a volume through a
Slicer storage node (this alone makes ITK pick its default threader, TBB), paint segments and
call the bridge, which runs Slicer's Fill between slices -- without setting
``ITK_GLOBAL_DEFAULT_THREADER`` itself. Before ``core/itk_threads.py`` such a script printed its
result and then died at interpreter exit with a segmentation fault (exit code 139) in about half
of its runs; ITK's default threader afterwards is checked too, so the test fails without the fix
even when a crash does not happen.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

USER_SCRIPT = r"""
import sys

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from UniverSegLogic import mrml
from UniverSegLogic.core.itk_threads import itk_default_threader
from UniverSegLogic.core.propagator import PropagationOptions

folder = sys.argv[1]
k, j, i = np.mgrid[:24, :40, :40]
blob = ((j - 20) ** 2 / 100 + (i - 20) ** 2 / 120 + (k - 12) ** 2 / 64) <= 1
sitk.WriteImage(
    sitk.GetImageFromArray(np.where(blob, 800, -100).astype(np.int16)), folder + "/blob.nrrd"
)
scene = slicer.vtkMRMLScene()
segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
segmentations.SetMRMLScene(scene)
volume = slicer.vtkMRMLScalarVolumeNode()
scene.AddNode(volume)
storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
scene.AddNode(storage)
storage.SetFileName(folder + "/blob.nrrd")
volume.SetAndObserveStorageNodeID(storage.GetID())
assert storage.ReadData(volume)
seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
seg.CreateDefaultDisplayNodes()
seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
logic = slicer.vtkSlicerSegmentationsModuleLogic
matrix = vtk.vtkMatrix4x4()
volume.GetIJKToRASMatrix(matrix)
for name, rows, slices in (("front", slice(0, 20), [5, 11, 17]), ("back", slice(20, 40), [6, 12])):
    sid = seg.GetSegmentation().AddEmptySegment("", name)
    painted = np.zeros(blob.shape, np.uint8)
    painted[slices, rows] = blob[slices, rows]
    image = slicer.vtkOrientedImageData()
    image.DeepCopy(volume.GetImageData())
    image.SetImageToWorldMatrix(matrix)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(painted.ravel(), deep=True))
    assert logic.SetBinaryLabelmapToSegment(image, seg, sid, logic.MODE_REPLACE)
result = mrml.Runner().propagate(volume, seg, None, PropagationOptions(device="cpu"))
print("predicted", sum(len(v) for v in result.predicted_slices.values()), "slices")
print("threader", itk_default_threader())
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "ITK_GLOBAL_DEFAULT_THREADER"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def test_a_user_script_that_runs_the_bridge_exits_0(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    for attempt in range(2):  # the crash came in about half of the runs
        p = subprocess.run(
            [sys.executable, str(script), str(tmp_path)],
            env=_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, (attempt, p.returncode, p.stdout, p.stderr[-3000:])
        assert "predicted" in p.stdout and "threader 0" in p.stdout, p.stdout  # 0: Platform


FIRST_USE = r"""
import slicer
from UniverSegLogic.core import fill_between
from UniverSegLogic.core.itk_threads import itk_default_threader

print("before", itk_default_threader())
fill_between.interpolator_class()
print("after", itk_default_threader())
"""


def test_a_threader_the_user_chose_is_kept(tmp_path):
    script = tmp_path / "first_use.py"
    script.write_text(FIRST_USE)
    runs = {}
    for choice in ("Pool", None):
        env = _env(ITK_GLOBAL_DEFAULT_THREADER=choice) if choice else _env()
        p = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
        )
        assert p.returncode == 0, p.stderr[-3000:]
        runs[choice] = p.stdout.split()
    assert runs["Pool"] == ["before", "1", "after", "1"]  # 1: Pool, as the user asked
    assert runs[None] == ["before", "2", "after", "0"]  # TBB by default; Platform once we run
