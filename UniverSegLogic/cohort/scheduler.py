"""Where a cohort's targets are segmented: in this process, a local Dask cluster, or a running
Dask scheduler, and how the default is chosen.

* :func:`choose_scheduler`: the default (``--scheduler auto``), from measured cost ratios only
  (nothing is timed at run time; the choice never changes a result);
* :func:`plan_run`: workers and PyTorch threads for the scheduler asked for or chosen;
* :func:`probe_scheduler`: connect to a ``tcp://`` address and read the handshake a Dask scheduler
  sends first, within a few seconds, so that a closed port, a silent listener or a server that is
  not Dask is one line (this module does not import PyTorch, so the CLI can probe first);
* :func:`open_client`: a connected client (a local cluster started and stopped) with at least
  one worker, every failure a one-line :class:`~UniverSegLogic.errors.UsageError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

from ..errors import UsageError, one_line

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
            if scheduler == "local" and not _have_dask():
                scheduler, workers = "inprocess", None
                reason += ", but dask.distributed is not installed (pip install '.[cohort]')"
    if scheduler == "inprocess":
        if workers not in (None, 1):
            raise UsageError("--scheduler inprocess runs one target at a time: leave out --workers")
        return RunPlan("inprocess", 1, threads or cores, reason)
    if scheduler == "local":
        workers = workers or default_workers(device)
        return RunPlan("local", workers, threads or max(1, cores // workers), reason)
    return RunPlan(scheduler, 0, threads or 1, "a running Dask scheduler")


def _have_dask() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


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
                raise ValueError(f"it answered {header!r}")
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
            f"{address} is not a Dask scheduler (no Dask handshake: {one_line(exc)})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - msgpack's own errors: the answer is not Dask's
        raise UsageError(
            f"{address} is not a Dask scheduler (no Dask handshake: {type(exc).__name__})"
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
            "running a cohort on Dask needs dask.distributed: pip install '.[cohort]' in a checkout "
            "of this repository (or use --scheduler inprocess)"
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
            try:  # run_cohort has probed the address (probe_scheduler)
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
