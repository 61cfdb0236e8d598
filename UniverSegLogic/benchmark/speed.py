"""Speed and exactness benchmark: reference forward pass vs :class:`engine.InferenceEngine`.

Everything is measured in the same run so that ratios are meaningful on a noisy machine:

* slices/s and peak memory for the reference path and the engine at S=16 and S=64 (batches of
  targets), their ratio, achieved TFLOP/s (FLOPs counted as the official code executes them:
  667.6 GFLOP per 128x128 slice at S=64, 169.3 at S=16; also the FLOPs each path really runs)
  against the device's peak (datasheet for known GPUs, a measured GEMM otherwise);
* exactness of the engine against the fp32 reference on real labeled slices (slicerio's chest
  CT, or the same slices precomputed as an npz file, ``--sample``, where slicerio is missing),
  for the weights in use and for a variant whose output layer is scaled so probabilities vary;
* end-to-end time of ``pipeline.propagate`` for one segment through a synthetic 256x256x200
  volume from 5 labeled slices, with the engine.

Imports only torch/numpy at module level (the GPU machine has no SimpleITK/slicerio).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.engine import InferenceEngine, engine_flops, reference_flops, resolve_device
from ..core.model import UniverSeg
from .rss import proc_status_kb, reset_rss_peak

Echo = Callable[[str], None]
#: Segments of the sample used for the exactness check (all of them unless quick).
SAMPLE_SEGMENTS = (
    "right lung",
    "thoracic vertebral column",
    "ribs",
    "left lung",
    "tissue",
    "lumbar vertebral column",
    "cervical vertebral column",
)

#: Dense peak TFLOP/s from NVIDIA datasheets: (fp32 non-tensor, tf32 tensor, fp16/bf16 tensor).
GPU_PEAKS = {
    "H100 SXM": (67.0, 494.7, 989.4),
    "H100 NVL": (60.0, 417.5, 835.0),
    "H100 PCIe": (51.2, 378.0, 756.0),
    "H100": (67.0, 494.7, 989.4),
    "H200": (67.0, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0),
    "L40S": (91.6, 183.0, 362.0),
    "A10": (31.2, 62.5, 125.0),
    "T4": (8.1, 8.1, 65.0),
}


# --------------------------------------------------------------------------- model / weights
def benchmark_model(seed: int = 0) -> Tuple[UniverSeg, str]:
    """The starter weights when present, else a fixed-seed random network (and which)."""
    try:
        from ..core.weights import build_model, load_weights, starter_path

        starter_path()
        w = load_weights("starter")
        return build_model(w), "starter weights"
    except Exception:  # noqa: BLE001 - missing file or missing optional dependency
        torch.manual_seed(seed)
        return (
            UniverSeg().eval(),
            f"random weights (torch.manual_seed({seed}); starter weights absent)",
        )


# --------------------------------------------------------------------------- memory probes
class PeakMemory:
    """Peak memory added while the block runs (MiB): CUDA allocator or process RSS (Linux)."""

    def __init__(self, device: str):
        self.device = device
        self.mb = -1.0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._ok = reset_rss_peak()
            self._base = proc_status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._ok and self._base is not None:
            hwm = proc_status_kb("VmHWM")
            if hwm is not None:
                self.mb = max(0.0, (hwm - self._base) / 1024)
        return False


# --------------------------------------------------------------------------- peaks
def device_peak(device: str) -> Dict[str, object]:
    """Peak TFLOP/s of the device: datasheet (known GPUs) and a measured large GEMM."""
    info: Dict[str, object] = {}
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        info["name"] = name
        for key, peaks in GPU_PEAKS.items():
            if key.replace(" ", "").lower() in name.replace(" ", "").lower():
                info.update(
                    datasheet=key,
                    fp32=peaks[0],
                    tf32=peaks[1],
                    fp16=peaks[2],
                    source=f"NVIDIA {key} datasheet, dense",
                )
                break
        n = 8192
        for dt, label in (
            (torch.float16, "measured_fp16_gemm"),
            (torch.float32, "measured_fp32_gemm"),
        ):
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            torch.matmul(a, b)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                torch.matmul(a, b)
            torch.cuda.synchronize()
            info[label] = 5 * 2 * n**3 / (time.perf_counter() - t0) / 1e12
            del a, b
    else:
        info["name"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
        n = 2048
        for dt, label in (
            (torch.float32, "measured_fp32_gemm"),
            (torch.bfloat16, "measured_bf16_gemm"),
        ):
            a = torch.randn(n, n, dtype=dt)
            b = torch.randn(n, n, dtype=dt)
            torch.matmul(a, b)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                torch.matmul(a, b)
                best = min(best, time.perf_counter() - t0)
            info[label] = 2 * n**3 / best / 1e12
        info["source"] = "measured: best of 5 torch.matmul 2048^2 in this run"
    return info


def _peak_for(info: Dict[str, object], device: str, precision: str, path: str) -> float:
    if device.startswith("cuda"):
        if path == "engine" and precision in ("fp16", "bf16"):
            return float(info.get("fp16") or info.get("measured_fp16_gemm") or 0.0)
        return float(info.get("fp32") or info.get("measured_fp32_gemm") or 0.0)
    if path == "engine" and precision == "bf16":
        return float(info.get("measured_bf16_gemm") or 0.0)
    return float(info.get("measured_fp32_gemm") or 0.0)


# --------------------------------------------------------------------------- sample data
def _sample_from_slicerio(size: int = 128) -> Optional[Dict[str, object]]:
    try:
        import nrrd  # pynrrd
        import slicerio  # noqa: F401
    except Exception:  # noqa: BLE001
        return None
    import slicerio

    from ..core.canvas import intensity_window, scale_intensity

    d = Path(slicerio.__file__).resolve().parent / "data"
    img, _ = nrrd.read(str(d / "CTChest4.nrrd"))
    seg = slicerio.read_segmentation(str(d / "Segmentation.seg.nrrd"))
    if seg["voxels"].shape != img.shape:
        return None
    images = scale_intensity(img, intensity_window(img)).transpose(2, 1, 0)  # (k, j, i)
    labels = np.asarray(seg["voxels"]).transpose(2, 1, 0)
    names = {s["name"]: int(s["labelValue"]) for s in seg["segments"]}
    return {
        "images": np.round(images * 255).astype(np.uint8),
        "labels": labels.astype(np.uint8),
        "names": names,
        "source": "slicerio CTChest4.nrrd + Segmentation.seg.nrrd (MIT)",
    }


def load_sample(path: Optional[str] = None) -> Tuple[Optional[Dict[str, object]], str]:
    """Sample slices: the npz file ``path`` (made here from slicerio's chest CT, for machines
    without slicerio: ``docs/results/benchmarks/chest_ct_slices.npz``), else slicerio's data,
    else None (and a note)."""
    if path:
        z = np.load(path)
        names = {str(n): int(v) for n, v in zip(z["names"], z["values"])}
        return (
            {"images": z["images"], "labels": z["labels"], "names": names},
            f"{Path(path).name} (precomputed from slicerio's chest CT, MIT)",
        )
    s = _sample_from_slicerio()
    if s is not None:
        return s, str(s["source"])
    return None, "sample data unavailable (no slicerio and no --sample file): synthetic slices"


def _synthetic_sample(n: int = 24, size: int = 128, seed: int = 0) -> Dict[str, object]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images, labels = [], []
    for k in range(n):
        cy, cx, r = (
            0.5 + 0.1 * np.sin(k / 4),
            0.5 + 0.1 * np.cos(k / 5),
            0.15 + 0.1 * np.sin(k / 7) ** 2,
        )
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        img = 0.3 + 0.4 * blob + 0.1 * rng.standard_normal((size, size))
        images.append(np.clip(img, 0, 1))
        labels.append(blob.astype(np.uint8))
    return {
        "images": np.round(np.array(images) * 255).astype(np.uint8),
        "labels": np.array(labels),
        "names": {"blob": 1},
    }


def sample_cases(
    sample: Dict[str, object],
    support: int,
    max_targets: int,
    segments: Sequence[str],
    size: int = 128,
) -> List[Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(segment, targets, support images, support labels) on a size x size canvas."""
    images = torch.from_numpy(np.asarray(sample["images"], dtype=np.float32) / 255.0)
    labels = np.asarray(sample["labels"])
    n = images.shape[0]
    out = []
    for name in segments:
        if name not in sample["names"]:
            continue
        mask = labels == sample["names"][name]
        present = np.flatnonzero(mask.reshape(n, -1).any(axis=1))
        if len(present) < 2:
            continue
        sup = np.unique(
            present[
                np.linspace(0, len(present) - 1, min(support, len(present))).round().astype(int)
            ]
        )
        rest = [i for i in range(n) if i not in set(sup.tolist())]
        pick = np.linspace(0, len(rest) - 1, min(max_targets, len(rest))).round().astype(int)
        tg = sorted({rest[i] for i in pick})
        lab = torch.from_numpy(mask.astype(np.float32))

        def canvas(x: torch.Tensor) -> torch.Tensor:
            x = x.unsqueeze(1)
            if x.shape[-1] != size:
                x = torch.nn.functional.interpolate(
                    x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
                )
            return x.contiguous()

        out.append((name, canvas(images[tg]), canvas(images[sup]), canvas(lab[sup]).clamp(0, 1)))
    return out


def exactness(
    model: UniverSeg,
    engine_kwargs: Dict[str, object],
    device: str,
    cases,
    scale_to_std: Optional[float] = None,
) -> Dict[str, float]:
    """Engine vs the fp32 reference (TF32 off) on ``cases``: prob/logit differences, masks.

    ``scale_to_std``: also run a copy of the model whose output layer is rescaled so the
    reference logits have that standard deviation and zero mean (probabilities then vary)."""
    ref = InferenceEngine(model, device, mode="reference")
    tf32 = None
    if device.startswith("cuda"):
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
    try:
        ref_logits = [ref.logits(t, si, sl) for _, t, si, sl in cases]
    finally:
        if tf32 is not None:
            torch.backends.cudnn.allow_tf32 = tf32
    used = model
    if scale_to_std:
        allz = torch.cat([z.flatten() for z in ref_logits])
        k = float(scale_to_std / max(float(allz.std()), 1e-6))
        mu = float(allz.mean())
        import copy

        used = copy.deepcopy(model)
        with torch.no_grad():
            used.out_conv.conv.weight.mul_(k)
            used.out_conv.conv.bias.mul_(k).sub_(k * mu)
        # the output layer is affine: the scaled reference is k * (z - mean) (exact up to rounding)
        ref_logits = [k * (z - mu) for z in ref_logits]
    eng = InferenceEngine(used, device, **engine_kwargs)
    dp, dl, agree, n = [], 0.0, 0, 0
    maxdp = 0.0
    for (_, t, si, sl), zr in zip(cases, ref_logits):
        ze = eng.logits(t, si, sl)
        pr, pe = torch.sigmoid(zr.double()), torch.sigmoid(ze.double())
        d = (pe - pr).abs()
        dp.append(float(d.sum()))
        maxdp = max(maxdp, float(d.max()))
        dl = max(dl, float((ze - zr).abs().max()))
        agree += int(((pe > 0.5) == (pr > 0.5)).sum())
        n += d.numel()
    return {
        "mean_abs_prob_diff": sum(dp) / max(1, n),
        "max_abs_prob_diff": maxdp,
        "max_abs_logit_diff": dl,
        "mask_agreement": agree / max(1, n),
        "pixels": n,
        "logit_std": float(torch.cat([z.flatten() for z in ref_logits]).std()),
        "logit_mean": float(torch.cat([z.flatten() for z in ref_logits]).mean()),
        "engine": eng.describe(),
    }


# --------------------------------------------------------------------------- speed
def time_path(
    engine: InferenceEngine, support: int, batch: int, size: int, repeats: int, seed: int = 0
) -> Tuple[float, float]:
    """(slices/s, peak MiB) for ``batch`` targets with ``support`` items (best of repeats)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, 1, size, size, generator=g)
    si = torch.rand(support, 1, size, size, generator=g)
    sl = (torch.rand(support, 1, size, size, generator=g) > 0.5).float()
    engine.logits(t[:1], si, sl)  # warm-up (kernels, caches, support features)
    best = float("inf")
    peak = -1.0
    for _ in range(max(1, repeats)):
        if hasattr(engine, "clear_support_cache"):
            engine.clear_support_cache()  # time the per-support-set work too
        with PeakMemory(engine.device) as pm:
            t0 = time.perf_counter()
            engine.logits(t, si, sl)
            best = min(best, time.perf_counter() - t0)
        peak = max(peak, pm.mb)
    return batch / best, peak


# --------------------------------------------------------------------------- volume
def synthetic_volume(shape: Tuple[int, int, int], seed: int = 0):
    """A (K, J, I) volume with one ellipsoid-like structure and its mask."""
    rng = np.random.default_rng(seed)
    k, j, i = shape
    zz, yy, xx = np.meshgrid(
        np.linspace(-1, 1, k), np.linspace(-1, 1, j), np.linspace(-1, 1, i), indexing="ij"
    )
    shift = 0.15 * np.sin(3 * zz)
    mask = ((xx - shift) / 0.45) ** 2 + (yy / 0.35) ** 2 + (zz / 0.8) ** 2 < 1
    img = (100 + 300 * mask + 40 * rng.standard_normal(shape)).astype(np.float32)
    return img, mask


def volume_propagation(
    engine: InferenceEngine, shape: Tuple[int, int, int], labeled: int = 5, seed: int = 0
) -> Dict[str, object]:
    """The annotation loop on a synthetic volume, one segment painted on ``labeled`` slices:

    * ``first_run_s``: a new :class:`Propagator` session (normalization, canvas) + its first
      propagation;
    * ``rerun_after_one_edit_s``: the user corrects one predicted slice (the middle of the
      middle gap, painted with the truth) and propagates again in the same session;
    * ``fresh_after_edit_s`` and ``rerun_identical_to_fresh``: a new session on the edited
      painting, whose masks the re-run must reproduce exactly.
    """
    from ..core.geometry import Volume
    from ..core.metrics import dice
    from ..core.propagator import PropagationOptions, Propagator, SegmentInput
    from ..core.slices import nonempty_slices

    img, mask = synthetic_volume(shape, seed)
    present = np.array(nonempty_slices(mask, 0))
    picks = present[np.linspace(0, len(present) - 1, labeled + 2).round().astype(int)[1:-1]]
    painted = np.zeros_like(mask)
    painted[picks] = mask[picks]
    mid = len(picks) // 2
    edit = int((picks[mid - 1] + picks[mid]) // 2) if len(picks) > 1 else int(picks[0]) + 1
    edited = painted.copy()
    edited[edit] = mask[edit]
    volume = Volume(img, np.diag([1.0, 1.0, 1.0, 1.0]))
    note = "default options"
    opts = PropagationOptions(axis=0, device=engine.device)
    try:
        import SimpleITK  # noqa: F401

        from ..core import prior  # noqa: F401  (the shape prior needs SimpleITK)
    except ModuleNotFoundError as exc:  # e.g. the GPU machine
        note = f"use_prior=False ({exc.name} missing)"
        opts = PropagationOptions(axis=0, device=engine.device, use_prior=False)

    # warm-up on a small copy: one-time imports (SimpleITK, Slicer's vtkITK) are not timed
    warm = Volume(img[:, ::8, ::8].copy(), np.diag([8.0, 8.0, 1.0, 1.0]))
    Propagator(warm, opts, engine=engine).propagate(
        [SegmentInput("w", "warm-up", painted[:, ::8, ::8].copy())]
    )
    t0 = time.perf_counter()
    session = Propagator(volume, opts, engine=engine)
    first = session.propagate([SegmentInput("s", "structure", painted)])
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rerun = session.propagate([SegmentInput("s", "structure", edited)])
    rerun_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh = Propagator(volume, opts, engine=engine).propagate(
        [SegmentInput("s", "structure", edited)]
    )
    fresh_s = time.perf_counter() - t0
    seg = first.segments[0]
    return {
        "shape": list(shape),
        "seconds": first_s,
        "first_run_s": first_s,
        "rerun_after_one_edit_s": rerun_s,
        "rerun_ratio": rerun_s / first_s,
        "fresh_after_edit_s": fresh_s,
        "rerun_identical_to_fresh": bool(
            np.array_equal(rerun.segments[0].mask, fresh.segments[0].mask)
        ),
        "edited_slice": edit,
        "network_runs": {
            "first": first.network_runs,
            "rerun": rerun.network_runs,
            "rerun_reused": rerun.network_reused,
            "fresh": fresh.network_runs,
        },
        "predicted_slices": len(seg.predicted_slices),
        "labeled_slices": [int(p) for p in picks],
        "dice_vs_truth": dice(seg.mask, mask),
        "options": note,
    }


# --------------------------------------------------------------------------- main
def run_benchmark(
    device: str = "auto",
    quick: bool = False,
    precision: str = "auto",
    repeats: Optional[int] = None,
    volume_shapes: Optional[Sequence[Tuple[int, int, int]]] = None,
    supports: Optional[Sequence[int]] = None,
    batch: Optional[int] = None,
    ref_batch: Optional[int] = None,
    compile: bool = False,
    sample_path: Optional[str] = None,
    echo: Echo = print,
) -> Dict[str, object]:
    device = resolve_device(device)
    is_cuda = device.startswith("cuda")
    model, weights_desc = benchmark_model()
    size = 32 if quick else 128
    supports = list(supports or ((2, 4) if quick else (16, 64)))
    repeats = repeats or (1 if quick else (3 if is_cuda else 2))
    ekw = {"precision": precision, "compile": compile}
    engine = InferenceEngine(model, device, **ekw)
    reference = InferenceEngine(model, device, mode="reference")
    echo(f"device: {device}; weights: {weights_desc}")
    echo(f"engine: {engine.describe()}")
    peak = device_peak(device) if not quick else {"source": "skipped (--quick)"}
    echo(f"peak: {json.dumps(peak)}")

    rows: List[Dict[str, object]] = []
    for s in supports:
        if quick:
            b_eng = b_ref = batch or 2
        elif is_cuda:
            b_eng = batch or 64
            b_ref = ref_batch or min(b_eng, reference.max_batch(s))
        else:
            b_eng = batch or 16
            b_ref = ref_batch or 2
        pair = {}
        for path, eng, b in (("reference", reference, b_ref), ("engine", engine, b_eng)):
            sps, mem = time_path(eng, s, b, size, repeats)
            fl_ref = reference_flops(s, size, size, official=True)
            fl_exec = fl_ref if path == "reference" else engine_flops(s, b, size, size)
            pk = _peak_for(peak, device, eng.precision, path) if not quick else 0.0
            row = {
                "path": path,
                "S": int(s),
                "batch": int(b),
                "slices_per_s": float(sps),
                "peak_mem_mb": float(mem),
                "precision": eng.precision,
                "gflop_per_slice_official": fl_ref / 1e9,
                "gflop_per_slice_executed": fl_exec / 1e9,
                "tflops_effective": fl_ref * sps / 1e12,
                "tflops_executed": fl_exec * sps / 1e12,
                "peak_tflops": pk,
                "estimated_mem_mb": eng.bytes_per_target(s, size, size) * b / 2**20,
            }
            rows.append(row)
            pair[path] = sps
            echo(f"  {path:9s} S={s:3d} batch={b:3d}: {sps:8.3f} slices/s, peak {mem:8.1f} MiB")
        echo(f"  ratio engine/reference at S={s}: {pair['engine'] / pair['reference']:.2f}x")

    # exactness on the sample data
    sample, sample_note = load_sample(sample_path)
    if sample is None:
        sample = _synthetic_sample(size=128)
    segs = SAMPLE_SEGMENTS[:2] if quick else (SAMPLE_SEGMENTS if is_cuda else SAMPLE_SEGMENTS[:3])
    cases = sample_cases(
        sample,
        support=2 if quick else 8,
        max_targets=2 if quick else (24 if is_cuda else 6),
        segments=segs if set(segs) & set(sample["names"]) else list(sample["names"]),
        size=size,
    )
    variants = [("weights in use", model, None)]
    if not weights_desc.startswith("random"):
        torch.manual_seed(0)
        variants.append(("random weights (seed 0)", UniverSeg().eval(), None))
    torch.manual_seed(0)
    variants.append(
        ("random weights (seed 0), output scaled to logit std 3", UniverSeg().eval(), 3.0)
    )
    checks = {}
    for label, m, scale in variants:
        checks[label] = exactness(m, ekw, device, cases, scale_to_std=scale)
    worst = {
        "mean_abs_prob_diff": max(e["mean_abs_prob_diff"] for e in checks.values()),
        "max_abs_prob_diff": max(e["max_abs_prob_diff"] for e in checks.values()),
        "max_abs_logit_diff": max(e["max_abs_logit_diff"] for e in checks.values()),
        "mask_agreement": min(e["mask_agreement"] for e in checks.values()),
    }
    n_px = next(iter(checks.values()))["pixels"]
    echo(
        f"exactness vs fp32 reference ({sample_note}; {len(cases)} segments, {n_px} pixels, "
        f"S={cases[0][2].shape[0] if cases else 0}):"
    )
    for label, e in checks.items():
        echo(
            f"  {label}: mean|dp| {e['mean_abs_prob_diff']:.2e}, max|dp| {e['max_abs_prob_diff']:.2e}, "
            f"max|dlogit| {e['max_abs_logit_diff']:.2e}, masks agree {e['mask_agreement'] * 100:.4f}% "
            f"(reference logits mean {e['logit_mean']:.2f}, std {e['logit_std']:.2f})"
        )

    # end-to-end propagation
    if volume_shapes is None:
        # quick: big enough that the edited painting still has gaps (adjacent labeled slices
        # without a gap are a fully labeled structure: nothing would be predicted)
        volume_shapes = [(20, 48, 48)] if quick else [(200, 256, 256)]
    volumes = []
    for shp in volume_shapes:
        try:
            v = volume_propagation(engine, tuple(int(x) for x in shp))
        except Exception as exc:  # noqa: BLE001 - report, keep the other results
            v = {"shape": list(shp), "seconds": -1.0, "error": f"{type(exc).__name__}: {exc}"}
            echo(f"propagation {shp}: FAILED {v['error']}")
            volumes.append(v)
            continue
        volumes.append(v)
        echo(
            f"annotation loop {shp[2]}x{shp[1]}x{shp[0]}: first run {v['first_run_s']:.2f} s, re-run "
            f"after one corrected slice {v['rerun_after_one_edit_s']:.2f} s "
            f"({v['rerun_ratio']:.2f}x; identical to a fresh run: {v['rerun_identical_to_fresh']})"
        )
        echo(
            f"propagation {shp[2]}x{shp[1]}x{shp[0]} (I x J x K), {v['predicted_slices']} slices predicted "
            f"from 5 labeled: {v['seconds']:.2f} s (Dice vs truth {v['dice_vs_truth']:.3f}; {v['options']})"
        )

    result = {
        "device": device,
        "device_name": str(peak.get("name", device)) if isinstance(peak, dict) else device,
        "weights": weights_desc,
        "engine": engine.describe(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": quick,
        "canvas": size,
        "rows": rows,
        "volume_propagation_s": volumes[0]["seconds"] if volumes else -1.0,
        "first_run_s": volumes[0].get("first_run_s", -1.0) if volumes else -1.0,
        "rerun_after_one_edit_s": volumes[0].get("rerun_after_one_edit_s", -1.0)
        if volumes
        else -1.0,
        "volumes": volumes,
        **worst,
        "exactness": {"sample": sample_note, "checks": checks},
        "peak": peak,
        "ratios": {str(s): _ratio(rows, s) for s in supports},
    }
    echo("")
    echo(format_table(result))
    return result


def _ratio(rows, s) -> float:
    r = {row["path"]: row["slices_per_s"] for row in rows if row["S"] == s}
    return float(r["engine"] / r["reference"]) if r.get("reference") else float("nan")


def format_table(result: Dict[str, object]) -> str:
    head = (
        f"{'path':10s} {'S':>4s} {'batch':>5s} {'prec':>5s} {'slices/s':>9s} {'ratio':>6s} "
        f"{'peakMiB':>8s} {'TFLOP/s eff':>11s} {'exec':>7s} {'peak':>7s}"
    )
    lines = [
        f"device {result['device']} ({result.get('device_name', '')}), {result['weights']}",
        head,
    ]
    for row in result["rows"]:
        ratio = result["ratios"][str(row["S"])] if row["path"] == "engine" else 1.0
        lines.append(
            f"{row['path']:10s} {row['S']:4d} {row['batch']:5d} {row['precision']:>5s} "
            f"{row['slices_per_s']:9.3f} {ratio:6.2f} {row['peak_mem_mb']:8.1f} "
            f"{row['tflops_effective']:11.3f} {row['tflops_executed']:7.3f} "
            f"{row['peak_tflops']:7.2f}"
        )
    lines.append(
        f"volume propagation: {result['volume_propagation_s']:.2f} s; "
        f"mean|dp| {result['mean_abs_prob_diff']:.2e}, max|dp| {result['max_abs_prob_diff']:.2e}, "
        f"mask agreement {result['mask_agreement'] * 100:.4f}%"
    )
    return "\n".join(lines)


def write_json(result: Dict[str, object], path: str) -> None:
    """The benchmark result as JSON (atomic; the folder is created)."""
    from ..core.atomic import write_text

    Path(path).resolve().parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(result, indent=2, default=float))
