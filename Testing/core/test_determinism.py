"""Same input, same options, same kind of CPU: the same masks in every process, whatever the
thread count and the load beside it, and every run says which device and precision ran.

Real files (slicerio's chest CT, right lung painted on 3 axial slices), the real starter weights,
the real command line in separate processes: one on one thread next to a busy process, one on two
threads, at the same time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import slicerio

from UniverSegLogic.core.io import (
    Segment,
    Segmentation,
    read_image,
    read_segmentation,
    write_segmentation,
)

DATA = Path(slicerio.__file__).resolve().parent / "data"
TIMEOUT_S = 300
HOG = "import time\nend = time.monotonic() + 240\nwhile time.monotonic() < end:\n    pass\n"


@pytest.fixture(scope="module")
def painted(tmp_path_factory):
    d = tmp_path_factory.mktemp("determinism")
    image = read_image(str(DATA / "CTChest4.nrrd"))
    lung = read_segmentation(str(DATA / "Segmentation.seg.nrrd"), image).get("right lung")
    user = np.zeros_like(lung.mask)
    user[[8, 16, 26]] = lung.mask[[8, 16, 26]]
    path = d / "painted.seg.nrrd"
    write_segmentation(
        str(path),
        Segmentation(image, [Segment(lung.name, user, lung.color, lung.id, dict(lung.fields))]),
    )
    return d, path, image


def _propagate(d, labels, name, threads, extra=(), env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("UNIVERSEG_CPU_BF16", None)
    env.update(env_extra or {})
    cmd = [
        sys.executable,
        "-m",
        "UniverSegLogic",
        "propagate",
        "--image",
        str(DATA / "CTChest4.nrrd"),
        "--labels",
        str(labels),
        "--out",
        str(d / f"{name}.seg.nrrd"),
        "--report",
        str(d / f"{name}.json"),
        "--quiet",
        *extra,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pair(d, labels, runs):
    """Start both runs at once, a busy process beside them; (stdout, report, mask, tags) each."""
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        procs = [_propagate(d, labels, *run) for run in runs]
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        hog.kill()
        hog.wait()
    results = []
    for (name, *_), p, (stdout, stderr) in zip(runs, procs, outs):
        assert p.returncode == 0, stderr
        report = json.loads((d / f"{name}.json").read_text())
        raw = slicerio.read_segmentation(str(d / f"{name}.seg.nrrd"))
        mask = slicerio.segment_mask(raw, raw["segments"][0])
        results.append((stdout, report, mask, raw["segments"][0].get("tags", {})))
    return results


def test_two_processes_at_different_thread_counts_give_the_same_masks(painted):
    d, labels, _ = painted
    runs = [("one_thread", 1), ("two_threads", 2)]
    (out1, rep1, mask1, tags1), (out2, rep2, mask2, tags2) = _pair(d, labels, runs)
    assert mask1.any() and np.array_equal(mask1, mask2)
    for out, rep, tags in ((out1, rep1, tags1), (out2, rep2, tags2)):
        # which device and precision ran: printed, in the report, in the file's segment tags
        assert rep["device"] == "cpu" and rep["precision"] in ("fp32", "bf16")
        assert rep["precision_reason"] and "ms" not in rep["precision_reason"]  # no timing
        assert f"precision: {rep['precision']}" in out
        assert tags["UniverSeg.Precision"] == rep["precision"]
        assert tags["UniverSeg.Device"] == "cpu"
    assert rep1["precision"] == rep2["precision"]
    assert rep1["segments"][0]["predicted_slices"] == rep2["segments"][0]["predicted_slices"]


def test_the_variable_and_the_option_both_give_bf16_and_agree_across_processes(painted):
    d, labels, _ = painted
    runs = [
        ("env_bf16", 1, (), {"UNIVERSEG_CPU_BF16": "1"}),
        ("option_bf16", 2, ("--precision", "bf16"), {"UNIVERSEG_CPU_BF16": "0"}),
    ]
    (_, rep_env, mask_env, _), (_, rep_opt, mask_opt, tags) = _pair(d, labels, runs)
    assert rep_env["precision"] == rep_opt["precision"] == "bf16"
    assert rep_env["precision_reason"] == "UNIVERSEG_CPU_BF16=1"
    assert rep_opt["precision_reason"].startswith("requested")  # the option wins over the variable
    assert tags["UniverSeg.Precision"] == "bf16"
    assert mask_env.any() and np.array_equal(mask_env, mask_opt)
