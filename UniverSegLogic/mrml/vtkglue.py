"""Small VTK helpers of the MRML bridge: matrices, numpy views of image scalars, oriented images."""

from __future__ import annotations

from typing import Optional

import numpy as np


def slicer_module():
    """The ``slicer`` module (Slicer or slicer-core), imported on first use."""
    import slicer

    return slicer


def vtk_module():
    """The ``vtk`` module, imported on first use."""
    import vtk

    return vtk


def np_from_vtk_matrix(m) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 float64 array."""
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix(a: np.ndarray):
    """A 4x4 array as a ``vtkMatrix4x4``."""
    m = vtk_module().vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def image_scalars(image) -> Optional[np.ndarray]:
    """KJI(+components) view of an image's scalars, or None when it holds none."""
    from vtk.util import numpy_support

    if image is None or image.GetPointData() is None:
        return None
    arr = image.GetPointData().GetScalars()
    if arr is None or arr.GetNumberOfTuples() == 0:
        return None
    dims = image.GetDimensions()
    shape = tuple(dims[::-1])
    comps = arr.GetNumberOfComponents()
    if comps > 1:
        shape = shape + (comps,)
    return numpy_support.vtk_to_numpy(arr).reshape(shape)


def extent_empty(extent) -> bool:
    """True for a VTK extent (I0, I1, J0, J1, K0, K1) that holds no voxel."""
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def oriented_image(array_kji: np.ndarray, extent, image_to_node: np.ndarray):
    """A uint8 vtkOrientedImageData holding ``array_kji`` over ``extent`` (I0,I1,J0,J1,K0,K1)."""
    slicer, vtk = slicer_module(), vtk_module()
    img = slicer.vtkOrientedImageData()
    img.SetExtent(*[int(e) for e in extent])
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image_scalars(img)[...] = array_kji.astype(np.uint8, copy=False)
    img.SetImageToWorldMatrix(vtk_matrix(image_to_node))
    return img


def geometry_image(extent, image_to_node: np.ndarray):
    """An unallocated vtkOrientedImageData describing a grid (reference for resampling)."""
    img = slicer_module().vtkOrientedImageData()
    img.SetExtent(*[int(e) for e in extent])
    img.SetImageToWorldMatrix(vtk_matrix(image_to_node))
    return img
