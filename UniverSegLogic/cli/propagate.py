"""``universeg-slicer propagate``: propagate labeled slices of segments through an image file."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

from ..core.device import DEVICE_NAMES
from ..core.slices import AXIS_AUTO
from ..errors import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "propagate",
        help="fill in every slice of segments from a few labeled slices",
        description="Propagate the labeled slices of segments through the image with UniverSeg and "
        "write a .seg.nrrd (names, colors and geometry kept; labeled slices unchanged).",
    )
    p.add_argument("--image", required=True, help="image file (NRRD, NIfTI, ...)")
    p.add_argument(
        "--labels",
        required=True,
        help="labels on the image grid: .seg.nrrd or an integer label map",
    )
    p.add_argument("--out", required=True, help="output .seg.nrrd")
    add_propagation_options(p)
    p.add_argument(
        "--support",
        nargs=2,
        action="append",
        default=[],
        metavar=("IMG", "SEG"),
        help="another labeled volume whose same-named segments serve as support (repeatable)",
    )
    p.add_argument(
        "--suggest",
        type=int,
        default=0,
        metavar="N",
        help="also suggest the N slices per segment that painting would improve most (0)",
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="REPORT.json",
        help="write per-segment labeled, predicted and suggested slices and the per-slice "
        "uncertainty (slice numbers along the propagation axis, array order)",
    )
    p.set_defaults(func=run)


def add_propagation_options(p: argparse.ArgumentParser) -> None:
    """The propagation options of ``propagate`` (and the engine's, :func:`add_engine_options`)."""
    p.add_argument(
        "--segments",
        default=None,
        help="comma-separated segment names or IDs to propagate (default: all)",
    )
    p.add_argument(
        "--axis",
        default=AXIS_AUTO,
        help="slicing axis: auto (the axis the painted slices lie on; an error when segments "
        "lie on different axes), axial, coronal, sagittal, or an array axis 0/1/2 of the KJI "
        "array (default: auto)",
    )
    p.add_argument(
        "--labeled-slices",
        action="append",
        default=[],
        metavar="[NAME:]I,J,...",
        help="slices that count as labeled (an empty one is labeled background); "
        "'NAME:3,9,15' for one segment, '3,9,15' for all (default: the non-empty "
        "slices of each segment)",
    )
    p.add_argument(
        "--support-size",
        type=int,
        default=None,
        help="support slices per target, bracketing first (default: 2, as calibrated)",
    )
    p.add_argument(
        "--ensemble",
        type=int,
        default=1,
        help="average predictions over this many support subsets (1)",
    )
    p.add_argument("--flips", action="store_true", help="add mirrored copies of the support")
    p.add_argument(
        "--no-prior",
        action="store_true",
        help="network only: no shape prior between labeled slices",
    )
    p.add_argument(
        "--fusion-model",
        default="logistic",
        help="fusion of the network with the painted slices: logistic (the calibrated per-pixel "
        "rule), learned (the learned fusion shipped with the starter weights: a little more "
        "accurate, about 1.5x the time; the logistic rule for other weights), auto (= learned), "
        "or a learned-fusion .pt file (default: logistic)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="the network's numeric precision on the CPU (auto: bf16 on CPUs with AMX, else "
        "fp32; UNIVERSEG_CPU_BF16=0/1 sets what auto means). Printed, and kept in the output's "
        "UniverSeg.Precision tag",
    )
    add_engine_options(p)


def add_device_option(p: argparse.ArgumentParser) -> None:
    """``--device``, declared here once for every command that runs the network."""
    p.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_NAMES,
        help="auto (an NVIDIA GPU, else the Apple GPU, else the CPU), cpu, cuda or mps (auto)",
    )


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--weights`` and ``--quiet`` (``propagate``, ``demo``, ``cohort``)."""
    add_device_option(p)
    p.add_argument(
        "--weights",
        default="starter",
        help="official (downloaded once, research-only license), starter, or a file path",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_labeled_slices(values: List[str], names: List[str], resolve=None) -> Dict[str, List[int]]:
    """``['3,9', 'liver:1,2']`` -> {segment: [slices]}; a bare list applies to every segment.

    Without ``resolve`` the keys are the ``names``; with it, ``resolve(NAME)`` gives the key of
    the segment ``NAME`` refers to (by ID, or by a name no other segment has) and a bare list
    applies to every key in ``names``."""
    out: Dict[str, List[int]] = {}
    for v in values:
        name, _, lst = v.rpartition(":")
        try:
            idx = [int(x) for x in lst.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise UsageError(
                f"--labeled-slices {v!r}: expected comma-separated slice numbers"
            ) from None
        if not idx:
            raise UsageError(f"--labeled-slices {v!r}: no slice number given")
        if resolve is not None:
            targets = names if not name else [resolve(name)]
        else:
            targets = names if not name else [name]
        for n in targets:
            if n not in names:
                raise UsageError(f"--labeled-slices: unknown segment {name or n!r}")
            out.setdefault(n, []).extend(idx)
    return out


class ProgressBar:
    """A one-line text progress bar on stderr."""

    def __init__(self, enabled: bool = True, width: int = 30):
        self.enabled = enabled and sys.stderr is not None
        self.width = width
        self._last = -1
        self._finished = False

    def __call__(self, fraction: float, message: str) -> None:
        if not self.enabled or self._finished:
            return
        pct = int(fraction * 100)
        if pct == self._last and fraction < 1.0:
            return
        self._last = pct
        filled = int(self.width * fraction)
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(f"\r[{bar}] {pct:3d}% {message[:40]:<40}")
        if fraction >= 1.0:
            sys.stderr.write("\n")
            self._finished = True
        sys.stderr.flush()


def options_from_args(args):
    """:class:`PropagationOptions` from the shared command-line options (validated there)."""
    from ..core.propagator import PropagationOptions

    axis = int(args.axis) if str(args.axis).strip().isdigit() else args.axis
    values = dict(
        axis=axis,
        ensemble=args.ensemble,
        flips=args.flips,
        device=args.device,
        weights=args.weights,
        use_prior=not args.no_prior,
        fusion_model=args.fusion_model,
        precision=getattr(args, "precision", "auto"),
    )
    if args.support_size is not None:
        values["support_size"] = args.support_size
    try:
        return PropagationOptions(**values)
    except UsageError as exc:
        raise UsageError(f"--{str(exc).replace('_', '-')}") from None


def print_notes(notes: List[str]) -> None:
    """One-time messages of a run, on stderr."""
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def select_segments(seg, spec: Optional[str]) -> List:
    """The segments named in ``spec`` (comma-separated names or IDs), or all of them."""
    if not seg.segments:
        raise UsageError("the segmentation holds no segment")
    if not spec:
        return list(seg.segments)
    chosen: List = []
    for name in segment_names(spec) or []:
        segment = seg.get(name)
        if not any(segment is c for c in chosen):
            chosen.append(segment)
    if not chosen:
        raise UsageError(f"--segments {spec!r}: no segment of the labels is named so")
    return chosen


def segment_names(spec: Optional[str]) -> Optional[List[str]]:
    """``--segments`` as a list of names or IDs (None: all segments)."""
    names = [n.strip() for n in spec.split(",") if n.strip()] if spec else []
    return names or None


def run(args) -> int:
    from ..core.geometry import axis_name
    from ..core.io import (
        Segmentation,
        check_output_path,
        read_image,
        read_segmentation,
        write_segmentation,
    )
    from ..core.propagator import Propagator, SegmentInput, SupportVolume

    if not args.out.lower().endswith(".seg.nrrd"):
        raise UsageError(f"--out must end with .seg.nrrd, got {args.out}")
    if args.suggest < 0:
        raise UsageError(f"--suggest must be 0 or more, got {args.suggest}")
    # before anything heavy: the output must be writable and must not be one of the inputs
    inputs_given = [
        args.image,
        args.labels,
        args.weights,
        *(p for pair in args.support for p in pair),
    ]
    check_output_path(args.out, inputs_given)
    if args.report:
        if os.path.abspath(args.report) == os.path.abspath(args.out):
            raise UsageError("--report must not be the --out file")
        check_output_path(args.report, inputs_given)
    options = options_from_args(args)
    from ..core.engines import torch_environment

    torch_environment()
    from ..core.engine import resolve_device

    resolve_device(options.device)  # --device cuda without CUDA: say so before reading anything
    image = read_image(args.image)
    labels = read_segmentation(args.labels, image, segment_names(args.segments))
    chosen = select_segments(labels, args.segments)
    options = resolve_auto_axis(options, image, chosen)
    # segments are told apart by their position in the file, never by name
    keys = {id(s): str(i) for i, s in enumerate(labels.segments)}
    labeled = parse_labeled_slices(
        args.labeled_slices, [keys[id(s)] for s in chosen], lambda n: keys[id(labels.get(n))]
    )
    support = []
    for img_path, seg_path in args.support:
        simg = read_image(img_path)
        sseg = read_segmentation(seg_path, simg)
        support.append(SupportVolume(simg, {s.name: s.mask for s in sseg.segments}))
    inputs = [SegmentInput(keys[id(s)], s.name, s.mask, labeled.get(keys[id(s)])) for s in chosen]
    session = Propagator(image, options, support_volumes=support)
    result = session.propagate(inputs, progress=ProgressBar(not args.quiet))
    print_notes(result.notes)
    done = {r.key: r for r in result.segments}
    keep_out(result, [s.mask for s in labels.segments if keys[id(s)] not in done], session.axis)
    out_segments = []
    for s in labels.segments:
        r = done.get(keys[id(s)])
        fields = dict(s.fields)
        if r is not None:  # how the prediction was computed, in the segment's tags
            fields["tags"] = {**dict(fields.get("tags") or {}), **result.tags()}
        out_segments.append(
            type(s)(s.name, r.mask if r is not None else s.mask, s.color, s.id, fields)
        )
    write_segmentation(args.out, Segmentation(image, out_segments))
    print(
        f"weights: {result.weights}; device: {result.device}; precision: {result.precision} "
        f"({result.precision_reason}); {result.seconds:.1f} s"
    )
    print(f"axis: {axis_name(image, session.axis)} (array axis {session.axis})")
    inputs = [inp for inp in inputs if inp.key in done]
    for inp in inputs:
        r = result.get(inp.key)
        kept = sorted(set(r.labeled_slices) - set(inp.labeled_slices or r.labeled_slices))
        if inp.labeled_slices and kept:
            print(
                f"  {r.name}: painted slices {_ranges(kept)} are not in --labeled-slices: "
                "kept as painted (labeled)"
            )
        print(
            f"  {r.name}: labeled slices {_ranges(r.labeled_slices)}; predicted "
            f"{plural(len(r.predicted_slices), 'slice')}"
        )
        if args.suggest:
            picks = r.suggested_slices(args.suggest)
            print(
                f"  {r.name}: paint next: "
                + (
                    f"slice{'' if len(picks) == 1 else 's'} {_ranges(picks)}"
                    if picks
                    else "nothing (every slice is labeled)"
                )
            )
    print(f"wrote {os.path.abspath(args.out)}")
    if args.report:
        write_report(args.report, [result.get(inp.key) for inp in inputs], args.suggest, result)
        print(f"wrote {os.path.abspath(args.report)}")
    return 0


def resolve_auto_axis(options, image, segments):
    """``options`` with axis ``auto`` replaced by the axis the painted slices of ``segments``
    lie on (:func:`~UniverSegLogic.core.slices.auto_axis`; axial when nothing is painted, so
    the run says that no segment has a labeled slice)."""
    from dataclasses import replace

    from ..core.geometry import axis_name, resolve_axis
    from ..core.slices import auto_axis

    if str(options.axis).strip().lower() != AXIS_AUTO:
        return options
    names = [s.name for s in segments]
    paintings = {
        (s.name if names.count(s.name) == 1 else f"{s.name} [{s.id}]"): s.mask for s in segments
    }
    axis = auto_axis(paintings, label=lambda a: axis_name(image, a))
    return replace(options, axis=resolve_axis(image, "axial") if axis is None else axis)


def keep_out(result, others: List, axis: int) -> None:
    """Predictions never take voxels of the segments a run did not propagate (painted voxels
    stay): :func:`~UniverSegLogic.core.restack.resolve_overlaps`, so a single-layer input
    gives a single-layer ``.seg.nrrd``."""
    import numpy as np

    from ..core.restack import resolve_overlaps

    if not others or not result.segments:
        return
    union = np.zeros(result.segments[0].mask.shape, dtype=bool)
    for mask in others:
        union |= np.asarray(mask, dtype=bool)
    resolve_overlaps(
        [r.mask for r in result.segments],
        [r.probability_at for r in result.segments],
        [r.labeled_slices for r in result.segments],
        axis,
        keep_out=union,
    )


def plural(count: int, word: str) -> str:
    """``1 slice``, ``2 slices``."""
    return f"{count} {word}" + ("" if count == 1 else "s")


def write_report(path: str, results: List, suggest: int, run=None) -> None:
    """The ``--report`` JSON, written atomically: ``{"device", "precision", "precision_reason",
    "weights", "segments": [{"name", "labeled_slices", "predicted_slices", "suggested_slices",
    "slice_uncertainty": {"<slice>": float}}]}`` (``run``: the PropagationResult the segments
    come from; its fields are left out without it)."""
    import json

    from ..core.atomic import write_text

    segments = [
        {
            "name": r.name,
            "labeled_slices": [int(i) for i in r.labeled_slices],
            "predicted_slices": [int(i) for i in r.predicted_slices],
            "suggested_slices": [int(i) for i in r.suggested_slices(suggest)] if suggest else [],
            "slice_uncertainty": {
                str(int(i)): round(float(v), 4) for i, v in sorted(r.slice_uncertainty.items())
            },
        }
        for r in results
    ]
    head = {}
    if run is not None:
        head = {
            "device": run.device,
            "precision": run.precision,
            "precision_reason": run.precision_reason,
            "weights": run.weights,
        }
    write_text(path, json.dumps({**head, "segments": segments}, indent=1) + "\n")


def _ranges(idx: List[int]) -> str:
    return (
        ",".join(str(i) for i in idx)
        if len(idx) <= 12
        else f"{','.join(str(i) for i in idx[:6])},...({len(idx)} slices)"
    )
