"""The annotation loop at clinical scale, against Slicer's Fill between slices on the same painting.

``universeg-slicer benchmark --clinical [--json OUT]`` (``--quick``: a 40x64x64 variant that only
checks that everything runs).

The volume is built at run time from data we may use: slicerio's chest CT (``CTChest4.nrrd``,
128x128x34 at 3.05x3.05x10 mm, with ``Segmentation.seg.nrrd``; MIT) resampled onto a 512x512x400
grid over the same field of view (0.76x0.76x0.85 mm): the image linearly, plus seeded noise
(sigma 12 HU) so that neighbouring thin slices are not copies, stored as int16 like a CT; each
segment through its signed distance map (computed on the original grid, resampled linearly,
thresholded at 0), so that the shapes change smoothly from slice to slice.

For one structure (right lung) and for three at once (right lung, left lung, thoracic vertebral
column), each painted on 5 axial slices chosen as the evaluation chooses them
(:func:`~UniverSegLogic.core.slices.evaluation_slices`), it measures, each step in its own child
process (so that one step's memory never counts in another's):

* ``first_run_s``: a new :class:`~UniverSegLogic.core.propagator.Propagator` session
  (normalization, canvas) and its first propagation, default options (the engine and the one-time
  imports are loaded before, as in Slicer after the first run);
* ``rerun_after_one_edit_s``: the user corrects one predicted slice of the first segment (the
  middle of its middle gap, painted with the truth) and propagates again in the same session;
* ``write_seg_nrrd_s``: writing the result as a ``.seg.nrrd`` (:func:`core.io.write_segmentation`);
* ``peak_rss_mb``: the child process's peak resident memory during the first run (``VmHWM``,
  reset through ``/proc/self/clear_refs`` just before it; the engine, the volume and the painting
  are already resident), ``rss_before_mb`` what was resident before it, ``peak_rss_added_mb`` the
  difference; ``rerun_peak_rss_mb`` and ``write_peak_rss_mb`` the same for the later steps;
* ``fill_between_slices_s``: Slicer's Fill between slices (:mod:`core.fill_between`, the effect's
  crop and settings) on the same painting in another child process; for three segments one run on
  their merged labelmap (segment n = label n), as the effect does;
* ``first_run_vs_fbs``, ``rerun_vs_fbs``: the ratios of those times;
* ``dice``: per segment, Dice against the full mask of the first run, the re-run and Fill between
  slices.

``cli`` runs ``universeg-slicer propagate`` on the same painting from files (reading, propagation
and writing, imports included) and gives its wall time and peak memory. ``annotation_loop_256``
is the 256x256x200 annotation loop of the engine benchmark (:func:`.speed
.volume_propagation`), measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .rss import proc_status_kb, reset_rss_peak

Echo = Callable[[str], None]

#: (slices, rows, cols) of the clinical volume, and of the ``--quick`` variant.
CLINICAL_SHAPE = (400, 512, 512)
QUICK_SHAPE = (24, 48, 48)
#: The structure of the one-segment case, and the three of the three-segment case.
ONE_SEGMENT = ("right lung",)
THREE_SEGMENTS = ("right lung", "left lung", "thoracic vertebral column")
#: Painted slices per segment.
PAINTED = 5
#: Timed runs of the one-segment first run and of Fill between slices (medians; the masks of
#: all of them must be identical): a shared machine's load moves single runs a lot.
REPEATS = 5
#: Standard deviation of the noise added to the resampled image (HU).
NOISE_HU = 12.0
SOURCE = "slicerio CTChest4.nrrd + Segmentation.seg.nrrd (MIT), resampled"


# ------------------------------------------------------------------------------ the volume
def _sample_paths() -> Tuple[Path, Path]:
    import slicerio

    data = Path(slicerio.__file__).resolve().parent / "data"
    return data / "CTChest4.nrrd", data / "Segmentation.seg.nrrd"


def resampled_grid(ijk_to_ras: np.ndarray, shape_in, shape_out) -> np.ndarray:
    """IJK-to-RAS of a grid of ``shape_out`` (K, J, I) covering the same field of view (voxel
    edges) as a grid of ``shape_in`` with ``ijk_to_ras``."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    scale = np.asarray(shape_in[::-1], float) / np.asarray(shape_out[::-1], float)  # I, J, K
    out = np.eye(4)
    out[:3, :3] = m[:3, :3] * scale
    # the centre of voxel 0 moves by half a new voxel minus half an old one, inwards
    out[:3, 3] = m[:3, 3] + m[:3, :3] @ ((scale - 1.0) / 2.0)
    return out


def _resample(image, ijk_to_ras: np.ndarray, shape, default: float, pixel):
    """``image`` (SimpleITK) resampled linearly onto the grid (``ijk_to_ras``, KJI ``shape``)."""
    import SimpleITK as sitk

    from ..core.io import LPS_TO_RAS

    lps = LPS_TO_RAS @ ijk_to_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in shape[::-1]])
    f.SetOutputSpacing([float(s) for s in spacing])
    f.SetOutputDirection([float(v) for v in (lps[:3, :3] / spacing).reshape(-1)])
    f.SetOutputOrigin([float(v) for v in lps[:3, 3]])
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(float(default))
    f.SetOutputPixelType(pixel)
    return sitk.GetArrayFromImage(f.Execute(image))


def build_case(
    shape: Sequence[int] = CLINICAL_SHAPE, names: Sequence[str] = THREE_SEGMENTS, seed: int = 0
):
    """(Volume (int16, CT-like), {name: full boolean mask}) on a grid of ``shape`` (K, J, I)."""
    import SimpleITK as sitk

    from ..core.geometry import Volume
    from ..core.io import read_image, read_segmentation, volume_to_sitk

    image_path, seg_path = _sample_paths()
    src = read_image(str(image_path))
    seg = read_segmentation(str(seg_path), src)
    shape = tuple(int(s) for s in shape)
    grid = resampled_grid(src.ijk_to_ras, src.array.shape, shape)
    img = _resample(
        volume_to_sitk(Volume(src.array.astype(np.float32), src.ijk_to_ras)),
        grid,
        shape,
        float(src.array.min()),
        sitk.sitkFloat32,
    )
    rng = np.random.default_rng(seed)
    out = np.empty(shape, dtype=np.int16)
    step = 16
    for k in range(0, shape[0], step):
        noise = rng.normal(0.0, NOISE_HU, img[k : k + step].shape).astype(np.float32)
        np.rint(img[k : k + step] + noise, out=img[k : k + step])
        out[k : k + step] = np.clip(img[k : k + step], -32768, 32767)
    del img
    masks = {}
    for name in names:
        m = seg.get(name).mask.astype(np.uint8)
        sd = sitk.SignedMaurerDistanceMap(
            volume_to_sitk(Volume(m, src.ijk_to_ras)),
            insideIsPositive=False,
            squaredDistance=False,
            useImageSpacing=True,
        )
        masks[name] = _resample(sd, grid, shape, 1e3, sitk.sitkFloat32) < 0
    return Volume(out, grid), masks


def painting(mask: np.ndarray, k: int = PAINTED) -> Tuple[List[int], np.ndarray]:
    """(labeled slices, the painted mask): ``k`` axial slices spread over the structure as the
    evaluation spreads them, each painted with the truth."""
    from ..core.slices import evaluation_slices, slice_extent

    z0, z1 = slice_extent(mask, 0)
    labeled = evaluation_slices(z0, z1, k)
    painted = np.zeros_like(mask)
    painted[labeled] = mask[labeled]
    return labeled, painted


def edited_slice(labeled: Sequence[int]) -> int:
    """The slice the user corrects: the middle of the middle gap."""
    lab = sorted(labeled)
    mid = len(lab) // 2
    return int((lab[mid - 1] + lab[mid]) // 2) if len(lab) > 1 else int(lab[0]) + 1


# ------------------------------------------------------------------------------ memory
def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Peak:
    """Resident memory before a block and its peak during it (MiB; -1 where unreadable), its
    wall time and the CPU time of all of the process's threads during it."""

    def __enter__(self):
        self.ok = reset_rss_peak()
        self.before = proc_status_kb("VmRSS")
        self.cpu0 = _cpu_seconds()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = _cpu_seconds() - self.cpu0
        hwm = proc_status_kb("VmHWM") if self.ok else None
        self.peak_mb = hwm / 1024 if hwm is not None else -1.0
        self.before_mb = self.before / 1024 if self.before is not None else -1.0
        return False


# ------------------------------------------------------------------------------ child steps
def _digest(mask: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()


def _child_propagation(spec: Dict) -> Dict:
    """One case's session steps (runs in a child process)."""
    import torch

    from ..core.engines import EngineStore
    from ..core.geometry import Volume
    from ..core.io import Segment, Segmentation, write_segmentation
    from ..core.metrics import dice
    from ..core.propagator import PropagationOptions, Propagator, SegmentInput

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    work = Path(spec["work"])
    names = spec["segments"]
    options = PropagationOptions(axis="axial", device="cpu", precision=spec["precision"])
    loaded = EngineStore(echo=lambda m: None).get("starter", "cpu", precision=spec["precision"])
    engine = loaded.engine
    volume = Volume(np.load(work / "image.npy"), np.load(work / "ijk_to_ras.npy"))
    painted = {n: np.load(work / f"painted_{i}.npy") for i, n in enumerate(names)}
    # one-time imports (SimpleITK, Slicer's vtkITK) on a small copy: not timed
    small = Volume(volume.array[:, ::8, ::8].copy(), volume.ijk_to_ras @ np.diag([8, 8, 1, 1]))
    Propagator(small, options, engine=engine).propagate(
        [SegmentInput("w", "warm-up", painted[names[0]][:, ::8, ::8].copy())]
    )
    inputs = [SegmentInput(str(i), n, painted[n]) for i, n in enumerate(names)]
    runs, digests = [], []
    for _ in range(max(1, int(spec.get("repeats", 1)))):
        with _Peak() as first_peak:
            session = Propagator(volume, options, engine=engine)
            first = session.propagate(inputs)
        runs.append(first_peak)
        digests.append([_digest(seg.mask) for seg in first.segments])
        if len(runs) < int(spec.get("repeats", 1)):
            del session, first
    first_s = float(np.median([r.seconds for r in runs]))
    first_cpu = float(np.median([r.cpu_seconds for r in runs]))
    first_peak = max(runs, key=lambda r: r.peak_mb)
    edit = int(spec["edited_slice"])
    truth0 = np.load(work / "truth_0.npy", mmap_mode="r")
    edited_mask = painted[names[0]].copy()
    edited_mask[edit] = truth0[edit]
    del truth0
    edited = [SegmentInput("0", names[0], edited_mask)] + inputs[1:]
    first_masks = {s.key: np.packbits(s.mask) for s in first.segments}
    first_info = {
        "predicted_slices": {s.name: len(s.predicted_slices) for s in first.segments},
        "network_runs": first.network_runs,
    }
    del first
    with _Peak() as rerun_peak:
        rerun = session.propagate(edited)
    out_path = work / f"result_{len(names)}.seg.nrrd"
    with _Peak() as write_peak:
        write_segmentation(
            str(out_path),
            Segmentation(volume, [Segment(s.name, s.mask, id=s.key) for s in rerun.segments]),
        )
    size_mb = out_path.stat().st_size / 2**20
    out_path.unlink()
    scores = {}
    for i, n in enumerate(names):
        truth = np.load(work / f"truth_{i}.npy")
        shape = truth.shape
        first_mask = np.unpackbits(first_masks[str(i)])[: truth.size].reshape(shape).astype(bool)
        scores[n] = {
            "first_run": dice(first_mask, truth),
            "rerun": dice(rerun.get(str(i)).mask, truth),
        }
    return {
        "first_run_s": first_s,
        "first_run_cpu_s": first_cpu,
        "first_run_s_each": [r.seconds for r in runs],
        "repeats_identical": all(d == digests[0] for d in digests),
        "rerun_after_one_edit_s": rerun_peak.seconds,
        "rerun_cpu_s": rerun_peak.cpu_seconds,
        "write_seg_nrrd_s": write_peak.seconds,
        "seg_nrrd_mb": size_mb,
        "rss_before_mb": first_peak.before_mb,
        "peak_rss_mb": first_peak.peak_mb,
        "peak_rss_added_mb": first_peak.peak_mb - first_peak.before_mb,
        "rerun_peak_rss_mb": rerun_peak.peak_mb,
        "write_peak_rss_mb": write_peak.peak_mb,
        "dice": scores,
        "device": rerun.device,
        "precision": rerun.precision,
        "precision_reason": rerun.precision_reason,
        "threads": torch.get_num_threads(),
        **first_info,
        "network_runs": {
            "first": first_info["network_runs"],
            "rerun": rerun.network_runs,
            "rerun_reused": rerun.network_reused,
        },
    }


def _child_fill_between(spec: Dict) -> Dict:
    """Slicer's Fill between slices on the case's painting (runs in a child process)."""
    from ..core import fill_between
    from ..core.metrics import dice

    work = Path(spec["work"])
    names = spec["segments"]
    spacing = np.load(work / "spacing_kji.npy")
    painted = [np.load(work / f"painted_{i}.npy") for i in range(len(names))]
    labeled = [list(spec["labeled"][n]) for n in names]
    fill_between.interpolator_class()  # the import is not timed (Slicer has it loaded)
    times, cpus = [], []
    for _ in range(max(1, int(spec.get("repeats", 1)))):
        with _Peak() as peak:
            if len(names) == 1:
                results = [fill_between.fill_between_slices(painted[0], labeled[0], 0, spacing)]
            else:
                results = fill_between.fill_between_segments(painted, labeled, 0, spacing)
        times.append(peak.seconds)
        cpus.append(peak.cpu_seconds)
    scores = {
        n: dice(r, np.load(work / f"truth_{i}.npy")) for i, (n, r) in enumerate(zip(names, results))
    }
    return {
        "fill_between_slices_s": float(np.median(times)),
        "fill_between_slices_cpu_s": float(np.median(cpus)),
        "fill_between_slices_s_each": times,
        "peak_rss_mb": peak.peak_mb,
        "dice": scores,
    }


def _run_child(kind: str, spec: Dict, timeout: float = 3600) -> Dict:
    """Run one step in a fresh Python process; its JSON answer."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as fh:
        answer = fh.name
    try:
        cmd = [sys.executable, "-m", __name__, kind, json.dumps(spec), answer]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} step failed: {proc.stderr.strip()[-2000:]}")
        with open(answer, encoding="utf-8") as fh:
            return json.load(fh)
    finally:
        os.remove(answer)


def _run_cli(work: Path, names: Sequence[str], spec: Dict) -> Dict:
    """``universeg-slicer propagate`` on the case's files: wall time and peak memory."""
    cmd = [
        sys.executable,
        "-m",
        "UniverSegLogic",
        "propagate",
        "--image",
        str(work / "image.nrrd"),
        "--labels",
        str(work / "painted.seg.nrrd"),
        "--segments",
        ",".join(names),
        "--out",
        str(work / "cli_out.seg.nrrd"),
        "--precision",
        spec["precision"],
        "--quiet",
    ]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
        except BaseException:
            proc.kill()
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"propagate failed: {err.read().strip()[-2000:]}")
    peak = usage.ru_maxrss  # KiB on Linux
    return {
        "wall_s": wall,
        "peak_rss_mb": peak / 1024,
        "command": "universeg-slicer propagate --image image.nrrd --labels painted.seg.nrrd "
        f"--segments {','.join(names)!r} --out out.seg.nrrd --precision {spec['precision']}",
    }


# ------------------------------------------------------------------------------ the benchmark
def _save_case(work: Path, volume, masks: Dict[str, np.ndarray], names: Sequence[str]) -> Dict:
    """The case's arrays (and the files the command line reads) in ``work``; the painting."""
    from ..core.io import Segment, Segmentation, write_image, write_segmentation
    from ..core.io import volume_to_sitk as to_sitk

    np.save(work / "image.npy", volume.array)
    np.save(work / "ijk_to_ras.npy", volume.ijk_to_ras)
    np.save(work / "spacing_kji.npy", volume.spacing_kji)
    labeled = {}
    segments = []
    for i, n in enumerate(names):
        labeled[n], painted = painting(masks[n])
        np.save(work / f"painted_{i}.npy", painted)
        np.save(work / f"truth_{i}.npy", masks[n])
        segments.append(Segment(n, painted, id=f"segment_{i}"))
    write_image(str(work / "image.nrrd"), to_sitk(volume))
    write_segmentation(str(work / "painted.seg.nrrd"), Segmentation(volume, segments))
    return labeled


def _case(
    work: Path, names: Sequence[str], labeled: Dict, base: Dict, echo: Echo, repeats: int = 1
) -> Dict:
    spec = dict(base, segments=list(names), labeled={n: labeled[n] for n in names})
    spec["edited_slice"] = edited_slice(labeled[names[0]])
    spec["repeats"] = repeats
    prop = _run_child("propagation", spec)
    fbs = _run_child("fill_between", spec)
    out = {
        "segments": list(names),
        "labeled_slices": {n: labeled[n] for n in names},
        "edited_slice": spec["edited_slice"],
        **{k: v for k, v in prop.items() if k != "dice"},
        "fill_between_slices_s": fbs["fill_between_slices_s"],
        "fill_between_slices_cpu_s": fbs["fill_between_slices_cpu_s"],
        "fill_between_slices_s_each": fbs["fill_between_slices_s_each"],
        "fill_between_peak_rss_mb": fbs["peak_rss_mb"],
        "first_run_vs_fbs": prop["first_run_s"] / fbs["fill_between_slices_s"],
        "rerun_vs_fbs": prop["rerun_after_one_edit_s"] / fbs["fill_between_slices_s"],
        "first_run_vs_fbs_cpu": prop["first_run_cpu_s"] / fbs["fill_between_slices_cpu_s"],
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0,
        "dice": {n: {**prop["dice"][n], "fill_between_slices": fbs["dice"][n]} for n in names},
    }
    echo(
        f"  {len(names)} segment(s), median of {repeats}: first run {out['first_run_s']:.2f} s "
        f"({out['first_run_vs_fbs']:.2f}x FBS), re-run after one corrected slice "
        f"{out['rerun_after_one_edit_s']:.2f} s ({out['rerun_vs_fbs']:.2f}x FBS), Fill between "
        f"slices {out['fill_between_slices_s']:.2f} s; peak RSS {out['peak_rss_mb']:.0f} MiB "
        f"(+{out['peak_rss_added_mb']:.0f}); write .seg.nrrd {out['write_seg_nrrd_s']:.2f} s; "
        f"CPU time {out['first_run_vs_fbs_cpu']:.2f}x FBS's; {repeats} runs identical: "
        f"{out['repeats_identical']}; load average {out['load_average']:.1f}"
    )
    for n in names:
        d = out["dice"][n]
        echo(
            f"    {n}: Dice first run {d['first_run']:.4f}, re-run {d['rerun']:.4f}, "
            f"Fill between slices {d['fill_between_slices']:.4f}"
        )
    return out


def run_clinical(
    quick: bool = False,
    precision: str = "auto",
    threads: Optional[int] = None,
    shape: Optional[Sequence[int]] = None,
    loop_256: bool = True,
    cli: bool = True,
    repeats: Optional[int] = None,
    echo: Echo = print,
) -> Dict[str, object]:
    """The clinical-scale benchmark (see the module docstring); the JSON-able result."""
    import torch

    from ..core.engine import resolve_precision

    shape = tuple(shape or (QUICK_SHAPE if quick else CLINICAL_SHAPE))
    repeats = int(repeats or (2 if quick else REPEATS))
    if threads:
        torch.set_num_threads(int(threads))
    prec, why = resolve_precision(precision, "cpu")
    echo(
        f"clinical benchmark: {shape[2]}x{shape[1]}x{shape[0]} CT ({SOURCE}); cpu, {prec} "
        f"({why}), {torch.get_num_threads()} threads"
    )
    t0 = time.perf_counter()
    volume, masks = build_case(shape, THREE_SEGMENTS)
    build_s = time.perf_counter() - t0
    result: Dict[str, object] = {
        "kind": "clinical",
        "quick": quick,
        "device": "cpu",
        "cpu": _cpu_name(),
        "precision": prec,
        "precision_reason": why,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "volume": {
            "shape_kji": list(shape),
            "spacing_kji_mm": [round(float(s), 4) for s in volume.spacing_kji],
            "dtype": str(volume.array.dtype),
            "source": SOURCE,
            "build_s": build_s,
        },
    }
    with tempfile.TemporaryDirectory(prefix="universeg-clinical-") as tmp:
        work = Path(tmp)
        labeled = _save_case(work, volume, masks, THREE_SEGMENTS)
        del volume, masks
        base = {"work": str(work), "precision": precision, "threads": threads}
        result["cases"] = [
            _case(work, ONE_SEGMENT, labeled, base, echo, repeats),
            _case(work, THREE_SEGMENTS, labeled, base, echo, 1),
        ]
        if cli:
            result["cli"] = _run_cli(work, ONE_SEGMENT, base)
            echo(
                f"  command line, 1 segment (imports, reading, propagation, writing): "
                f"{result['cli']['wall_s']:.2f} s, peak RSS {result['cli']['peak_rss_mb']:.0f} MiB"
            )
    if loop_256:
        from ..core.engines import EngineStore
        from .speed import volume_propagation

        engine = EngineStore(echo=lambda m: None).get("starter", "cpu", precision=precision)
        loop = volume_propagation(engine.engine, (12, 48, 48) if quick else (200, 256, 256))
        result["annotation_loop_256"] = loop
        echo(
            f"  annotation loop {loop['shape'][2]}x{loop['shape'][1]}x{loop['shape'][0]}: first "
            f"run {loop['first_run_s']:.2f} s, re-run after one corrected slice "
            f"{loop['rerun_after_one_edit_s']:.2f} s (identical to a fresh run: "
            f"{loop['rerun_identical_to_fresh']}; Dice {loop['dice_vs_truth']:.4f})"
        )
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="ignore") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _child_main(argv: List[str]) -> int:
    from ..core.engines import torch_environment

    torch_environment()
    kind, spec, answer = argv[0], json.loads(argv[1]), argv[2]
    steps = {"propagation": _child_propagation, "fill_between": _child_fill_between}
    out = steps[kind](spec)
    with open(answer, "w", encoding="utf-8") as fh:
        json.dump(out, fh)
    return 0


if __name__ == "__main__":  # the child steps
    sys.exit(_child_main(sys.argv[1:]))
