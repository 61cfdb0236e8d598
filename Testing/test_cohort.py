"""``universeg-slicer cohort``: real files, the real model, a real Dask scheduler and workers.

The cohort is made of resampled, shifted, intensity-scaled copies of slicerio's chest CT
(:func:`UniverSegLogic.benchmark.synthetic.synthetic_cohort`); the reference is the scan itself. The Dask test
starts a scheduler and two workers as separate processes on 127.0.0.1, kills one worker while
the cohort runs, and compares every output with an in-process run.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from UniverSegLogic.benchmark.synthetic import sample_scan, synthetic_cohort
from UniverSegLogic.cli import main
from UniverSegLogic.cohort.align import align_reference, axis_profiles, register
from UniverSegLogic.cohort.case import qc_flag
from UniverSegLogic.cohort.montage import encode_png
from UniverSegLogic.core.io import read_image, read_segmentation, volume_to_sitk
from UniverSegLogic.core.metrics import dice
from UniverSegLogic.core.weights import sha256_of

SEGMENTS = "right lung,left lung,thoracic vertebral column"
COMMON = ["--segments", SEGMENTS, "--threads", "1", "--quiet"]
TIMEOUT_S = 240


def reference_args():
    s = sample_scan()
    return ["--reference", s["image"], s["segmentation"]]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four synthetic targets, and the outputs of an in-process run over them."""
    root = tmp_path_factory.mktemp("cohort")
    manifest = synthetic_cohort(str(root / "in"), 4, seed=7)
    out = root / "inprocess"
    rc = main(
        ["cohort", "--targets", manifest, *reference_args(), "--out", str(out)]
        + ["--scheduler", "inprocess", *COMMON]
    )
    assert rc == 0
    return {"root": root, "manifest": manifest, "out": out}


def outputs_of(folder):
    """{id: (masks by segment name, montage bytes, record segments)} of a cohort output folder."""
    found = {}
    for rec_path in sorted(glob.glob(os.path.join(str(folder), "copy*.json"))):
        with open(rec_path, encoding="utf-8") as fh:
            rec = json.load(fh)
        if rec["status"] != "ok":
            continue
        tid = rec["id"]
        seg_path = os.path.join(str(folder), f"{tid}.seg.nrrd")
        image = read_image(rec["details"]["image"])
        seg = read_segmentation(seg_path, image)
        with open(os.path.join(str(folder), f"{tid}.png"), "rb") as fh:
            png = fh.read()
        found[tid] = ({s.name: s.mask for s in seg.segments}, png, rec["segments"])
    return found


def assert_same_outputs(a, b):
    assert sorted(a) == sorted(b)
    for tid in a:
        masks_a, png_a, rows_a = a[tid]
        masks_b, png_b, rows_b = b[tid]
        assert sorted(masks_a) == sorted(masks_b)
        for name in masks_a:
            np.testing.assert_array_equal(masks_a[name], masks_b[name], err_msg=f"{tid} {name}")
        assert png_a == png_b, tid
        assert [r["volume_ml"] for r in rows_a] == [r["volume_ml"] for r in rows_b]


def read_summary(folder):
    with open(os.path.join(str(folder), "summary.csv"), encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------ outputs


def test_outputs_are_complete_and_on_the_target_grid(cohort):
    out = cohort["out"]
    rows = read_summary(out)
    assert [r["id"] for r in rows] == ["copy000", "copy001", "copy002", "copy003"]
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        tid = r["id"]
        image = read_image(os.path.join(str(cohort["root"]), "in", f"{tid}.nrrd"))
        seg = read_segmentation(str(out / f"{tid}.seg.nrrd"), image)  # refuses another grid
        truth = read_segmentation(str(cohort["root"] / "in" / "truth" / f"{tid}.seg.nrrd"), image)
        assert seg.names() == SEGMENTS.split(",")
        for name in ("right lung", "left lung"):
            assert dice(seg.get(name).mask, truth.get(name).mask) > 0.8, (tid, name)
        with open(out / f"{tid}.json", encoding="utf-8") as fh:
            rec = json.load(fh)
        assert rec["status"] == "ok" and len(rec["digest"]) == 64
        assert set(rec["details"]["timings"]) >= {"read", "align", "propagate", "write", "total"}
        assert rec["details"]["outputs"]["seg"]["sha256"] == sha256_of(str(out / f"{tid}.seg.nrrd"))
        for s in rec["segments"]:
            assert s["volume_ml"] > 0 and s["reference_ml"] > 0 and s["support_slices"]
        assert "volumes_ml" in r and "right lung=" in r["volumes_ml"]
        with open(out / f"{tid}.png", "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not glob.glob(str(out / ".partial-*"))


def test_rerun_recomputes_nothing_and_a_changed_target_only_itself(cohort, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cohort["out"], out)
    records = sorted(glob.glob(str(out / "*.json")))
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "copy*"))}
    args = ["cohort", "--targets", cohort["manifest"], *reference_args(), "--out", str(out)]
    assert main(args + ["--scheduler", "inprocess", *COMMON]) == 0
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    assert all(r["status"] == "skipped (up to date)" for r in read_summary(out))
    # a damaged output: that target (only) is recomputed
    with open(out / "copy002.seg.nrrd", "r+b") as fh:
        fh.truncate(100)
    assert main(args + ["--scheduler", "inprocess", *COMMON]) == 0
    status = {r["id"]: r["status"] for r in read_summary(out)}
    assert status.pop("copy002") == "ok"
    assert set(status.values()) == {"skipped (up to date)"}
    assert len(records) == 4


def test_a_corrupt_target_is_reported_and_the_others_finish(cohort, tmp_path, capsys):
    folder = tmp_path / "in"
    manifest = synthetic_cohort(str(folder), 3, seed=7, corrupt=[1])
    out = tmp_path / "out"
    rc = main(
        ["cohort", "--targets", manifest, *reference_args(), "--out", str(out)]
        + ["--scheduler", "inprocess", *COMMON]
    )
    assert rc == 3
    rows = {r["id"]: r for r in read_summary(out)}
    assert rows["copy001"]["status"] == "failed"
    assert "copy001.nrrd" in rows["copy001"]["reason"] and "\n" not in rows["copy001"]["reason"]
    assert rows["copy000"]["status"] == rows["copy002"]["status"] == "ok"
    assert not os.path.exists(out / "copy001.seg.nrrd")
    assert "copy001: failed" in capsys.readouterr().out
    # the two good targets are the same copies as in the main cohort (same seed): same result
    a, b = outputs_of(cohort["out"]), outputs_of(out)
    assert_same_outputs({k: a[k] for k in ("copy000", "copy002")}, b)


@pytest.mark.parametrize(
    "content, message",
    [
        ("name,image\nx,a.nrrd\n", "needs the columns id,image"),
        ("id,image\n", "lists no target"),
        ("id,image\na,x.nrrd\nA,y.nrrd\n", "listed twice"),
        ("id,image\n../up,x.nrrd\n", "must be letters"),
    ],
)
def test_a_bad_manifest_is_one_line_and_writes_nothing(tmp_path, capsys, content, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    rc = main(
        [
            "cohort",
            "--targets",
            str(manifest),
            *reference_args(),
            "--out",
            str(out),
            "--scheduler",
            "inprocess",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
    assert not os.path.exists(out / "summary.csv")


def test_without_dask_the_command_says_how_to_get_it(cohort, tmp_path):
    code = (
        "import sys; sys.modules['distributed'] = None\n"
        "from UniverSegLogic.cli import main\n"
        f"sys.exit(main({['cohort', '--targets', cohort['manifest'], *reference_args(), '--out', str(tmp_path / 'o'), '--workers', '1', '--quiet']!r}))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert p.returncode == 2, p.stderr
    assert "pip install 'universeg-slicer[cohort]'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ Dask


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, log):
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for_workers(address, n, timeout=120):
    from distributed import Client

    with Client(address, timeout=timeout) as client:
        client.wait_for_workers(n, timeout=timeout)
        return sorted(client.scheduler_info()["workers"])


def test_on_a_dask_cluster_a_killed_worker_loses_nothing(cohort, tmp_path):
    """Scheduler + two workers (separate processes, loopback only); one worker is killed while
    the cohort runs: every target still completes, identical to the in-process run."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = open(tmp_path / "cluster.log", "w")
    procs = []
    try:
        procs.append(
            start(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--no-dashboard",
                ],
                log,
            )
        )
        workers = [
            start(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    address,
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                    "--name",
                    f"w{i}",
                ],
                log,
            )
            for i in range(2)
        ]
        procs += workers
        assert len(wait_for_workers(address, 2)) == 2
        out = tmp_path / "out"
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "UniverSegLogic",
                "cohort",
                "--targets",
                cohort["manifest"],
                *reference_args(),
                "--out",
                str(out),
                "--scheduler",
                address,
                *COMMON,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + TIMEOUT_S
        while not glob.glob(str(out / "copy*.json")) and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()
            time.sleep(0.05)
        done_at_kill = len(glob.glob(str(out / "copy*.json")))
        assert run.poll() is None and done_at_kill < 4
        os.kill(workers[0].pid, signal.SIGKILL)  # mid-run: its task is lost with it
        stdout, stderr = run.communicate(timeout=TIMEOUT_S)
        assert run.returncode == 0, stderr
        assert "4 targets: 4 segmented" in stdout
        assert workers[0].wait(timeout=30) == -signal.SIGKILL
        assert_same_outputs(outputs_of(cohort["out"]), outputs_of(out))
        assert not glob.glob(str(out / ".partial-*"))
        assert all(r["status"] == "ok" for r in read_summary(out))
        # resumed on the cluster (one worker left): nothing is recomputed
        before = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "copy*"))}
        again = subprocess.run(
            [
                sys.executable,
                "-m",
                "UniverSegLogic",
                "cohort",
                "--targets",
                cohort["manifest"],
                *reference_args(),
                "--out",
                str(out),
                "--scheduler",
                address,
                *COMMON,
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert again.returncode == 0 and "0 segmented, 4 up to date" in again.stdout
        assert {p: os.stat(p).st_mtime_ns for p in before} == before
    finally:
        for p in procs:
            stop(p)
        log.close()


def test_local_cluster_matches_inprocess(cohort, tmp_path):
    out = tmp_path / "out"
    rc = main(
        [
            "cohort",
            "--targets",
            cohort["manifest"],
            *reference_args(),
            "--out",
            str(out),
            "--scheduler",
            "local",
            "--workers",
            "2",
            *COMMON,
        ]
    )
    assert rc == 0
    assert_same_outputs(outputs_of(cohort["out"]), outputs_of(out))


def test_unreachable_scheduler_is_one_line(cohort, tmp_path, capsys):
    rc = main(
        [
            "cohort",
            "--targets",
            cohort["manifest"],
            *reference_args(),
            "--out",
            str(tmp_path / "o"),
            "--scheduler",
            f"tcp://127.0.0.1:{free_port()}",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot reach the Dask scheduler" in err[0]


# ------------------------------------------------------------------------------ parts


def test_extent_alignment_recovers_a_shifted_resampled_copy(cohort):
    scan = sample_scan()
    ref = read_image(scan["image"])
    masks = {s.name: s.mask for s in read_segmentation(scan["segmentation"], ref).segments}
    target = read_image(os.path.join(str(cohort["root"]), "in", "copy001.nrrd"))
    truth = read_segmentation(str(cohort["root"] / "in" / "truth" / "copy001.seg.nrrd"), target)
    aligned = align_reference(ref, {"right lung": masks["right lung"]}, target, "extent")
    unaligned = align_reference(ref, {"right lung": masks["right lung"]}, target, "none")
    # "none" is exact here (the copy was made in physical space); extent must come close to it
    assert dice(unaligned.masks["right lung"], truth.get("right lung").mask) > 0.97
    assert dice(aligned.masks["right lung"], truth.get("right lung").mask) > 0.85
    assert aligned.image.array.shape == target.array.shape


def test_registration_is_reproducible(cohort):
    scan = sample_scan()
    ref = volume_to_sitk(read_image(scan["image"]))
    target = volume_to_sitk(read_image(os.path.join(str(cohort["root"]), "in", "copy002.nrrd")))
    a = register(ref, target, "affine").GetParameters()
    b = register(ref, target, "affine").GetParameters()
    # the same voxel sample each time (fixed nonzero seed): the same transform, up to the
    # summation order of ITK's threads (a clock-seeded sample moves it by far more than this)
    np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-6)
    positions, profile = axis_profiles(target)[2]
    assert np.all(np.diff(positions) > 0) and len(profile) == len(positions)


def test_qc_flags_and_png():
    assert qc_flag(0.0, 10.0) == "empty"
    assert qc_flag(10.0, 10.0) == ""
    assert "implausible" in qc_flag(40.0, 10.0) and "implausible" in qc_flag(2.0, 10.0)
    png = encode_png(np.zeros((3, 5, 3), np.uint8))
    assert png.startswith(b"\x89PNG") and png.endswith(b"IEND\xaeB`\x82")


def test_a_targets_painted_slices_are_used_and_kept(cohort, tmp_path):
    """A manifest row with labels: its painted slices are support and come back bit for bit; a
    row whose labels are on another grid fails with its reason, the others finish."""
    from UniverSegLogic.core.io import Segment, Segmentation, write_segmentation

    root = cohort["root"]
    image = read_image(str(root / "in" / "copy000.nrrd"))
    truth = read_segmentation(str(root / "in" / "truth" / "copy000.seg.nrrd"), image)
    lung = truth.get("right lung").mask
    rows = np.flatnonzero(lung.reshape(lung.shape[0], -1).any(1))
    keep = [int(rows[len(rows) // 3]), int(rows[2 * len(rows) // 3])]
    painted = np.zeros_like(lung)
    painted[keep] = lung[keep]
    write_segmentation(
        str(tmp_path / "painted.seg.nrrd"), Segmentation(image, [Segment("right lung", painted)])
    )
    other = read_image(str(root / "in" / "copy001.nrrd"))
    write_segmentation(
        str(tmp_path / "wrong_grid.seg.nrrd"),
        Segmentation(other, [Segment("right lung", np.zeros(other.array.shape, bool))]),
    )
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,image,labels\n"
        f"painted,{root / 'in' / 'copy000.nrrd'},painted.seg.nrrd\n"
        f"mismatch,{root / 'in' / 'copy002.nrrd'},wrong_grid.seg.nrrd\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    rc = main(
        [
            "cohort",
            "--targets",
            str(manifest),
            *reference_args(),
            "--out",
            str(out),
            "--segments",
            "right lung",
            "--scheduler",
            "inprocess",
            "--quiet",
        ]
    )
    assert rc == 3
    rows_csv = {r["id"]: r for r in read_summary(out)}
    assert rows_csv["mismatch"]["status"] == "failed" and rows_csv["mismatch"]["reason"]
    result = read_segmentation(str(out / "painted.seg.nrrd"), image).get("right lung").mask
    np.testing.assert_array_equal(result[keep], lung[keep])
    with open(out / "painted.json", encoding="utf-8") as fh:
        rec = json.load(fh)
    assert rec["segments"][0]["painted_slices"] == keep
    assert dice(result, lung) > 0.8


def test_an_output_that_is_an_input_is_refused_and_nothing_is_written(cohort, tmp_path, capsys):
    """Labels kept as <id>.seg.nrrd in the output folder would be replaced by the result."""
    import filecmp

    root = cohort["root"]
    image = read_image(str(root / "in" / "copy000.nrrd"))
    truth = str(root / "in" / "truth" / "copy000.seg.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    labels = out / "copy000.seg.nrrd"
    shutil.copyfile(truth, labels)
    (tmp_path / "m.csv").write_text(
        f"id,image,labels\ncopy000,{root / 'in' / 'copy000.nrrd'},out/copy000.seg.nrrd\n",
        encoding="utf-8",
    )
    rc = main(
        [
            "cohort",
            "--targets",
            str(tmp_path / "m.csv"),
            *reference_args(),
            "--out",
            str(out),
            "--segments",
            "right lung",
            "--scheduler",
            "inprocess",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "would be overwritten" in err[0]
    assert filecmp.cmp(truth, labels, shallow=False)
    assert sorted(os.listdir(out)) == ["copy000.seg.nrrd"]
    assert read_segmentation(str(labels), image).names() == read_segmentation(truth, image).names()
