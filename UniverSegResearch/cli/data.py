"""``python -m UniverSegResearch data``: fetch labeled volumes and prepare training/evaluation data."""

from __future__ import annotations

import os
import time

from UniverSegLogic.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "data",
        help="prepare training and evaluation data (developers)",
        description="Fetch the labeled public volumes (TotalSegmentator test files, Colin27 "
        "AAL/Brodmann from Debian mricron-data, MNI152 from nilearn, slicerio's chest "
        "CT) and write 128x128 slice stacks for training plus full-resolution "
        "evaluation masks. Downloads are cached; the output folder is rewritten.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    prep = actions.add_parser(
        "prepare",
        help="fetch (cached) and write the prepared-data folder",
        description="Write OUT/train, OUT/val (npz slice stacks per case and axis), OUT/eval "
        "(image.nrrd + masks/*.nrrd per evaluation case) and the manifests.",
    )
    prep.add_argument(
        "--out",
        default=os.path.join(".data", "prepared"),
        help="prepared-data folder (default: .data/prepared)",
    )
    prep.add_argument(
        "--cache",
        default=os.path.join(".data", "cache"),
        help="download cache (default: .data/cache)",
    )
    prep.add_argument(
        "--sources",
        default=None,
        help="comma-separated subset of: slicerio, totalsegmentator, mricron, "
        "nilearn (default: all)",
    )
    prep.add_argument("--quiet", action="store_true", help="print only the summary table")
    prep.set_defaults(func=run)


def run(args) -> int:
    from .. import data

    sources = tuple(data.SOURCES)
    if args.sources:
        sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
        unknown = [s for s in sources if s not in data.SOURCES]
        if unknown or not sources:
            raise UsageError(
                f"--sources: unknown {', '.join(unknown) or 'empty list'} "
                f"(choose from {', '.join(data.SOURCES)})"
            )
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Platform")
    start = time.monotonic()
    summary = data.prepare(
        args.out, args.cache, sources, log=(lambda msg: None) if args.quiet else print
    )
    print(summary.table())
    if not args.quiet:
        print(f"done in {time.monotonic() - start:.0f} s")
    return 0
