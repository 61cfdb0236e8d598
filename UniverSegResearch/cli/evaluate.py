"""``python -m UniverSegResearch evaluate``: our propagation vs Fill between slices vs nearest-slice copy."""

from __future__ import annotations

import os
import sys
import time
from typing import List

from UniverSegLogic.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score propagation against Fill between slices on ground-truth masks",
        description="For every ground-truth mask and every k: keep k slices spread over the mask's "
        "extent, hide the others, and fill them with UniverSeg (this package), Slicer's "
        "Fill between slices and a nearest-slice copy. Writes Dice per mask, k and method.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image file (NRRD, NIfTI, ...)")
    src.add_argument(
        "--cases",
        metavar="MANIFEST",
        help="evaluation manifest (eval/manifest.json written by 'data prepare')",
    )
    src.add_argument(
        "--cohort",
        action="store_true",
        help="cohort labeling vs atlas registration: each of the two TotalSegmentator CT "
        "training cases segmented from the other as reference (Dice per structure, seconds "
        "per case; UniverSegResearch/cohort_eval.py)",
    )
    p.add_argument(
        "--cache",
        default=os.path.join(".data", "cache"),
        help="with --cohort: download cache of the TotalSegmentator files (default: .data/cache)",
    )
    p.add_argument(
        "--structures",
        default=None,
        help="with --cohort: comma-separated structures (default: every structure both scans "
        "label with >= 500 voxels over >= 3 axial slices)",
    )
    p.add_argument(
        "--mask",
        action="append",
        default=[],
        help="ground-truth binary mask on the image grid (repeatable; with --image)",
    )
    p.add_argument(
        "--roles",
        default=None,
        help="with --cases: comma-separated case roles to use (e.g. val or unseen; default: all)",
    )
    p.add_argument("--k", default="2,3,5,8", help="comma-separated numbers of labeled slices")
    p.add_argument(
        "--axis",
        default="0",
        help="slicing axis: array axis 0/1/2 of the KJI array, or axial, coronal, "
        "sagittal (default: 0)",
    )
    p.add_argument(
        "--weights",
        default="starter",
        help="official, starter, or a weights file path (default: starter)",
    )
    p.add_argument(
        "--fusion",
        default=None,
        help="fusion parameters JSON (default: the one shipped for the weights)",
    )
    p.add_argument(
        "--fusion-model",
        default="auto",
        help="auto (the learned fusion where the weights have one), learned, logistic, or a "
        "learned-fusion .pt file (default: auto)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--support-size",
        type=int,
        default=None,
        help="support slices per target (default: the propagation default)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of universeg, fill_between_slices, nearest_slice (default: "
        "all); with --cohort of ours, atlas, ours_affine, atlas_affine (default: all)",
    )
    p.add_argument(
        "--json",
        required=True,
        help="output JSON file (with --cohort also a Markdown report beside it, .md)",
    )
    p.add_argument("--figures", default=None, help="folder for Dice-vs-k curves and montages")
    p.add_argument("--quiet", action="store_true", help="only the summary table")
    p.add_argument(
        "--session",
        action="store_true",
        help="simulate annotation sessions instead: from the k=2 slices, paint the slice each "
        "strategy picks until Dice >= --target-dice or --max-painted slices "
        "(UniverSegResearch/session_eval.py)",
    )
    p.add_argument(
        "--strategies",
        default="ours_suggest,ours_bisect,fbs_bisect",
        help="with --session: comma-separated strategies",
    )
    p.add_argument("--target-dice", type=float, default=0.90, help="with --session (0.90)")
    p.add_argument("--max-painted", type=int, default=20, help="with --session (20)")
    p.add_argument(
        "--logit-cache",
        default=None,
        metavar="DIR",
        help="keep the network's logits in DIR between runs (exact; a developer speed-up)",
    )
    p.set_defaults(func=run)


def parse_ints(text: str, what: str) -> List[int]:
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not out or any(v < 1 for v in out):
        raise UsageError(f"{what}: expected positive integers, got {text!r}")
    return out


def _session_factory(args, axis, engine, options, fusion):
    """Propagator per case, its logits kept in ``--logit-cache`` when given (else None)."""
    if not args.logit_cache:
        return None
    from ..logit_store import session_factory

    return session_factory(args.logit_cache, args.weights, axis, engine, options, fusion)


def run(args) -> int:
    from UniverSegLogic.core.geometry import resolve_axis
    from UniverSegLogic.core.io import check_output_path, read_image
    from UniverSegLogic.core.prior import FusionParams
    from UniverSegLogic.core.propagator import PropagationOptions
    from UniverSegLogic.core.slices import slice_extent

    from .. import evaluate as ev

    # before anything heavy: outputs writable, none of them an input
    inputs = [args.image, args.cases, args.fusion, args.weights, *args.mask]
    check_output_path(args.json, inputs, option="--json")
    if args.figures:
        check_output_path(args.figures, inputs, option="--figures", folder=True)
    if args.cohort:
        from .. import cohort_eval

        return cohort_eval.run_cli(args)
    fusion = FusionParams.load(args.fusion) if args.fusion else None
    ks = parse_ints(args.k, "--k")
    methods = [m for m in (args.methods or ",".join(ev.METHODS)).replace(" ", "").split(",") if m]
    bad = [m for m in methods if m not in ev.METHODS]
    if bad or not methods:
        raise UsageError(
            f"--methods: unknown method {bad[0] if bad else '(none)'}; use {', '.join(ev.METHODS)}"
        )
    if args.image:
        if not args.mask:
            raise UsageError("--image needs at least one --mask")
        image = read_image(args.image)
        masks = [
            ev.EvalMask(os.path.basename(m).split(".")[0], ev.read_mask(m, image))
            for m in args.mask
        ]
        cases = [ev.EvalCase(os.path.basename(args.image).split(".")[0], image, masks)]
    else:
        if args.mask:
            raise UsageError("--mask goes with --image, not with --cases")
        roles = [r for r in args.roles.split(",") if r] if args.roles else None
        cases = ev.load_manifest(args.cases, roles)
    axis = resolve_axis(cases[0].image, args.axis)
    for c in cases:
        for m in c.masks:
            if slice_extent(m.mask, axis) is None:
                raise UsageError(f"mask {m.name!r} of {c.name} is empty")
    if args.session:
        from .. import session_eval

        return session_eval.run_cli(args, cases, axis)

    engine = None
    options = PropagationOptions(
        device=args.device, weights=args.weights, fusion_model=args.fusion_model
    )
    if args.support_size is not None:
        if args.support_size < 1:
            raise UsageError("--support-size must be at least 1")
        options.support_size = args.support_size
    if "universeg" in methods:
        from UniverSegLogic.core.engines import EngineStore

        engine = EngineStore().get(args.weights, args.device).engine
    log = None if args.quiet else (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    outcomes = ev.evaluate_cases(
        cases,
        ks,
        axis,
        methods,
        engine,
        options,
        fusion,
        keep_predictions=bool(args.figures),
        log=log,
        session_factory=_session_factory(args, axis, engine, options, fusion),
    )
    total = time.perf_counter() - t0
    ev.write_json(args.json, outcomes)
    by_role = {}
    for c in cases:
        by_role.setdefault(c.role or "all", []).append(c.name)
    if len(by_role) > 1:
        for role, names in by_role.items():
            sel = [o for o in outcomes if o.case in names]
            print(ev.summary_table(sel, f"== role {role}: {', '.join(names)}"))
    print(ev.summary_table(outcomes, f"== all cases ({len(cases)})"))
    print(
        f"evaluated {len({o.mask for o in outcomes})} masks x {len(ks)} k x {len(methods)} "
        f"methods in {total:.1f} s; wrote {args.json}"
    )
    if args.figures:
        paths = ev.write_figures(args.figures, outcomes, cases, axis)
        print(f"wrote {len(paths)} figures to {args.figures}")
    sys.stdout.flush()
    return 0
