"""Command line: propagate along each axis and with a second volume; every error path exits 2
with one line and leaves no output file; the demo end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from conftest import labeled_only, write_volume_file

from UniverSegLogic.cli import main
from UniverSegLogic.core.geometry import Volume, make_ijk_to_ras
from UniverSegLogic.core.io import Segment, Segmentation, read_image, write_segmentation
from UniverSegLogic.core.model import UniverSeg

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    shape = (14, 18, 22)
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    vol = Volume(
        np.zeros(shape, np.float32), make_ijk_to_ras((1.1, 0.9, 2.5), (10, -20, 30), direction)
    )
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ball = ((k - 7) / 5.5) ** 2 + ((j - 9) / 6.0) ** 2 + ((i - 11) / 7.0) ** 2 <= 1
    box = (k >= 2) & (k <= 11) & (j >= 2) & (j <= 5) & (i >= 2) & (i <= 6)
    vol.array[ball] = 800
    vol.array[box] = 300
    vol.array += np.random.default_rng(0).normal(0, 10, shape).astype(np.float32)
    write_volume_file(d / "image.nrrd", vol)
    ref = read_image(str(d / "image.nrrd"))
    sparse = np.zeros(shape, bool)
    sparse[[4, 7, 10]] = ball[[4, 7, 10]]
    box_sparse = np.zeros(shape, bool)
    box_sparse[[3, 9]] = box[[3, 9]]
    write_segmentation(
        str(d / "labels.seg.nrrd"),
        Segmentation(
            ref,
            [
                Segment("ball", sparse, (0.9, 0.1, 0.1), "ball_id", {}),
                Segment("box", box_sparse, (0.1, 0.2, 0.9), "box_id", {}),
            ],
        ),
    )
    write_segmentation(
        str(d / "full.seg.nrrd"),
        Segmentation(ref, [Segment("ball", ball, (0.9, 0.1, 0.1), "ball_id", {})]),
    )
    torch.manual_seed(0)
    torch.save(UniverSeg().state_dict(), d / "weights.pt")
    return d, ball, box


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_propagate_each_axis(case, capsys, axis, tmp_path):
    d, ball, box = case
    out = tmp_path / f"{axis}.seg.nrrd"
    labeled = {"axial": "4,7,10", "coronal": "5,9,13", "sagittal": "6,11,16"}[axis]
    code, stdout, err = _run(
        [
            "propagate",
            "--image",
            str(d / "image.nrrd"),
            "--labels",
            str(d / "full.seg.nrrd"),
            "--out",
            str(out),
            "--axis",
            axis,
            "--labeled-slices",
            f"ball:{labeled}",
            "--weights",
            str(d / "weights.pt"),
            "--device",
            "cpu",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["ball"]
    assert seg["segments"][0]["color"] == pytest.approx([0.9, 0.1, 0.1], abs=1e-4)
    mask = slicerio.segment_mask(seg, "ball").transpose(2, 1, 0)
    from UniverSegLogic.core.geometry import resolve_axis

    a = resolve_axis(read_image(str(d / "image.nrrd")), axis)
    for t in map(int, labeled.split(",")):
        idx = [slice(None)] * 3
        idx[a] = t
        assert np.array_equal(mask[tuple(idx)], ball[tuple(idx)]), (axis, t)
    assert "predicted" in stdout


def test_propagate_keeps_other_segments_and_geometry(case, capsys, tmp_path):
    d, ball, box = case
    out = tmp_path / "out.seg.nrrd"
    code, stdout, err = _run(
        [
            "propagate",
            "--image",
            str(d / "image.nrrd"),
            "--labels",
            str(d / "labels.seg.nrrd"),
            "--out",
            str(out),
            "--segments",
            "ball",
            "--weights",
            str(d / "weights.pt"),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    src = slicerio.read_segmentation(str(d / "labels.seg.nrrd"))
    res = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in res["segments"]] == ["ball", "box"]
    assert np.allclose(res["ijkToLPS"], src["ijkToLPS"])
    assert np.array_equal(slicerio.segment_mask(res, "box"), slicerio.segment_mask(src, "box"))
    b_src, b_res = slicerio.segment_mask(src, "ball"), slicerio.segment_mask(res, "ball")
    for k in (4, 7, 10):
        assert np.array_equal(b_res[..., k], b_src[..., k])


def test_propagate_suggest_and_report_contract(case, capsys, tmp_path):
    d, ball, box = case
    out, report = tmp_path / "out.seg.nrrd", tmp_path / "report.json"
    # slice 12 of "box" is empty and listed: labeled background
    code, stdout, err = _run(
        [
            "propagate",
            "--image",
            str(d / "image.nrrd"),
            "--labels",
            str(d / "labels.seg.nrrd"),
            "--out",
            str(out),
            "--labeled-slices",
            "box:3,9,12",
            "--weights",
            str(d / "weights.pt"),
            "--suggest",
            "2",
            "--report",
            str(report),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert set(data) == {"device", "precision", "precision_reason", "weights", "segments"}
    assert data["device"] == "cpu" and data["precision"] in ("fp32", "bf16")
    assert f"precision: {data['precision']} ({data['precision_reason']})" in stdout
    segs = data["segments"]
    assert [s["name"] for s in segs] == ["ball", "box"]
    n = ball.shape[0]  # axial = array axis 0 here
    for s in segs:
        assert set(s) == {
            "name",
            "labeled_slices",
            "predicted_slices",
            "suggested_slices",
            "slice_uncertainty",
        }
        assert isinstance(s["name"], str)
        for key in ("labeled_slices", "predicted_slices", "suggested_slices"):
            assert isinstance(s[key], list) and all(type(i) is int for i in s[key]), key
            assert all(0 <= i < n for i in s[key]), key
        assert s["labeled_slices"] == sorted(s["labeled_slices"])
        assert not set(s["labeled_slices"]) & set(s["predicted_slices"])
        assert 1 <= len(s["suggested_slices"]) <= 2
        assert not set(s["suggested_slices"]) & set(s["labeled_slices"])
        unc = s["slice_uncertainty"]
        assert set(unc) == {str(i) for i in range(n)}
        assert all(type(v) is float and v >= 0.0 for v in unc.values())
        assert all(unc[str(i)] == 0.0 for i in s["labeled_slices"])
    by = {s["name"]: s for s in segs}
    assert by["ball"]["labeled_slices"] == [4, 7, 10]
    assert by["box"]["labeled_slices"] == [3, 9, 12]  # the empty listed slice is labeled
    assert 12 not in by["box"]["predicted_slices"]
    assert all(t < 12 for t in by["box"]["suggested_slices"])  # the box ended at 12
    assert "paint next" in stdout
    # without --report nothing is written; a negative count is a usage error
    code, _, err = _run(
        [
            "propagate",
            "--image",
            str(d / "image.nrrd"),
            "--labels",
            str(d / "labels.seg.nrrd"),
            "--out",
            str(tmp_path / "o2.seg.nrrd"),
            "--suggest",
            "-1",
            "--quiet",
        ],
        capsys,
    )
    assert code == 2 and "--suggest" in err and not (tmp_path / "o2.seg.nrrd").exists()


def test_propagate_with_support_from_a_second_volume(case, capsys, tmp_path):
    d, ball, box = case
    # the target volume's own segmentation has no labeled slice of "ball": support comes from
    # the second (fully labeled) volume
    ref = read_image(str(d / "image.nrrd"))
    only_box = tmp_path / "only_box.seg.nrrd"
    write_segmentation(
        str(only_box),
        Segmentation(
            ref,
            [
                Segment("ball", np.zeros_like(ball), (0.9, 0.1, 0.1), "ball_id", {}),
                Segment("box", box, (0.1, 0.2, 0.9), "box_id", {}),
            ],
        ),
    )
    out = tmp_path / "supported.seg.nrrd"
    code, stdout, err = _run(
        [
            "propagate",
            "--image",
            str(d / "image.nrrd"),
            "--labels",
            str(only_box),
            "--out",
            str(out),
            "--segments",
            "ball",
            "--support",
            str(d / "image.nrrd"),
            str(d / "full.seg.nrrd"),
            "--weights",
            str(d / "weights.pt"),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert "ball" in stdout and out.exists()


def _error_cases(d, tmp):
    (tmp / "garbage.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    img2d = sitk.GetImageFromArray(np.zeros((8, 8), np.float32))
    sitk.WriteImage(img2d, str(tmp / "flat.nrrd"))
    img4d = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))] * 2)
    sitk.WriteImage(img4d, str(tmp / "movie.nrrd"))
    other = sitk.GetImageFromArray(np.zeros((5, 5, 5), np.uint8))
    other.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(other, str(tmp / "othergrid.nrrd"))
    (tmp / "bad.pt").write_bytes(b"PK\x03\x04 not really a zip")
    img, lab, w = str(d / "image.nrrd"), str(d / "labels.seg.nrrd"), str(d / "weights.pt")
    base = ["--device", "cpu", "--quiet"]
    return {
        "missing image": ["--image", str(tmp / "nope.nrrd"), "--labels", lab, "--weights", w],
        "unreadable image": ["--image", str(tmp / "garbage.nrrd"), "--labels", lab, "--weights", w],
        "2D image": ["--image", str(tmp / "flat.nrrd"), "--labels", lab, "--weights", w],
        "4D image": ["--image", str(tmp / "movie.nrrd"), "--labels", lab, "--weights", w],
        "grid mismatch": ["--image", img, "--labels", str(tmp / "othergrid.nrrd"), "--weights", w],
        "no labeled slice": [
            "--image",
            img,
            "--labels",
            lab,
            "--segments",
            "ball",
            "--axis",
            "sagittal",
            "--labeled-slices",
            "ball:",
            "--weights",
            w,
        ],
        "empty segment": [
            "--image",
            img,
            "--labels",
            str(tmp / "emptyseg.seg.nrrd"),
            "--weights",
            w,
        ],
        "unknown segment": ["--image", img, "--labels", lab, "--segments", "liver", "--weights", w],
        "bad weights": ["--image", img, "--labels", lab, "--weights", str(tmp / "bad.pt")],
        "missing weights": ["--image", img, "--labels", lab, "--weights", str(tmp / "none.pt")],
        "offline official": ["--image", img, "--labels", lab, "--weights", "official"],
        "bad option": ["--image", img, "--labels", lab, "--support-size", "0", "--weights", w],
        "bad fusion": ["--image", img, "--labels", lab, "--fusion-model", "neural", "--weights", w],
        "missing fusion file": [
            "--image",
            img,
            "--labels",
            lab,
            "--fusion-model",
            str(tmp / "none_fusion.pt"),
            "--weights",
            w,
        ],
    }, base


def test_error_paths_exit_2_with_one_line(case, capsys, tmp_path, monkeypatch):
    d, ball, box = case
    monkeypatch.setenv("UNIVERSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("UNIVERSEG_OFFICIAL_URL", "http://127.0.0.1:9/closed")
    ref = read_image(str(d / "image.nrrd"))
    write_segmentation(
        str(tmp_path / "emptyseg.seg.nrrd"),
        Segmentation(ref, [Segment("nothing", np.zeros(ref.array.shape, bool))]),
    )
    cases, base = _error_cases(d, tmp_path)
    for name, args in cases.items():
        out = tmp_path / f"{name.replace(' ', '_')}.seg.nrrd"
        code, stdout, err = _run(["propagate", *args, "--out", str(out), *base], capsys)
        lines = [x for x in err.strip().splitlines() if x.strip()]
        assert code == 2, (name, err)
        assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, (name, err)
        assert not out.exists(), name
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial")], name


def test_subprocess_error_has_no_traceback(case, tmp_path):
    d, _, _ = case
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "UniverSegLogic",
            "propagate",
            "--image",
            str(tmp_path / "missing.nrrd"),
            "--labels",
            str(d / "labels.seg.nrrd"),
            "--out",
            str(tmp_path / "o.seg.nrrd"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "file not found" in p.stderr
    assert "Traceback" not in p.stderr


def test_demo_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run(
        [sys.executable, "-m", "UniverSegLogic", "demo", "--out", str(tmp_path), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr
    assert "weights:" in p.stdout and "Dice" in p.stdout
    metrics = json.loads((tmp_path / "demo_metrics.json").read_text())
    assert 0.0 <= metrics["dice_hidden_slices"] <= 1.0
    assert (tmp_path / "demo_overlay.png").stat().st_size > 1000
    seg = slicerio.read_segmentation(str(tmp_path / "demo_result.seg.nrrd"))
    names = [s["name"] for s in seg["segments"]]
    assert names == ["right lung (UniverSeg)", "right lung (reference)"]
    pred = slicerio.segment_mask(seg, "right lung (UniverSeg)")
    ref = slicerio.segment_mask(seg, "right lung (reference)")
    for k in metrics["labeled_slices"]:  # the kept "user" slices are the reference's, exactly
        assert np.array_equal(pred[..., k], ref[..., k])
    # the shipped starter weights are used, and they work (README: 0.931 / 0.921)
    assert metrics["weights"].startswith("UniverSeg-for-Slicer starter")
    assert metrics["dice"] > 0.9 and metrics["dice_hidden_slices"] > 0.9
    assert metrics["fill_between_slices_dice"] < metrics["dice"]  # Slicer's own baseline


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line_exit_2(case, capsys, tmp_path):
    d, _, _ = case
    out = tmp_path / "o.seg.nrrd"
    for command in (
        ["demo", "--out", str(tmp_path / "demo"), "--device", "cuda", "--quiet"],
        [
            "propagate",
            "--image",
            str(d / "image.nrrd"),
            "--labels",
            str(d / "labels.seg.nrrd"),
            "--out",
            str(out),
            "--device",
            "cuda",
            "--quiet",
        ],
    ):
        code, _, err = _run(command, capsys)
        lines = [x for x in err.strip().splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and "CUDA" in lines[0], err
    assert not out.exists()


def test_internal_errors_say_so_in_one_line_and_exit_1(case, capsys, tmp_path, monkeypatch):
    from UniverSegLogic.core import propagator

    def broken(self, *a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(propagator.Propagator, "propagate", broken)
    d, _, _ = case
    args = [
        "propagate",
        "--image",
        str(d / "image.nrrd"),
        "--labels",
        str(d / "labels.seg.nrrd"),
        "--out",
        str(tmp_path / "o.seg.nrrd"),
        "--device",
        "cpu",
        "--quiet",
    ]
    code, _, err = _run(args, capsys)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 1 and len(lines) == 1, err
    assert "internal error (ZeroDivisionError: a bug)" in lines[0] and "--debug" in lines[0]
    with pytest.raises(ZeroDivisionError):
        main(args + ["--debug"])


def test_help_imports_neither_torch_nor_the_research_code():
    code = (
        "import sys\n"
        "from UniverSegLogic.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'SimpleITK', 'vtk', 'slicer', 'matplotlib') if m in sys.modules]\n"
        "heavy += [m for m in sys.modules if m.startswith(('UniverSegResearch', 'UniverSegLogic.benchmark'))]\n"
        "print('HEAVY', heavy)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stdout, p.stdout
    assert "propagate" in p.stdout and "benchmark" in p.stdout


# ------------------------------------------------------------------- the same rules everywhere


def _labels(d, folder, name, segments):
    """A .seg.nrrd in ``folder`` of ``segments`` ((name, mask) pairs) on the case's image grid."""
    ref = read_image(str(d / "image.nrrd"))
    colors = [(0.9, 0.1, 0.1), (0.1, 0.2, 0.9), (0.2, 0.8, 0.2)]
    path = folder / f"{name}.seg.nrrd"
    write_segmentation(
        str(path),
        Segmentation(
            ref,
            [Segment(n, m, colors[i % 3], f"{n}_id", {}) for i, (n, m) in enumerate(segments)],
        ),
    )
    return path


def _propagate(d, labels, out, *extra, weights="starter"):
    return [
        "propagate",
        "--image",
        str(d / "image.nrrd"),
        "--labels",
        str(labels),
        "--out",
        str(out),
        "--weights",
        weights if weights == "starter" else str(d / weights),
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def _masks(path):
    seg = slicerio.read_segmentation(str(path))
    return seg, {
        s["name"]: slicerio.segment_mask(seg, s["name"]).transpose(2, 1, 0) > 0
        for s in seg["segments"]
    }


def test_axis_auto_is_the_axis_the_painted_slices_lie_on(case, capsys, tmp_path):
    d, ball, box = case
    painted = labeled_only(ball, 1, [5, 9, 13])  # coronal slices
    labels = _labels(d, tmp_path, "coronal", [("ball", painted)])
    out = tmp_path / "out.seg.nrrd"
    code, stdout, err = _run(_propagate(d, labels, out, weights="weights.pt"), capsys)
    assert code == 0, err
    assert "axis: coronal (array axis 1)" in stdout
    mask = _masks(out)[1]["ball"]
    for t in (5, 9, 13):
        assert np.array_equal(mask[:, t], ball[:, t])
    assert "predicted 1 slices" not in stdout and "predicted" in stdout


def test_segments_painted_on_two_axes_are_one_line_and_write_nothing(case, capsys, tmp_path):
    d, ball, box = case
    labels = _labels(
        d,
        tmp_path,
        "two",
        [("ball", labeled_only(ball, 0, [4, 7, 10])), ("box", labeled_only(box, 2, [3, 5]))],
    )
    out = tmp_path / "out.seg.nrrd"
    code, stdout, err = _run(_propagate(d, labels, out, weights="weights.pt"), capsys)
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "more than one axis" in err
    assert "'ball'" in err and "'box'" in err


def test_a_segment_without_labeled_slice_is_skipped_with_a_note(case, capsys, tmp_path):
    d, ball, box = case
    painted = labeled_only(ball, 0, [4, 7, 10])
    labels = _labels(d, tmp_path, "fresh", [("ball", painted), ("fresh", np.zeros_like(ball))])
    out = tmp_path / "out.seg.nrrd"
    code, stdout, err = _run(_propagate(d, labels, out, weights="weights.pt"), capsys)
    assert code == 0, err
    assert "note: fresh: no labeled slice along the axial axis: skipped" in err
    masks = _masks(out)[1]
    assert set(masks) == {"ball", "fresh"} and not masks["fresh"].any()
    empty = _labels(d, tmp_path, "empty", [("fresh", np.zeros_like(ball))])
    code, _, err = _run(_propagate(d, empty, tmp_path / "none.seg.nrrd"), capsys)
    assert code == 2 and "no labeled slice in any segment" in err and err.count("\n") == 1


def test_a_fully_labeled_run_is_written_back_bit_for_bit(case, capsys, tmp_path):
    d, ball, box = case
    labels = _labels(d, tmp_path, "full", [("ball", ball), ("box", labeled_only(box, 0, [3, 9]))])
    out = tmp_path / "out.seg.nrrd"
    code, stdout, err = _run(_propagate(d, labels, out), capsys)
    assert code == 0, err
    assert "ball: labeled slices" in stdout and "predicted 0 slices" in stdout
    assert np.array_equal(_masks(out)[1]["ball"], ball)


def test_predicted_segments_do_not_overlap_and_a_single_layer_stays_single(case, capsys, tmp_path):
    d, ball, box = case
    # two segments painted on different slices of one structure: both predict all of it
    first, second = labeled_only(ball, 0, [3, 11]), labeled_only(ball, 0, [7])
    labels = _labels(d, tmp_path, "halves", [("first", first), ("second", second)])
    assert slicerio.read_segmentation(str(labels))["voxels"].ndim == 3  # one layer in
    out = tmp_path / "out.seg.nrrd"
    code, stdout, err = _run(_propagate(d, labels, out), capsys)
    assert code == 0, err
    seg, masks = _masks(out)
    assert seg["voxels"].ndim == 3  # one layer out
    a, b = masks["first"], masks["second"]
    assert not (a & b).any() and a[[4, 5, 8, 9]].any()
    assert np.array_equal(a[[3, 11]], first[[3, 11]]) and np.array_equal(b[7], second[7])
    # a segment that is not propagated keeps every voxel: predictions never take them
    out2 = tmp_path / "first_only.seg.nrrd"
    code, _, err = _run(_propagate(d, labels, out2, "--segments", "first"), capsys)
    assert code == 0, err
    seg, masks = _masks(out2)
    assert seg["voxels"].ndim == 3
    assert np.array_equal(masks["second"], second) and not (masks["first"] & second).any()


def test_device_mps_is_accepted_and_refused_in_one_line_without_an_apple_gpu(
    case, capsys, tmp_path
):
    d, ball, box = case
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    args = _propagate(d, d / "labels.seg.nrrd", tmp_path / "o.seg.nrrd", weights="weights.pt")
    args[args.index("--device") + 1] = "mps"
    code, _, err = _run(args, capsys)
    assert code == 2 and "Apple GPU (MPS)" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", [None, "propagate", "demo", "cohort", "benchmark", "web"])
def test_help_texts_show_no_markup(command, capsys):
    with pytest.raises(SystemExit):
        main(([command] if command else []) + ["--help"])
    text = capsys.readouterr().out
    assert "usage: universeg-slicer" in text
    assert "``" not in text and ":func:" not in text and "universeg-slicer[" not in text


def test_the_precision_variable_works_with_both_values_and_the_flag_wins(
    case, capsys, tmp_path, monkeypatch
):
    """UNIVERSEG_CPU_BF16=0 and =1 both set what ``auto`` means, --precision overrides the
    variable; the precision that ran is printed, in --report and in the segments' tags."""
    d, ball, box = case
    runs = [
        ("0", (), "fp32", "UNIVERSEG_CPU_BF16=0"),
        ("1", (), "bf16", "UNIVERSEG_CPU_BF16=1"),
        ("1", ("--precision", "fp32"), "fp32", "requested"),
        ("0", ("--precision", "bf16"), "bf16", "requested"),
    ]
    masks = {}
    for n, (value, flag, precision, reason) in enumerate(runs):
        monkeypatch.setenv("UNIVERSEG_CPU_BF16", value)
        out, report = tmp_path / f"o{n}.seg.nrrd", tmp_path / f"r{n}.json"
        args = _propagate(
            d, d / "labels.seg.nrrd", out, "--report", str(report), *flag, weights="weights.pt"
        )
        code, stdout, err = _run(args, capsys)
        assert code == 0, err
        data = json.loads(report.read_text())
        assert data["precision"] == precision, (value, flag)
        assert data["precision_reason"].startswith(reason), data["precision_reason"]
        assert f"precision: {precision} (" in stdout
        seg = slicerio.read_segmentation(str(out))
        for s in seg["segments"]:
            assert s["tags"]["UniverSeg.Precision"] == precision
            assert s["tags"]["UniverSeg.Device"] == "cpu"
        masks.setdefault(precision, []).append(_masks(out)[1])
    # the variable and the flag asking for the same precision compute the same masks
    for same in masks.values():
        assert all(np.array_equal(same[0][k], same[1][k]) for k in same[0])
