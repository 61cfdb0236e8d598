"""Slice preprocessing: intensity scaling, and resizing slices to the network's 128x128 canvas.

Intensities are scaled once per volume (robust percentiles), never per slice, so that slices of one
volume stay comparable. In-plane, a slice is resized so that its *physical* extent fits the canvas
with the aspect ratio preserved, then zero-padded to a square. :class:`Canvas` holds that mapping and
its exact inverse, used for images, labels and predicted probabilities alike, so labels and
predictions land back on the voxels they came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from torch.nn import functional as F

from .model import TRAINED_SIZE

#: Percentiles used for robust intensity scaling.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5


def intensity_window(
    array: np.ndarray, max_samples: int = 2_000_000, seed: int = 0
) -> Tuple[float, float]:
    """Robust (low, high) intensity window of a volume, from its 0.5 and 99.5 percentiles."""
    flat = np.asarray(array).reshape(-1)
    if flat.size > max_samples:
        idx = np.random.default_rng(seed).choice(flat.size, max_samples, replace=False)
        flat = flat[idx]
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if flat.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(flat.astype(np.float64), [LOW_PERCENTILE, HIGH_PERCENTILE])
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def scale_intensity(array: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """Clip to ``window`` and map to [0, 1] as float32."""
    lo, hi = window
    out = (np.asarray(array, dtype=np.float32) - lo) / np.float32(hi - lo)
    np.nan_to_num(out, copy=False, nan=0.0)
    return np.clip(out, 0.0, 1.0, out=out)


@dataclass(frozen=True)
class Canvas:
    """Maps (rows, cols) slices of given pixel spacing onto a ``size`` x ``size`` canvas."""

    rows: int
    cols: int
    size: int
    inner: Tuple[int, int]  # rows, cols of the resized slice inside the canvas
    offset: Tuple[int, int]  # top, left padding

    @classmethod
    def for_slices(
        cls, rows: int, cols: int, row_spacing: float, col_spacing: float, size: int = TRAINED_SIZE
    ) -> Canvas:
        """The canvas for slices of ``rows`` x ``cols`` pixels at the given spacing (mm)."""
        er, ec = rows * row_spacing, cols * col_spacing
        scale = size / max(er, ec)
        ir = int(min(size, max(1, round(er * scale))))
        ic = int(min(size, max(1, round(ec * scale))))
        return cls(rows, cols, size, (ir, ic), ((size - ir) // 2, (size - ic) // 2))

    def to_canvas(self, slices: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """(N, rows, cols) -> (N, 1, size, size): resize (anti-aliased when shrinking) and pad."""
        x = slices.unsqueeze(1).float()
        if (self.rows, self.cols) != self.inner:
            shrink = self.inner[0] < self.rows or self.inner[1] < self.cols
            if mode in ("bilinear", "bicubic"):
                x = F.interpolate(
                    x, size=self.inner, mode=mode, align_corners=False, antialias=shrink
                )
            else:
                x = F.interpolate(x, size=self.inner, mode=mode)
        top, left = self.offset
        bottom = self.size - self.inner[0] - top
        right = self.size - self.inner[1] - left
        return F.pad(x, (left, right, top, bottom))

    def mask_to_canvas(self, masks: torch.Tensor) -> torch.Tensor:
        """(N, rows, cols) binary masks -> (N, 1, size, size) soft labels in [0, 1] (bilinear,
        anti-aliased when shrinking, like the images): the support labels the network sees."""
        return self.to_canvas(masks.float()).clamp_(0, 1)

    def label_ids_to_canvas(self, labels: np.ndarray) -> np.ndarray:
        """(N, rows, cols) integer label ids -> (N, size, size) uint16 by pixel-centre nearest
        neighbour (matching the image map) and zero padding: training data keeps ids exact."""
        x = torch.from_numpy(np.ascontiguousarray(labels).astype(np.float32)).unsqueeze(1)
        if (self.rows, self.cols) != self.inner:
            x = F.interpolate(x, size=self.inner, mode="nearest-exact")
        top, left = self.offset
        bottom = self.size - self.inner[0] - top
        right = self.size - self.inner[1] - left
        return np.rint(F.pad(x, (left, right, top, bottom))[:, 0].numpy()).astype(np.uint16)

    def from_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        """(N, 1, size, size) -> (N, rows, cols): crop the padding and resize back (bilinear)."""
        return self.from_inner(self.inner_part(canvas))

    def inner_part(self, canvas: torch.Tensor) -> torch.Tensor:
        """(N, 1, size, size) -> (N, 1, inner rows, inner cols): the canvas without its padding
        (what :meth:`from_inner` maps back)."""
        top, left = self.offset
        return canvas[:, :, top : top + self.inner[0], left : left + self.inner[1]]

    @property
    def upsamples(self) -> bool:
        """True when the slice is at least as fine as the canvas along both axes: then each
        native pixel is the plain bilinear mix of its 2x2 nearest canvas pixels."""
        return self.rows >= self.inner[0] and self.cols >= self.inner[1]

    def from_inner(self, inner: torch.Tensor) -> torch.Tensor:
        """(N, 1, inner rows, inner cols) -> (N, rows, cols): resized back (bilinear)."""
        x = inner.float()
        if (self.rows, self.cols) != self.inner:
            shrink = self.rows < self.inner[0] or self.cols < self.inner[1]
            x = F.interpolate(
                x,
                size=(self.rows, self.cols),
                mode="bilinear",
                align_corners=False,
                antialias=shrink,
            )
        return x[:, 0]
