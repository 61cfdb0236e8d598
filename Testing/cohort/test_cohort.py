"""``universeg-slicer cohort``: real files, the real model, a real Dask scheduler and workers.

The cohort is made of resampled, shifted, intensity-scaled copies of slicerio's chest CT
(:func:`UniverSegLogic.benchmark.synthetic.synthetic_cohort`); the reference is the scan itself. The Dask test
starts a scheduler and two workers as separate processes on 127.0.0.1, kills one worker while
the cohort runs, and compares every output with an in-process run. Wrong scheduler addresses are
a closed port and :class:`FakeListener`, a test double of a server on 127.0.0.1 (it accepts and
never answers, or answers like a web server).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from UniverSegLogic.benchmark.synthetic import sample_scan, synthetic_cohort
from UniverSegLogic.cli import main
from UniverSegLogic.cohort.align import align_reference, axis_profiles, register
from UniverSegLogic.cohort.case import qc_flag
from UniverSegLogic.cohort.montage import encode_png
from UniverSegLogic.core.geometry import Volume
from UniverSegLogic.core.io import (
    Segment,
    Segmentation,
    read_image,
    read_segmentation,
    volume_to_sitk,
    write_image,
    write_segmentation,
)
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


def snapshot(folder):
    """{name: (bytes, mtime)} of every file in ``folder`` (hidden ones included)."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    }


def cohort_args(manifest, out, *extra):
    return ["cohort", "--targets", str(manifest), *reference_args(), "--out", str(out), *extra]


def one_target_manifest(cohort, path, tid="copy000"):
    path.write_text(f"id,image\n{tid},{cohort['root'] / 'in' / f'{tid}.nrrd'}\n", encoding="utf-8")
    return path


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
    assert "pip install '.[cohort]'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    # by default (no --workers), a cohort that a cluster would speed up runs in this process
    code = (
        "import sys; sys.modules['distributed'] = None\n"
        "from UniverSegLogic.cohort.scheduler import plan_run\n"
        "print(plan_run('auto', None, 0, 100, 'cpu'))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "scheduler='inprocess'" in p.stdout, p.stdout + p.stderr


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


def test_on_a_dask_cluster_a_killed_worker_loses_nothing(cohort, tmp_path, capsys, monkeypatch):
    """Scheduler + two workers (separate processes, loopback only); one worker is killed while
    the cohort runs: every target still completes, identical to the in-process run. Before the
    workers start, a run against the bare scheduler says it has no worker (after a bounded wait)
    and writes nothing."""
    from UniverSegLogic.cohort import scheduler

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
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:  # the scheduler listens
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        monkeypatch.setattr(scheduler, "WORKER_WAIT_S", 1.0)
        lonely = tmp_path / "lonely"
        assert main(cohort_args(cohort["manifest"], lonely, "--scheduler", address, *COMMON)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has no worker (none joined within 1 s)" in err[0], err
        assert not lonely.exists()
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
        out.mkdir()
        other = out / ".partial-0badcafe-big.seg.nrrd"  # another program's file being written
        other.write_bytes(b"in flight")
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
        assert glob.glob(str(out / ".partial-*")) == [str(other)]  # the killed worker's are gone
        assert other.read_bytes() == b"in flight"
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


class FakeListener:
    """Test double of a server at a scheduler address (127.0.0.1 only): accepts every connection
    and then never answers (``answer=None``) or answers ``answer`` and keeps the connection."""

    def __init__(self, answer=None):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.answer is not None:
                conn.sendall(self.answer)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.sock.close()
        for c in self.conns:
            c.close()
        self.thread.join(timeout=5)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("closed port", "cannot reach the Dask scheduler"),
        ("silent", "did not answer within"),
        ("web server", "is not a Dask scheduler"),
    ],
)
def test_a_wrong_scheduler_address_is_one_line_within_seconds(cohort, tmp_path, kind, message):
    """Nothing listening, a listener that never answers, one that answers like a web server: one
    line each, exit 2, within seconds (the probe's bound), and no output folder left behind."""
    answers = {"silent": None, "web server": b"HTTP/1.1 400 Bad Request\r\n\r\n"}
    out = tmp_path / "out"
    with contextlib.ExitStack() as stack:
        if kind == "closed port":
            address = f"tcp://127.0.0.1:{free_port()}"
        else:
            address = stack.enter_context(FakeListener(answers[kind])).address
        t0 = time.monotonic()
        p = subprocess.run(
            [sys.executable, "-m", "UniverSegLogic"]
            + cohort_args(cohort["manifest"], out, "--scheduler", address, "--quiet"),
            capture_output=True,
            text=True,
            timeout=90,
        )
        seconds = time.monotonic() - t0
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and message in err[0], p.stderr
    assert address in err[0]
    assert seconds < 30, f"{kind}: {seconds:.1f} s"  # process start included; the probe is 5 s
    assert not out.exists()


def test_the_default_scheduler_is_the_one_that_pays_off(cohort, tmp_path, capsys):
    """By default a run picks in-process or a local cluster from estimated costs (measured
    ratios, nothing timed), and says which and why; a few targets run in this process."""
    from UniverSegLogic.cohort.scheduler import choose_scheduler

    assert choose_scheduler(1, 2, 2, "cpu")[0] == "inprocess"
    assert choose_scheduler(3, 2, 2, "cpu")[0] == "inprocess"  # a cluster: 2 rounds on 2 workers
    assert choose_scheduler(20, 2, 2, "cpu")[0] == "local"
    assert choose_scheduler(20, 1, 1, "cpu") == ("inprocess", "one core")
    assert choose_scheduler(20, 16, 1, "cuda")[0] == "inprocess"
    assert choose_scheduler(0, 2, 2, "cpu") == ("inprocess", "nothing to segment")
    manifest = one_target_manifest(cohort, tmp_path / "m.csv", "copy003")
    out = tmp_path / "out"
    assert main(cohort_args(manifest, out, *COMMON)) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("1 targets:")][0]
    assert "in this process" in line and "a local cluster would take an estimated" in line, line
    # the result is the one every scheduler gives (the cluster tests compare the others)
    assert_same_outputs(
        {k: v for k, v in outputs_of(cohort["out"]).items() if k == "copy003"}, outputs_of(out)
    )


# ------------------------------------------------------------------------------ file safety


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--axis", "diagonal"], "--axis: unknown axis 'diagonal'"),
        (["--segments", "spleen"], "no segment named spleen"),
        (["--weights", "MISSING"], "not found"),
        (["--weights", "JUNK"], "corrupt or truncated"),
    ],
)
def test_a_bad_option_writes_nothing_and_keeps_earlier_results(
    cohort, tmp_path, capsys, bad, message
):
    """Checked before the first file is written: an earlier run's results stay byte for byte,
    and a new output folder is not created."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    swap = {"MISSING": str(tmp_path / "missing.pt"), "JUNK": str(junk)}
    bad = [swap.get(a, a) for a in bad]
    good = tmp_path / "good"
    shutil.copytree(cohort["out"], good)
    before = snapshot(good)
    fresh = tmp_path / "fresh"
    for out in (good, fresh):
        # the bad option comes after COMMON's: argparse keeps the last one
        rc = main(cohort_args(cohort["manifest"], out, "--scheduler", "inprocess", *COMMON, *bad))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], err
    assert snapshot(good) == before
    assert not fresh.exists()


@pytest.mark.parametrize("name", ["summary.csv", "copy000.json", "copy000.seg.nrrd", "copy000.png"])
def test_a_file_the_run_did_not_write_is_never_replaced(cohort, tmp_path, capsys, name):
    """The manifest saved where an output goes (``--targets OUT/summary.csv``, or as
    ``OUT/<id>.json``), or someone else's file at a target's output name: refused up front."""
    out = tmp_path / "out"
    out.mkdir()
    if name in ("summary.csv", "copy000.json"):
        manifest = one_target_manifest(cohort, out / name)
    else:
        manifest = one_target_manifest(cohort, tmp_path / "m.csv")
        (out / name).write_bytes(b"not written by a cohort run\n")
    before = snapshot(out)
    rc = main(cohort_args(manifest, out, "--scheduler", "inprocess", *COMMON))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "would be overwritten" in err[0], err
    assert snapshot(out) == before


def test_a_failed_target_keeps_its_earlier_good_result(cohort, tmp_path, capsys):
    """A target that fails now (its image got damaged) keeps the record and files of its earlier
    good run; the summary says it failed, and that the earlier result is kept."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(cohort["root"] / "in" / "copy000.nrrd", folder / "copy000.nrrd")
    manifest = folder / "m.csv"
    manifest.write_text("id,image\ncopy000,copy000.nrrd\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    for suffix in (".seg.nrrd", ".png", ".json"):
        shutil.copyfile(cohort["out"] / f"copy000{suffix}", out / f"copy000{suffix}")
    args = cohort_args(manifest, out, "--scheduler", "inprocess", *COMMON)
    assert main(args) == 0
    assert "0 segmented, 1 up to date" in capsys.readouterr().out
    before = snapshot(out)
    image = folder / "copy000.nrrd"
    with open(image, "r+b") as fh:
        fh.truncate(image.stat().st_size // 2)
    assert main(args) == 3
    after = snapshot(out)
    for suffix in (".seg.nrrd", ".png", ".json"):
        assert after[f"copy000{suffix}"] == before[f"copy000{suffix}"], suffix
    row = read_summary(out)[0]
    assert row["status"] == "failed" and "its earlier result is kept" in row["reason"]


def test_a_run_removes_only_its_own_temporary_files(tmp_path):
    """A run's temporary files carry its tag (core.atomic), and it removes only those: another
    program's file being written in the same folder stays (see also the killed-run and Dask
    tests, where a real run sweeps beside such a file)."""
    from UniverSegLogic.core import atomic

    other = tmp_path / ".partial-1a2b3c4d-big.seg.nrrd"  # core.atomic's name for another writer
    other.write_bytes(b"another program's result, being written")
    tag = atomic.new_owner_tag()
    with atomic.owner_tag(tag):
        mine = Path(atomic.temporary_name(str(tmp_path / "copy001.seg.nrrd")))
    assert mine.name.startswith(f".partial-{tag}-") and mine.name.endswith(".seg.nrrd")
    assert atomic.TEMPORARY_PREFIX + tag not in atomic.temporary_name(str(tmp_path / "x.png"))
    mine.write_bytes(b"left by a killed worker of this run")
    assert atomic.remove_temporaries(str(tmp_path), tag) == [str(mine)]
    assert not mine.exists()
    assert other.read_bytes() == b"another program's result, being written"
    with pytest.raises(ValueError):
        atomic.remove_temporaries(str(tmp_path), "*")


def test_a_killed_run_resumes(cohort, tmp_path):
    """SIGKILL as soon as the target's outputs are being written; the next run completes (a
    target's outputs are claimed by its record before they are written). Another program's
    temporary file in the folder survives both runs."""
    manifest = one_target_manifest(cohort, tmp_path / "m.csv", "copy002")
    out = tmp_path / "out"
    out.mkdir()
    other = out / ".partial-1a2b3c4d-big.seg.nrrd"  # core.atomic's name for another writer
    other.write_bytes(b"another program's result, being written")
    args = cohort_args(manifest, out, "--scheduler", "inprocess", *COMMON)
    run = subprocess.Popen([sys.executable, "-m", "UniverSegLogic", *args])
    deadline = time.monotonic() + TIMEOUT_S
    while not list(out.glob("copy002.*")) and time.monotonic() < deadline:
        assert run.poll() is None
        time.sleep(0.01)
    run.kill()
    run.wait(timeout=30)
    assert main(args) == 0
    assert [r["status"] for r in read_summary(out)] in (["ok"], ["skipped (up to date)"])
    assert other.read_bytes() == b"another program's result, being written"
    assert_same_outputs(
        {k: v for k, v in outputs_of(cohort["out"]).items() if k == "copy002"}, outputs_of(out)
    )


def test_nothing_is_labeled_outside_the_scanned_field_of_view(tmp_path, capsys):
    """A target whose field of view does not cover the reference's (its content shifted by 8
    slices and 12 columns, -1024 padding in their place): no voxel of the padding is labeled,
    and QC flags the structures that the alignment puts partly outside it. A reference that
    covers only part of a target: nothing is labeled beyond what it covers."""
    scan = sample_scan()
    ref = read_image(scan["image"])
    a = ref.array
    shifted = np.full_like(a, -1024)
    shifted[8:, :, 12:] = a[:-8, :, :-12]
    write_image(str(tmp_path / "shifted.nrrd"), volume_to_sitk(Volume(shifted, ref.ijk_to_ras)))
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image\nshifted,shifted.nrrd\n", encoding="utf-8")
    segments = "right lung,left lung,lumbar vertebral column,tissue,cervical vertebral column"
    args = ["--segments", segments, "--threads", "1", "--quiet", "--scheduler", "inprocess"]
    assert main(cohort_args(manifest, tmp_path / "out", *args)) == 0
    target = read_image(str(tmp_path / "shifted.nrrd"))
    seg = read_segmentation(str(tmp_path / "out" / "shifted.seg.nrrd"), target)
    labeled = np.zeros(a.shape, bool)
    for s in seg.segments:
        labeled |= s.mask
    assert labeled[8:, :, 12:].any()
    assert not labeled[:8].any() and not labeled[:, :, :12].any()
    with open(tmp_path / "out" / "shifted.json", encoding="utf-8") as fh:
        rec = {r["name"]: r for r in json.load(fh)["segments"]}
    # the lungs run to the scan's last slice: shifted by 8, their top is off the target's grid
    for name in ("right lung", "left lung"):
        assert "partly outside the target's scan" in rec[name]["qc"], rec[name]
        assert 0.05 < rec[name]["outside_share"] < 0.6
    assert "no support" in rec["cervical vertebral column"]["qc"]  # slices 26-33: all off
    assert "shifted: check right lung: partly outside" in capsys.readouterr().out

    # a reference of slices 10-25 only, in place (--align none): nothing beyond them
    crop = ref.ijk_to_ras.copy()
    crop[:3, 3] = ref.ijk_to_ras[:3, :3] @ [0, 0, 10] + ref.ijk_to_ras[:3, 3]
    part = Volume(a[10:26], crop)
    write_image(str(tmp_path / "part.nrrd"), volume_to_sitk(part))
    truth = read_segmentation(scan["segmentation"], ref)
    write_segmentation(
        str(tmp_path / "part.seg.nrrd"),
        Segmentation(part, [Segment(s.name, s.mask[10:26], s.color) for s in truth.segments]),
    )
    manifest.write_text(f"id,image\nwhole,{scan['image']}\n", encoding="utf-8")
    rc = main(
        ["cohort", "--targets", str(manifest), "--reference", str(tmp_path / "part.nrrd")]
        + [str(tmp_path / "part.seg.nrrd"), "--out", str(tmp_path / "out2"), "--align", "none"]
        + args
    )
    assert rc == 0
    seg = read_segmentation(str(tmp_path / "out2" / "whole.seg.nrrd"), ref)
    labeled = np.zeros(a.shape, bool)
    for s in seg.segments:
        labeled |= s.mask
    assert labeled[10:26].any() and not labeled[:10].any() and not labeled[26:].any()


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
    """A manifest row with labels: its painted slices are support and come back bit for bit, and
    so do its segments that are not predicted (one no reference has, one left out of
    --segments), marked target-only in the record; a row whose labels are on another grid fails
    with its reason, the others finish."""
    root = cohort["root"]
    image = read_image(str(root / "in" / "copy000.nrrd"))
    truth = read_segmentation(str(root / "in" / "truth" / "copy000.seg.nrrd"), image)
    lung = truth.get("right lung").mask
    rows = np.flatnonzero(lung.reshape(lung.shape[0], -1).any(1))
    keep = [int(rows[len(rows) // 3]), int(rows[2 * len(rows) // 3])]
    painted = np.zeros_like(lung)
    painted[keep] = lung[keep]
    tumor = np.zeros_like(lung)
    tumor[10:13, 40:47, 50:60] = True
    tumor[11, 44, 52] = False
    own = [
        Segment("right lung", painted),
        Segment("tumor", tumor, (0.1, 0.8, 0.2), "Segment_7", {"tags": {"Source": "me"}}),
        Segment("left lung", truth.get("left lung").mask, (0.2, 0.3, 0.9)),
    ]
    write_segmentation(str(tmp_path / "painted.seg.nrrd"), Segmentation(image, own))
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
    back = read_segmentation(str(out / "painted.seg.nrrd"), image)
    result = back.get("right lung").mask
    np.testing.assert_array_equal(result[keep], lung[keep])
    with open(out / "painted.json", encoding="utf-8") as fh:
        rec = json.load(fh)
    assert rec["segments"][0]["painted_slices"] == keep
    assert dice(result, lung) > 0.8
    assert back.names() == ["right lung", "tumor", "left lung"]
    for s in own[1:]:
        np.testing.assert_array_equal(back.get(s.name).mask, s.mask, err_msg=s.name)
        assert back.get(s.name).color == pytest.approx(s.color)
    assert back.get("tumor").id == "Segment_7"
    assert back.get("tumor").fields.get("tags") == {"Source": "me"}
    rows = {r["name"]: r for r in rec["segments"]}
    assert [n for n, r in rows.items() if r["target_only"]] == ["tumor", "left lung"]
    assert rows["tumor"]["painted_slices"] == [10, 11, 12] and not rows["tumor"]["qc"]


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
