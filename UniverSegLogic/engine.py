"""Inference engine: runs UniverSeg for batches of target slices that share one support set.

The pipeline only talks to :class:`InferenceEngine` (``logits``), so the way the network is
evaluated (reference forward pass, split cross convolutions, dtype, batch sizing) is decided here.
"""
from __future__ import annotations

from typing import Optional

import torch

from .model import UniverSeg


class Cancelled(Exception):
    """Raised when the caller asked to stop; nothing has been written."""


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; validates explicit choices."""
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA was requested but no CUDA device is available "
                               "(use --device cpu or auto)")
        return device
    if device != "cpu":
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


class InferenceEngine:
    """Evaluates a UniverSeg network for target batches sharing one support set."""

    def __init__(self, model: UniverSeg, device: str = "auto", batch_size: Optional[int] = None):
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.batch_size = batch_size or (16 if self.device != "cpu" else 4)

    @torch.no_grad()
    def logits(self, targets: torch.Tensor, support_images: torch.Tensor,
               support_labels: torch.Tensor) -> torch.Tensor:
        """(B,1,H,W) targets, (S,1,H,W) support -> (B,1,H,W) float32 logits on the CPU."""
        dev = self.device
        out = self.model.forward_shared(targets.to(dev, torch.float32),
                                        support_images.to(dev, torch.float32),
                                        support_labels.to(dev, torch.float32))
        return out.float().cpu()
