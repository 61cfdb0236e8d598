"""``universeg-slicer cohort``: segment every target of a manifest from labeled reference volumes."""

from __future__ import annotations

import os
import sys

from ..errors import UsageError
from .propagate import add_engine_options, plural


def register(sub) -> None:
    p = sub.add_parser(
        "cohort",
        help="segment a whole cohort from one or a few labeled reference volumes",
        description="For every target of the manifest: align the reference volume(s) to it, use "
        "their labeled slices as UniverSeg's support (plus the target's own painted slices, if "
        "given), and write DIR/<id>.seg.nrrd, DIR/<id>.json and DIR/<id>.png; DIR/summary.csv "
        "lists every target. Up-to-date targets are skipped, so an interrupted run resumes. "
        "Every option is checked before anything is written; a run never replaces a file it did "
        "not write (an input, or a file without this tool's record). "
        "Exit code 0: every target succeeded; 3: some failed (see summary.csv).",
    )
    p.add_argument(
        "--targets", required=True, metavar="MANIFEST.csv", help="CSV with id,image[,labels]"
    )
    p.add_argument(
        "--reference",
        nargs=2,
        action="append",
        required=True,
        metavar=("IMG", "SEG"),
        help="a labeled reference volume and its segmentation (repeatable)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--segments", default=None, help="comma-separated segment names (default: all)")
    p.add_argument(
        "--axis", default="axial", help="slicing axis: axial, coronal, sagittal or 0/1/2"
    )
    p.add_argument(
        "--align",
        default="extent",
        choices=("extent", "affine", "none"),
        help="how a reference is brought onto each target: the body's extent (default), an "
        "affine registration started from it, or the stored physical coordinates",
    )
    p.add_argument(
        "--support-size", type=int, default=2, help="support slices per target slice (2)"
    )
    p.add_argument(
        "--scheduler",
        default="auto",
        help="auto (default: in this process unless a local Dask cluster pays off; the summary "
        "says which and why), local (a Dask cluster on this machine), a scheduler address such "
        "as tcp://HOST:8786, or inprocess (no Dask)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local workers (implies a local cluster; default: one per core on the CPU, as "
        "memory allows; 1 on a GPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="PyTorch threads per worker (default: cores / workers)",
    )
    p.add_argument("--retries", type=int, default=2, help="retries of a task whose worker died (2)")
    add_engine_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.support_size < 1:
        raise UsageError(f"--support-size must be at least 1, got {args.support_size}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.scheduler not in ("auto", "local", "inprocess"):
        from ..cohort.scheduler import probe_scheduler

        probe_scheduler(args.scheduler)  # before PyTorch is imported: a wrong address is quick
    from ..cohort.case import CohortSettings
    from ..cohort.runner import run_cohort
    from ..core.engine import cpu_bf16_choice, resolve_device
    from .propagate import ProgressBar, segment_names

    device = resolve_device(args.device)  # --device cuda without CUDA: say so first
    if args.weights == "official":
        from ..core.weights import official_path

        official_path(allow_download=True, echo=lambda m: print(m, file=sys.stderr))
    use_bf16, why = cpu_bf16_choice() if device == "cpu" else (False, "not on the CPU")
    settings = CohortSettings(
        segments=tuple(segment_names(args.segments)) if args.segments else None,
        axis=args.axis,
        align=args.align,
        device=args.device,
        weights=args.weights,
        support_size=args.support_size,
        threads=args.threads or 0,  # 0: the run's plan shares the cores out
        cpu_bf16=use_bf16,
        cpu_bf16_reason=why,
    )
    summary = run_cohort(
        args.targets,
        [tuple(r) for r in args.reference],
        args.out,
        settings,
        scheduler=args.scheduler,
        workers=args.workers,
        retries=args.retries,
        progress=ProgressBar(not args.quiet),
    )
    ok = sum(r.status == "ok" for r in summary.records)
    skipped = sum(r.status.startswith("skipped") for r in summary.records)
    where = {"inprocess": "in this process", "local": "local Dask cluster"}.get(
        summary.scheduler, f"Dask scheduler {summary.scheduler}"
    )
    how = (
        f"{where}, {plural(summary.workers, 'worker')} x {plural(summary.threads, 'thread')}; "
        if summary.workers
        else ""
    )
    print(
        f"{len(summary.records)} targets: {ok} segmented, {skipped} up to date, "
        f"{len(summary.failed)} failed; {summary.seconds:.1f} s ({how}{summary.reason})"
    )
    for r in summary.failed:
        print(f"  {r.id}: failed: {r.reason}")
    for r in summary.records:
        for flag in r.qc_flags:
            print(f"  {r.id}: check {flag}")
    print(f"wrote {os.path.abspath(summary.summary_csv)}")
    return summary.exit_code
