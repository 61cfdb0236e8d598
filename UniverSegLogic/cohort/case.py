"""One cohort target: align the references, propagate, write the outputs (runs on a worker).

:func:`segment_target` is the task a Dask worker (or this process, with ``--scheduler
inprocess``) runs for each target. It never raises for a problem of the target itself: an
unreadable or mismatched target comes back as a ``failed`` record with a one-line reason. Its
outputs are written atomically, the JSON record last, so a target either has a complete and
consistent set of ``<id>.seg.nrrd``, ``<id>.png``, ``<id>.json`` or keeps its earlier ones.

Each worker process loads the weights once (:func:`worker_engines`) and reuses its engine for
every task it is given.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..core.geometry import Volume
from ..core.weights import sha256_of
from ..errors import UniverSegError, one_line

#: Version of the record format and of what goes into a result (part of every target's digest).
RECORD_VERSION = 1
#: A prediction this many times smaller or larger than the reference structure is flagged.
QC_SIZE_RATIO = 3.0


@dataclass(frozen=True)
class CohortSettings:
    """How every target of a cohort is segmented (the same for all of them)."""

    segments: Optional[Tuple[str, ...]] = None  # names; None: every segment of the references
    axis: str = "axial"
    align: str = "extent"
    device: str = "auto"
    weights: str = "starter"
    support_size: int = 2
    threads: int = 1  # PyTorch threads per worker
    cpu_bf16: bool = False  # decided once by the client, so every worker computes alike
    cpu_bf16_reason: str = ""

    def result_options(self) -> Dict[str, object]:
        """What the result depends on (goes into each target's digest)."""
        d = asdict(self)
        for k in ("threads", "cpu_bf16_reason"):
            d.pop(k)
        d["segments"] = list(self.segments) if self.segments else None
        return d


@dataclass
class Reference:
    """A labeled reference volume, read once by the client and sent once to every worker."""

    name: str
    image: Volume
    masks: Dict[str, np.ndarray]  # by segment name
    colors: Dict[str, Tuple[float, float, float]]
    volume_ml: Dict[str, float]
    digest: str  # of the image and segmentation files


@dataclass
class TargetSpec:
    """One row of the manifest, with the digest of everything its result depends on."""

    id: str
    image: str
    labels: Optional[str] = None
    digest: str = ""


@dataclass
class CaseRecord:
    """What happened to one target (the ``<id>.json`` record and a ``summary.csv`` row)."""

    id: str
    status: str  # ok, failed, skipped (up to date)
    reason: str = ""
    digest: str = ""
    seconds: float = 0.0
    segments: List[Dict[str, object]] = field(default_factory=list)
    details: Dict[str, object] = field(default_factory=dict)

    @property
    def qc_flags(self) -> List[str]:
        return [f"{s['name']}: {s['qc']}" for s in self.segments if s.get("qc")]


_WORKER: Dict[str, object] = {}


def worker_engines(settings: CohortSettings):
    """This process's :class:`~UniverSegLogic.core.engines.EngineStore` (weights are loaded once
    per process; the PyTorch and ITK threads and the bf16 decision are set on first use)."""
    if "engines" not in _WORKER:
        import SimpleITK as sitk
        import torch

        from ..core.engine import set_cpu_bf16_choice
        from ..core.engines import EngineStore

        torch.set_num_threads(max(1, int(settings.threads)))
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(settings.threads)))
        set_cpu_bf16_choice(settings.cpu_bf16, settings.cpu_bf16_reason or "cohort setting")
        _WORKER["engines"] = EngineStore(echo=lambda message: None, allow_download=False)
    return _WORKER["engines"]


def volume_ml(mask: np.ndarray, ijk_to_ras: np.ndarray) -> float:
    """Volume of a mask in millilitres."""
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(ijk_to_ras)[:3, :3])))
    return float(np.count_nonzero(mask)) * voxel_mm3 / 1000.0


def qc_flag(predicted_ml: float, reference_ml: float) -> str:
    """'' for a plausible prediction; else why it should be looked at."""
    if predicted_ml <= 0.0:
        return "empty"
    if reference_ml > 0 and not (
        1.0 / QC_SIZE_RATIO <= predicted_ml / reference_ml <= QC_SIZE_RATIO
    ):
        return f"implausible size ({predicted_ml / reference_ml:.2f}x the reference)"
    return ""


def output_paths(out_dir: str, target_id: str) -> Dict[str, str]:
    """The files of one target."""
    base = os.path.join(out_dir, target_id)
    return {"seg": base + ".seg.nrrd", "montage": base + ".png", "record": base + ".json"}


def up_to_date_record(out_dir: str, target: TargetSpec) -> Optional[CaseRecord]:
    """The earlier result of ``target`` in ``out_dir`` as a ``skipped (up to date)`` record, when
    it is complete and for the same inputs and options (the record's digest matches and its files
    are the ones it recorded); else None."""
    paths = output_paths(out_dir, target.id)
    try:
        with open(paths["record"], encoding="utf-8") as fh:
            record = json.load(fh)
        if record.get("status") != "ok" or record.get("digest") != target.digest:
            return None
        files = record.get("details", {}).get("outputs", {})
        if not all(
            sha256_of(paths[k]) == files.get(k, {}).get("sha256") for k in ("seg", "montage")
        ):
            return None
        return CaseRecord(
            target.id,
            "skipped (up to date)",
            "",
            target.digest,
            float(record.get("seconds", 0.0)),
            record.get("segments", []),
            record.get("details", {}),
        )
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def segment_target(
    target: TargetSpec, references: List[Reference], settings: CohortSettings, out_dir: str
) -> CaseRecord:
    """Segment one target and write its outputs; a problem with the target gives a ``failed``
    record (its one-line reason) instead of an exception."""
    t0 = time.perf_counter()
    try:
        record = _segment(target, references, settings, out_dir, t0)
    except (UniverSegError, OSError) as exc:
        reason = one_line(exc)
        if isinstance(exc, OSError) and getattr(exc, "filename", None):
            reason = f"{exc.strerror or reason}: {exc.filename}"
        record = CaseRecord(target.id, "failed", reason, target.digest)
    except MemoryError:
        record = CaseRecord(target.id, "failed", "out of memory", target.digest)
    record.seconds = round(time.perf_counter() - t0, 3)
    if record.status == "failed":
        _write_record(output_paths(out_dir, target.id)["record"], record)
    return record


def _write_record(path: str, record: CaseRecord) -> None:
    from ..core.atomic import write_text

    payload = asdict(record)
    write_text(path, json.dumps(payload, indent=1, sort_keys=False) + "\n")


@dataclass
class SegmentedTarget:
    """What :func:`segment_masks` computed for one target (nothing written yet)."""

    names: List[str]
    aligned: list  # (Reference, AlignedReference) per reference
    info: list  # (name, painted on the target?, {reference name: support slices}) per name
    inputs: list  # the SegmentInput items propagated (names with labels or support)
    result: object  # PropagationResult, or None when no name had labels or support
    timings: Dict[str, float]


def segment_masks(
    image: Volume, references: List[Reference], settings: CohortSettings, painted=None
) -> SegmentedTarget:
    """Align every reference onto ``image`` and propagate (the computation of one target, without
    reading or writing files; also what the cohort evaluation times)."""
    from ..core.geometry import resolve_axis
    from ..core.propagator import PropagationOptions, Propagator, SegmentInput, SupportVolume
    from ..core.slices import nonempty_slices
    from .align import align_reference

    timings: Dict[str, float] = {}
    names = list(settings.segments) if settings.segments else _reference_names(references)
    tick = time.perf_counter()
    aligned = []
    for ref in references:
        wanted = {n: m for n, m in ref.masks.items() if n in names}
        aligned.append((ref, align_reference(ref.image, wanted, image, settings.align)))
    timings["align"] = time.perf_counter() - tick

    options = PropagationOptions(
        axis=settings.axis,
        support_size=settings.support_size,
        device=settings.device,
        weights=settings.weights,
    )
    support = [SupportVolume(a.image, a.masks) for _, a in aligned]
    axis = resolve_axis(image, settings.axis)  # support slices are counted along it
    inputs, info = [], []
    for i, name in enumerate(names):
        mask = np.zeros(image.array.shape, dtype=bool)
        if painted is not None and name in painted.names():
            mask = np.asarray(painted.get(name).mask, dtype=bool)
        ref_slices = {
            ref.name: len(nonempty_slices(a.masks[name], axis))
            for ref, a in aligned
            if name in a.masks and a.masks[name].any()
        }
        info.append((name, mask.any(), ref_slices))
        if mask.any() or ref_slices:
            inputs.append(SegmentInput(str(i), name, mask))
    tick = time.perf_counter()
    result = None
    if inputs:
        session = Propagator(
            image, options, engines=worker_engines(settings), support_volumes=support
        )
        result = session.propagate(inputs)
    timings["propagate"] = time.perf_counter() - tick

    return SegmentedTarget(names, aligned, info, inputs, result, timings)


def _segment(
    target: TargetSpec,
    references: List[Reference],
    settings: CohortSettings,
    out_dir: str,
    t0: float,
) -> CaseRecord:
    from ..core.atomic import write_bytes
    from ..core.io import Segment, Segmentation, read_image, read_segmentation, write_segmentation
    from .montage import montage_png

    timings: Dict[str, float] = {}
    tick = time.perf_counter()
    image = read_image(target.image)
    painted = read_segmentation(target.labels, image) if target.labels else None
    timings["read"] = time.perf_counter() - tick

    seg = segment_masks(image, references, settings, painted)
    aligned, info, inputs, result = seg.aligned, seg.info, seg.inputs, seg.result
    timings.update(seg.timings)

    tick = time.perf_counter()
    segments_out, rows, masks, colors = [], [], [], []
    for i, (name, was_painted, ref_slices) in enumerate(info):
        r = None
        if result is not None and any(inp.key == str(i) for inp in inputs):
            r = result.get(str(i))
        mask = r.mask if r is not None else np.zeros(image.array.shape, dtype=bool)
        color = next(
            (ref.colors[name] for ref in references if name in ref.colors), (0.9, 0.3, 0.3)
        )
        ref_ml = [ref.volume_ml[name] for ref in references if name in ref.volume_ml]
        ml = volume_ml(mask, image.ijk_to_ras)
        flag = qc_flag(ml, float(np.mean(ref_ml)) if ref_ml else 0.0)
        if r is None:
            flag = "no support (the structure falls outside this target after alignment)"
        rows.append(
            {
                "name": name,
                "volume_ml": round(ml, 3),
                "reference_ml": round(float(np.mean(ref_ml)), 3) if ref_ml else None,
                "qc": flag,
                "painted_slices": [int(s) for s in (r.labeled_slices if r and was_painted else [])],
                "support_slices": ref_slices,
            }
        )
        segments_out.append(Segment(name, mask, color, None, {}))
        masks.append(mask)
        colors.append(color)
    paths = output_paths(out_dir, target.id)
    write_segmentation(paths["seg"], Segmentation(image, segments_out))
    write_bytes(paths["montage"], montage_png(image, masks, colors, settings.axis))
    timings["write"] = time.perf_counter() - tick
    details = {
        "version": RECORD_VERSION,
        "image": target.image,
        "labels": target.labels,
        "references": [
            {
                "name": ref.name,
                "digest": ref.digest,
                "alignment": a.method,
                "alignment_seconds": round(a.seconds, 3),
                "transform": a.parameters,
            }
            for ref, a in aligned
        ],
        "options": settings.result_options(),
        "device": result.device if result is not None else None,
        "weights": result.weights if result is not None else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "outputs": {
            k: {"file": os.path.basename(paths[k]), "sha256": sha256_of(paths[k])}
            for k in ("seg", "montage")
        },
    }
    record = CaseRecord(target.id, "ok", "", target.digest, 0.0, rows, details)
    record.seconds = round(time.perf_counter() - t0, 3)
    details["timings"]["total"] = record.seconds
    _write_record(paths["record"], record)
    return record


def _reference_names(references: List[Reference]) -> List[str]:
    names: List[str] = []
    for ref in references:
        for n in ref.masks:
            if n not in names:
                names.append(n)
    return names
