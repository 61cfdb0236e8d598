"""UniverSeg v1 network, written for this project.

The module layout reproduces the released v1 checkpoint exactly (key names, shapes, 44 tensors,
1,182,785 parameters), so ``load_state_dict(official, strict=True)`` works unchanged.

Two call forms:

* ``model(target, support_images, support_labels)`` -- the official form:
  target (B,1,H,W), support images and labels (B,S,1,H,W), returns logits (B,1,H,W).
* ``model.forward_shared(targets, support_images, support_labels)`` -- one support set
  (S,1,H,W) serves a whole batch of targets (B,1,H,W) (the volume case).

This is the straightforward reference implementation (the correctness oracle); the fast
inference path lives in :mod:`UniverSegLogic.core.engine`.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import SupportError

#: Side length the released network was trained at.
TRAINED_SIZE = 128
#: Feature channels per stream in every block of v1.
FEATURES = 64
#: Encoder blocks; H and W must be divisible by 2 ** (ENCODER_BLOCKS - 1).
ENCODER_BLOCKS = 4
DECODER_BLOCKS = 3
LEAKY_SLOPE = 0.01


class EmptySupportError(SupportError):
    """Raised when a forward pass is asked for with no support item."""


class _Conv(nn.Module):
    """3x3 (or 1x1) same-padded convolution, optionally followed by LeakyReLU.

    Kept as a wrapper so that parameter names read ``<name>.conv.weight`` as in v1.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, activation: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        self.activation = activation
        nn.init.kaiming_normal_(self.conv.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.leaky_relu(x, LEAKY_SLOPE) if self.activation else x


class _Stream(nn.Module):
    """Per-stream convolution applied to every item of a (N, C, H, W) batch.

    The attribute name ``vmapped`` keeps v1's key names (``...target.vmapped.conv.weight``).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.vmapped = _Conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vmapped(x)


class _CrossConv(nn.Module):
    """One 3x3 conv (with bias, no nonlinearity in v1) over [target || support_i]."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cross_conv = nn.Conv2d(cin, cout, 3, padding=1)
        nn.init.kaiming_normal_(self.cross_conv.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
        nn.init.zeros_(self.cross_conv.bias)

    def forward(self, target: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """target (B,Ct,H,W), support (B,S,Cs,H,W) -> z (B,S,Cout,H,W)."""
        b, s = support.shape[:2]
        pairs = torch.cat([target.unsqueeze(1).expand(b, s, *target.shape[1:]), support], dim=2)
        z = self.cross_conv(pairs.flatten(0, 1))
        return z.unflatten(0, (b, s))


class CrossBlock(nn.Module):
    """v1 CrossBlock: shared cross conv, then target = conv(mean_i z_i), support_i = conv(z_i)."""

    def __init__(self, cin: int, features: int = FEATURES):
        super().__init__()
        self.cross = _CrossConv(cin, features)
        self.target = _Stream(features)
        self.support = _Stream(features)

    def forward(
        self, target: torch.Tensor, support: torch.Tensor, need_support: bool = True
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.cross(target, support)
        new_target = self.target(z.mean(dim=1))
        if not need_support:
            return new_target, z  # the caller discards the support stream
        new_support = self.support(z.flatten(0, 1)).unflatten(0, z.shape[:2])
        return new_target, new_support


class UniverSeg(nn.Module):
    """The UniverSeg v1 network (random initial weights; load a checkpoint with ``weights``)."""

    def __init__(self, features: int = FEATURES):
        super().__init__()
        f = features
        self.enc_blocks = nn.ModuleList(
            [CrossBlock(3, f)] + [CrossBlock(2 * f, f) for _ in range(ENCODER_BLOCKS - 1)]
        )
        self.dec_blocks = nn.ModuleList([CrossBlock(4 * f, f) for _ in range(DECODER_BLOCKS)])
        self.out_conv = _Conv(f, 1, kernel=1, activation=False)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check(
        target: torch.Tensor,
        support_images: torch.Tensor,
        support_labels: torch.Tensor,
        shared: bool,
    ) -> None:
        want = 4 if shared else 5
        if target.dim() != 4 or target.shape[1] != 1:
            raise ValueError(f"target must be (B,1,H,W), got {tuple(target.shape)}")
        if support_images.shape != support_labels.shape:
            raise ValueError(
                "support images and labels must have the same shape, got "
                f"{tuple(support_images.shape)} and {tuple(support_labels.shape)}"
            )
        if support_images.dim() != want:
            form = "(S,1,H,W)" if shared else "(B,S,1,H,W)"
            raise ValueError(f"support must be {form}, got {tuple(support_images.shape)}")
        s_axis = 0 if shared else 1
        if support_images.shape[s_axis] == 0:
            raise EmptySupportError(
                "the support set is empty: UniverSeg needs at least one labeled slice"
            )
        if support_images.shape[-2:] != target.shape[-2:]:
            raise ValueError(
                "target and support must have the same H and W, got "
                f"{tuple(target.shape[-2:])} and {tuple(support_images.shape[-2:])}"
            )
        h, w = target.shape[-2:]
        m = 2 ** (ENCODER_BLOCKS - 1)
        if h % m or w % m:
            raise ValueError(f"H and W must be divisible by {m}, got {h}x{w}")
        if not shared and support_images.shape[0] != target.shape[0]:
            raise ValueError("target and support batch sizes differ")

    # ----------------------------------------------------------------- forward
    def forward(
        self, target: torch.Tensor, support_images: torch.Tensor, support_labels: torch.Tensor
    ) -> torch.Tensor:
        """Official call form: (B,1,H,W), (B,S,1,H,W), (B,S,1,H,W) -> logits (B,1,H,W)."""
        self._check(target, support_images, support_labels, shared=False)
        support = torch.cat([support_images, support_labels], dim=2)
        t, s = target, support
        skips: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for i, block in enumerate(self.enc_blocks):
            t, s = block(t, s)
            if i < len(self.enc_blocks) - 1:
                skips.append((t, s))
                t = F.max_pool2d(t, 2)
                s = F.max_pool2d(s.flatten(0, 1), 2).unflatten(0, s.shape[:2])
        for i, block in enumerate(self.dec_blocks):
            t_skip, s_skip = skips.pop()
            t = torch.cat([_up(t), t_skip], dim=1)
            s = torch.cat([_up(s.flatten(0, 1)).unflatten(0, s.shape[:2]), s_skip], dim=2)
            t, s = block(t, s, need_support=i < len(self.dec_blocks) - 1)
        return self.out_conv(t)

    def forward_shared(
        self, targets: torch.Tensor, support_images: torch.Tensor, support_labels: torch.Tensor
    ) -> torch.Tensor:
        """One support set (S,1,H,W) for a batch of targets (B,1,H,W) -> logits (B,1,H,W)."""
        self._check(targets, support_images, support_labels, shared=True)
        b = targets.shape[0]
        imgs = support_images.unsqueeze(0).expand(b, *support_images.shape)
        labs = support_labels.unsqueeze(0).expand(b, *support_labels.shape)
        return self.forward(targets, imgs, labs)


def _up(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 upsampling with align_corners=True (as v1's UpsamplingBilinear2d)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
