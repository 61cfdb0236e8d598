"""Run a cohort: every target of a manifest, on this machine or a Dask cluster.

:func:`run_cohort` reads the manifest and the reference volumes (once, in this process), skips
the targets whose outputs are up to date (their record's digest covers the content of the target's
files, the references, the weights and the options), and runs :func:`case.segment_target` for
the others:

* ``scheduler="local"``: a ``dask.distributed.LocalCluster`` of ``workers`` processes on this
  machine, one task at a time each, ``threads`` PyTorch threads each (default: the cores shared
  out), memory per worker from the engine's working-memory budget;
* ``scheduler="tcp://HOST:PORT"`` (any address Dask takes): a running scheduler, e.g. one started
  by ``dask-jobqueue`` on SLURM/PBS; workers must see the target files and ``out_dir``;
* ``scheduler="inprocess"``: one target after the other in this process (no Dask needed).

The reference volumes are scattered to the workers once (not sent with each task). A task whose
worker dies is retried on another worker (``retries``); outputs are only ever renamed into place,
and the temporary files a killed worker leaves behind are removed at the end. Each target's record
goes to ``summary.csv`` (written atomically when the run ends), failed targets with their one-line
reason.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..core.weights import sha256_of
from ..errors import InputError, UsageError, one_line
from .case import (
    RECORD_VERSION,
    CaseRecord,
    CohortSettings,
    Reference,
    TargetSpec,
    output_paths,
    segment_target,
    up_to_date_record,
    volume_ml,
)

#: Target ids become file names: letters, digits, '.', '_' and '-' only.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
#: Retries of a task whose worker died (Dask's own accounting of lost workers).
DEFAULT_RETRIES = 2
#: Memory a worker needs besides the engine's working budget (model, volumes, Python).
WORKER_BASE_BYTES = 2 * 1024**3
#: How long to wait for a scheduler given by address (seconds).
CONNECT_TIMEOUT_S = 30

ProgressFn = Callable[[float, str], None]


@dataclass
class CohortSummary:
    """What a cohort run did."""

    records: List[CaseRecord]
    summary_csv: str
    seconds: float
    scheduler: str
    workers: int

    @property
    def failed(self) -> List[CaseRecord]:
        return [r for r in self.records if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when every target succeeded (or was up to date), 3 when some failed."""
        return 3 if self.failed else 0


def read_manifest(path: str) -> List[TargetSpec]:
    """Targets of a manifest CSV with the columns ``id,image[,labels]`` (paths relative to the
    manifest's folder); ids must be unique and usable as file names."""
    if not os.path.isfile(path):
        raise InputError(f"manifest not found: {path}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
            header = rows[0].keys() if rows else []
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable CSV manifest ({one_line(exc)})") from None
    if not rows:
        raise InputError(f"{path}: the manifest lists no target (columns: id,image[,labels])")
    missing = [c for c in ("id", "image") if c not in header]
    if missing:
        raise InputError(
            f"{path}: the manifest needs the columns id,image[,labels]; missing {missing[0]}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    targets, seen = [], set()
    for n, row in enumerate(rows, start=2):
        tid = (row.get("id") or "").strip()
        if not ID_PATTERN.match(tid):
            raise InputError(
                f"{path} line {n}: id {tid!r} must be letters, digits, '.', '_' or '-'"
            )
        if tid.lower() in seen:
            raise InputError(f"{path} line {n}: id {tid!r} is listed twice")
        seen.add(tid.lower())
        image = (row.get("image") or "").strip()
        if not image:
            raise InputError(f"{path} line {n}: no image given for {tid!r}")
        labels = (row.get("labels") or "").strip() or None
        resolve = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(folder, p))
        targets.append(TargetSpec(tid, resolve(image), resolve(labels) if labels else None))
    return targets


def read_reference(image_path: str, seg_path: str, segments: Optional[Sequence[str]]) -> Reference:
    """A reference volume and its segments (only ``segments`` when given)."""
    from ..core.io import read_image, read_segmentation

    image = read_image(image_path)
    seg = read_segmentation(seg_path, image)
    masks, colors, ml = {}, {}, {}
    for s in seg.segments:
        if segments and s.name not in segments:
            continue
        if s.name in masks:
            raise InputError(f"{seg_path}: two segments are named {s.name!r}")
        masks[s.name] = s.mask.astype(bool)
        colors[s.name] = tuple(float(c) for c in s.color)
        ml[s.name] = volume_ml(s.mask, image.ijk_to_ras)
    if not masks:
        want = f" named {', '.join(segments)}" if segments else ""
        raise InputError(f"{seg_path}: the reference holds no segment{want}")
    name = re.sub(r"(\.seg)?\.nrrd$|\.nii(\.gz)?$", "", os.path.basename(image_path))
    digest = hashlib.sha256((sha256_of(image_path) + sha256_of(seg_path)).encode()).hexdigest()
    return Reference(name, image, masks, colors, ml, digest)


def target_digest(
    target: TargetSpec, references: List[Reference], settings: CohortSettings, weights_id: str
) -> str:
    """sha256 of everything a target's result depends on; '' when a file cannot be read (the
    task then fails with the reason)."""
    try:
        parts = [sha256_of(target.image), sha256_of(target.labels) if target.labels else ""]
    except OSError:
        return ""
    payload = {
        "version": RECORD_VERSION,
        "target": parts,
        "references": [r.digest for r in references],
        "weights": weights_id,
        "options": settings.result_options(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def weights_identity(weights: str) -> str:
    """What identifies the weights in a digest: the file's sha256 (starter or a path), or the
    name of the pinned official checkpoint."""
    from ..core.weights import starter_path

    if weights == "official":
        return "official"
    path = str(starter_path()) if weights == "starter" else weights
    try:
        return sha256_of(path)
    except OSError:
        raise InputError(f"weights file not found: {path}") from None


def default_threads(workers: int) -> int:
    """PyTorch threads per worker: this machine's cores shared out (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, int(cores or 1) // max(1, workers))


def default_workers(device: str) -> int:
    """Local workers by default: one per core on the CPU (two single-thread workers measured
    1.26x one two-thread worker: docs/results/cohort/README.md), fewer where memory is short
    (:data:`WORKER_BASE_BYTES` each); one on a GPU, which the workers would share."""
    if device != "cpu":
        return 1
    from ..core.engine import available_ram_bytes

    return max(1, min(default_threads(1), int(available_ram_bytes() // WORKER_BASE_BYTES)))


def worker_memory_bytes(workers: int) -> int:
    """Memory limit of one local worker: the engine's CPU working budget shared out, plus the
    model, volumes and interpreter."""
    from ..core.engine import available_ram_bytes

    budget = min(0.4 * available_ram_bytes(), 6 * 1024**3)
    return int(WORKER_BASE_BYTES + budget / max(1, workers))


def _refuse_outputs_that_are_inputs(out_dir: str, targets: List[TargetSpec], inputs) -> None:
    """UsageError when a target's output file would replace one of the inputs (e.g. labels kept
    as ``<id>.seg.nrrd`` in the output folder), before anything is written."""

    def identity(path: str):
        st = os.stat(path)
        return st.st_dev, st.st_ino

    given = {identity(p): p for p in inputs if os.path.exists(p)}
    for t in targets:
        for path in output_paths(out_dir, t.id).values():
            if os.path.exists(path) and identity(path) in given:
                raise UsageError(
                    f"--out: {path} is the input {given[identity(path)]}: choose another output "
                    "folder (the input would be overwritten)"
                )


def clean_partials(out_dir: str) -> int:
    """Remove temporary files left by an interrupted or killed writer (see :mod:`core.atomic`)."""
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(out_dir), ".partial-*")):
        try:
            os.remove(path)
            removed += 1
        except OSError:
            pass
    return removed


def write_summary(path: str, records: List[CaseRecord], targets: List[TargetSpec]) -> None:
    """``summary.csv``: one row per target, in manifest order."""
    from ..core.atomic import write_text

    by_id = {r.id: r for r in records}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "status", "reason", "seconds", "qc", "volumes_ml", "segmentation"])
    for t in targets:
        r = by_id[t.id]
        vols = ";".join(f"{s['name']}={s['volume_ml']}" for s in r.segments)
        seg = os.path.basename(output_paths("", t.id)["seg"]) if r.status != "failed" else ""
        w.writerow(
            [t.id, r.status, r.reason, f"{r.seconds:.2f}", " | ".join(r.qc_flags), vols, seg]
        )
    write_text(path, buf.getvalue())


def run_cohort(
    manifest: str,
    references: Sequence[Tuple[str, str]],
    out_dir: str,
    settings: CohortSettings,
    scheduler: str = "local",
    workers: int = 1,
    retries: int = DEFAULT_RETRIES,
    progress: Optional[ProgressFn] = None,
) -> CohortSummary:
    """Segment every target of ``manifest`` from ``references`` ((image, segmentation) paths)
    into ``out_dir``; see the module docstring. Raises a :class:`UniverSegError` only for a
    problem of the whole run (manifest, references, options, scheduler)."""
    from .align import ALIGN_METHODS

    t0 = time.perf_counter()
    if not references:
        raise UsageError("give at least one --reference IMG SEG")
    if settings.align not in ALIGN_METHODS:
        raise UsageError(
            f"--align must be one of {', '.join(ALIGN_METHODS)}, got {settings.align!r}"
        )
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if retries < 0:
        raise UsageError(f"--retries must be 0 or more, got {retries}")
    targets = read_manifest(manifest)
    if not os.path.isdir(out_dir):
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the output folder {out_dir}: {exc.strerror}") from None
    from ..core.io import check_output_path

    inputs = [p for t in targets for p in (t.image, t.labels) if p]
    inputs += [p for pair in references for p in pair]
    check_output_path(os.path.join(out_dir, "summary.csv"), inputs)
    _refuse_outputs_that_are_inputs(out_dir, targets, inputs)
    refs = [read_reference(img, seg, settings.segments) for img, seg in references]
    if settings.segments:
        known = {n for r in refs for n in r.masks}
        unknown = [n for n in settings.segments if n not in known]
        if unknown:
            raise UsageError(f"--segments: no reference has a segment named {unknown[0]!r}")
    weights_id = weights_identity(settings.weights)
    for t in targets:
        t.digest = target_digest(t, refs, settings, weights_id)
    clean_partials(out_dir)

    records: Dict[str, CaseRecord] = {}
    todo = []
    for t in targets:
        earlier = up_to_date_record(out_dir, t) if t.digest else None
        if earlier is not None:
            records[t.id] = earlier
        else:
            todo.append(t)
    done = len(records)

    def report(record: CaseRecord) -> None:
        nonlocal done
        done += 1
        records[record.id] = record
        if progress is not None:
            progress(done / len(targets), f"{record.id}: {record.status}")

    if progress is not None:
        progress(done / len(targets), f"{done} of {len(targets)} up to date")
    used_workers = 0
    if todo:
        if scheduler == "inprocess":
            used_workers = 1
            for t in todo:
                report(segment_target(t, refs, settings, out_dir))
        else:
            used_workers = _run_on_dask(
                todo, refs, settings, out_dir, scheduler, workers, retries, report
            )
    clean_partials(out_dir)
    ordered = [records[t.id] for t in targets]
    summary = os.path.join(out_dir, "summary.csv")
    write_summary(summary, ordered, targets)
    return CohortSummary(ordered, summary, time.perf_counter() - t0, scheduler, used_workers)


def _run_on_dask(todo, refs, settings, out_dir, scheduler, workers, retries, report) -> int:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise UsageError(
            "running a cohort on Dask needs dask.distributed: pip install '.[cohort]' in a checkout "
            "of this repository (or use --scheduler inprocess)"
        ) from None
    for name in ("distributed", "tornado", "bokeh"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    cluster = None
    try:
        if scheduler == "local":
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                memory_limit=worker_memory_bytes(workers),
                dashboard_address=None,
                host="127.0.0.1",
                silence_logs=logging.CRITICAL,
            )
            client = Client(cluster)
        else:
            try:
                client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError, ValueError) as exc:
                raise UsageError(
                    f"cannot reach the Dask scheduler {scheduler}: {one_line(exc)}"
                ) from None
        with client:
            n_workers = len(client.scheduler_info().get("workers", {}))
            shared = client.scatter(refs, broadcast=True, hash=False)
            futures = {
                client.submit(
                    segment_target,
                    t,
                    shared,
                    settings,
                    os.path.abspath(out_dir),
                    key=f"universeg-cohort-{t.id}-{(t.digest or 'x')[:12]}-{os.getpid()}-{time.time_ns()}",
                    retries=retries,
                    pure=False,
                ): t
                for t in todo
            }
            for future in as_completed(futures):
                t = futures[future]
                try:
                    record = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker died too often, or our bug
                    reason = one_line(exc)
                    if type(exc).__name__ == "KilledWorker":
                        reason = "its worker died on every attempt (out of memory or killed?)"
                    record = CaseRecord(t.id, "failed", reason, t.digest)
                report(record)
            return n_workers
    finally:
        if cluster is not None:
            cluster.close()
