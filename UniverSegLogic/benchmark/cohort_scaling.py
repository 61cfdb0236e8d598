"""How ``universeg-slicer cohort`` scales with Dask workers (``benchmark --cohort N``).

One run times the same synthetic cohort (:func:`synthetic.synthetic_cohort`: N resampled,
shifted, intensity-scaled copies of slicerio's chest CT, the scan itself as the reference) on a
local Dask cluster in several configurations, each from a fresh output folder and including the
cluster's start, and checks that every configuration wrote the same segmentations and montages.
"""

from __future__ import annotations

import glob
import os
import platform
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

#: (workers, PyTorch threads per worker) timed by default: one core per worker, then one
#: worker using every core (what ``--workers 1`` does by default).
DEFAULT_CONFIGS: Tuple[Tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2))


def _outputs(folder: str) -> Dict[str, Tuple[str, bytes]]:
    out = {}
    for seg_path in sorted(glob.glob(os.path.join(folder, "*.seg.nrrd"))):
        tid = os.path.basename(seg_path)[: -len(".seg.nrrd")]
        with open(os.path.join(folder, f"{tid}.png"), "rb") as fh:
            png = fh.read()
        out[tid] = seg_path, png
    return out


def _same(a_dir: str, b_dir: str, images: Dict[str, str]) -> bool:
    from ..core.io import read_image, read_segmentation

    a, b = _outputs(a_dir), _outputs(b_dir)
    if sorted(a) != sorted(b):
        return False
    for tid in a:
        if a[tid][1] != b[tid][1]:
            return False
        image = read_image(images[tid])
        sa, sb = read_segmentation(a[tid][0], image), read_segmentation(b[tid][0], image)
        if sa.names() != sb.names():
            return False
        if any(not np.array_equal(x.mask, y.mask) for x, y in zip(sa.segments, sb.segments)):
            return False
    return True


def run_cohort_scaling(
    count: int = 20,
    configs: Sequence[Tuple[int, int]] = DEFAULT_CONFIGS,
    folder: Optional[str] = None,
    segments: Optional[Sequence[str]] = None,
    seed: int = 20261202,
    echo=print,
) -> Dict[str, object]:
    """Time a cohort of ``count`` synthetic targets for each (workers, threads) configuration;
    returns the rows, the speed-up of each row over the first, and whether all outputs agree."""
    from ..cohort.case import CohortSettings
    from ..cohort.runner import run_cohort
    from ..core.engine import cpu_bf16_choice
    from .synthetic import sample_scan, synthetic_cohort

    tmp = None
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="universeg-cohort-bench-")
        folder = tmp.name
    try:
        manifest = synthetic_cohort(os.path.join(folder, "in"), count, seed=seed)
        images = {
            os.path.basename(p)[: -len(".nrrd")]: p
            for p in glob.glob(os.path.join(folder, "in", "copy*.nrrd"))
        }
        scan = sample_scan()
        use_bf16, why = cpu_bf16_choice()
        rows: List[Dict[str, object]] = []
        for workers, threads in configs:
            out = os.path.join(folder, f"out_w{workers}_t{threads}")
            settings = CohortSettings(
                segments=tuple(segments) if segments else None,
                device="cpu",
                threads=threads,
                cpu_bf16=use_bf16,
                cpu_bf16_reason=why,
            )
            t0 = time.perf_counter()
            summary = run_cohort(
                manifest,
                [(scan["image"], scan["segmentation"])],
                out,
                settings,
                scheduler="local",
                workers=workers,
            )
            wall = time.perf_counter() - t0
            ok = sum(r.status == "ok" for r in summary.records)
            per_case = [r.seconds for r in summary.records if r.status == "ok"]
            rows.append(
                {
                    "workers": workers,
                    "threads_per_worker": threads,
                    "wall_s": round(wall, 2),
                    "targets_ok": ok,
                    "mean_case_s": round(float(np.mean(per_case)), 2) if per_case else None,
                    "out": out,
                }
            )
            echo(
                f"workers {workers} x {threads} threads: {wall:.1f} s wall for {count} targets "
                f"({ok} ok, {rows[-1]['mean_case_s']} s per case on its worker)"
            )
        base = rows[0]
        for r in rows:
            r["speedup_vs_first"] = round(float(base["wall_s"]) / float(r["wall_s"]), 3)
            r["identical_to_first"] = _same(str(base["out"]), str(r["out"]), images)
        for r in rows:
            r.pop("out")
        return {
            "targets": count,
            "segments": list(segments) if segments else "all",
            "machine": f"{platform.processor() or platform.machine()}, "
            f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores",
            "cpu_bf16": [use_bf16, why],
            "rows": rows,
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
