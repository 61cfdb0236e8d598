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
        default="local",
        help="local (a Dask cluster on this machine, default), a scheduler address such as "
        "tcp://HOST:8786, or inprocess (no Dask)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local workers (default: one per core on the CPU, as memory allows; 1 on a GPU)",
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
    from ..cohort.case import CohortSettings
    from ..cohort.runner import default_threads, default_workers, run_cohort
    from ..core.engine import cpu_bf16_choice, resolve_device
    from .propagate import ProgressBar, segment_names

    if args.support_size < 1:
        raise UsageError(f"--support-size must be at least 1, got {args.support_size}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    local = args.scheduler in ("local", "inprocess")
    device = resolve_device(args.device)  # --device cuda without CUDA: say so first
    workers = args.workers
    if workers is None:
        workers = default_workers(device) if args.scheduler == "local" else 1
    if args.scheduler == "inprocess" and workers != 1:
        raise UsageError("--scheduler inprocess runs one target at a time: leave out --workers")
    threads = args.threads or (default_threads(workers) if local else 1)
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
        threads=threads,
        cpu_bf16=use_bf16,
        cpu_bf16_reason=why,
    )
    summary = run_cohort(
        args.targets,
        [tuple(r) for r in args.reference],
        args.out,
        settings,
        scheduler=args.scheduler,
        workers=workers,
        retries=args.retries,
        progress=ProgressBar(not args.quiet),
    )
    ok = sum(r.status == "ok" for r in summary.records)
    skipped = sum(r.status.startswith("skipped") for r in summary.records)
    print(
        f"{len(summary.records)} targets: {ok} segmented, {skipped} up to date, "
        f"{len(summary.failed)} failed; {summary.seconds:.1f} s "
        f"({summary.scheduler}, {plural(summary.workers, 'worker')} x {plural(threads, 'thread')})"
    )
    for r in summary.failed:
        print(f"  {r.id}: failed: {r.reason}")
    for r in summary.records:
        for flag in r.qc_flags:
            print(f"  {r.id}: check {flag}")
    print(f"wrote {os.path.abspath(summary.summary_csv)}")
    return summary.exit_code
