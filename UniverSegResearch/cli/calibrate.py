"""``python -m UniverSegResearch calibrate``: fit the network/prior fusion on validation structures."""

from __future__ import annotations

import json
import os
import time

from UniverSegLogic.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit how the network and the painted-slice prior are combined",
        description="Build evaluation-protocol episodes (k labeled slices per validation "
        "structure), run the network once per episode (cached), choose the fusion "
        "features on leave-one-case-out Dice, fit them on all episodes and write the "
        "fusion JSON (Resources/starter_fusion.json for the starter weights).",
    )
    p.add_argument(
        "--cases",
        required=True,
        metavar="MANIFEST",
        help="evaluation manifest (eval/manifest.json written by 'data prepare')",
    )
    p.add_argument("--roles", default="val", help="case roles to calibrate on (default: val)")
    p.add_argument(
        "--weights",
        default="starter",
        help="official, starter, or a weights file path (default: starter)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--k", default="2,3,5,8", help="numbers of labeled slices per episode")
    p.add_argument(
        "--support-size",
        type=int,
        default=None,
        help="support slices per target (default: the propagation default)",
    )
    p.add_argument(
        "--cache",
        default=os.path.join(".data", "calibration"),
        help="folder caching the network's logits per episode",
    )
    p.add_argument(
        "--features",
        default=None,
        metavar="INSIDE+OUTSIDE",
        help="only this candidate feature-set pair (e.g. sdf_fbs_nb+model_nb; default: choose "
        "among all on leave-one-case-out Dice)",
    )
    p.add_argument("--out", required=True, help="fusion JSON to write")
    p.add_argument("--report", default=None, help="JSON report of the candidates' scores")
    p.set_defaults(func=run)


def run(args) -> int:
    from UniverSegLogic.core.engines import EngineStore
    from UniverSegLogic.core.io import check_output_path
    from UniverSegLogic.core.propagator import PropagationOptions
    from UniverSegLogic.core.weights import load_weights

    from .. import calibrate as cal
    from ..evaluate import load_manifest
    from .evaluate import parse_ints

    inputs = [args.cases, args.weights]
    check_output_path(args.out, inputs, option="--out")  # before anything heavy
    if args.report:
        if os.path.abspath(args.report) == os.path.abspath(args.out):
            raise UsageError("--report and --out name the same file")
        check_output_path(args.report, [*inputs, args.out], option="--report")
    ks = parse_ints(args.k, "--k")
    inside_sets = outside_sets = None
    if args.features:
        inside_sets, _, outside = args.features.partition("+")
        if inside_sets not in cal.INSIDE_SETS or outside not in cal.OUTSIDE_SETS:
            raise UsageError(
                f"--features: expected INSIDE+OUTSIDE of {', '.join(cal.INSIDE_SETS)} and "
                f"{', '.join(cal.OUTSIDE_SETS)}, got {args.features!r}"
            )
        inside_sets, outside_sets = [inside_sets], [outside]
    support = args.support_size or PropagationOptions().support_size
    if support < 1:
        raise UsageError("--support-size must be at least 1")
    cases = load_manifest(args.cases, [r for r in args.roles.split(",") if r])
    w = load_weights(args.weights)
    loaded = EngineStore().get(args.weights, args.device)
    engine, desc = loaded.engine, loaded.description
    cache = os.path.join(args.cache, cal.weights_key(w.path))
    t0 = time.perf_counter()
    episodes = cal.build_episodes(
        cases, engine, cache, ks, 0, support, log=lambda s: print(s, flush=True)
    )
    print(f"{len(episodes)} episodes ready in {time.perf_counter() - t0:.0f} s", flush=True)
    params, report = cal.calibrate(
        episodes,
        log=lambda s: print(s, flush=True),
        inside_sets=inside_sets,
        outside_sets=outside_sets,
    )
    params.save(args.out, {"weights": desc, "support_size": support, "ks": ks})
    print(f"wrote {args.out}: {params.source}")
    if args.report:
        from UniverSegLogic.core.atomic import write_text

        write_text(args.report, json.dumps(report, indent=1))
    return 0
