"""What users get from ``pip install .``: the built wheel carries the starter weights, their
fusion calibration and the model card, and works from any folder (no checkout beside it)."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import UniverSegLogic
from UniverSegLogic.core.prior import fusion_for
from UniverSegLogic.core.weights import starter_path
fusion, note = fusion_for("starter")
out = {"package": UniverSegLogic.__file__, "weights": str(starter_path()),
       "fusion": fusion.source, "note": note}

# the MRML bridge from the installed package (slicer-core's real scene)
import numpy as np, slicer
from UniverSegLogic import mrml
from UniverSegLogic.mrml.vtkglue import oriented_image
scene = slicer.vtkMRMLScene()
logic = slicer.vtkSlicerSegmentationsModuleLogic
segmentations = logic()
segmentations.SetMRMLScene(scene)  # registers the segmentation converter rules
vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
k, j, i = np.mgrid[:12, :24, :24]
ball = ((k - 6) ** 2 / 25 + (j - 12) ** 2 / 49 + (i - 12) ** 2 / 49) <= 1
slicer.util.updateVolumeFromArray(vol, np.where(ball, 500, -100).astype(np.int16))
seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
sid = seg.GetSegmentation().AddEmptySegment("ball")
painted = np.zeros_like(ball)
painted[[3, 8]] = ball[[3, 8]]
m = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
vol.GetIJKToRASMatrix(m)
ijk = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
image = oriented_image(painted.astype(np.uint8), (0, 23, 0, 23, 0, 11), ijk)
assert logic.SetBinaryLabelmapToSegment(image, seg, sid, logic.MODE_REPLACE)
from UniverSegLogic.core.propagator import PropagationOptions
res = mrml.Runner().propagate(vol, seg, [sid], PropagationOptions(axis=0, device="cpu"))
out["bridge_weights"] = res.weights
out["bridge_predicted"] = len(res.predicted_slices[sid])
print("RESULT " + json.dumps(out))

from UniverSegLogic.cli import main
sys.exit(main(["demo", "--out", sys.argv[2], "--quiet", "--device", "cpu"]))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    (path,) = out.glob("universeg_slicer-*.whl")
    return path


def test_the_wheel_carries_the_shipped_resources_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for resource in (
        "starter_weights.pt",
        "starter_fusion.json",
        "starter_fusion_net.pt",
        "MODEL_CARD.md",
    ):
        assert f"UniverSegLogic/resources/{resource}" in names
    assert not [
        n
        for n in names
        if n.startswith(("Testing/", "docs/", "UniverSegSlicer/", "UniverSegResearch/"))
    ]
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert any(n.endswith("licenses/NOTICE") for n in names)


def test_the_installed_package_works_from_an_empty_folder(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel: this is its installed tree
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(site), str(empty / "demo")],
        capture_output=True,
        text=True,
        cwd=empty,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    info = json.loads(line[len("RESULT ") :])
    assert info["package"].startswith(str(site))  # not the checkout
    assert info["weights"].startswith(str(site)) and info["note"] is None
    assert "calibrated" in info["fusion"]
    assert info["bridge_weights"].startswith("UniverSeg-for-Slicer starter")
    assert info["bridge_predicted"] > 0
    assert "weights: UniverSeg-for-Slicer starter weights (Apache-2.0)" in p.stdout
    metrics = json.loads((empty / "demo" / "demo_metrics.json").read_text())
    assert round(metrics["dice"], 3) == 0.931 and round(metrics["dice_hidden_slices"], 3) == 0.921
