"""``universeg-slicer demo``: an end-to-end run on the sample that ships with slicerio.

The chest CT (128x128x34, 3x3x10 mm) and its 7-segment segmentation inside the ``slicerio`` package
stand in for a user's session: a few axial slices of one segment are kept as "user labels", the
rest is hidden and propagated, and the result is compared with the hidden slices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np

from ..errors import UsageError
from ..sample import DEFAULT_K, DEFAULT_SEGMENT, sample_paths
from . import plain
from .propagate import ProgressBar, add_engine_options

#: Files the demo writes into its --out folder.
OUTPUT_FILES = ("demo_result.seg.nrrd", "demo_overlay.png", "demo_metrics.json")


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run on the bundled chest CT sample and report Dice",
        description=plain(__doc__.splitlines()[0]),
    )
    p.add_argument("--out", default="universeg-demo", help="output folder (universeg-demo)")
    p.add_argument("--segment", default=DEFAULT_SEGMENT, help=f"segment ({DEFAULT_SEGMENT})")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"labeled slices to keep ({DEFAULT_K})")
    add_engine_options(p)
    p.set_defaults(func=run)


def overlay_png(
    path: str,
    image_stack: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    labeled: List[int],
    count: int = 6,
) -> None:
    """Montage of hidden slices: gray image, truth contour green, prediction contour red,
    labeled slices framed in blue (written atomically)."""
    import SimpleITK as sitk

    from ..core.canvas import intensity_window, scale_intensity
    from ..core.io import write_image
    from ..core.slices import nonempty_slices

    nz = nonempty_slices(truth, 0)
    picks = np.unique(np.linspace(nz[0], nz[-1], count).round().astype(int)) if nz else [0]
    img = scale_intensity(image_stack, intensity_window(image_stack))
    tiles = []
    for z in picks:
        g = (img[z] * 255).astype(np.uint8)
        rgb = np.stack([g, g, g], -1)
        for m, color in ((truth[z], (0, 220, 0)), (pred[z], (230, 30, 30))):
            edge = m & ~(
                np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
            )
            rgb[edge] = color
        if z in labeled:
            for border in (np.s_[:2], np.s_[-2:], np.s_[:, :2], np.s_[:, -2:]):
                rgb[border] = (40, 90, 255)
        tiles.append(rgb)
    montage = sitk.GetImageFromArray(np.concatenate(tiles, axis=1), isVector=True)
    write_image(path, montage)


def run(args) -> int:
    from ..core import fill_between
    from ..core.atomic import write_text
    from ..core.geometry import SliceFrame
    from ..core.io import (
        Segmentation,
        check_output_path,
        read_image,
        read_segmentation,
        write_segmentation,
    )
    from ..core.metrics import dice
    from ..core.propagator import PropagationOptions, Propagator, SegmentInput
    from ..core.slices import evaluation_slices, slice_extent
    from .propagate import print_notes

    if args.k < 1:
        raise UsageError("--k must be at least 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    check_output_path(str(out), option="--out", folder=True)  # before anything heavy
    if out.is_dir():
        for name in OUTPUT_FILES:
            check_output_path(str(out / name), option="--out")
    options = PropagationOptions(axis="axial", device=args.device, weights=args.weights)
    from ..core.engine import resolve_device

    resolve_device(options.device)
    image_path, seg_path = sample_paths()
    image = read_image(str(image_path))
    seg = read_segmentation(str(seg_path), image)
    segment = seg.get(args.segment)
    frame = SliceFrame.of(image, "axial")
    truth = frame.to_frame(segment.mask)
    z = slice_extent(truth, 0)
    if z is None:
        raise UsageError(f"segment {segment.name!r} is empty in the sample")
    labeled = evaluation_slices(z[0], z[1], args.k)
    user = np.zeros_like(truth)
    user[labeled] = truth[labeled]

    session = Propagator(image, options)
    result = session.propagate(
        [SegmentInput("demo", segment.name, frame.from_frame(user), labeled)],
        progress=ProgressBar(not args.quiet),
    )
    print_notes(result.notes)
    r = result.segments[0]
    pred = frame.to_frame(r.mask)
    hidden = np.ones(truth.shape[0], bool)
    hidden[labeled] = False
    metrics = {
        "sample": f"slicerio {image_path.name} + {seg_path.name}",
        "segment": segment.name,
        "axis": "axial",
        "labeled_slices": labeled,
        "dice": dice(pred, truth),
        "dice_hidden_slices": dice(pred[hidden], truth[hidden]),
        "weights": result.weights,
        "device": result.device,
        "precision": result.precision,
        "seconds": round(result.seconds, 2),
    }
    if fill_between.available():  # Slicer's own "Fill between slices" on the same painting
        try:
            fbs = fill_between.fill_between_slices(user, labeled, 0, frame.spacing)
            metrics["fill_between_slices_dice"] = dice(fbs, truth)
            metrics["fill_between_slices_dice_hidden_slices"] = dice(fbs[hidden], truth[hidden])
        except fill_between.FillBetweenUnavailable as exc:
            print_notes([str(exc)])
    out.mkdir(parents=True, exist_ok=True)
    write_segmentation(
        str(out / "demo_result.seg.nrrd"),
        Segmentation(
            image,
            [
                type(segment)(segment.name + " (UniverSeg)", r.mask, segment.color, None, {}),
                type(segment)(
                    segment.name + " (reference)", segment.mask, (0.2, 0.8, 0.2), None, {}
                ),
            ],
        ),
    )
    overlay_png(str(out / "demo_overlay.png"), frame.to_frame(image.array), truth, pred, labeled)
    write_text(str(out / "demo_metrics.json"), json.dumps(metrics, indent=2) + "\n")
    print(f"weights: {result.weights}")
    print(
        f"sample: {metrics['sample']}; segment '{segment.name}'; axial slices "
        f"{labeled} kept as user labels ({args.k} of {truth.shape[0]})"
    )
    print(
        f"Dice (whole volume): {metrics['dice']:.3f}   Dice (hidden slices only): "
        f"{metrics['dice_hidden_slices']:.3f}   [{result.device}, {result.precision}, "
        f"{result.seconds:.1f} s]"
    )
    if "fill_between_slices_dice" in metrics:
        print(
            f"Slicer's Fill between slices on the same labeled slices: Dice "
            f"{metrics['fill_between_slices_dice']:.3f}, hidden slices "
            f"{metrics['fill_between_slices_dice_hidden_slices']:.3f}"
        )
    print(
        f"wrote {out / 'demo_result.seg.nrrd'}, {out / 'demo_overlay.png'}, "
        f"{out / 'demo_metrics.json'}"
    )
    return 0
