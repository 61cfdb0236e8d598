"""Run a cohort: every target of a manifest, on this machine or a Dask cluster.

:func:`run_cohort` first checks everything a run needs (options, manifest, references, weights,
the output folder, the scheduler) and writes nothing when one of them is wrong: no output folder
is created, no earlier result is touched. It then skips the targets whose outputs are up to date
(their record's digest covers the content of the target's files, the references, the weights and
the options) and runs :func:`case.segment_target` for the others:

* ``scheduler="auto"`` (default): in this process when a local cluster would not pay off (a few
  targets, one core, a GPU), else a local cluster (:func:`choose_scheduler`; which one and why is
  in the summary);
* ``scheduler="local"``: a ``dask.distributed.LocalCluster`` of ``workers`` processes on this
  machine, one task at a time each, ``threads`` PyTorch threads each (default: the cores shared
  out), memory per worker from the engine's working-memory budget;
* ``scheduler="tcp://HOST:PORT"`` (any address Dask takes): a running scheduler, e.g. one started
  by ``dask-jobqueue`` on SLURM/PBS; workers must see the target files and ``out_dir``. A TCP
  address is probed first (:func:`probe_scheduler`: connect and read the Dask handshake, a few
  seconds at most), so a wrong address is one line, not a hang;
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

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import struct
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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

#: Target ids become file names: letters, digits, '.', '_' and '-' only.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
#: Retries of a task whose worker died (Dask's own accounting of lost workers).
DEFAULT_RETRIES = 2
#: Memory a worker needs besides the engine's working budget (model, volumes, Python).
WORKER_BASE_BYTES = 2 * 1024**3
#: How long the probe of a scheduler address may take: TCP connect, then its Dask handshake (s).
CONNECT_TIMEOUT_S = 5.0
#: How long Dask's own client may take to connect once the probe has passed (s).
CLIENT_TIMEOUT_S = 10.0
#: Largest Dask handshake message the probe reads (a real one is about 60 bytes).
MAX_HANDSHAKE_BYTES = 64 * 1024
#: How long a run waits for a scheduler that has no worker yet to get one (s).
WORKER_WAIT_S = 120.0
#: The header of ``summary.csv`` (an existing file without it is not this tool's summary).
SUMMARY_COLUMNS = ["id", "status", "reason", "seconds", "qc", "volumes_ml", "segmentation"]

# What the default scheduler choice (:func:`choose_scheduler`) is based on, in units of one
# target's time on one thread alone, measured on the 2-core machine (docs/results/cohort/README.md):
#: a local cluster's start: 2 worker processes up, PyTorch imported and the weights loaded in
#: 7.9 s (median of 3) while one target took 20.8 s on one thread (median of 8), same conditions
CLUSTER_START_CASES = 0.38
#: one target on a single-thread worker while every core works (15.13 s vs 14.07 s alone)
BUSY_CASE = 1.075
#: the share of a target's time that more PyTorch threads do not shorten: in-process on 2 cores
#: a target takes 9.66 s, 0.687 of its one-thread time (Amdahl: s + (1 - s) / 2 = 0.687)
SERIAL_SHARE = 0.374

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


def default_threads(workers: int) -> int:
    """PyTorch threads per worker: this machine's cores shared out (at least 1)."""
    return max(1, machine_cores() // max(1, workers))


def machine_cores() -> int:
    """The cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, int(cores or 1))


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


def choose_scheduler(targets: int, cores: int, workers: int, device: str) -> Tuple[str, str]:
    """(``"inprocess"`` or ``"local"``, why) for ``targets`` targets to segment: a local cluster
    of ``workers`` single-thread workers only where its estimated time is lower than this process
    using all ``cores``. Both estimates are in units of one target's one-thread time, from
    measured ratios (:data:`CLUSTER_START_CASES`, :data:`BUSY_CASE`, :data:`SERIAL_SHARE`);
    nothing is timed at run time, and the choice never changes a result."""
    if targets == 0:
        return "inprocess", "nothing to segment"
    if device != "cpu":
        return "inprocess", f"on {device}, which local workers would share"
    if cores < 2 or workers < 2:
        return "inprocess", "one core" if cores < 2 else "memory for one worker only"
    inprocess = targets * (SERIAL_SHARE + (1.0 - SERIAL_SHARE) / cores)
    cluster = CLUSTER_START_CASES + math.ceil(targets / workers) * BUSY_CASE
    ratio = cluster / inprocess
    if ratio < 1.0:
        return "local", (
            f"{targets} targets on {cores} cores: a local cluster is estimated at "
            f"{ratio:.2f}x the in-process time"
        )
    return "inprocess", (
        f"{targets} target{'s' if targets != 1 else ''} on {cores} cores: a local cluster would "
        f"take an estimated {ratio:.2f}x as long"
    )


@dataclass
class RunPlan:
    """Where the targets of a run are segmented."""

    scheduler: str  # "inprocess", "local" or a scheduler address
    workers: int
    threads: int  # PyTorch threads per worker (or in this process)
    reason: str


def plan_run(
    scheduler: str, workers: Optional[int], threads: int, targets: int, device: str
) -> RunPlan:
    """The :class:`RunPlan` for ``targets`` targets to segment: ``scheduler`` as asked, or for
    ``"auto"`` the one :func:`choose_scheduler` picks (a local cluster when ``workers`` is given);
    ``threads`` 0 means the cores shared out among the workers."""
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    cores = machine_cores()
    reason = "asked for"
    if scheduler == "auto":
        if workers is not None:
            scheduler, reason = "local", f"{workers} workers asked for"
        else:
            n = default_workers(device)
            scheduler, reason = choose_scheduler(targets, cores, n, device)
            workers = n if scheduler == "local" else None
    if scheduler == "inprocess":
        if workers not in (None, 1):
            raise UsageError("--scheduler inprocess runs one target at a time: leave out --workers")
        return RunPlan("inprocess", 1, threads or cores, reason)
    if scheduler == "local":
        workers = workers or default_workers(device)
        return RunPlan("local", workers, threads or max(1, cores // workers), reason)
    return RunPlan(scheduler, 0, threads or 1, "a running Dask scheduler")


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


def _recv_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(min(65536, n - len(data)))
        if not chunk:
            raise ConnectionError("it closed the connection")
        data += chunk
    return data


def _handshake_of(body: bytes) -> dict:
    """The message of one Dask frame set (its frame count, frame lengths, then the frames; the
    handshake is a msgpack map), or ValueError."""
    import msgpack

    if len(body) < 16:
        raise ValueError("too short")
    (count,) = struct.unpack_from("<Q", body, 0)
    if not 1 <= count <= 8 or len(body) < 8 * (1 + count):
        raise ValueError("not a Dask frame set")
    lengths = struct.unpack_from(f"<{count}Q", body, 8)
    start = 8 * (1 + count)
    if sum(lengths) > len(body) - start:
        raise ValueError("not a Dask frame set")
    message = msgpack.unpackb(body[start : start + lengths[0]], raw=False)
    if not isinstance(message, dict) or "pickle-protocol" not in message:
        raise ValueError("not a Dask handshake")
    return message


def probe_scheduler(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """For a ``tcp://`` address (or ``HOST:PORT``): connect and read the handshake a Dask
    scheduler sends first, within ``timeout`` seconds in all; UsageError (one line) when nothing
    listens, nothing answers, or the answer is not Dask's. Other schemes are left to Dask."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme != "tcp":
            return
        host, port = parse_host_port(location)
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"--scheduler {address}: not a scheduler address ({one_line(exc)})"
        ) from None
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            header = _recv_exactly(sock, 8, deadline)
            (size,) = struct.unpack("<Q", header)
            if not 16 <= size <= MAX_HANDSHAKE_BYTES:
                raise ValueError(f"its first message would be {size} bytes")
            _handshake_of(_recv_exactly(sock, size, deadline))
    except (socket.timeout, TimeoutError):
        raise UsageError(
            f"the Dask scheduler {address} did not answer within {timeout:g} s: is it a Dask "
            "scheduler (the address dask scheduler prints)?"
        ) from None
    except ConnectionError as exc:
        if isinstance(exc, ConnectionRefusedError):
            raise UsageError(
                f"cannot reach the Dask scheduler {address}: connection refused (nothing listens "
                "there; is the scheduler running?)"
            ) from None
        raise UsageError(
            f"{address} is not a Dask scheduler ({one_line(exc)} during the handshake)"
        ) from None
    except OSError as exc:
        raise UsageError(
            f"cannot reach the Dask scheduler {address}: {exc.strerror or one_line(exc)}"
        ) from None
    except (ValueError, struct.error, MemoryError) as exc:
        raise UsageError(
            f"{address} is not a Dask scheduler (its answer is not a Dask handshake: "
            f"{one_line(exc)})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - msgpack's own errors: the answer is not Dask's
        raise UsageError(
            f"{address} is not a Dask scheduler (its answer is not a Dask handshake: "
            f"{type(exc).__name__})"
        ) from None


@contextlib.contextmanager
def open_client(plan: RunPlan) -> Iterator[object]:
    """A connected ``distributed.Client`` for ``plan`` (None for in-process), with at least
    one worker; closed (and a local cluster stopped) when the block ends. Any failure to get
    there is a one-line UsageError."""
    if plan.scheduler == "inprocess":
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UsageError(
            "running a cohort on Dask needs dask.distributed: pip install 'universeg-slicer[cohort]' "
            "(or use --scheduler inprocess)"
        ) from None
    for name in ("distributed", "tornado", "bokeh"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    cluster = None
    try:
        if plan.scheduler == "local":
            try:
                cluster = LocalCluster(
                    n_workers=plan.workers,
                    threads_per_worker=1,
                    processes=True,
                    memory_limit=worker_memory_bytes(plan.workers),
                    dashboard_address=None,
                    host="127.0.0.1",
                    silence_logs=logging.CRITICAL,
                )
                client = Client(cluster)
            except Exception as exc:  # noqa: BLE001 - Dask's startup errors, one line
                raise UsageError(f"cannot start a local Dask cluster: {one_line(exc)}") from None
        else:
            probe_scheduler(plan.scheduler)
            try:
                client = Client(plan.scheduler, timeout=CLIENT_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - incl. MemoryError from a bogus frame size
                raise UsageError(
                    f"cannot use the Dask scheduler {plan.scheduler}: {one_line(exc)}"
                ) from None
        with client:
            if not client.scheduler_info().get("workers"):
                try:
                    client.wait_for_workers(1, timeout=WORKER_WAIT_S)
                except (TimeoutError, OSError):
                    raise UsageError(
                        f"the Dask scheduler {plan.scheduler} has no worker (none joined within "
                        f"{WORKER_WAIT_S:g} s): start workers, then run again"
                    ) from None
            yield client
    finally:
        if cluster is not None:
            cluster.close()


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
