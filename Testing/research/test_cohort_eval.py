"""Cohort evaluation (ours vs atlas registration): its rules, outputs and the atlas baseline on a
resampled copy of a real scan (the synthetic cohort), and the body box the alignment starts from."""

import json
import os

import numpy as np
import pytest

from UniverSegLogic.benchmark.synthetic import sample_scan, synthetic_cohort
from UniverSegLogic.cohort.align import working_grid
from UniverSegLogic.core.geometry import Volume, make_ijk_to_ras
from UniverSegLogic.core.io import read_image, read_segmentation, volume_to_sitk
from UniverSegLogic.errors import UsageError
from UniverSegResearch import cohort_eval as ce
from UniverSegResearch.cli import main


def _scan(name, image_path, seg_path):
    image = read_image(image_path)
    seg = read_segmentation(seg_path, image)
    return ce.LabeledScan(name, image, {s.name: np.asarray(s.mask, bool) for s in seg.segments})


def test_structure_rule_needs_both_scans_voxels_and_slices():
    vol = Volume(np.zeros((6, 20, 20), np.int16), make_ijk_to_ras((1.0, 1.0, 1.0)))
    big = np.zeros((6, 20, 20), bool)
    big[1:5, 2:18, 2:18] = True  # 1024 voxels over 4 slices
    flat = np.zeros((6, 20, 20), bool)
    flat[2] = True  # 400 voxels on one slice
    wide = np.zeros((6, 20, 20), bool)
    wide[0:2] = True  # 800 voxels over 2 slices
    a = ce.LabeledScan("a", vol, {"big": big, "flat": flat, "wide": wide, "only_a": big})
    b = ce.LabeledScan("b", vol, {"big": big, "flat": big, "wide": big})
    assert ce.shared_structures([a, b]) == ["big"]
    assert ce.shared_structures([a, b], min_voxels=400, min_slices=1) == ["big", "flat", "wide"]


def test_held_out_cases_are_refused_before_anything_is_read(tmp_path):
    with pytest.raises(UsageError, match="held out"):
        ce.load_scans(str(tmp_path), ("ts_ct_abdomen", "ts_mr_abdomen"))


def test_working_grid_keeps_the_extent_and_coarsens_fine_axes_only():
    arr = np.random.default_rng(0).normal(size=(8, 90, 90)).astype(np.float32)
    img = volume_to_sitk(Volume(arr, make_ijk_to_ras((1.0, 1.0, 4.0))))
    out = working_grid(img, 3.0)
    assert out.GetSize() == (30, 30, 8)
    assert np.allclose(out.GetSpacing(), (3.0, 3.0, 4.0))

    # the same physical extent: the outer edges of the first and last voxels agree
    def corners(image):
        first = image.TransformContinuousIndexToPhysicalPoint([-0.5] * 3)
        last = image.TransformContinuousIndexToPhysicalPoint([s - 0.5 for s in image.GetSize()])
        return np.array([first, last])

    assert np.allclose(corners(out), corners(img), atol=1e-4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A real labeled CT and a resampled, shifted, rescaled copy of it (with its true labels)."""
    folder = str(tmp_path_factory.mktemp("cohort_pair"))
    synthetic_cohort(folder, 1, seed=7)
    src = sample_scan()
    original = _scan("original", src["image"], src["segmentation"])
    copy = _scan(
        "copy",
        os.path.join(folder, "copy000.nrrd"),
        os.path.join(folder, "truth", "copy000.seg.nrrd"),
    )
    return original, copy


def test_atlas_scores_high_on_a_copy_and_the_outputs_hold_every_row(pair, tmp_path):
    structure = "right lung"
    payload = ce.evaluate_pairs(list(pair), [structure], ("ours", "atlas"), device="cpu")
    rows = payload["rows"]
    assert len(rows) == 4 and len(payload["seconds"]) == 4
    assert {(r["pair"], r["method"]) for r in rows} == {
        (p, m) for p in ("original->copy", "copy->original") for m in ("ours", "atlas")
    }
    for r in rows:
        assert r["structure"] == structure and 0.0 <= r["dice"] <= 1.0
        assert r["truth_voxels"] > 1000
    atlas = [r["dice"] for r in rows if r["method"] == "atlas"]
    ours = [r["dice"] for r in rows if r["method"] == "ours"]
    assert min(atlas) > 0.9, atlas  # registration of an exact resampled copy
    assert min(ours) > 0.7, ours
    for s in payload["seconds"]:
        assert s["seconds"] > 0 and s["timings"]
    summary = payload["summary"]
    assert set(summary["by_method"]) == {"ours", "atlas"}
    t = summary["ours_vs_atlas"]
    assert t["dice_target_met"] == (t["dice_difference"] >= -ce.TARGET_DICE_GAP)
    assert payload["conditions"]["torch_threads"] == 1
    path = tmp_path / "evaluation.json"
    ce.write_json(str(path), payload)
    back = json.loads(path.read_text())
    assert back["rows"] == rows
    md = ce.markdown(back, "python -m UniverSegResearch evaluate --cohort --json x.json")
    assert "| right lung | original -> copy |" in md
    assert "seconds per case" in md and "time / atlas time" in md
    assert "python -m UniverSegResearch evaluate --cohort --json x.json" in md


def test_cli_cohort_excludes_the_other_sources(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--cohort", "--image", "x.nrrd", "--json", str(tmp_path / "o.json")])
    # an unknown method is refused (exit 2, one line) before any data is fetched
    code = main(
        [
            "evaluate",
            "--cohort",
            "--cache",
            str(tmp_path / "none"),
            "--methods",
            "ours,snake",
            "--json",
            str(tmp_path / "o.json"),
        ]
    )
    assert code == 2
    assert "snake" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none")
