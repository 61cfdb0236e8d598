"""Evaluation: the two baselines, the evaluation command and its outputs (the slice rule and
Dice are tested in test_rules.py)."""

import json
import os

import numpy as np
import pytest
import torch

from UniverSegLogic.core.fill_between import available, fill_between_slices, slicer_extent
from UniverSegLogic.core.metrics import dice
from UniverSegLogic.core.slices import evaluation_slices, slice_extent
from UniverSegResearch import evaluate as ev

needs_vtkitk = pytest.mark.skipif(not available(), reason="slicer-core / vtkITK not importable")


def test_nearest_slice_copy_inside_the_labeled_range_only():
    m = np.zeros((10, 6, 6), dtype=bool)
    m[2, 0, 0] = True
    m[6, 5, 5] = True
    out = ev.nearest_slice_copy(m, [2, 6])
    for z in (0, 1, 7, 8, 9):
        assert not out[z].any(), z
    for z in (2, 3, 4):  # 4 is a tie between 2 and 6: the lower one wins
        assert np.array_equal(out[z], m[2]), z
    for z in (5, 6):
        assert np.array_equal(out[z], m[6]), z
    # along axis 1
    out1 = ev.nearest_slice_copy(np.moveaxis(m, 0, 1), [2, 6], axis=1)
    assert np.array_equal(np.moveaxis(out1, 1, 0), out)


# ----------------------------------------------------------------------- Fill between slices


def _cylinder(shape=(30, 40, 50), z=(5, 25), r=10):
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]]
    return ((j - 20) ** 2 + (i - 25) ** 2 <= r * r) & (k >= z[0]) & (k <= z[1])


@needs_vtkitk
def test_fill_between_slices_fills_the_gap_of_a_cylinder_and_nothing_outside():
    cyl = _cylinder()
    out = fill_between_slices(cyl, [8, 18], axis=0, spacing_kji=(3.0, 1.0, 1.0))
    for z in range(8, 19):
        assert np.array_equal(out[z], cyl[z]), z
    assert not out[:8].any() and not out[19:].any()
    # along another array axis: the same cylinder lying along I
    cyl_i = np.ascontiguousarray(np.moveaxis(cyl, 0, 2))
    out_i = fill_between_slices(cyl_i, [8, 18], axis=2)
    assert np.array_equal(np.moveaxis(out_i, 2, 0), out)


@needs_vtkitk
def test_fill_between_slices_interpolates_a_changing_shape():
    k, j, i = np.mgrid[:20, :40, :40]
    cone = (j - 20) ** 2 + (i - 20) ** 2 <= (4 + k) ** 2
    out = fill_between_slices(cone, [2, 14], axis=0)
    areas = [int(out[z].sum()) for z in range(2, 15)]
    assert areas == sorted(areas) and areas[0] < areas[6] < areas[-1]
    assert np.array_equal(out[2], cone[2]) and np.array_equal(out[14], cone[14])


def test_slicer_extent_margin():
    m = np.zeros((50, 60, 70), dtype=bool)
    m[10:41, 5, 30:32] = True
    # margins: max(3, 0.1 * 30) = 3 along K; 3 along J (clamped at 0); 3 along I
    assert slicer_extent(m) == ((7, 43), (2, 8), (27, 34))
    m[10:41, 5:56, 30:32] = True  # J extent 50 -> margin 5, clamped to 59
    assert slicer_extent(m)[1] == (0, 59)
    assert slicer_extent(np.zeros((3, 3, 3), bool)) is None


# ----------------------------------------------------------------------- CLI


def _tiny_case(tmp_path):
    import SimpleITK as sitk

    k, j, i = np.mgrid[:14, :24, :20]
    mask = ((j - 12) ** 2 / 36 + (i - 10) ** 2 / 25 + (k - 7) ** 2 / 30) <= 1
    image = mask * 800 - 100 + np.random.default_rng(0).normal(0, 10, mask.shape)
    paths = {}
    for name, arr in (("image", image.astype(np.float32)), ("blob", mask.astype(np.uint8))):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.2, 1.0, 2.5))
        paths[name] = str(tmp_path / f"{name}.nrrd")
        sitk.WriteImage(img, paths[name])
    torch.manual_seed(0)
    from UniverSegLogic.core.model import UniverSeg

    paths["weights"] = str(tmp_path / "random.pt")
    torch.save(UniverSeg().state_dict(), paths["weights"])
    return paths, mask


@needs_vtkitk
def test_evaluate_cli_writes_the_json_schema(tmp_path, capsys):
    from UniverSegResearch.cli import main

    paths, mask = _tiny_case(tmp_path)
    out = tmp_path / "out.json"
    rc = main(
        [
            "evaluate",
            "--image",
            paths["image"],
            "--mask",
            paths["blob"],
            "--k",
            "2,3",
            "--weights",
            paths["weights"],
            "--device",
            "cpu",
            "--json",
            str(out),
            "--figures",
            str(tmp_path / "fig"),
            "--quiet",
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) == {"results"}
    rows = data["results"]
    assert len(rows) == 2 * 3
    assert {(r["k"], r["method"]) for r in rows} == {
        (k, m) for k in (2, 3) for m in ("universeg", "fill_between_slices", "nearest_slice")
    }
    for r in rows:
        assert set(r) == {"mask", "k", "method", "dice", "dice_unlabeled", "seconds"}
        assert r["mask"] == "blob"
        assert 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["dice_unlabeled"] <= 1.0
        assert r["seconds"] >= 0.0
    # the baselines are deterministic: check one against a direct computation
    z0, z1 = slice_extent(mask, 0)
    lab = evaluation_slices(z0, z1, 3)
    want = dice(ev.nearest_slice_copy(mask, lab), mask)
    got = next(r for r in rows if r["k"] == 3 and r["method"] == "nearest_slice")
    assert got["dice"] == pytest.approx(want)
    figs = sorted(os.listdir(tmp_path / "fig"))
    assert "dice_vs_k.png" in figs and any(
        f.startswith("montage_") and f.endswith(".jpg") for f in figs
    )
    printed = capsys.readouterr().out
    assert "ours-FBS" in printed


@needs_vtkitk
def test_evaluate_cli_reads_a_manifest(tmp_path, capsys):
    from UniverSegResearch.cli import main

    paths, _ = _tiny_case(tmp_path)
    manifest = {
        "cases": [
            {
                "case": "tiny",
                "role": "val",
                "image": "image.nrrd",
                "structures": [{"name": "blob", "mask": "blob.nrrd"}],
            },
            {
                "case": "other",
                "role": "unseen",
                "image": "image.nrrd",
                "structures": [{"name": "blob", "mask": "blob.nrrd"}],
            },
        ]
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "m.json"
    rc = main(
        [
            "evaluate",
            "--cases",
            str(tmp_path / "manifest.json"),
            "--roles",
            "val",
            "--k",
            "2",
            "--methods",
            "fill_between_slices,nearest_slice",
            "--json",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["mask"] for r in rows} == {"blob"} and len(rows) == 2
    rc = main(
        [
            "evaluate",
            "--cases",
            str(tmp_path / "manifest.json"),
            "--k",
            "2",
            "--methods",
            "nearest_slice",
            "--json",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    assert {r["mask"] for r in json.loads(out.read_text())["results"]} == {
        "tiny/blob",
        "other/blob",
    }
    assert "role unseen" in capsys.readouterr().out


def test_evaluate_cli_usage_errors(tmp_path, capsys):
    from UniverSegResearch.cli import main

    assert (
        main(["evaluate", "--image", "x.nrrd", "--k", "2", "--json", str(tmp_path / "o.json")]) == 2
    )
    assert "--mask" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--image",
                "x.nrrd",
                "--mask",
                "m.nrrd",
                "--k",
                "two",
                "--json",
                str(tmp_path / "o.json"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "evaluate",
                "--image",
                "x.nrrd",
                "--mask",
                "m.nrrd",
                "--methods",
                "magic",
                "--json",
                str(tmp_path / "o.json"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "o.json").exists()
