"""Volume propagation: a few labeled slices in, every other slice predicted.

``propagate(request)`` is the single entry point used by the CLI, the MRML bridge and the
evaluation. For each segment it

1. views image and mask in the canonical slice frame of the chosen axis (:mod:`geometry`),
2. finds the labeled slices (:mod:`support`),
3. picks the targets: the slices between the first and last labeled slice, plus up to one typical
   gap beyond each end (``max_extrapolation``),
4. runs UniverSeg on the 128x128 canvas (:mod:`slicing`, :mod:`engine`) with bracketing support,
   optionally ensembled over support subsets and with flipped support copies,
5. fuses the network's logit with the painted-slice shape prior inside the labeled range
   (:mod:`prior`), and restacks (:mod:`restack`): labeled slices keep the user's labels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .engine import Cancelled, InferenceEngine, resolve_device
from .geometry import AxisSpec, GeometryError, SliceFrame, Volume
from .prior import DistancePrior, FusionParams
from .restack import assemble
from .slicing import Canvas, intensity_window, scale_intensity
from .support import (ExternalSupport, SupportError, ensemble_subsets, labeled_slices_of,
                      select_support)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

_RESOURCES = Path(__file__).resolve().parent.parent / "Resources"


@dataclass
class PropagationOptions:
    """How to propagate (defaults are what the CLI and the Slicer module use)."""

    axis: AxisSpec = "axial"
    support_size: int = 8
    ensemble: int = 1
    flips: bool = False
    device: str = "auto"
    weights: str = "starter"
    batch_size: Optional[int] = None
    #: slices predicted beyond the first/last labeled slice: None = one typical gap, -1 = all
    max_extrapolation: Optional[int] = None
    #: fuse the network with the painted-slice shape prior between labeled slices
    use_prior: bool = True
    seed: int = 0


@dataclass
class SegmentRequest:
    """One segment to propagate: its mask on the image grid (KJI) and optional labeled slices."""

    name: str
    mask: np.ndarray
    labeled_slices: Optional[Sequence[int]] = None


@dataclass
class SupportVolume:
    """Another labeled volume whose slices can serve as support (masks matched by name)."""

    image: Volume
    masks: Dict[str, np.ndarray]


@dataclass
class PropagationRequest:
    image: Volume
    segments: List[SegmentRequest]
    options: PropagationOptions = field(default_factory=PropagationOptions)
    support_volumes: List[SupportVolume] = field(default_factory=list)


@dataclass
class SegmentResult:
    name: str
    mask: np.ndarray            # bool KJI: user labels on labeled slices, prediction elsewhere
    probability: np.ndarray     # float32 KJI
    labeled_slices: List[int]
    predicted_slices: List[int]


@dataclass
class PropagationResult:
    axis: int                   # array axis that was sliced
    segments: List[SegmentResult]
    device: str
    weights: str
    seconds: float

    def get(self, name: str) -> SegmentResult:
        return next(s for s in self.segments if s.name == name)


def default_fusion(weights_source: str) -> FusionParams:
    """Fusion parameters calibrated for ``weights_source`` (starter: shipped json)."""
    path = _RESOURCES / "starter_fusion.json"
    if weights_source == "starter" and path.is_file():
        return FusionParams.load(path)
    return FusionParams()


_ENGINE_CACHE: Dict[Tuple[str, str], Tuple[InferenceEngine, str]] = {}


def get_engine(weights: str = "starter", device: str = "auto",
               batch_size: Optional[int] = None) -> Tuple[InferenceEngine, str]:
    """A cached engine for (weights, device) and the weights' description."""
    from .weights import build_model, load_weights

    dev = resolve_device(device)
    key = (weights, dev)
    if key not in _ENGINE_CACHE:
        w = load_weights(weights)
        _ENGINE_CACHE[key] = (InferenceEngine(build_model(w), dev, batch_size), w.description)
    engine, desc = _ENGINE_CACHE[key]
    if batch_size:
        engine.batch_size = batch_size
    return engine, desc


def _check_inputs(request: PropagationRequest) -> None:
    shape = request.image.array.shape
    if not request.segments:
        raise SupportError("no segment to propagate")
    for s in request.segments:
        if np.shape(s.mask) != shape:
            raise GeometryError(f"segment {s.name!r}: mask shape {np.shape(s.mask)} does not match "
                                f"the image {shape}")
    o = request.options
    if o.support_size < 1:
        raise SupportError("support size must be at least 1")
    if o.ensemble < 1:
        raise SupportError("ensemble must be at least 1")


class _Stack:
    """An image viewed in the canonical frame and on the canvas."""

    def __init__(self, volume: Volume, axis: AxisSpec):
        self.frame = SliceFrame.of(volume, axis)
        window = intensity_window(volume.array)
        self.images = self.frame.to_frame(scale_intensity(volume.array, window))
        n, r, c = self.images.shape
        self.n = n
        self.canvas = Canvas.for_slices(r, c, self.frame.spacing[1], self.frame.spacing[2])
        self._cache: Dict[int, torch.Tensor] = {}

    def canvas_images(self, idx: Sequence[int]) -> torch.Tensor:
        missing = [i for i in idx if i not in self._cache]
        if missing:
            t = self.canvas.to_canvas(torch.from_numpy(np.ascontiguousarray(self.images[missing])))
            for i, x in zip(missing, t):
                self._cache[i] = x
        return torch.stack([self._cache[i] for i in idx])

    def canvas_masks(self, mask_stack: np.ndarray, idx: Sequence[int]) -> torch.Tensor:
        m = torch.from_numpy(np.ascontiguousarray(mask_stack[list(idx)], dtype=np.float32))
        return self.canvas.to_canvas(m).clamp_(0, 1)


def _external_support(request: PropagationRequest, name: str) -> Optional[ExternalSupport]:
    imgs, labs, pos = [], [], []
    for sv in request.support_volumes:
        if name not in sv.masks:
            continue
        st = _Stack(sv.image, request.options.axis)
        ms = st.frame.to_frame(np.asarray(sv.masks[name], dtype=bool))
        idx = [int(i) for i in np.flatnonzero(ms.reshape(st.n, -1).any(axis=1))]
        if not idx:
            continue
        imgs.append(st.canvas_images(idx))
        labs.append(st.canvas_masks(ms, idx))
        pos.append(np.array(idx, dtype=np.float64) / max(1, st.n - 1))
    if not imgs:
        return None
    return ExternalSupport(torch.cat(imgs), torch.cat(labs), np.concatenate(pos))


def _targets(n: int, labeled: List[int], max_extrapolation: Optional[int],
             external: Optional[ExternalSupport]) -> List[int]:
    if not labeled:  # external support only: the relative range the structure covers there
        lo = max(0, int(np.floor((external.positions.min() - 0.1) * (n - 1))))
        hi = min(n - 1, int(np.ceil((external.positions.max() + 0.1) * (n - 1))))
        return list(range(lo, hi + 1))
    if max_extrapolation is None:
        gaps = np.diff(labeled)
        ext = int(np.max(gaps)) if len(gaps) else max(2, n // 8)
    elif max_extrapolation < 0:
        ext = n
    else:
        ext = int(max_extrapolation)
    lo, hi = max(0, labeled[0] - ext), min(n - 1, labeled[-1] + ext)
    lab = set(labeled)
    return [t for t in range(lo, hi + 1) if t not in lab]


def propagate(request: PropagationRequest, progress: Optional[ProgressFn] = None,
              cancel: Optional[CancelFn] = None, engine: Optional[InferenceEngine] = None,
              fusion: Optional[FusionParams] = None) -> PropagationResult:
    """Propagate every requested segment; raises :class:`Cancelled` if ``cancel()`` turns True."""
    t0 = time.perf_counter()
    _check_inputs(request)
    opts = request.options
    desc = "caller-provided engine"
    if engine is None:
        engine, desc = get_engine(opts.weights, opts.device, opts.batch_size)
    fusion = fusion or default_fusion(opts.weights)
    stack = _Stack(request.image, opts.axis)
    frame, n = stack.frame, stack.n

    # plan every segment first so that input errors surface before any compute
    plans = []
    for seg in request.segments:
        mask_stack = frame.to_frame(np.asarray(seg.mask, dtype=bool))
        external = _external_support(request, seg.name)
        if seg.labeled_slices is None and external is not None and not mask_stack.any():
            labeled: List[int] = []
        else:
            labeled = labeled_slices_of(mask_stack, seg.labeled_slices, seg.name)
        plans.append((seg, mask_stack, labeled, external,
                      _targets(n, labeled, opts.max_extrapolation, external)))
    total = sum(len(p[4]) for p in plans) * opts.ensemble or 1
    done = 0

    def report(msg: str) -> None:
        if cancel is not None and cancel():
            raise Cancelled("propagation cancelled")
        if progress is not None:
            progress(min(1.0, done / total), msg)

    report("starting")
    results = []
    for seg, mask_stack, labeled, external, targets in plans:
        prior = DistancePrior(mask_stack, labeled, frame.spacing[1:]) if opts.use_prior else None
        logit_sum: Dict[int, np.ndarray] = {}
        groups: Dict[tuple, List[int]] = {}
        for t in targets:
            internal = select_support(t, labeled, opts.support_size) if labeled else ()
            ext: Tuple[int, ...] = ()
            room = opts.support_size - len(internal)
            if external is not None and room > 0:
                pos = round(t / max(1, n - 1) * 16) / 16  # quantized: keeps batches large
                ext = tuple(sorted(int(i) for i in external.nearest(pos, room)))
            groups.setdefault((internal, ext), []).append(t)
        for (internal, ext), group in groups.items():
            for subset in ensemble_subsets(internal, opts.ensemble, opts.seed) if internal \
                    else [()] * opts.ensemble:
                s_img = [stack.canvas_images(subset)] if subset else []
                s_lab = [stack.canvas_masks(mask_stack, subset)] if subset else []
                if ext:
                    s_img.append(external.images[list(ext)])
                    s_lab.append(external.labels[list(ext)])
                s_img_t, s_lab_t = torch.cat(s_img), torch.cat(s_lab)
                if opts.flips:
                    s_img_t = torch.cat([s_img_t, s_img_t.flip(-1)])
                    s_lab_t = torch.cat([s_lab_t, s_lab_t.flip(-1)])
                for b in range(0, len(group), engine.batch_size):
                    chunk = group[b:b + engine.batch_size]
                    report(f"{seg.name}: slices {chunk[0]}..{chunk[-1]}")
                    logits = engine.logits(stack.canvas_images(chunk), s_img_t, s_lab_t)
                    native = stack.canvas.from_canvas(logits).numpy()
                    for t, lg in zip(chunk, native):
                        logit_sum[t] = logit_sum.get(t, 0.0) + lg
                    done += len(chunk)
        probs = {}
        for t, lg in logit_sum.items():
            d = prior.distance(t) if prior is not None else None
            fused = fusion.fuse(lg / opts.ensemble, d)
            probs[t] = 1.0 / (1.0 + np.exp(-np.clip(fused, -30, 30)))
        report(f"{seg.name}: restacking")
        mask, prob = assemble(frame, seg.mask, labeled, probs)
        results.append(SegmentResult(seg.name, mask, prob.astype(np.float32), list(labeled),
                                     sorted(probs)))
    if progress is not None:
        progress(1.0, "done")
    return PropagationResult(frame.axis, results, engine.device, desc,
                             time.perf_counter() - t0)
