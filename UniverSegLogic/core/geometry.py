"""Volume geometry, in one place.

Arrays are indexed KJI (``array[k, j, i]``, the order of ``SimpleITK.GetArrayFromImage`` and
``slicer.util.arrayFromVolume``). The voxel-to-world map is a 4x4 IJK-to-RAS matrix (Slicer's
convention); files in LPS are converted when read or written (see :mod:`UniverSegLogic.core.io`).

A *slicing axis* is an array axis (0, 1 or 2). Anatomical names are resolved through the
direction matrix: ``axial`` slices are stacked along the IJK axis closest to S, ``coronal`` to A,
``sagittal`` to R.

For slicing, a volume is viewed in a *canonical slice frame*: the array is transposed and flipped
so that axis 0 is the slicing axis and rows/columns follow fixed anatomical directions (rows run
towards -(the higher RAS axis), columns towards -(the lower RAS axis)). Slices of two volumes with
different direction matrices then look the same way up, which matters when one volume is the
support of another. :class:`SliceFrame` maps arrays into that frame and back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple, Union

import numpy as np

from ..errors import GeometryError  # noqa: F401

AXIS_NAMES: Dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}  # -> RAS axis
AxisSpec = Union[str, int]


@dataclass
class Volume:
    """A 3D scalar volume: KJI array plus its IJK-to-RAS matrix."""

    array: np.ndarray
    ijk_to_ras: np.ndarray = field(default_factory=lambda: np.eye(4))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if self.array.ndim != 3:
            raise GeometryError(
                f"expected a 3D volume, got {self.array.ndim} dimensions (shape {self.array.shape})"
            )
        if self.ijk_to_ras.shape != (4, 4):
            raise GeometryError("ijk_to_ras must be a 4x4 matrix")
        if abs(np.linalg.det(self.ijk_to_ras[:3, :3])) < 1e-12:
            raise GeometryError("the IJK-to-RAS matrix is singular")

    @property
    def spacing_ijk(self) -> np.ndarray:
        """Voxel size along I, J, K (mm)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def spacing_kji(self) -> np.ndarray:
        """Voxel size along array axes 0, 1, 2 (K, J, I)."""
        return self.spacing_ijk[::-1].copy()

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of I, J, K."""
        return self.ijk_to_ras[:3, :3] / self.spacing_ijk

    @property
    def origin(self) -> np.ndarray:
        """RAS position of voxel (0, 0, 0)."""
        return self.ijk_to_ras[:3, 3].copy()

    def same_grid(self, other: Volume, tol: float = 1e-4) -> bool:
        """True when ``other`` has the same shape and voxel-to-world map."""
        return self.array.shape == other.array.shape and np.allclose(
            self.ijk_to_ras, other.ijk_to_ras, atol=tol
        )


def make_ijk_to_ras(spacing_ijk, origin_ras=(0.0, 0.0, 0.0), direction=None) -> np.ndarray:
    """Build a 4x4 IJK-to-RAS matrix from spacing (I,J,K), RAS origin and a 3x3 direction."""
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = d * np.asarray(spacing_ijk, dtype=np.float64)
    m[:3, 3] = origin_ras
    return m


def _array_axis_ras(volume: Volume) -> Tuple[np.ndarray, np.ndarray]:
    """For each array axis (K, J, I): the dominant RAS axis and the sign along it."""
    d = volume.direction[:, ::-1]  # columns now in array-axis order K, J, I
    dominant = np.argmax(np.abs(d), axis=0)
    sign = np.sign(d[dominant, np.arange(3)])
    return dominant, sign


def resolve_axis(volume: Volume, axis: AxisSpec) -> int:
    """Array axis (0, 1, 2) of a slicing axis given by name or as an array axis."""
    if isinstance(axis, (int, np.integer)) or (isinstance(axis, str) and axis.strip().isdigit()):
        a = int(axis)
        if a not in (0, 1, 2):
            raise GeometryError(f"array axis must be 0, 1 or 2, got {a}")
        return a
    name = str(axis).strip().lower()
    if name not in AXIS_NAMES:
        raise GeometryError(f"unknown axis {axis!r}: use axial, coronal, sagittal or 0, 1, 2")
    ras = AXIS_NAMES[name]
    d = volume.direction[:, ::-1]
    return int(np.argmax(np.abs(d[ras, :])))


def axis_name(volume: Volume, axis: int) -> str:
    """Anatomical name (axial/coronal/sagittal) of array axis ``axis`` in world space."""
    d = volume.direction[:, ::-1]  # columns in array-axis order
    ras = int(np.argmax(np.abs(d[:, int(axis)])))
    return {v: k for k, v in AXIS_NAMES.items()}[ras]


@dataclass(frozen=True)
class SliceFrame:
    """Maps a KJI array to (slices, rows, cols) in the canonical slice frame and back."""

    axis: int  # array axis that is sliced
    row_axis: int  # array axis that becomes rows
    col_axis: int  # array axis that becomes columns
    flip_rows: bool
    flip_cols: bool
    spacing: Tuple[float, float, float]  # slice, row, col spacing in mm
    #: True when increasing slice index runs towards - of the slicing axis' RAS direction.
    #: Slice order is kept as stored (slice t is array index t), so slice numbers stay the
    #: user's; compare positions across volumes with :meth:`relative_position`.
    slice_reversed: bool = False

    @classmethod
    def of(cls, volume: Volume, axis: AxisSpec) -> SliceFrame:
        """The canonical frame for slicing ``volume`` along ``axis``."""
        a = resolve_axis(volume, axis)
        dominant, sign = _array_axis_ras(volume)
        rest = [x for x in (0, 1, 2) if x != a]
        if dominant[rest[0]] != dominant[rest[1]]:
            # rows: the in-plane axis closer to the higher RAS axis (A or S)
            rest.sort(key=lambda x: -dominant[x])
        row, col = rest
        sp = volume.spacing_kji
        return cls(
            a,
            row,
            col,
            bool(sign[row] > 0),
            bool(sign[col] > 0),
            (float(sp[a]), float(sp[row]), float(sp[col])),
            bool(sign[a] < 0),
        )

    def relative_position(self, index, count: int):
        """Position (0..1) of slice ``index`` of ``count`` along the anatomical direction, so
        positions agree between volumes whose slices are stored in opposite orders."""
        pos = np.asarray(index, dtype=np.float64) / max(1, count - 1)
        return 1.0 - pos if self.slice_reversed else pos

    def to_frame(self, array: np.ndarray) -> np.ndarray:
        """KJI array -> (slices, rows, cols) view in the canonical frame."""
        out = np.transpose(array, (self.axis, self.row_axis, self.col_axis))
        if self.flip_rows:
            out = out[:, ::-1, :]
        if self.flip_cols:
            out = out[:, :, ::-1]
        return out

    def from_frame(self, stack: np.ndarray) -> np.ndarray:
        """(slices, rows, cols) canonical stack -> KJI array (inverse of :meth:`to_frame`)."""
        if self.flip_rows:
            stack = stack[:, ::-1, :]
        if self.flip_cols:
            stack = stack[:, :, ::-1]
        order = (self.axis, self.row_axis, self.col_axis)
        return np.ascontiguousarray(np.transpose(stack, np.argsort(order)))
