"""Cohorts for testing and measuring ``universeg-slicer cohort``.

:func:`synthetic_cohort` makes targets from one real labeled scan: each copy is the scan resampled
onto a new grid (voxel size scaled by 0.8-1.25 per axis, the grid shifted by up to 8% of the field
of view, so the anatomy moves inside the array and parts of it leave the field of view) with its
intensities scaled and offset. The copies' true labels (the scan's labels through the same
resampling) are written beside them, never listed in the manifest.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Dict, List, Optional

import numpy as np

from ..cohort.align import resample_onto
from ..core.atomic import write_text
from ..core.geometry import Volume
from ..core.io import (
    Segment,
    Segmentation,
    read_image,
    read_segmentation,
    volume_to_sitk,
    write_image,
    write_segmentation,
)


def sample_scan() -> Dict[str, str]:
    """The labeled chest CT that ships inside slicerio (image and segmentation paths)."""
    from ..sample import slicerio_data_dir

    folder = slicerio_data_dir()
    return {
        "image": os.path.join(folder, "CTChest4.nrrd"),
        "segmentation": os.path.join(folder, "Segmentation.seg.nrrd"),
    }


def copy_grid(volume: Volume, rng: np.random.Generator) -> np.ndarray:
    """A new IJK-to-RAS matrix (and its shape, returned as the last row's first three entries
    of a (5, 4) array) for a resampled, shifted copy of ``volume``."""
    shape_ijk = np.array(volume.array.shape[::-1], dtype=np.float64)
    m = volume.ijk_to_ras.copy()
    factors = rng.uniform(0.8, 1.25, size=3)
    m[:3, :3] = m[:3, :3] * factors
    extent = np.abs(volume.ijk_to_ras[:3, :3]) @ shape_ijk
    m[:3, 3] = volume.ijk_to_ras[:3, 3] + rng.uniform(-0.08, 0.08, size=3) * extent
    new_shape = np.maximum(4, np.round(shape_ijk / factors)).astype(int)
    out = np.zeros((5, 4))
    out[:4] = m
    out[4, :3] = new_shape
    return out


def synthetic_cohort(
    out_dir: str,
    count: int,
    seed: int = 20261202,
    image: Optional[str] = None,
    segmentation: Optional[str] = None,
    corrupt: Optional[List[int]] = None,
) -> str:
    """Write ``count`` copies of a labeled scan (default: :func:`sample_scan`) as targets, their
    true labels under ``truth/``, and ``manifest.csv``; returns the manifest's path. Copies whose
    index is in ``corrupt`` are written truncated (a target that cannot be read)."""
    src = sample_scan() if image is None else {"image": image, "segmentation": segmentation}
    vol = read_image(src["image"])
    seg = read_segmentation(src["segmentation"], vol)
    masks = {str(k): s.mask for k, s in enumerate(seg.segments)}  # names may repeat
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "truth"), exist_ok=True)
    rows = []
    for i in range(count):
        grid = copy_grid(vol, rng)
        m, shape = grid[:4], grid[4, :3].astype(int)
        gain, offset = rng.uniform(0.8, 1.25), rng.uniform(-60, 60)
        grid_volume = Volume(np.zeros(tuple(int(v) for v in shape[::-1]), np.uint8), m)
        moved, moved_masks = resample_onto(grid_volume, vol, masks)
        arr = moved.array * gain + offset
        tid = f"copy{i:03d}"
        path = os.path.join(out_dir, f"{tid}.nrrd")
        copy = Volume(np.round(arr).astype(np.int16), m)
        write_image(path, volume_to_sitk(copy))
        if corrupt and i in corrupt:
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
        truth = [Segment(s.name, moved_masks[str(k)], s.color) for k, s in enumerate(seg.segments)]
        write_segmentation(
            os.path.join(out_dir, "truth", f"{tid}.seg.nrrd"), Segmentation(copy, truth)
        )
        rows.append((tid, f"{tid}.nrrd"))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "image"])
    w.writerows(rows)
    manifest = os.path.join(out_dir, "manifest.csv")
    write_text(manifest, buf.getvalue())
    return manifest
