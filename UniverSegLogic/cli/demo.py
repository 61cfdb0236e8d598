"""``universeg-slicer demo``: an end-to-end run on the sample that ships with slicerio.

The chest CT (128x128x34, 3x3x10 mm) and its 7-segment segmentation inside the ``slicerio`` package
stand in for a user's session: a few axial slices of one segment are kept as "user labels", the
rest is hidden and propagated, and the result is compared with the hidden slices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Tuple

import numpy as np

from ..errors import UsageError
from .propagate import ProgressBar

DEFAULT_SEGMENT = "right lung"
DEFAULT_K = 3


def sample_paths() -> Tuple[Path, Path]:
    """Paths of slicerio's bundled chest CT and its segmentation."""
    import slicerio

    data = Path(slicerio.__file__).resolve().parent / "data"
    image, seg = data / "CTChest4.nrrd", data / "Segmentation.seg.nrrd"
    if not image.is_file() or not seg.is_file():
        raise UsageError(f"the sample data is missing from the slicerio package ({data})")
    return image, seg


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run on the bundled chest CT sample and report Dice",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--out", default="universeg-demo", help="output folder (universeg-demo)")
    p.add_argument("--segment", default=DEFAULT_SEGMENT, help=f"segment ({DEFAULT_SEGMENT})")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"labeled slices to keep ({DEFAULT_K})")
    p.add_argument(
        "--weights", default="starter", help="starter (default), official, or a weights file"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quiet", action="store_true")
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
    labeled slices framed in blue."""
    import SimpleITK as sitk

    from ..core.canvas import intensity_window, scale_intensity
    from ..core.io import atomic_path

    nz = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
    picks = np.unique(np.linspace(nz[0], nz[-1], count).round().astype(int)) if nz.size else [0]
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
    montage = np.concatenate(tiles, axis=1)
    tmp = atomic_path(path)[:-4] + ".png"
    try:
        sitk.WriteImage(sitk.GetImageFromArray(montage, isVector=True), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(args) -> int:
    from ..core.geometry import SliceFrame
    from ..core.io import Segmentation, read_image, read_segmentation, write_segmentation
    from ..core.pipeline import PropagationOptions, PropagationRequest, SegmentRequest, propagate
    from ..core.weights import WeightsError, starter_path
    from ..research.evaluate import dice, extent, labeled_slices_for

    if args.k < 1:
        raise UsageError("--k must be at least 1")
    image_path, seg_path = sample_paths()
    image = read_image(str(image_path))
    seg = read_segmentation(str(seg_path), image)
    segment = seg.get(args.segment)
    frame = SliceFrame.of(image, "axial")
    truth = frame.to_frame(segment.mask)
    z = extent(truth, 0)
    if z is None:
        raise UsageError(f"segment {segment.name!r} is empty in the sample")
    labeled = labeled_slices_for(z[0], z[1], args.k)
    user = np.zeros_like(truth)
    user[labeled] = truth[labeled]

    engine = None
    weights_line = None
    if args.weights == "starter":
        try:
            starter_path()
        except WeightsError:
            import torch

            from ..core.engine import InferenceEngine
            from ..core.model import UniverSeg

            torch.manual_seed(0)
            engine = InferenceEngine(UniverSeg(), args.device)
            weights_line = (
                "weights: NONE AVAILABLE - random initial weights; this result is not "
                "meaningful (starter weights not found)"
            )
    options = PropagationOptions(axis="axial", device=args.device, weights=args.weights)
    request = PropagationRequest(
        image, [SegmentRequest(segment.name, frame.from_frame(user), labeled)], options
    )
    result = propagate(request, progress=ProgressBar(not args.quiet), engine=engine)
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
        "weights": weights_line or result.weights,
        "device": result.device,
        "seconds": round(result.seconds, 2),
    }
    from ..core import fill_between

    if fill_between.available():  # Slicer's own "Fill between slices" on the same painting
        fbs = fill_between.fill_between_slices(user, labeled, 0, frame.spacing)
        metrics["fill_between_slices_dice"] = dice(fbs, truth)
        metrics["fill_between_slices_dice_hidden_slices"] = dice(fbs[hidden], truth[hidden])
    out = Path(args.out)
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
    (out / "demo_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(weights_line or f"weights: {result.weights}")
    print(
        f"sample: {metrics['sample']}; segment '{segment.name}'; axial slices "
        f"{labeled} kept as user labels ({args.k} of {truth.shape[0]})"
    )
    print(
        f"Dice (whole volume): {metrics['dice']:.3f}   Dice (hidden slices only): "
        f"{metrics['dice_hidden_slices']:.3f}   [{result.device}, {result.seconds:.1f} s]"
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
