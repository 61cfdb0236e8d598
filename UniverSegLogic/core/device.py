"""Compute devices, decided without importing torch.

Everything here is plain Python so that the Slicer module can use it before PyTorch is installed:

* :func:`choose_device` -- the one rule for ``auto`` / ``cpu`` / ``cuda[:n]`` / ``mps``, from what
  the installed PyTorch offers (:func:`torch_backends` reads that from an imported torch);
* :func:`is_mps_unsupported` -- recognise the errors PyTorch raises for an operation the Apple
  GPU backend does not implement (the caller then runs on the CPU, with one message).

Installing PyTorch is the Slicer module's job (``UniverSegSlicer/UniverSegSlicerLib/torch_install.py``).
"""

from __future__ import annotations

import re
from typing import Dict, Optional

from ..errors import DeviceError, UsageError

#: Message shown once when a run falls back from the Apple GPU to the CPU.
MPS_FALLBACK_MESSAGE = (
    "The Apple GPU (MPS) does not support an operation UniverSeg needs: running on the CPU instead."
)

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


def choose_device(requested: Optional[str], cuda: bool, mps: bool = False) -> str:
    """The device to run on.

    ``auto``: ``cuda`` when PyTorch sees a CUDA device, else ``mps`` (Apple Silicon GPU) when the
    installed PyTorch offers it, else ``cpu``. An explicit ``cuda``/``cuda:<n>`` or ``mps`` that is
    not available raises :class:`DeviceError`; anything else raises :class:`UsageError`.
    """
    device = (requested or "auto").strip().lower()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        if not cuda:
            raise DeviceError(
                "CUDA was requested but PyTorch sees no CUDA device (use device cpu or auto)"
            )
        return device
    if device == "mps":
        if not mps:
            raise DeviceError(
                "the Apple GPU (MPS) was requested but this PyTorch does not offer it "
                "(use device cpu or auto)"
            )
        return device
    raise UsageError(f"unknown device {requested!r}: use auto, cpu, cuda or mps")


def torch_backends(torch) -> Dict[str, bool]:
    """``{"cuda": ..., "mps": ...}``: what an imported ``torch`` module offers on this machine."""
    cuda = bool(torch.cuda.is_available())
    backend = getattr(getattr(torch, "backends", None), "mps", None)
    mps = False
    if backend is not None:
        try:
            mps = bool(backend.is_available())
        except (AttributeError, RuntimeError):
            mps = False
    return {"cuda": cuda, "mps": mps}


def is_mps_unsupported(error: BaseException) -> bool:
    """True for the errors PyTorch raises when an operation is not implemented on MPS."""
    if not isinstance(error, (NotImplementedError, RuntimeError, TypeError)):
        return False
    text = str(error).lower()
    return "mps" in text and (
        "not implemented" in text
        or "not currently implemented" in text
        or "not supported" in text
        or "unsupported" in text
        or "doesn't support" in text
        or "does not support" in text
    )
