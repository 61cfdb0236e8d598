"""Volume propagation: a few labeled slices in, every other slice predicted.

``propagate(request)`` is the single entry point used by the CLI, the MRML bridge and the
evaluation. For each segment it

1. views image and mask in the canonical slice frame of the chosen axis (:mod:`geometry`),
2. finds the labeled slices (:mod:`support`),
3. picks the targets: the slices between the first and last labeled slice, plus up to
   ``FusionParams.extrapolation_gaps`` typical gaps beyond each end (``max_extrapolation``
   overrides; nothing beyond an end slice that is labeled but empty),
4. runs UniverSeg on the 128x128 canvas (:mod:`slicing`, :mod:`engine`) with bracketing support,
   optionally ensembled over support subsets and with flipped support copies,
5. fuses (:mod:`prior`, unless ``use_prior`` is off): inside the painted range the network's
   logit with the painted-slice shape prior (interpolated signed distance and, where vtkITK is
   importable, Slicer's Fill between slices) by a calibrated logistic rule; beyond it the network
   with a calibrated rule, walking outwards and keeping only regions that overlap the previous
   slice, stopping (and skipping the network) once a slice comes out empty,
6. restacks (:mod:`restack`): labeled slices keep the user's labels bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .canvas import Canvas, intensity_window, scale_intensity
from .engine import Cancelled, InferenceEngine, resolve_device
from .geometry import AxisSpec, GeometryError, SliceFrame, Volume
from .prior import FusionParams, OutsideChain, ShapePrior, fuse_inside, sigmoid
from .restack import assemble
from .support import (
    ExternalSupport,
    SupportError,
    ensemble_subsets,
    labeled_slices_of,
    select_support,
)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


@dataclass
class PropagationOptions:
    """How to propagate (defaults are what the CLI and the Slicer module use)."""

    axis: AxisSpec = "axial"
    #: labeled slices per target, bracketing first (2 = the two around it: as good as 8 on the
    #: validation structures, at a fraction of the cost; see docs/results/evaluation/README.md)
    support_size: int = 2
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
    mask: np.ndarray  # bool KJI: user labels on labeled slices, prediction elsewhere
    probability: np.ndarray  # float32 KJI
    labeled_slices: List[int]
    predicted_slices: List[int]


@dataclass
class PropagationResult:
    axis: int  # array axis that was sliced
    segments: List[SegmentResult]
    device: str
    weights: str
    seconds: float

    def get(self, name: str) -> SegmentResult:
        return next(s for s in self.segments if s.name == name)


def default_fusion(weights_source: str) -> FusionParams:
    """Fusion parameters calibrated for ``weights_source`` (starter: shipped json)."""
    from .weights import resource_file

    path = resource_file("starter_fusion.json") if weights_source == "starter" else None
    if path is not None:
        return FusionParams.load(path)
    return FusionParams()


_ENGINE_CACHE: Dict[Tuple[str, str], Tuple[InferenceEngine, str]] = {}


def get_engine(
    weights: str = "starter", device: str = "auto", batch_size: Optional[int] = None
) -> Tuple[InferenceEngine, str]:
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
            raise GeometryError(
                f"segment {s.name!r}: mask shape {np.shape(s.mask)} does not match "
                f"the image {shape}"
            )
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
        pos.append(st.frame.relative_position(np.array(idx), st.n))
    if not imgs:
        return None
    return ExternalSupport(torch.cat(imgs), torch.cat(labs), np.concatenate(pos))


def _targets(
    n: int,
    labeled: List[int],
    mask_stack: np.ndarray,
    max_extrapolation: Optional[int],
    extrapolation_gaps: float,
    external: Optional[ExternalSupport],
    frame: SliceFrame,
) -> List[int]:
    """Slices to predict: between the labeled slices, plus the extrapolation beyond each end.

    Nothing is predicted beyond an end slice that is labeled but empty (the user confirmed that
    the structure has ended there).
    """
    if not labeled:  # external support only: the relative range the structure covers there
        rel = frame.relative_position(np.arange(n), n)
        lo, hi = external.positions.min() - 0.1, external.positions.max() + 0.1
        return [int(t) for t in np.flatnonzero((rel >= lo) & (rel <= hi))]
    if max_extrapolation is None:
        gaps = np.diff(labeled)
        gap = float(np.mean(gaps)) if len(gaps) else float(max(2, n // 8))
        ext = int(np.ceil(extrapolation_gaps * gap))
    elif max_extrapolation < 0:
        ext = n
    else:
        ext = int(max_extrapolation)
    lo = labeled[0] - (ext if mask_stack[labeled[0]].any() else 0)
    hi = labeled[-1] + (ext if mask_stack[labeled[-1]].any() else 0)
    lab = set(labeled)
    return [t for t in range(max(0, lo), min(n - 1, hi) + 1) if t not in lab]


def _fill_between_stack(
    mask_stack: np.ndarray, labeled: List[int], spacing: Tuple[float, float, float]
) -> Optional[np.ndarray]:
    """Fill between slices on the canonical stack, or None where vtkITK is not importable."""
    from . import fill_between

    if not fill_between.available():
        return None
    return fill_between.fill_between_slices(mask_stack, labeled, 0, spacing)


@dataclass
class _Plan:
    seg: SegmentRequest
    mask_stack: np.ndarray  # canonical (slices, rows, cols) user labels
    labeled: List[int]
    external: Optional[ExternalSupport]
    targets: List[int]


def _plan(
    request: PropagationRequest,
    frame: SliceFrame,
    n: int,
    extrapolation_gaps: float,
    max_extrapolation: Optional[int],
) -> List[_Plan]:
    """Labeled slices and targets of every segment (input errors surface here, before compute)."""
    plans = []
    for seg in request.segments:
        mask_stack = frame.to_frame(np.asarray(seg.mask, dtype=bool))
        external = _external_support(request, seg.name)
        if seg.labeled_slices is None and external is not None and not mask_stack.any():
            labeled: List[int] = []
        else:
            labeled = labeled_slices_of(mask_stack, seg.labeled_slices, seg.name)
        plans.append(
            _Plan(
                seg,
                mask_stack,
                labeled,
                external,
                _targets(
                    n, labeled, mask_stack, max_extrapolation, extrapolation_gaps, external, frame
                ),
            )
        )
    return plans


def _network_logits(
    stack: _Stack,
    plan: _Plan,
    opts: PropagationOptions,
    engine: InferenceEngine,
    targets: Sequence[int],
    tick: Callable[[str, int], None],
) -> Dict[int, np.ndarray]:
    """Mean network logit (canonical native grid) of each target over the ensemble.

    Targets sharing a support set run as one batch; ``tick(message, slices)`` is called before
    each batch (progress and cancel).
    """
    n, labeled, external = stack.n, plan.labeled, plan.external
    logit_sum: Dict[int, np.ndarray] = {}
    runs: Dict[int, int] = {}
    groups: Dict[tuple, List[int]] = {}
    for t in targets:
        internal = select_support(t, labeled, opts.support_size) if labeled else ()
        ext: Tuple[int, ...] = ()
        room = opts.support_size - len(internal)
        if external is not None and room > 0:
            rel = float(stack.frame.relative_position(t, n))
            pos = round(rel * 16) / 16  # quantized: keeps batches large
            ext = tuple(sorted(int(i) for i in external.nearest(pos, room)))
        groups.setdefault((internal, ext), []).append(t)
    for (internal, ext), group in groups.items():
        subsets = (
            ensemble_subsets(internal, opts.ensemble, opts.seed)
            if internal
            else [()] * opts.ensemble
        )
        for subset in subsets:
            s_img = [stack.canvas_images(subset)] if subset else []
            s_lab = [stack.canvas_masks(plan.mask_stack, subset)] if subset else []
            if ext:
                s_img.append(external.images[list(ext)])
                s_lab.append(external.labels[list(ext)])
            s_img_t, s_lab_t = torch.cat(s_img), torch.cat(s_lab)
            if opts.flips:
                s_img_t = torch.cat([s_img_t, s_img_t.flip(-1)])
                s_lab_t = torch.cat([s_lab_t, s_lab_t.flip(-1)])
            for b in range(0, len(group), engine.batch_size):
                chunk = group[b : b + engine.batch_size]
                tick(f"{plan.seg.name}: slices {chunk[0]}..{chunk[-1]}", 0)
                logits = engine.logits(stack.canvas_images(chunk), s_img_t, s_lab_t)
                native = stack.canvas.from_canvas(logits).numpy()
                for t, lg in zip(chunk, native):
                    logit_sum[t] = logit_sum.get(t, 0.0) + lg
                    runs[t] = runs.get(t, 0) + 1
                tick("", len(chunk))
    return {t: lg / runs[t] for t, lg in logit_sum.items()}


def fused_probabilities(
    prior: ShapePrior,
    fusion: FusionParams,
    targets: Sequence[int],
    network: Callable[[Sequence[int]], Dict[int, np.ndarray]],
    batch: int = 8,
    skip: Optional[Callable[[int], None]] = None,
) -> Dict[int, np.ndarray]:
    """Fused probability of every target: the prior-and-network rule inside the painted range,
    the outside rule with its extent rule beyond each end (computed outwards in batches of
    ``batch``; once a side stops, its remaining targets are not computed: ``skip(count)``)."""
    probs: Dict[int, np.ndarray] = {}
    inside = [t for t in targets if prior.inside_range(t)]
    if inside:
        logits = network(inside)
        for t, lg in logits.items():
            probs[t] = fuse_inside(prior, fusion, t, lg, logits)
    lab = prior.labeled
    for end, side in (
        (lab[0], sorted((t for t in targets if t < lab[0]), reverse=True)),
        (lab[-1], sorted(t for t in targets if t > lab[-1])),
    ):
        chain = OutsideChain(prior, fusion, end)
        for b in range(0, len(side), batch):
            if chain.stopped:  # the structure has ended: the rest stays empty
                if skip is not None:
                    skip(len(side) - b)
                break
            chunk = side[b : b + batch]
            lgs = network(chunk)
            for t in chunk:
                probs[t] = chain.push(t, lgs[t], lgs)
    return probs


def propagate(
    request: PropagationRequest,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    engine: Optional[InferenceEngine] = None,
    fusion: Optional[FusionParams] = None,
) -> PropagationResult:
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
    plans = _plan(request, frame, n, fusion.extrapolation_gaps, opts.max_extrapolation)
    total = sum(len(p.targets) for p in plans) * opts.ensemble or 1
    done = 0

    def tick(msg: str, slices: int) -> None:
        nonlocal done
        done += slices
        if cancel is not None and cancel():
            raise Cancelled("propagation cancelled")
        if progress is not None and msg:
            progress(min(1.0, done / total), msg)

    tick("starting", 0)
    results = []
    for plan in plans:

        def network(targets: Sequence[int], plan=plan) -> Dict[int, np.ndarray]:
            return _network_logits(stack, plan, opts, engine, targets, tick)

        if opts.use_prior and plan.labeled:
            fbs = None
            if fusion.uses_fbs():
                tick(f"{plan.seg.name}: fill between slices", 0)
                fbs = _fill_between_stack(plan.mask_stack, plan.labeled, frame.spacing)
            prior = ShapePrior(plan.mask_stack, plan.labeled, frame.spacing, fbs)
            probs = fused_probabilities(
                prior,
                fusion,
                plan.targets,
                network,
                engine.batch_size,
                lambda k: tick("", k * opts.ensemble),
            )
        else:
            probs = {t: sigmoid(lg) for t, lg in network(plan.targets).items()}
        tick(f"{plan.seg.name}: restacking", 0)
        mask, prob = assemble(frame, plan.seg.mask, plan.labeled, probs)
        results.append(
            SegmentResult(
                plan.seg.name, mask, prob.astype(np.float32), list(plan.labeled), sorted(probs)
            )
        )
    if progress is not None:
        progress(1.0, "done")
    return PropagationResult(frame.axis, results, engine.device, desc, time.perf_counter() - t0)


@dataclass
class SegmentLogits:
    """Raw network output of one segment, for calibrating the fusion (:mod:`calibrate`)."""

    frame: SliceFrame
    mask_stack: np.ndarray
    labeled: List[int]
    logits: Dict[int, np.ndarray]


def segment_logits(
    request: PropagationRequest, engine: InferenceEngine, extrapolation: int
) -> List[SegmentLogits]:
    """Network logits of every target of every segment, ``extrapolation`` slices beyond each end
    and no extent rule: the raw material :func:`fused_probabilities` works on."""
    _check_inputs(request)
    opts = request.options
    stack = _Stack(request.image, opts.axis)
    out = []
    for plan in _plan(request, stack.frame, stack.n, 1.0, extrapolation):
        lg = _network_logits(stack, plan, opts, engine, plan.targets, lambda m, k: None)
        out.append(SegmentLogits(stack.frame, plan.mask_stack, plan.labeled, lg))
    return out
