"""Node access: checking volume and segmentation nodes, their world geometry, segment masks."""

from __future__ import annotations

import hashlib
from typing import List, Sequence

import numpy as np

from ..core.geometry import GeometryError, Volume, axis_name, resolve_axis
from ..errors import MRMLError
from .gridmap import GridMap, cell_index, read_onto_volume
from .vtkglue import (
    extent_empty,
    image_scalars,
    np_from_vtk_matrix,
    slicer_module,
    vtk_matrix,
    vtk_module,
)


def node_name(node) -> str:
    """The node's name for messages (``(unnamed)`` when it has none)."""
    return node.GetName() if node is not None and node.GetName() else "(unnamed)"


def check_volume_node(volumeNode) -> None:
    """Raise :class:`MRMLError` unless ``volumeNode`` is a scalar volume holding image data."""
    if volumeNode is None:
        raise MRMLError("no input volume selected")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise MRMLError(
            f"{node_name(volumeNode)} is a {volumeNode.GetClassName()}, not a scalar volume"
        )
    if volumeNode.GetImageData() is None or image_scalars(volumeNode.GetImageData()) is None:
        raise MRMLError(f"volume {node_name(volumeNode)} holds no image data")


def check_segmentation_node(segmentationNode) -> None:
    """Raise :class:`MRMLError` unless ``segmentationNode`` is a segmentation the bridge can
    read and write (binary labelmaps as its source representation)."""
    slicer = slicer_module()
    if segmentationNode is None:
        raise MRMLError("no segmentation selected")
    if not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        raise MRMLError(
            f"{node_name(segmentationNode)} is a {segmentationNode.GetClassName()}, "
            "not a segmentation"
        )
    seg = segmentationNode.GetSegmentation()
    getter = getattr(seg, "GetSourceRepresentationName", None) or seg.GetMasterRepresentationName
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if seg.GetNumberOfSegments() and getter() != binary:
        raise MRMLError(
            f"segmentation {node_name(segmentationNode)} stores {getter()}: make "
            "binary labelmap its source representation (e.g. open it in Segment "
            "Editor) first"
        )


def parent_to_world(node) -> np.ndarray:
    """4x4 matrix of the node's parent transform(s); refuses non-linear transforms."""
    t = node.GetParentTransformNode()
    if t is None:
        return np.eye(4)
    if not t.IsTransformToWorldLinear():
        raise MRMLError(
            f"{node_name(node)} is under the non-linear transform {node_name(t)}: "
            "harden the transform first (Transforms module)"
        )
    m = vtk_module().vtkMatrix4x4()
    t.GetMatrixTransformToWorld(m)
    return np_from_vtk_matrix(m)


def local_ijk_to_ras(volumeNode) -> np.ndarray:
    """The volume's own IJK-to-RAS matrix (4x4), without parent transforms."""
    m = vtk_module().vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np_from_vtk_matrix(m)


def volume_from_node(volumeNode) -> Volume:
    """The volume as a :class:`Volume` (KJI copy, world IJK-to-RAS); RGB becomes grayscale."""
    check_volume_node(volumeNode)
    array = np.array(image_scalars(volumeNode.GetImageData()), copy=True)
    if array.ndim == 4:
        if array.shape[-1] in (3, 4):
            array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        else:
            raise MRMLError(
                f"volume {node_name(volumeNode)} has {array.shape[-1]} components "
                "per voxel: expected a scalar or RGB volume"
            )
    return Volume(array, geometry_of(volumeNode).ijk_to_ras)


def geometry_of(volumeNode) -> Volume:
    """World geometry of a volume without copying its voxels (a zero-stride stand-in array)."""
    check_volume_node(volumeNode)
    shape = tuple(volumeNode.GetImageData().GetDimensions()[::-1])
    world = parent_to_world(volumeNode) @ local_ijk_to_ras(volumeNode)
    if np.linalg.det(world[:3, :3]) == 0:
        raise MRMLError(f"volume {node_name(volumeNode)} has a singular IJK-to-RAS matrix")
    return Volume(np.broadcast_to(np.zeros((), np.uint8), shape), world)


def volume_axis(volume: Volume, axis) -> int:
    """Array axis of ``axis`` (a name or 0/1/2) in ``volume``; :class:`MRMLError` if unusable."""
    try:
        return resolve_axis(volume, axis)
    except GeometryError as exc:
        raise MRMLError(str(exc)) from None


def array_axis(volumeNode, axis) -> int:
    """Array axis (0 K, 1 J, 2 I) of ``axis`` (a name resolved in world space, or 0/1/2)."""
    return volume_axis(geometry_of(volumeNode), axis)


def axis_for_slice_normal(volumeNode, normal_ras: Sequence[float]) -> int:
    """Array axis of ``volumeNode`` most nearly perpendicular to a slice view (its normal in RAS).

    Used to default the slicing axis to the orientation of the view the user paints in
    (the normal is the third column of the slice node's SliceToRAS matrix).
    """
    volume = geometry_of(volumeNode)
    n = np.asarray(normal_ras, dtype=np.float64)[:3]
    if not np.linalg.norm(n):
        raise MRMLError("slice normal is zero")
    d = volume.direction[:, ::-1]
    return int(np.argmax(np.abs(d.T @ (n / np.linalg.norm(n)))))


def slice_index_at(volumeNode, axis, point_ras: Sequence[float]) -> int:
    """Index along ``axis`` of the volume slice through the world point ``point_ras``.

    Raises :class:`MRMLError` when the point lies outside the volume along that axis.
    """
    volume = geometry_of(volumeNode)
    a = volume_axis(volume, axis)
    p = np.append(np.asarray(point_ras, dtype=np.float64)[:3], 1.0)
    ijk = np.linalg.solve(volume.ijk_to_ras, p)[:3]
    index = int(cell_index(ijk[2 - a]))
    n = volume.array.shape[a]
    if not 0 <= index < n:
        raise MRMLError(
            f"the position is outside the volume along the {axis_name(volume, a)} "
            f"axis (slice {index} of 0..{n - 1})"
        )
    return index


def slice_center_ras(volumeNode, axis, index: int) -> List[float]:
    """World (RAS) position of the centre of slice ``index`` along ``axis`` (the inverse of
    :func:`slice_index_at`): e.g. ``sliceNode.JumpSliceByOffsetting(*ras)`` shows that slice
    ("Go to suggested slice"). Raises :class:`MRMLError` for an index outside the volume."""
    volume = geometry_of(volumeNode)
    a = volume_axis(volume, axis)
    n = volume.array.shape[a]
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise MRMLError(f"slice {index!r} is outside 0..{n - 1}")
    ijk = [(volume.array.shape[2 - x] - 1) / 2.0 for x in range(3)]  # I, J, K centre
    ijk[2 - a] = float(index)
    return [float(v) for v in (volume.ijk_to_ras @ np.array(ijk + [1.0]))[:3]]


def grid_key(volumeNode, segmentationNode) -> str:
    """Fingerprint of the slice grid a record refers to: the volume's shape and IJK-to-RAS, and
    where the segmentation sits relative to it (a common parent transform changes nothing)."""
    dims = volumeNode.GetImageData().GetDimensions()
    grid = volume_to_segmentation(volumeNode, segmentationNode) @ local_ijk_to_ras(volumeNode)
    text = (
        ",".join(str(int(d)) for d in dims) + ";" + ",".join(f"{v:.4f}" for v in grid[:3].ravel())
    )
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# segments


def segment_of(segmentationNode, segmentId):
    """The ``vtkSegment`` with ID ``segmentId`` (:class:`MRMLError` when there is none)."""
    seg = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if seg is None:
        raise MRMLError(f"segmentation {node_name(segmentationNode)} has no segment {segmentId!r}")
    return seg


def resolve_segment_id(segmentationNode, key: str) -> str:
    """The segment ID ``key`` names: an ID, or the name of exactly one segment (segments are
    told apart by ID: a name two segments share raises :class:`MRMLError`)."""
    seg = segmentationNode.GetSegmentation()
    if seg.GetSegment(key) is not None:
        return key
    named = [
        seg.GetNthSegmentID(i)
        for i in range(seg.GetNumberOfSegments())
        if seg.GetNthSegment(i).GetName() == key
    ]
    if len(named) == 1:
        return named[0]
    if named:  # segments are told apart by ID, never by name
        raise MRMLError(
            f"{len(named)} segments of {node_name(segmentationNode)} are named {key!r}: "
            f"choose one by its ID ({', '.join(named)})"
        )
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    raise MRMLError(
        f"segmentation {node_name(segmentationNode)} has no segment {key!r} "
        f"(segments: {', '.join(names) or 'none'})"
    )


def segment_mask(volumeNode, segmentationNode, segmentId) -> np.ndarray:
    """Boolean KJI mask of one segment on the volume's voxel grid.

    Read from the segment's own labelmap grid with the rule of :mod:`.gridmap` (the rule writing
    uses): every painted voxel is seen in the volume slice its centre lies in, and ties (grids
    shifted by half a voxel) are broken the same way in both directions."""
    segment_of(segmentationNode, segmentId)
    shape = tuple(volumeNode.GetImageData().GetDimensions()[::-1])
    internal = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    if internal is None or extent_empty(internal.GetExtent()):
        return np.zeros(shape, dtype=bool)
    label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    stored_values = image_scalars(internal)
    if stored_values is None:
        return np.zeros(shape, dtype=bool)
    stored = stored_values == label
    if not stored.any():
        return np.zeros(shape, dtype=bool)
    m = vtk_module().vtkMatrix4x4()
    internal.GetImageToWorldMatrix(m)
    world = np.linalg.inv(parent_to_world(segmentationNode)) @ parent_to_world(volumeNode)
    vol_ijk_to_seg = world @ local_ijk_to_ras(volumeNode)
    grid = GridMap(np.linalg.solve(vol_ijk_to_seg, np_from_vtk_matrix(m)))
    return read_onto_volume(stored, internal.GetExtent(), grid, shape)


def volume_to_segmentation(volumeNode, segmentationNode) -> np.ndarray:
    """Volume RAS (local) -> segmentation node coordinates; refuses shear."""
    m = np.linalg.inv(parent_to_world(segmentationNode)) @ parent_to_world(volumeNode)
    if slicer_module().vtkOrientedImageDataResample.DoesTransformMatrixContainShear(vtk_matrix(m)):
        raise MRMLError(
            f"the transform between {node_name(volumeNode)} and "
            f"{node_name(segmentationNode)} contains shear: harden it first"
        )
    return m


# --------------------------------------------------------------------------------------------
# slice views and the slicing axis (the Slicer module and the Segment Editor effect; no Qt)


def _matrix4(matrix) -> np.ndarray:
    """A 4x4 numpy matrix from a ``vtkMatrix4x4`` or anything array-like."""
    if hasattr(matrix, "GetElement"):
        return np_from_vtk_matrix(matrix)
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise MRMLError(f"expected a 4x4 matrix, got shape {m.shape}")
    return m


def slice_view_axis(volumeNode, slice_to_ras) -> int:
    """Array axis of ``volumeNode`` that a slice view shows slices of (``slice_to_ras``: the slice
    node's ``GetSliceToRAS()``; its third column is the view normal)."""
    return axis_for_slice_normal(volumeNode, _matrix4(slice_to_ras)[:3, 2])


def slice_view_index(volumeNode, axis, slice_to_ras) -> int:
    """Index along ``axis`` of the volume slice a slice view shows (the slice through the view's
    centre). Raises :class:`MRMLError` when the view does not show slices along ``axis`` or its
    centre lies outside the volume."""
    volume = geometry_of(volumeNode)
    a = volume_axis(volume, axis)
    m = _matrix4(slice_to_ras)
    shown = axis_for_slice_normal(volumeNode, m[:3, 2])
    if shown != a:
        raise MRMLError(
            f"the slice view shows {axis_name(volume, shown)} slices of "
            f"{node_name(volumeNode)}, not {axis_name(volume, a)} ones: use a view with "
            "that orientation"
        )
    return slice_index_at(volumeNode, a, m[:3, 3])
