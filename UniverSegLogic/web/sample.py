"""The sample session of ``universeg-slicer web --sample``: slicerio's chest CT with a few axial
slices of one segment painted (the rest hidden), as a user would start. The tests use it too."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np

from ..sample import DEFAULT_K, DEFAULT_SEGMENT, sample_paths


def write_sample(
    folder, segment: str = DEFAULT_SEGMENT, k: int = DEFAULT_K
) -> Tuple[Path, Path, List[int]]:
    """Write ``<folder>/<segment> 3 slices.seg.nrrd``: only ``k`` axial slices of ``segment``
    of slicerio's sample segmentation (chosen as the demo and the evaluation choose them), on
    the chest CT's grid. Returns (image path, segmentation path, painted slice indices)."""
    from ..core.geometry import SliceFrame
    from ..core.io import Segmentation, read_image, read_segmentation, write_segmentation
    from ..core.slices import evaluation_slices, slice_extent
    from ..errors import UsageError

    image_path, seg_path = sample_paths()
    image = read_image(str(image_path))
    source = read_segmentation(str(seg_path), image).get(segment)
    frame = SliceFrame.of(image, "axial")
    truth = frame.to_frame(source.mask)
    z = slice_extent(truth, 0)
    if z is None:
        raise UsageError(f"segment {segment!r} is empty in the sample")
    labeled = evaluation_slices(z[0], z[1], k)
    painted = np.zeros_like(truth)
    painted[labeled] = truth[labeled]
    out = Path(folder) / f"{segment} {k} slices.seg.nrrd"
    write_segmentation(
        str(out),
        Segmentation(
            image,
            [type(source)(segment, frame.from_frame(painted), source.color, segment, {})],
        ),
    )
    return image_path, out, labeled
