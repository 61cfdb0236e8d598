"""One cohort target: align the references, propagate, write the outputs (runs on a worker).

:func:`segment_target` is the task a Dask worker (or this process, with ``--scheduler
inprocess``) runs for each target. It never raises for a problem of the target itself: an
unreadable or mismatched target comes back as a ``failed`` record with a one-line reason. Its
outputs are written atomically, the JSON record last, so a target either has a complete and
consistent set of ``<id>.seg.nrrd``, ``<id>.png``, ``<id>.json`` or keeps its earlier ones.

The record ``<id>.json`` is what makes ``<id>.seg.nrrd`` and ``<id>.png`` this tool's outputs
(:func:`own_record`): a target with no record yet first gets a ``running`` one, so that a run
killed while writing can be resumed; a failure never replaces an earlier ``ok`` record (the
summary reports it, the earlier result stays). What is predicted stays inside the target's
scanned field of view (:func:`segment_masks`); the target's own segments that are not predicted
come back bit for bit, marked ``target_only`` in the record.

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
#: 2: predictions kept to the field of view, the target's own segments kept, ``running`` records.
RECORD_VERSION = 2
#: A prediction this many times smaller or larger than the reference structure is flagged.
QC_SIZE_RATIO = 3.0
#: A structure is flagged when the alignment puts more than this share of it outside the target's
#: data (a few boundary voxels move across by nearest-neighbour rounding alone).
QC_OUTSIDE_SHARE = 0.02
#: The statuses a record of this tool can have on disk.
RECORD_STATUSES = ("ok", "failed", "running")


@dataclass(frozen=True)
class CohortSettings:
    """How every target of a cohort is segmented (the same for all of them)."""

    segments: Optional[Tuple[str, ...]] = None  # names; None: every segment of the references
    axis: str = "axial"
    align: str = "extent"
    device: str = "auto"
    weights: str = "starter"
    support_size: int = 2
    threads: int = 1  # PyTorch threads per worker (0: the run chooses, see runner.plan_run)
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


def read_record(path: str) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing or is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def own_record(out_dir: str, target_id: str) -> Optional[dict]:
    """The record of ``target_id`` in ``out_dir`` when it is one this tool wrote (an object with
    that id, a known status and a digest), else None. Such a record makes the target's
    ``.seg.nrrd`` and ``.png`` beside it this tool's outputs, which a later run may replace."""
    record = read_record(output_paths(out_dir, target_id)["record"])
    if (
        record is None
        or record.get("id") != target_id
        or record.get("status") not in RECORD_STATUSES
        or not isinstance(record.get("digest"), str)
    ):
        return None
    return record


def up_to_date_record(out_dir: str, target: TargetSpec) -> Optional[CaseRecord]:
    """The earlier result of ``target`` in ``out_dir`` as a ``skipped (up to date)`` record, when
    it is complete and for the same inputs and options (the record's digest matches and its files
    are the ones it recorded); else None."""
    paths = output_paths(out_dir, target.id)
    record = own_record(out_dir, target.id)
    try:
        if record is None or record["status"] != "ok" or record["digest"] != target.digest:
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
    target: TargetSpec,
    references: List[Reference],
    settings: CohortSettings,
    out_dir: str,
    owner: str = "",
) -> CaseRecord:
    """Segment one target and write its outputs; a problem with the target gives a ``failed``
    record (its one-line reason) instead of an exception. ``owner``: the run's tag for the
    temporary files written (:func:`core.atomic.owner_tag`)."""
    import contextlib

    from ..core.atomic import owner_tag

    t0 = time.perf_counter()
    with owner_tag(owner) if owner else contextlib.nullcontext():
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
            _record_failure(out_dir, record)
    return record


def _record_failure(out_dir: str, record: CaseRecord) -> None:
    """Write a failure record, unless an earlier ``ok`` one is there: that one (and its result)
    stays, and the failure is only reported."""
    earlier = own_record(out_dir, record.id)
    if earlier is not None and earlier["status"] == "ok":
        record.reason += " (its earlier result is kept)"
        return
    try:
        _write_record(output_paths(out_dir, record.id)["record"], record)
    except (UniverSegError, OSError) as exc:
        record.reason += f"; and its record could not be written: {one_line(exc)}"


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
    #: PropagationResult (its masks kept to ``field_of_view`` and the painted voxels), or None
    #: when no name had labels or support
    result: object
    timings: Dict[str, float]
    #: target voxels (KJI, bool) where predictions may go: the target has image data there
    #: (:func:`align.data_region`) and at least one reference, once aligned, has too
    field_of_view: Optional[np.ndarray] = None
    #: by name: the largest share of a reference's structure that the alignment puts outside the
    #: target's data (:attr:`align.AlignedReference.outside`)
    outside: Dict[str, float] = field(default_factory=dict)


def segment_masks(
    image: Volume, references: List[Reference], settings: CohortSettings, painted=None
) -> SegmentedTarget:
    """Align every reference onto ``image`` and propagate (the computation of one target, without
    reading or writing files; also what the cohort evaluation times). Predictions are kept to
    the target's field of view: no voxel is labeled where the target holds only padding or where
    no aligned reference has image data (the painted voxels stay as painted)."""
    from ..core.geometry import resolve_axis
    from ..core.propagator import PropagationOptions, Propagator, SegmentInput, SupportVolume
    from ..core.slices import nonempty_slices
    from .align import align_reference, data_region

    timings: Dict[str, float] = {}
    names = list(settings.segments) if settings.segments else _reference_names(references)
    tick = time.perf_counter()
    region = data_region(image)
    covered = np.zeros(image.array.shape, dtype=bool)
    aligned = []
    outside: Dict[str, float] = {}
    for ref in references:
        wanted = {n: m for n, m in ref.masks.items() if n in names}
        a = align_reference(ref.image, wanted, image, settings.align, target_region=region)
        aligned.append((ref, a))
        covered |= a.valid if a.valid is not None else True
        for name, share in a.outside.items():
            outside[name] = max(outside.get(name, 0.0), share)
    field_of_view = np.logical_and(region, covered, out=region)
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
        for inp in inputs:
            r = result.get(inp.key)
            r.keep_within(field_of_view, inp.mask)
    timings["propagate"] = time.perf_counter() - tick

    return SegmentedTarget(names, aligned, info, inputs, result, timings, field_of_view, outside)


def _segment(
    target: TargetSpec,
    references: List[Reference],
    settings: CohortSettings,
    out_dir: str,
    t0: float,
) -> CaseRecord:
    from ..core.atomic import write_bytes
    from ..core.geometry import resolve_axis
    from ..core.io import Segment, Segmentation, read_image, read_segmentation, write_segmentation
    from ..core.slices import nonempty_slices
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
        flags = [qc_flag(ml, float(np.mean(ref_ml)) if ref_ml else 0.0)]
        if r is None:
            flags = ["no support (the structure falls outside this target after alignment)"]
        share = seg.outside.get(name, 0.0)
        if r is not None and share > QC_OUTSIDE_SHARE:
            flags.append(
                f"partly outside the target's scan ({share:.0%} of the reference structure "
                "falls outside it after alignment)"
            )
        rows.append(
            {
                "name": name,
                "volume_ml": round(ml, 3),
                "reference_ml": round(float(np.mean(ref_ml)), 3) if ref_ml else None,
                "qc": "; ".join(f for f in flags if f),
                "painted_slices": [int(s) for s in (r.labeled_slices if r and was_painted else [])],
                "support_slices": ref_slices,
                "outside_share": round(share, 4),
                "target_only": False,
            }
        )
        segments_out.append(Segment(name, mask, color, None, {}))
        masks.append(mask)
        colors.append(color)
    axis = resolve_axis(image, settings.axis)
    for s in painted.segments if painted is not None else []:
        if s.name in seg.names:
            continue  # predicted above, its painted slices kept bit for bit
        kept = np.asarray(s.mask, dtype=bool)
        rows.append(
            {
                "name": s.name,
                "volume_ml": round(volume_ml(kept, image.ijk_to_ras), 3),
                "reference_ml": None,
                "qc": "",
                "painted_slices": nonempty_slices(kept, axis),
                "support_slices": {},
                "outside_share": 0.0,
                "target_only": True,
            }
        )
        segments_out.append(Segment(s.name, kept, s.color, s.id, dict(s.fields)))
    paths = output_paths(out_dir, target.id)
    if own_record(out_dir, target.id) is None:
        # claim the outputs before writing them, so that a run killed now can be resumed
        _write_record(paths["record"], CaseRecord(target.id, "running", "", target.digest))
    write_segmentation(paths["seg"], Segmentation(image, segments_out))
    write_bytes(paths["montage"], montage_png(image, masks, colors, settings.axis))
    timings["write"] = time.perf_counter() - tick
    fov = seg.field_of_view
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
        "field_of_view": {
            "voxels": int(np.count_nonzero(fov)) if fov is not None else None,
            "share": round(float(np.mean(fov)), 4) if fov is not None and fov.size else None,
        },
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
