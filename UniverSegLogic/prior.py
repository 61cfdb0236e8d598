"""Shape prior from the painted slices, and its fusion with the network's prediction.

UniverSeg predicts each slice on its own; between two painted slices the painted shapes themselves
say a lot. The prior interpolates the *signed distance* (mm, negative inside) of the two painted
slices that bracket a target, linearly in slice position. An empty labeled slice counts as "far
outside" so the shape shrinks towards it. Fusion adds the prior to the network's logit with weights
calibrated on validation data (``Resources/starter_fusion.json``); outside the painted range only the
network speaks.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

#: Signed distance given to every pixel of an empty labeled slice (mm, "far outside").
EMPTY_DISTANCE_MM = 50.0


def signed_distance(mask: np.ndarray, spacing: Tuple[float, float]) -> np.ndarray:
    """Signed Euclidean distance (mm) to the boundary of a 2D mask; negative inside."""
    import SimpleITK as sitk

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, EMPTY_DISTANCE_MM, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, -EMPTY_DISTANCE_MM, dtype=np.float32)
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing((float(spacing[1]), float(spacing[0])))  # x = columns, y = rows
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False,
                                     useImageSpacing=True)
    out = sitk.GetArrayFromImage(d).astype(np.float32)
    return np.clip(out, -EMPTY_DISTANCE_MM, EMPTY_DISTANCE_MM)


class DistancePrior:
    """Interpolated signed distance between the labeled slices of one segment."""

    def __init__(self, mask_stack: np.ndarray, labeled: Sequence[int],
                 spacing: Tuple[float, float]):
        self.labeled = sorted(labeled)
        self._sdf: Dict[int, np.ndarray] = {}
        self._masks = mask_stack
        self._spacing = spacing

    def _get(self, i: int) -> np.ndarray:
        if i not in self._sdf:
            self._sdf[i] = signed_distance(self._masks[i], self._spacing)
        return self._sdf[i]

    def inside_range(self, t: int) -> bool:
        """True when ``t`` lies strictly between two labeled slices."""
        return bool(self.labeled) and self.labeled[0] < t < self.labeled[-1]

    def distance(self, t: int) -> Optional[np.ndarray]:
        """Interpolated signed distance at slice ``t``, or None outside the labeled range."""
        if not self.inside_range(t):
            return None
        lab = self.labeled
        hi = next(i for i in lab if i > t)
        lo = max(i for i in lab if i < t)
        w = (t - lo) / float(hi - lo)
        return (1.0 - w) * self._get(lo) + w * self._get(hi)


@dataclass
class FusionParams:
    """logit = model_weight * model_logit - prior_weight * distance_mm / prior_scale_mm + bias.

    Outside the painted range: logit = outside_model_weight * model_logit + outside_bias.
    """

    model_weight: float = 1.0
    prior_weight: float = 1.0
    prior_scale_mm: float = 1.0
    bias: float = 0.0
    outside_model_weight: float = 1.0
    outside_bias: float = 0.0
    source: str = "default (uncalibrated)"

    @classmethod
    def load(cls, path: Path) -> "FusionParams":
        data = json.loads(Path(path).read_text())
        known = {k: data[k] for k in asdict(cls()) if k in data}
        return cls(**known)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def fuse(self, model_logit: np.ndarray, distance_mm: Optional[np.ndarray]) -> np.ndarray:
        """Fused logit for one slice (``distance_mm`` None outside the painted range)."""
        if distance_mm is None:
            return self.outside_model_weight * model_logit + self.outside_bias
        return (self.model_weight * model_logit
                - self.prior_weight * distance_mm / self.prior_scale_mm + self.bias)
