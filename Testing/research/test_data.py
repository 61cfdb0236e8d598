"""Tests of data preparation (``UniverSegResearch.data``): offline, on small arrays made here and on
slicerio's bundled sample."""

import json
import os

import numpy as np
import pytest
from conftest import rotation

from UniverSegLogic.core.geometry import Volume, make_ijk_to_ras, resolve_axis
from UniverSegResearch import cli, data

# ------------------------------------------------------------------ npz conversion


def _oblique_case():
    """A 20x24x28 KJI volume, axes permuted and flipped w.r.t. RAS, rotated 12 degrees, with label 1
    in the right-anterior-superior corner (physically) and label 2 in the left-posterior-inferior
    one."""
    # columns = RAS directions of I, J, K: I ~ -A, J ~ S, K ~ -R
    base = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float)
    direction = rotation(2, 12) @ base
    spacing_ijk = (0.8, 1.5, 2.5)
    m = make_ijk_to_ras(spacing_ijk, (5.0, -3.0, 7.0), direction)
    shape = (20, 24, 28)  # K, J, I
    k, j, i = np.indices(shape)
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).reshape(-1, 4).T
    ras = (m @ ijk1)[:3].T.reshape(shape + (3,))
    lo, hi = ras.reshape(-1, 3).min(0), ras.reshape(-1, 3).max(0)
    frac = (ras - lo) / (hi - lo)
    labels = np.zeros(shape, dtype=np.uint16)
    labels[np.all(frac > 0.7, axis=-1)] = 1
    labels[np.all(frac < 0.3, axis=-1)] = 2
    image = np.where(labels == 1, 1000.0, np.where(labels == 2, 500.0, 0.0)).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 5, shape).astype(np.float32)
    return Volume(image, m), labels


@pytest.mark.parametrize("axis", data.AXES)
def test_npz_arrays_put_labels_on_the_right_slices_and_pixels(axis):
    volume, labels = _oblique_case()
    assert labels[labels == 1].size > 20 and labels[labels == 2].size > 20
    out = data.volume_to_npz_arrays(volume, labels, ["alpha", "beta"], axis, source="synthetic")

    a = resolve_axis(volume, axis)
    n = volume.array.shape[a]
    assert out["image"].dtype == np.uint8 and out["image"].shape == (n, 128, 128)
    assert out["labels"].dtype == np.uint16 and out["labels"].shape == (n, 128, 128)
    assert out["image"].max() == 255 and out["image"].min() == 0
    assert list(out["names"]) == ["alpha", "beta"] and str(out["source"]) == "synthetic"
    assert set(np.unique(out["labels"]).tolist()) == {0, 1, 2}
    assert out["spacing"].dtype == np.float32
    assert out["spacing"][0] == pytest.approx(volume.spacing_kji[a])

    # slices: the stack keeps the array order along the slicing axis
    other = tuple(x for x in (0, 1, 2) if x != a)
    for lab in (1, 2):
        expected = np.nonzero(np.any(labels == lab, axis=other))[0]
        got = np.nonzero(np.any(out["labels"] == lab, axis=(1, 2)))[0]
        np.testing.assert_array_equal(got, expected)

    # pixels: rows run from superior/anterior down, columns from right to left, so the
    # right-anterior-superior corner is top-left and the opposite corner bottom-right
    occupied = np.argwhere(np.any(out["image"] > 0, axis=0))
    (r0, c0), (r1, c1) = occupied.min(0), occupied.max(0)
    centre = np.array([(r0 + r1) / 2, (c0 + c1) / 2])
    one = np.argwhere(np.any(out["labels"] == 1, axis=0)).mean(0)
    two = np.argwhere(np.any(out["labels"] == 2, axis=0)).mean(0)
    assert np.all(one < centre) and np.all(two > centre)

    # the image and the labels share the canvas: label 1 is the bright block
    assert out["image"][out["labels"] == 1].mean() > 200
    assert out["image"][out["labels"] == 0].mean() < 80


def test_npz_labels_are_resized_by_nearest_neighbour():
    vol = Volume(np.zeros((3, 40, 50), np.float32), make_ijk_to_ras((0.7, 0.9, 2.0)))
    labels = np.zeros((3, 40, 50), np.uint16)
    labels[:, 10:30, 5:20] = 1
    labels[:, 10:30, 20:35] = 3  # touches 1: linear interpolation would create 2s
    out = data.volume_to_npz_arrays(vol, labels, ["a", "b", "c"], 0)
    assert set(np.unique(out["labels"]).tolist()) == {0, 1, 3}
    with pytest.raises(data.DataError):
        data.volume_to_npz_arrays(vol, labels, ["a", "b"], 0)  # id 3 has no name


def test_canvas_keeps_the_physical_aspect():
    vol = Volume(np.zeros((4, 30, 60), np.float32), make_ijk_to_ras((1.0, 4.0, 2.0)))
    # in-plane: 60 columns x 1 mm, 30 rows x 4 mm -> 60 mm x 120 mm
    rows, cols = data.canvas_inner(vol, 0)
    assert (rows, cols) == (128, 64)
    out = data.volume_to_npz_arrays(vol, np.ones((4, 30, 60), np.uint16), ["x"], 0)
    filled = np.argwhere(out["labels"][0] > 0)
    assert tuple(filled.max(0) - filled.min(0) + 1) == (rows, cols)


# ------------------------------------------------------------------ split rule


def _aal_like_names():
    names, i = {}, 1
    for region in [
        "Precentral",
        "Frontal_Sup",
        "Frontal_Sup_Orb",
        "Frontal_Mid",
        "Insula",
        "Cingulum_Ant",
        "Hippocampus",
        "Amygdala",
        "Calcarine",
    ]:
        for side in ("L", "R"):
            names[i] = f"{region}_{side}"
            i += 1
    for v in ["Vermis_1_2", "Vermis_3", "Vermis_4_5", "Vermis_6"]:
        names[i] = v
        i += 1
    return names


def test_heldout_rule_takes_every_fourth_region_with_both_hemispheres():
    names = _aal_like_names()
    held = [names[i] for i in data.heldout_aal_ids(names)]
    assert held == ["Frontal_Mid_L", "Frontal_Mid_R", "Amygdala_L", "Amygdala_R", "Vermis_4_5"]


def test_split_never_leaks_heldout_structures_into_train():
    names = _aal_like_names()
    rng = np.random.default_rng(1)
    labels = rng.integers(0, max(names) + 1, size=(12, 14, 16))
    train_names, val_names, train, val = data.split_aal(labels, names)
    held = set(data.heldout_aal_ids(names))
    assert held and set(val_names) == held and not held & set(train_names)
    assert not np.isin(train, sorted(held)).any()
    assert set(np.unique(val).tolist()) <= held | {0}
    np.testing.assert_array_equal(np.where(val > 0, val, train), labels)
    # no region of a validation structure (either hemisphere) remains in training
    val_regions = {data.aal_region(n) for n in val_names.values()}
    assert not val_regions & {data.aal_region(n) for n in train_names.values()}
    # after renumbering, the training names still hold no validation name
    _, kept, _ = data.relabel(train, train_names, min_voxels=1)
    assert not set(kept) & set(val_names.values())


def test_relabel_renumbers_and_drops_small_structures():
    labels = np.zeros((5, 10, 10), np.int64)
    labels[0, :, :] = 7  # 100 voxels
    labels[1, 0, :3] = 4  # 3 voxels: dropped
    labels[2:4, :, :] = 9  # 200 voxels
    out, names, dropped = data.relabel(labels, {4: "small", 7: "seven", 9: "nine", 11: "absent"})
    assert names == ["seven", "nine"] and dropped == ["small"]
    assert out.dtype == np.uint16
    assert (out[0] == 1).all() and (out[2:4] == 2).all() and (out[1] == 0).all()
    with pytest.raises(data.DataError, match="without a name"):
        data.relabel(labels, {7: "seven", 9: "nine"})


def test_slicerio_demo_sample_is_never_a_training_case():
    demo = [c for c in data.CASES if c.source == "slicerio"]
    assert demo and all(c.role == "unseen" for c in demo)
    assert not [c for c in data.CASES if c.role == "train" and c.source == "slicerio"]
    with pytest.raises(data.DataError):
        data.check_role(demo[0], "train")
    with pytest.raises(data.DataError):
        data.check_role(data.case_spec("ts_mr_abdomen"), "train")  # validation case
    data.check_role(data.case_spec("ts_ct_abdomen"), "train")
    # the whole MR case validates, and AAL is split between train and val
    assert data.case_spec("ts_mr_abdomen").role == "val"
    assert data.case_spec("colin27_aal_heldout").role == "val"


def test_prepare_writes_the_demo_sample_only_to_eval(tmp_path):
    import SimpleITK as sitk

    from UniverSegLogic.core.io import read_image, read_segmentation

    out = tmp_path / "prepared"
    summary = data.prepare(
        str(out), str(tmp_path / "cache"), sources=["slicerio"], log=lambda m: None
    )
    assert summary.files == []
    assert not (out / "train").exists() and not (out / "val").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == []
    ev = json.loads((out / "eval" / "manifest.json").read_text())
    (case,) = ev["cases"]
    assert case["case"] == "slicerio_chest_ct" and case["role"] == "unseen"
    assert len(case["structures"]) == 7

    # masks are full resolution, on the image grid, and equal the original segments
    folder = data.slicerio_data_dir()
    original = read_segmentation(
        os.path.join(folder, "Segmentation.seg.nrrd"),
        read_image(os.path.join(folder, "CTChest4.nrrd")),
    )
    image = read_image(str(out / "eval" / case["image"]))
    for s in case["structures"]:
        m = sitk.ReadImage(str(out / "eval" / s["mask"]))
        mask = read_image(str(out / "eval" / s["mask"]))
        assert mask.same_grid(image) and m.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(mask.array > 0, original.get(s["name"]).mask)
    assert "tissue" in [s["name"] for s in case["structures"]]

    # a second run replaces the folder (idempotent), a foreign folder is refused
    data.prepare(str(out), str(tmp_path / "cache"), sources=["slicerio"], log=lambda m: None)
    assert sorted(os.listdir(out)) == ["eval", "manifest.json"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(data.DataError, match="refusing"):
        data.prepare(
            str(foreign), str(tmp_path / "cache"), sources=["slicerio"], log=lambda m: None
        )
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["data", "prepare", "--sources", "nowhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    assert (
        cli.main(
            [
                "data",
                "prepare",
                "--out",
                str(foreign),
                "--cache",
                str(tmp_path / "c"),
                "--sources",
                "slicerio",
            ]
        )
        == 2
    )


# ------------------------------------------------------------------ parsers and labels

CLASS_MAP_TEXT = """
import os
raise RuntimeError("this module must not be executed")

class_map = {
    # a comment
    "total": {
        1: "spleen",
        2: "kidney_right",
        10: "pancreas",
    },
    "total_mr": {1: "spleen", 3: "liver"},
}

commercial_models = {"x": 1}
other = dict(a=1)
"""


def test_class_map_parser_reads_text_without_running_it():
    maps = data.parse_class_map(CLASS_MAP_TEXT)
    assert maps == {
        "total": {1: "spleen", 2: "kidney_right", 10: "pancreas"},
        "total_mr": {1: "spleen", 3: "liver"},
    }
    with pytest.raises(data.DataError, match="int: str"):
        data.parse_class_map(CLASS_MAP_TEXT, "commercial_models")


def test_class_map_parser_rejects_bad_input():
    with pytest.raises(data.DataError, match="no top-level"):
        data.parse_class_map("x = 1\n")
    with pytest.raises(data.DataError, match="not a literal"):
        data.parse_class_map("class_map = {'t': {1: name}}\n")
    with pytest.raises(data.DataError, match="int: str"):
        data.parse_class_map("class_map = {'t': {'1': 'a'}}\n")
    with pytest.raises(data.DataError):
        data.parse_class_map("class_map = {\n")


def test_aal_names_parser():
    text = "1 Precentral_L 2001\n2 Precentral_R 2002\n\n116 Vermis_10 9170\n"
    assert data.parse_aal_names(text) == {1: "Precentral_L", 2: "Precentral_R", 116: "Vermis_10"}
    with pytest.raises(data.DataError):
        data.parse_aal_names("nothing here\n")


def test_tissue_labels_threshold_and_ties():
    gm = np.array([200, 128, 127, 0, 128, 255], dtype=np.uint8)
    wm = np.array([10, 0, 0, 200, 128, 254], dtype=np.uint8)
    np.testing.assert_array_equal(data.tissue_labels(gm, wm), [1, 1, 0, 2, 2, 1])


def test_labels_on_grid_resamples_a_flipped_file_through_physical_space():
    import SimpleITK as sitk

    ref = sitk.Image(6, 5, 4, sitk.sitkInt16)
    ref.SetSpacing((1.0, 2.0, 3.0))
    ref.SetOrigin((10.0, -4.0, 2.0))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 0, 2] = 3
    labels[2, 4, 5] = 7
    # the same labels stored with the J axis reversed (as TotalSegmentator's DICOM output is)
    flipped = sitk.GetImageFromArray(labels[:, ::-1, :].copy())
    flipped.SetSpacing((1.0, 2.0, 3.0))
    flipped.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    flipped.SetOrigin((10.0, -4.0 + 2.0 * 4, 2.0))
    np.testing.assert_array_equal(data.labels_on_grid(flipped, ref), labels)
    assert not np.array_equal(sitk.GetArrayFromImage(flipped), labels)


def test_eval_structures_need_enough_slices_and_are_capped_by_size():
    masks = {}
    for name, (slices, width) in {"thin": (3, 30), "a": (6, 4), "b": (8, 6), "c": (10, 2)}.items():
        m = np.zeros((12, 32, 32), bool)
        m[:slices, :width, :width] = True
        masks[name] = m
    assert data.choose_eval_structures(masks, min_slices=6, limit=2) == ["b", "a"]
    assert data.choose_eval_structures(masks, min_slices=6, limit=None) == ["b", "a", "c"]
    assert data.slices_spanned(masks["thin"]) == 3
