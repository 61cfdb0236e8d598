"""Run a cohort: every target of a manifest, on this machine or a Dask cluster.

:func:`run_cohort` first checks everything a run needs (options, manifest, references, weights,
the output folder, the scheduler) and writes nothing when one of them is wrong: no output folder
is created, no earlier result is touched. It then skips the targets whose outputs are up to date
(their record's digest covers the content of the target's files, the references, the weights and
the options) and runs :func:`case.segment_target` for the others:

* ``scheduler="auto"`` (default): in this process when a local cluster would not pay off (a few
  targets, one core, a GPU), else a local cluster (:func:`scheduler.choose_scheduler`; which
  one and why is in the summary);
* ``scheduler="local"``: a ``dask.distributed.LocalCluster`` of ``workers`` processes on this
  machine, one task at a time each, ``threads`` PyTorch threads each (default: the cores shared
  out), memory per worker from the engine's working-memory budget;
* ``scheduler="tcp://HOST:PORT"`` (any address Dask takes): a running scheduler, e.g. one started
  by ``dask-jobqueue`` on SLURM/PBS; workers must see the target files and ``out_dir``. A TCP
  address is probed first (:func:`scheduler.probe_scheduler`: connect and read the Dask
  handshake, a few seconds at most), so a wrong address is one line, not a hang;
* ``scheduler="inprocess"``: one target after the other in this process (no Dask needed).

Which scheduler runs never changes a result: the computation and its precision are the same.
The reference volumes are scattered to the workers once (not sent with each task). A task whose
worker dies is retried on another worker (``retries``). Outputs are only ever renamed into place;
a run never replaces a file that is not its own (an input, the manifest, a file without this
tool's record, see :func:`check_output_folder`), and it removes only the temporary files that
carry its own tag (:func:`core.atomic.remove_temporaries`), such as a killed worker's. Each
target's record goes to ``summary.csv`` (written atomically when the run ends), failed targets
with their one-line reason.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..core.weights import sha256_of
from ..errors import InputError, UniverSegError, UsageError, one_line
from .case import (
    RECORD_VERSION,
    CaseRecord,
    CohortSettings,
    Reference,
    TargetSpec,
    output_paths,
    own_record,
    segment_target,
    up_to_date_record,
    volume_ml,
)
from .scheduler import open_client, plan_run, probe_scheduler

#: Target ids become file names: letters, digits, '.', '_' and '-' only.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
#: Retries of a task whose worker died (Dask's own accounting of lost workers).
DEFAULT_RETRIES = 2
#: The header of ``summary.csv`` (an existing file without it is not this tool's summary).
SUMMARY_COLUMNS = ["id", "status", "reason", "seconds", "qc", "volumes_ml", "segmentation"]

ProgressFn = Callable[[float, str], None]


@dataclass
class CohortSummary:
    """What a cohort run did."""

    records: List[CaseRecord]
    summary_csv: str
    seconds: float
    scheduler: str
    workers: int
    threads: int = 1
    #: why this scheduler ran (e.g. the default's choice), for the summary line
    reason: str = ""

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


def check_weights(weights: str) -> str:
    """Load and verify the weights once, here, before anything is written (a missing, corrupt
    or oversized file is one line, not a failure of every target); returns their identity
    (:func:`weights_identity`). ``official`` must already be in the cache."""
    from ..core.weights import load_weights

    load_weights(weights, echo=lambda message: None, allow_download=False)
    return weights_identity(weights)


def check_settings(settings: CohortSettings) -> None:
    """UsageError for an option no target could be segmented with (before anything is read)."""
    import numpy as np

    from ..core.geometry import Volume, resolve_axis
    from .align import ALIGN_METHODS

    if settings.align not in ALIGN_METHODS:
        raise UsageError(
            f"--align must be one of {', '.join(ALIGN_METHODS)}, got {settings.align!r}"
        )
    try:
        resolve_axis(Volume(np.zeros((1, 1, 1), np.uint8), np.eye(4)), settings.axis)
    except UniverSegError as exc:
        raise UsageError(f"--axis: {one_line(exc)}") from None
    if int(settings.support_size) < 1:
        raise UsageError(f"--support-size must be at least 1, got {settings.support_size}")
    if settings.threads < 0:
        raise UsageError(f"--threads must be at least 1, got {settings.threads}")
    if settings.segments is not None and not all(str(n).strip() for n in settings.segments):
        raise UsageError("--segments: a segment name is empty")


def check_output_folder(out_dir: str, targets: List[TargetSpec], inputs: Sequence[str]) -> None:
    """Refuse (one line, nothing written) an output folder where the run would replace a file
    that is not its own: an input (the manifest, a target's image or labels, a reference, links
    included), or, at a target's output names, a file that no record of this tool claims
    (:func:`case.own_record`), or a ``summary.csv`` that is not this tool's summary. Also refuse
    a folder that cannot be created or written."""
    from ..core.io import check_output_path

    check_output_path(out_dir, inputs, option="--out", folder=True)
    if not os.path.isdir(out_dir):
        return  # nothing there yet to replace

    def identity(path: str):
        st = os.stat(path)
        return st.st_dev, st.st_ino

    given = {identity(p): p for p in inputs if os.path.exists(p)}

    def refuse_input(path: str) -> None:
        if os.path.exists(path) and identity(path) in given:
            raise UsageError(
                f"--out: {path} is the input {given[identity(path)]}: choose another output "
                "folder (the input would be overwritten)"
            )

    summary = os.path.join(out_dir, "summary.csv")
    refuse_input(summary)
    if os.path.lexists(summary):
        try:
            with open(summary, encoding="utf-8", newline="") as fh:
                header = next(csv.reader(fh), None)
        except (OSError, UnicodeDecodeError, csv.Error):
            header = None
        if header != SUMMARY_COLUMNS:
            raise UsageError(
                f"--out: {summary} is not the summary of a cohort run: move it or choose "
                "another output folder (it would be overwritten)"
            )
    check_output_path(summary, inputs, option="--out")
    for t in targets:
        paths = output_paths(out_dir, t.id)
        for path in paths.values():
            refuse_input(path)
        if own_record(out_dir, t.id) is not None:
            continue  # this tool's record: the target's files beside it are its outputs
        for path in paths.values():
            if os.path.lexists(path):
                raise UsageError(
                    f"--out: {path} was not written by a cohort run (no record of this tool "
                    f"claims it for target {t.id!r}): move it or choose another output folder "
                    "(it would be overwritten)"
                )


def write_summary(path: str, records: List[CaseRecord], targets: List[TargetSpec]) -> None:
    """``summary.csv``: one row per target, in manifest order."""
    from ..core.atomic import write_text

    by_id = {r.id: r for r in records}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS)
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
    scheduler: str = "auto",
    workers: Optional[int] = None,
    retries: int = DEFAULT_RETRIES,
    progress: Optional[ProgressFn] = None,
) -> CohortSummary:
    """Segment every target of ``manifest`` from ``references`` ((image, segmentation) paths)
    into ``out_dir``; see the module docstring. Raises a :class:`UniverSegError` only for a
    problem of the whole run (manifest, references, options, weights, output folder, scheduler),
    and then before anything is written. ``settings.threads`` 0: the plan's default."""
    from ..core.atomic import new_owner_tag, remove_temporaries
    from ..core.engine import resolve_device

    t0 = time.perf_counter()
    if not references:
        raise UsageError("give at least one --reference IMG SEG")
    check_settings(settings)
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if retries < 0:
        raise UsageError(f"--retries must be 0 or more, got {retries}")
    device = resolve_device(settings.device)
    if scheduler not in ("auto", "local", "inprocess"):
        probe_scheduler(scheduler)  # seconds at most, before the slower checks below
    targets = read_manifest(manifest)
    inputs = [manifest] + [p for t in targets for p in (t.image, t.labels) if p]
    inputs += [p for pair in references for p in pair]
    check_output_folder(out_dir, targets, inputs)
    refs = [read_reference(img, seg, settings.segments) for img, seg in references]
    if settings.segments:
        known = {n for r in refs for n in r.masks}
        unknown = [n for n in settings.segments if n not in known]
        if unknown:
            raise UsageError(f"--segments: no reference has a segment named {unknown[0]!r}")
    weights_id = check_weights(settings.weights)
    for t in targets:
        t.digest = target_digest(t, refs, settings, weights_id)

    records: Dict[str, CaseRecord] = {}
    todo = []
    for t in targets:
        earlier = up_to_date_record(out_dir, t) if t.digest else None
        if earlier is not None:
            records[t.id] = earlier
        else:
            todo.append(t)
    plan = plan_run(scheduler, workers, settings.threads, len(todo), device)
    settings = replace(settings, threads=plan.threads)
    done = len(records)

    def report(record: CaseRecord) -> None:
        nonlocal done
        done += 1
        records[record.id] = record
        if progress is not None:
            progress(done / len(targets), f"{record.id}: {record.status}")

    used_workers = 0
    if todo:
        with open_client(plan) as client:  # the scheduler is reachable before a file is written
            if not os.path.isdir(out_dir):
                try:
                    os.makedirs(out_dir, exist_ok=True)
                except OSError as exc:
                    raise UsageError(
                        f"cannot create the output folder {out_dir}: {exc.strerror}"
                    ) from None
            if progress is not None:
                progress(done / len(targets), f"{done} of {len(targets)} up to date")
            owner = new_owner_tag()
            try:
                if client is None:
                    used_workers = 1
                    for t in todo:
                        report(segment_target(t, refs, settings, out_dir, owner))
                else:
                    used_workers = _run_on_dask(
                        client, todo, refs, settings, out_dir, owner, retries, report
                    )
            finally:
                remove_temporaries(out_dir, owner)  # a killed worker's; never another program's
    elif progress is not None:
        progress(1.0, f"{done} of {len(targets)} up to date")
    ordered = [records[t.id] for t in targets]
    summary = os.path.join(out_dir, "summary.csv")
    write_summary(summary, ordered, targets)
    return CohortSummary(
        ordered,
        summary,
        time.perf_counter() - t0,
        plan.scheduler,
        used_workers,
        plan.threads,
        plan.reason,
    )


def _run_on_dask(client, todo, refs, settings, out_dir, owner, retries, report) -> int:
    from distributed import as_completed

    n_workers = len(client.scheduler_info().get("workers", {}))
    shared = client.scatter(refs, broadcast=True, hash=False)
    futures = {
        client.submit(
            segment_target,
            t,
            shared,
            settings,
            os.path.abspath(out_dir),
            owner,
            key=f"universeg-cohort-{t.id}-{(t.digest or 'x')[:12]}-{owner}",
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
