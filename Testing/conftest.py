"""Shared test material: phantoms, rotations and the engine test doubles.

Test doubles isolate geometry from the network and are named as such; every other test uses the
real engine (random or starter weights).
"""

import os

import numpy as np
import pytest
import torch

# slicer-core's ITK thread pool can crash the process at exit after several interpolator runs
os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Platform")

from UniverSegLogic.core.geometry import Volume, make_ijk_to_ras  # noqa: E402


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about array-free axis ``axis`` (0, 1 or 2)."""
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    a, b = [x for x in range(3) if x != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def write_volume_file(path, vol: Volume) -> None:
    """Write ``vol`` as an image file with SimpleITK directly (the tests' own writer, kept apart
    from the product's ``core.io``, so a geometry bug there cannot hide in both directions)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol.array)
    lps = np.diag([-1.0, -1, 1, 1]) @ vol.ijk_to_ras
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing(sp.tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    img.SetDirection((lps[:3, :3] / sp).ravel().tolist())
    sitk.WriteImage(img, str(path))


class ThresholdEngineDouble:
    """Test double for InferenceEngine: logit = 40 * (target - 0.5); ignores the support.

    Counts calls and the targets it was asked for."""

    device = "cpu"
    batch_size = 5

    def __init__(self):
        self.calls = 0
        self.targets = 0

    def logits(self, targets, support_images, support_labels):
        assert support_images.shape[0] >= 1 and support_images.shape == support_labels.shape
        self.calls += 1
        self.targets += int(targets.shape[0])
        return 40.0 * (targets.float() - 0.5)


class ConstantLogitEngineDouble:
    """Test double for InferenceEngine: logit +8 (foreground) for every pixel of every target.

    Records how many support items each call received."""

    device = "cpu"
    batch_size = 4

    def __init__(self):
        self.support_counts = []

    def logits(self, targets, support_images, support_labels):
        self.support_counts.append(int(support_images.shape[0]))
        return torch.full((targets.shape[0], 1) + tuple(targets.shape[-2:]), 8.0)


class EngineStoreDouble:
    """Test double for :class:`~UniverSegLogic.core.engines.EngineStore`: hands out ``engine``
    (an engine double, or a real engine loaded once) for any weights and device, so a run through
    :class:`~UniverSegLogic.mrml.Runner` -- the path the Slicer module, its effect and the
    browser app take -- computes with it."""

    def __init__(self, engine, description="engine test double"):
        self.engine, self.description = engine, description
        self.mps_failed = False
        self.requests = []  # (weights, device) of every get

    def device_for(self, requested):
        return self.engine.device

    def get(
        self, weights="starter", device="auto", progress=None, cancel=None, *, precision="auto"
    ):
        from UniverSegLogic.core.engines import LoadedEngine

        given = getattr(self.engine, "precision", "fp32")  # an engine double computes in fp32
        if precision not in ("auto", given):
            raise AssertionError(f"the double's engine computes in {given}, not {precision}")
        self.requests.append((weights, device))
        return LoadedEngine(self.engine, self.description, "double", "")

    def clear(self):
        pass

    def __len__(self):
        return 1


def runner_with(engine, **kwargs):
    """The shipped run path (:class:`UniverSegLogic.mrml.Runner`) computing with ``engine``."""
    from UniverSegLogic.mrml import Runner

    return Runner(engines=EngineStoreDouble(engine), **kwargs)


def oblique_phantom(shape=(18, 26, 34), spacing=(0.9, 1.4, 2.5)):
    """Oblique, anisotropic, left-handed volume with non-zero origin holding an off-centre
    ellipsoid whose cross-section changes from slice to slice along every axis; (volume, mask)."""
    tilt = rotation(0, np.degrees(0.3))
    m = make_ijk_to_ras(
        spacing, (-60.0, 33.5, -12.25), rotation(2, 25) @ tilt @ np.diag([1, -1, 1])
    )
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    inside = (((k - 7.5) / 6.5) ** 2 + ((j - 11) / 8.0) ** 2 + ((i - 19) / 11.0) ** 2) <= 1.0
    inside &= ~((k > 9) & (j < 10))  # break the symmetry
    image = np.where(inside, 900.0, -100.0).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 5, shape).astype(np.float32)
    return Volume(image, m), inside


def blob_phantom():
    """A 16 x 28 x 30 axis-aligned volume holding a bright ellipsoid; (volume, mask)."""
    k, j, i = np.mgrid[:16, :28, :30]
    blob = ((j - 14) ** 2 / 64 + (i - 15) ** 2 / 81 + (k - 8) ** 2 / 36) <= 1
    img = np.where(blob, 700.0, -100.0) + np.random.default_rng(1).normal(0, 20, blob.shape)
    return Volume(img.astype(np.float32), make_ijk_to_ras((1.0, 1.2, 2.5))), blob


def labeled_only(mask, axis, labeled):
    """``mask`` with only the slices ``labeled`` along ``axis`` kept (a user's painting)."""
    out = np.zeros_like(mask)
    idx = [slice(None)] * 3
    for t in labeled:
        idx[axis] = t
        out[tuple(idx)] = mask[tuple(idx)]
    return out


def random_engine(batch_size=4):
    """The real engine with a seeded random network (fast, deterministic)."""
    from UniverSegLogic.core.engine import InferenceEngine
    from UniverSegLogic.core.model import UniverSeg

    torch.manual_seed(0)
    return InferenceEngine(UniverSeg(), "cpu", batch_size=batch_size)


@pytest.fixture(scope="session")
def starter_engine():
    """The real engine with the shipped starter weights (loaded once per test session)."""
    from UniverSegLogic.core.engines import EngineStore

    return EngineStore().get("starter", "cpu").engine
