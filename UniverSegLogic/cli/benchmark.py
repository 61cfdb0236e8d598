"""``universeg-slicer benchmark``: reference vs engine speed, exactness, volume propagation.

Also runnable without the CLI's other commands (and their imaging dependencies):
``python -m UniverSegLogic.cli.benchmark --device cuda --json OUT.json``.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Tuple

from .propagate import add_device_option, plural


def _shape(text: str) -> Tuple[int, int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            "volume shape must be K,J,I (slices,rows,cols), e.g. 200,256,256"
        )
    return parts[0], parts[1], parts[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_device_option(p)
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (32x32 canvas, S=2/4, small volume): checks that it runs",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="engine precision (auto: fp16 on CUDA, bf16 on CPUs with AMX, else fp32)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (best is kept)")
    p.add_argument(
        "--support",
        type=int,
        action="append",
        default=None,
        metavar="S",
        help="support sizes to time (repeatable; default 16 and 64)",
    )
    p.add_argument("--batch", type=int, default=None, help="engine target batch")
    p.add_argument("--ref-batch", type=int, default=None, help="reference target batch")
    p.add_argument(
        "--volume-shape",
        type=_shape,
        action="append",
        default=None,
        metavar="K,J,I",
        help="volume(s) for the propagation timing (default 200,256,256)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--sample",
        default=None,
        metavar="NPZ",
        help="sample slices as an npz file (machines without slicerio, e.g. the GPU machine: "
        "docs/results/benchmarks/chest_ct_slices.npz); default: slicerio's chest CT",
    )
    p.add_argument(
        "--cohort",
        type=int,
        default=None,
        metavar="N",
        help="instead: time 'cohort' on N synthetic targets with 1 and 2 local Dask workers "
        "(UniverSegLogic/benchmark/cohort_scaling.py; needs the cohort extra)",
    )
    p.add_argument(
        "--clinical",
        action="store_true",
        help="instead: the annotation loop on a 512x512x400 CT built from slicerio's chest CT, "
        "1 and 3 segments painted on 5 slices, against Slicer's Fill between slices on the same "
        "painting (first run, re-run after one corrected slice, peak memory, Dice), the command "
        "line on the same files, and the 256x256x200 annotation loop (UniverSegLogic/benchmark/"
        "clinical.py; --quick: 64x64x40)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="let the engine use torch.compile for large calls (opt-in; slow to start)",
    )


def run(args: argparse.Namespace) -> int:
    import os

    from ..core.atomic import output_error
    from ..core.io import check_output_path

    if args.json:  # before the timing runs (the folder is created, as the result's writer does)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        except OSError as exc:
            raise output_error(exc, args.json) from None
        check_output_path(args.json, [args.sample], option="--json")
    from ..core.engines import torch_environment

    torch_environment()
    if args.cohort is not None:
        return _cohort(args)
    if args.clinical:
        return _clinical(args)
    import torch

    from ..benchmark.speed import run_benchmark, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_benchmark(
        device=args.device,
        quick=args.quick,
        precision=args.precision,
        repeats=args.repeats,
        volume_shapes=args.volume_shape,
        supports=args.support,
        batch=args.batch,
        ref_batch=args.ref_batch,
        compile=args.compile,
        sample_path=args.sample,
    )
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def _cohort(args: argparse.Namespace) -> int:
    import json

    from ..benchmark.cohort_scaling import run_cohort_scaling
    from ..core.atomic import write_text
    from ..errors import UsageError

    if args.cohort < 2:
        raise UsageError(f"--cohort needs at least 2 targets, got {args.cohort}")
    result = run_cohort_scaling(args.cohort)
    for r in result["rows"]:
        print(
            f"  {plural(r['workers'], 'worker')} x {plural(r['threads_per_worker'], 'thread')}: "
            f"{r['wall_s']} s, "
            f"{r['speedup_vs_first']}x the first row, identical: {r['identical_to_first']}"
        )
    if args.json:
        write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _clinical(args: argparse.Namespace) -> int:
    from ..benchmark.clinical import run_clinical
    from ..benchmark.speed import write_json

    if args.device not in ("auto", "cpu"):
        from ..errors import UsageError

        raise UsageError("--clinical measures the CPU path: leave out --device or use cpu")
    if args.precision not in ("auto", "fp32", "bf16"):
        from ..errors import UsageError

        raise UsageError("--clinical: --precision must be auto, fp32 or bf16")
    result = run_clinical(
        quick=args.quick, precision=args.precision, threads=args.threads, repeats=args.repeats
    )
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark",
        help="time the reference forward pass against the inference engine",
        description="Slices/s and peak memory of the reference forward pass and the engine "
        "(S=16, S=64), exactness on sample data, and an end-to-end propagation.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="universeg-slicer benchmark")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
