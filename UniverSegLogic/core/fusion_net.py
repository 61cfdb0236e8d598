"""Learned fusion: a small U-Net that corrects the calibrated logistic fusion, slice by slice.

The logistic rule of :mod:`prior` sees one pixel at a time. This module adds what it cannot
see -- image edges, spatial context, the shape of the painted slices -- with a small 2D U-Net on
the network's 128x128 canvas. For each target slice it reads what the propagation already has:

* the image of the target slice, of its two neighbours and of the painted slices that bracket it
  (beyond the painted range: the nearest painted end slice, twice);
* the network's logit and the mean logit of the neighbouring slices (``model``, ``model_nb``);
* the logistic rule's fused logit (``base``);
* the shape prior: the interpolated signed distance over the structure's radius and Fill between
  slices' (inside the painted range), the end slice's distance (beyond it), and the bracketing
  painted labels themselves;
* where the slice lies: inside or beyond the painted range, its relative position in the gap,
  the distance past the painted end in typical gaps, and the gap (or that distance) in
  structure radii.

Its output is a *correction* added to the logistic logit (the last layer starts at zero, so an
untrained net is exactly the logistic rule): ``fused = base + from_canvas(delta)`` on the
slice's own grid. Nothing else changes -- the targets, the extent rule beyond the painted range
and the restacking (painted slices keep the user's labels bit for bit) are those of the logistic
fusion.

The weights ship as ``Resources/starter_fusion_net.pt`` (trained on the starter network's logits,
``python -m UniverSegResearch fusion``); a missing file means the logistic rule alone, with a
note. Loaded with ``torch.load(..., weights_only=True)``; inference is float32, deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UsageError, WeightsError

#: The shipped learned fusion (for the starter weights).
RESOURCE = "starter_fusion_net.pt"
#: A weights file's own learned fusion: ``<weights file>`` + this suffix.
SIDECAR_SUFFIX = ".fusion_net.pt"
#: Format tag of a learned-fusion file.
FORMAT = "UniverSeg-Slicer learned fusion v1"
#: What ``PropagationOptions.fusion`` may say: ``auto`` = learned when the weights have one.
FUSION_MODES = ("auto", "learned", "logistic")
#: Per-pixel input maps, in channel order (each scaled to about [-1, 1]).
MAP_CHANNELS: Tuple[str, ...] = (
    "image",
    "image_prev",
    "image_next",
    "image_lo",
    "image_hi",
    "model",
    "model_nb",
    "base",
    "dist",
    "fbs_dist",
    "label_lo",
    "label_hi",
)
#: Per-slice constants, appended as constant channels.
SCALAR_CHANNELS: Tuple[str, ...] = ("inside", "w", "beyond", "extent_r")
CHANNELS: Tuple[str, ...] = MAP_CHANNELS + SCALAR_CHANNELS
#: Scales: logits / LOGIT_SCALE, normalised distances / DIST_SCALE (both clipped to +-1).
LOGIT_SCALE = 12.0
DIST_SCALE = 3.0
DEFAULT_WIDTHS = (12, 24, 48, 96)
LEAKY = 0.01
#: The net's window: where the logistic logit exceeds ROI_LOGIT (or the network's logit 0, or
#: a bracketing painted label is), grown by ROI_MARGIN pixels, at least MIN_WINDOW pixels.
ROI_LOGIT = -4.0
ROI_MARGIN = 16
MIN_WINDOW = 64


# ------------------------------------------------------------------------------------ network


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.LeakyReLU(LEAKY),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.LeakyReLU(LEAKY),
    )


class FusionUNet(nn.Module):
    """2D U-Net: ``len(widths)`` levels (2x2 max-pool down, bilinear up, skip concatenation),
    two 3x3 convolutions + LeakyReLU per block, no normalisation; a 1x1 output convolution that
    starts at zero (the correction of an untrained net is 0)."""

    def __init__(self, in_channels: int = len(CHANNELS), widths: Sequence[int] = DEFAULT_WIDTHS):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or any(w < 1 for w in widths):
            raise UsageError(f"fusion net widths must be >= 2 positive numbers, got {widths}")
        self.in_channels, self.widths = int(in_channels), widths
        self.down = nn.ModuleList()
        c = self.in_channels
        for w in widths:
            self.down.append(_block(c, w))
            c = w
        self.up = nn.ModuleList(
            _block(widths[i + 1] + widths[i], widths[i]) for i in range(len(widths) - 2, -1, -1)
        )
        self.out = nn.Conv2d(widths[0], 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for block in self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skips.pop()], 1))
        return self.out(x)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters()))


@dataclass
class FusionNet:
    """A loaded learned fusion: the network and what came with it."""

    model: FusionUNet
    #: beyond the painted range, at most this many typical gaps (None: the logistic rule's)
    extrapolation_gaps: Optional[float] = None
    source: str = ""
    path: str = ""
    info: Dict[str, object] = field(default_factory=dict)

    def state(self) -> Dict[str, object]:
        """The file form (what :func:`save_fusion_net` writes)."""
        return {
            "format": FORMAT,
            "channels": list(CHANNELS),
            "widths": list(self.model.widths),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "extrapolation_gaps": (
                None if self.extrapolation_gaps is None else float(self.extrapolation_gaps)
            ),
            "source": str(self.source),
            "info": dict(self.info),
        }


def save_fusion_net(net: FusionNet, path: str) -> None:
    """Write ``net`` atomically (loadable with ``weights_only=True``)."""
    import io

    from .atomic import write_bytes

    buf = io.BytesIO()
    torch.save(net.state(), buf)
    write_bytes(str(path), buf.getvalue())


def fusion_net_from_state(state: object, origin: str = "learned fusion") -> FusionNet:
    """A :class:`FusionNet` from its file form; anything unexpected raises WeightsError."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise WeightsError(f"{origin}: not a learned-fusion file ({FORMAT!r} expected)")
    if list(state.get("channels", [])) != list(CHANNELS):
        raise WeightsError(
            f"{origin}: made for other inputs ({state.get('channels')}); this version reads "
            f"{list(CHANNELS)}"
        )
    try:
        model = FusionUNet(len(CHANNELS), state["widths"])
        model.load_state_dict(state["state_dict"], strict=True)
    except (KeyError, TypeError, RuntimeError, UsageError) as exc:
        raise WeightsError(f"{origin}: cannot use its weights ({exc})") from None
    gaps = state.get("extrapolation_gaps")
    if gaps is not None and not (isinstance(gaps, (int, float)) and 0 <= float(gaps) <= 10):
        raise WeightsError(f"{origin}: bad extrapolation_gaps {gaps!r}")
    info = state.get("info") or {}
    return FusionNet(
        model.eval(),
        None if gaps is None else float(gaps),
        str(state.get("source", "")),
        info=dict(info) if isinstance(info, dict) else {},
    )


def load_fusion_net(path: str) -> FusionNet:
    """Read a learned-fusion file (``torch.load(weights_only=True)``, on the CPU)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"learned fusion not found: {p}")
    from .weights import check_archive

    check_archive(str(p))  # bounded before anything is inflated, like the network's weights
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (a truncated or foreign file: one line for the user)
        from ..errors import one_line

        raise WeightsError(f"cannot read the learned fusion {p}: {one_line(exc)}") from None
    net = fusion_net_from_state(state, str(p))
    net.path = str(p)
    return net


def fusion_net_for(weights_source: str, mode: str = "auto") -> Tuple[Optional[FusionNet], str]:
    """(learned fusion for ``weights_source`` or None, a note for the user or "").

    ``mode``: ``logistic`` -> None; a ``.pt`` file -> that learned fusion (a missing or bad file
    raises WeightsError); ``auto`` / ``learned`` -> the shipped net for the starter weights
    (trained on their logits only; also for a file byte-identical to them), for a weights file ``X.pt`` the file ``X.pt`` +
    :data:`SIDECAR_SUFFIX` when present. No net for the weights, or a missing shipped file: None
    and a note that the logistic rule is used (``learned`` asked for it explicitly; ``auto`` says
    so only when the shipped file is missing)."""
    if mode.endswith(".pt"):
        return load_fusion_net(mode), ""
    if mode not in FUSION_MODES:
        raise UsageError(
            f"fusion must be one of {', '.join(FUSION_MODES)} or a .pt file, got {mode!r}"
        )
    if mode == "logistic":
        return None, ""
    from .weights import is_starter_content, resource_file

    starter = weights_source == "starter" or (
        weights_source != "official" and is_starter_content(str(weights_source))
    )  # like the logistic rule's calibration (prior.fusion_for): by content, not by name
    if not starter:
        sidecar = Path(str(weights_source) + SIDECAR_SUFFIX)
        if weights_source != "official" and sidecar.is_file():
            return load_fusion_net(str(sidecar)), ""
        note = (
            f"no learned fusion for weights {weights_source!r} (the shipped one is trained on "
            "the starter weights' logits): using the logistic fusion rule"
        )
        return None, note if mode == "learned" else ""
    path = resource_file(RESOURCE)
    if path is None:
        return None, (
            f"the learned fusion (Resources/{RESOURCE}) is missing: using the logistic fusion rule"
        )
    return load_fusion_net(str(path)), ""


# ------------------------------------------------------------------------------------ inputs


CanvasImages = Callable[[Sequence[int]], torch.Tensor]


def canvas_image_source(images: np.ndarray, canvas) -> CanvasImages:
    """``f(idx) -> (N, 1, size, size)`` canvas images of slices ``idx`` of a canonical image
    stack (cached), for callers without a propagation session's own (training, tests)."""
    cache: Dict[int, torch.Tensor] = {}

    def get(idx: Sequence[int]) -> torch.Tensor:
        missing = [i for i in idx if i not in cache]
        if missing:
            t = canvas.to_canvas(torch.from_numpy(np.ascontiguousarray(images[missing])))
            for i, x in zip(missing, t):
                cache[i] = x
        return torch.stack([cache[i] for i in idx])

    return get


def _clip(x, scale: float) -> np.ndarray:
    return np.clip(np.asarray(x, np.float32) / np.float32(scale), -1.0, 1.0)


def slice_maps(
    prior, t: int, region: str, feats, base: np.ndarray
) -> Tuple[np.ndarray, Tuple[int, int], np.ndarray]:
    """(native maps of :data:`MAP_CHANNELS` that are not images, (lo, hi) painted slices,
    scalars of :data:`SCALAR_CHANNELS`) of target ``t``; ``feats``: its
    :class:`~UniverSegLogic.core.prior.FeatureSource`, ``base``: the logistic logit."""
    inside = region == "inside"
    if inside:
        lo, hi = prior.bracket(t)
        dist = feats.get("sdf_n")
        fbs = feats.get("fbs_n") if prior.fbs is not None else dist
        w = (t - lo) / float(hi - lo)
        scalars = [1.0, w, 0.0, float(feats.get("gap_r").flat[0]) / 10.0]
    else:
        lo = hi = prior.end_of(t)
        dist = fbs = feats.get("end_n")
        scalars = [
            0.0,
            0.0,
            float(feats.get("beyond").flat[0]) / 4.0,
            float(feats.get("beyond_r").flat[0]) / 10.0,
        ]
    maps = np.stack(
        [
            _clip(feats.get("model"), LOGIT_SCALE),
            _clip(feats.get("model_nb"), LOGIT_SCALE),
            _clip(base, LOGIT_SCALE),
            _clip(dist, DIST_SCALE),
            _clip(fbs, DIST_SCALE),
            np.asarray(prior.masks[lo], np.float32),
            np.asarray(prior.masks[hi], np.float32),
        ]
    )
    return maps, (int(lo), int(hi)), np.asarray(scalars, np.float32)


#: Outside the prior's region (see :func:`build_inputs`), each map channel holds the value of
#: a pixel far from the structure: the lowest clipped logit, the largest clipped distance
#: (signed distances are positive outside), no label.
OUTSIDE_FILL = np.array([-1.0, -1.0, -1.0, 1.0, 1.0, 0.0, 0.0], np.float32)


def _partial(region):
    """``region`` when it covers less than the slice, else None."""
    return None if region is None or region.is_full else region


def build_inputs(
    prior,
    items: Mapping[int, Tuple[str, object, np.ndarray]],
    canvas,
    canvas_images: CanvasImages,
    window=None,
) -> torch.Tensor:
    """(N, len(CHANNELS), size, size) float32 inputs of the targets ``items`` = ``{t: (region,
    features, logistic logit)}`` (sorted by t), on the canvas of ``canvas``. A prior fused in a
    region of the slice (:class:`~UniverSegLogic.core.region.Region`) gives region-sized maps;
    ``window`` (a Region; None: the prior's) is the part of the slice the net sees: the maps are
    placed in the whole slice with :data:`OUTSIDE_FILL` outside the window (the images are whole
    slices either way)."""
    ts = sorted(items)
    n = prior.masks.shape[0]
    region = getattr(prior, "region", None)
    window = _partial(window if window is not None else region)
    maps, scal, idx = [], [], []
    for t in ts:
        kind, feats, base = items[t]
        m, (lo, hi), s = slice_maps(prior, t, kind, feats, base)
        if window is not None:
            whole = np.empty((m.shape[0], window.rows, window.cols), np.float32)
            whole[...] = OUTSIDE_FILL[:, None, None]
            if _partial(region) is None:
                whole[(slice(None),) + window.index] = m[(slice(None),) + window.index]
            else:  # the prior's region holds the window (both around the same painting)
                r0, c0 = window.r0 - region.r0, window.c0 - region.c0
                part = m[:, r0 : r0 + window.shape[0], c0 : c0 + window.shape[1]]
                whole[(slice(None),) + window.index] = part
            m = whole
        maps.append(m)
        scal.append(s)
        idx.append([t, max(0, t - 1), min(n - 1, t + 1), lo, hi])
    native = torch.from_numpy(np.ascontiguousarray(np.stack(maps)))  # (N, M, rows, cols)
    N, M = native.shape[:2]
    mapped = canvas.to_canvas(native.reshape(N * M, *native.shape[2:]))
    mapped = mapped.reshape(N, M, canvas.size, canvas.size)
    flat = [i for row in idx for i in row]
    imgs = canvas_images(flat).reshape(N, 5, canvas.size, canvas.size)
    scalars = torch.from_numpy(np.stack(scal))[:, :, None, None].expand(
        N, len(SCALAR_CHANNELS), canvas.size, canvas.size
    )
    return torch.cat([imgs.float(), mapped.float(), scalars.float()], 1).contiguous()


def region_box(x: torch.Tensor, multiple: int, margin: int = ROI_MARGIN) -> Tuple[slice, slice]:
    """The window of one slice's canvas inputs ``x`` (C, S, S) the net runs on: the box around
    where the structure may be (logistic logit above :data:`ROI_LOGIT`, network logit above 0,
    the bracketing painted labels) grown by ``margin``, at least :data:`MIN_WINDOW` pixels,
    rounded up to a multiple of ``multiple``, inside the canvas (the whole canvas when nothing is
    there). Training crops are windows around the structure too."""
    size = x.shape[-1]
    roi = x[MAP_CHANNELS.index("base")] > ROI_LOGIT / LOGIT_SCALE
    roi |= x[MAP_CHANNELS.index("model")] > 0
    roi |= x[MAP_CHANNELS.index("label_lo")] > 0.5
    roi |= x[MAP_CHANNELS.index("label_hi")] > 0.5
    rows, cols = torch.nonzero(roi.any(1)).flatten(), torch.nonzero(roi.any(0)).flatten()
    if len(rows) == 0:
        return slice(0, size), slice(0, size)
    out = []
    for lo, hi in ((int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)):
        lo, hi = lo - margin, hi + margin
        want = max(hi - lo, MIN_WINDOW)
        want = min(size, -(-want // multiple) * multiple)
        start = int(np.clip((lo + hi - want) // 2, 0, size - want))
        out.append(slice(start, start + want))
    return out[0], out[1]


class LearnedFusion:
    """The ``refine`` step of :func:`~UniverSegLogic.core.prior.fuse_gap` /
    :class:`~UniverSegLogic.core.prior.OutsideChain`: ``refine(prior, {t: (region, features,
    logistic logit)}) -> {t: fused logit}`` on each slice's own grid.

    ``canvas``: the session's :class:`~UniverSegLogic.core.canvas.Canvas`; ``canvas_images(idx)``
    its canvas images of canonical slices ``idx`` (see :func:`canvas_image_source`). The net runs
    slice by slice on the window :func:`region_box` of each (no correction outside it), so a
    slice's result never depends on which other slices were computed with it. Given a
    ``window`` (a rectangle of the slice; the propagator gives the one its fusion region around
    the same painting has), the net sees the maps there only and corrects nothing outside it."""

    def __init__(self, net: FusionNet, canvas, canvas_images: CanvasImages):
        self.net = net
        self.canvas = canvas
        self.canvas_images = canvas_images
        self.model = net.model.to(memory_format=torch.channels_last)

    def __call__(
        self, prior, items: Mapping[int, Tuple[str, object, np.ndarray]], window=None
    ) -> Dict[int, np.ndarray]:
        """``{t: fused logit}`` over the prior's planes; ``window``: see :func:`build_inputs`
        (no correction outside it)."""
        ts = sorted(items)
        x = build_inputs(prior, items, self.canvas, self.canvas_images, window)
        delta = torch.zeros((len(ts), 1) + tuple(x.shape[2:]), dtype=torch.float32)
        with torch.inference_mode():
            for i in range(len(ts)):
                rows, cols = region_box(x[i], self.model.multiple)
                part = x[i : i + 1, :, rows, cols].contiguous(memory_format=torch.channels_last)
                delta[i, :, rows, cols] = self.model(part)
            native = self.canvas.from_canvas(delta).numpy()
        region = _partial(getattr(prior, "region", None))
        window = _partial(window if window is not None else region)
        out: Dict[int, np.ndarray] = {}
        for t, d in zip(ts, native):
            if window is not None:
                keep = np.zeros(d.shape, np.float32)
                keep[window.index] = d[window.index]
                d = keep
            if region is not None:
                d = region.crop(d)
            out[t] = (np.asarray(items[t][2], np.float32) + d).astype(np.float32)
        return out


def describe(net: Optional[FusionNet]) -> str:
    """One line saying which fusion runs (for logs and results)."""
    if net is None:
        return "logistic fusion rule"
    return (
        f"learned fusion ({parameter_count(net.model):,} parameters"
        + (f", {Path(net.path).name}" if net.path else "")
        + ")"
    )
