"""The propagation session: a few labeled slices in, every other slice predicted.

:class:`Propagator` is the one entry point of the CLI, the MRML bridge, the evaluation, the
browser app and cohort labeling, in the spirit of segment-anything's ``SamPredictor``: it is built
once per (volume, axis, options) -- the volume is viewed in the canonical slice frame and its
slices are normalized and put onto the network's canvas once, as they are needed (no normalized
copy of the volume is made) -- and :meth:`Propagator.propagate` is called as often as the user
paints. For each segment it

1. views the mask in the canonical slice frame of the axis (:mod:`geometry`),
2. finds the labeled slices (:mod:`support`); a segment without any is skipped with a note,
3. picks the targets: the slices between the first and last labeled slice, plus up to
   ``FusionParams.extrapolation_gaps`` typical gaps beyond each end (``max_extrapolation``
   overrides; nothing beyond an end slice that is labeled but empty, and nothing at all for a
   run of adjacent labeled slices without a gap: such a segment is left as it is),
4. runs UniverSeg on the 128x128 canvas (:mod:`canvas`, :mod:`engine`) with bracketing support,
   optionally ensembled over support subsets and with flipped support copies; on slices thinner
   than a canvas pixel only on every few slices, interpolating its logits in between
   (:func:`slices.network_slices`, ``network_step``),
5. fuses (:mod:`prior`, unless ``use_prior`` is off): inside the painted range the network's
   logit with the painted-slice shape prior (interpolated signed distance and, where vtkITK is
   importable, Slicer's Fill between slices of each gap's two slices) by a calibrated logistic
   rule; beyond it the network with a calibrated rule, walking outwards and keeping only regions
   that overlap the previous slice, stopping (and skipping the network) once a slice comes out
   empty. Each gap and each end is fused in a region of the slice around what is painted there
   (:mod:`region`), checked to be exact for every slice -- a bound on the fused logit outside it
   inside the painted range, foreground on its border beyond it -- and fused whole where not,
6. restacks (:mod:`restack`): labeled slices keep the user's labels bit for bit, and a voxel
   that several segments predict goes to the most probable one (painted voxels stay),
7. scores how unsure each slice is (:mod:`suggest`, from the fused probabilities and the shape
   prior, never a ground truth): ``SegmentResult.slice_uncertainty`` and
   ``SegmentResult.suggested_slices(n)`` / :meth:`Propagator.suggest_slices`, the slices to paint
   next.

What a session remembers between calls is keyed by *content*, so a result never depends on what
was cached: the network logit of each (target slice, support set) on the canvas -- a support set
named by the slice indices and a fingerprint of their labels --, Fill between slices of each gap
and the signed distance maps (both by the labels of the slices they come from), and the fused
probabilities of each gap between two labeled slices (keyed by both end slices and the logits
used). A second call after the user corrected or added one slice therefore runs the network and
Fill between slices only for the gaps next to the changed slice. The engine is batch-invariant
on the CPU, so the masks are identical to those of a fresh session.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import Cancelled, SupportError, UsageError
from .geometry import AxisSpec, GeometryError, SliceFrame, Volume, axis_name, resolve_axis
from .prior import (
    EMPTY_DISTANCE_MM,
    MODEL_CLIP,
    FusionParams,
    ShapePrior,
    fuse_gap,
    fuse_side,
    gaps_of,
    inside_upper_bound,
    outside_sides,
    sigmoid,
)
from .region import Region, bounding_box, box_distance_mm, canvas_footprints, max_filter3
from .restack import (
    RegionProbabilities,
    assemble_mask,
    assemble_probability,
    probability_at,
    resolve_overlaps,
)
from .slices import (
    extrapolation_slices,
    labeled_run,
    network_slices,
    network_step,
    nonempty_slices,
    prediction_targets,
    typical_gap,
)
from .suggest import SliceUncertainty, slice_uncertainty, suggest_slices
from .support import ExternalSupport, ensemble_subsets, labeled_slices_of, select_support

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

#: What ``PropagationOptions.precision`` accepts (the engine's ``CPU_PRECISIONS``; kept here so
#: that validating options imports no torch).
PRECISION_CHOICES = ("auto", "fp32", "bf16")
#: Segment tags that say how a result was computed (``.seg.nrrd`` files, MRML segments).
TAG_DEVICE = "UniverSeg.Device"
TAG_PRECISION = "UniverSeg.Precision"

#: The margin of the region a gap or an end is fused in, around what is painted and what Fill
#: between slices filled, in pixels of the network's canvas (the network cannot place an edge
#: more finely); whether the region is exact is checked for every slice (``_inside_exact``).
REGION_MARGIN_CANVAS_PIXELS = 4

#: A region is taken as exact only when the fused logit outside it is bounded below ``-slack``:
#: the signed distances inside a region are those of the whole slice to float rounding
#: (SimpleITK's Maurer map of a crop adds in another order: ~1e-6 mm).
BOUND_SLACK = 1e-3

#: Logits and fused gaps kept between calls: at least this many bytes (and twice the last call's).
MIN_CACHE_BYTES = 256 * 1024 * 1024


# ------------------------------------------------------------------------------------ options


@dataclass
class PropagationOptions:
    """How to propagate (defaults are what the CLI and the Slicer module use, except ``axis``:
    the surfaces default to ``auto``, which they resolve to an array axis before a Propagator is
    built -- :func:`~UniverSegLogic.core.slices.auto_axis`).

    Validated when created: a wrong type or value raises :class:`UsageError` here, not deep
    inside a run.
    """

    axis: AxisSpec = "axial"
    #: labeled slices per target, bracketing first (2 = the two around it: as good as 8 on the
    #: validation structures, at a fraction of the cost; see docs/results/evaluation/README.md)
    support_size: int = 2
    ensemble: int = 1
    flips: bool = False
    device: str = "auto"
    weights: str = "starter"
    #: targets per engine call (progress and cancel granularity); None = the engine's default
    batch_size: Optional[int] = None
    #: slices predicted beyond the first/last labeled slice: None = the calibrated typical-gap
    #: rule, -1 = to the end of the volume, N = at most N slices
    max_extrapolation: Optional[int] = None
    #: fuse the network with the painted-slice shape prior between labeled slices
    use_prior: bool = True
    seed: int = 0
    #: run the network on every N-th slice and interpolate its logits in between: None = the
    #: slices that fit in 1.2 pixels of its canvas (:func:`~UniverSegLogic.core.slices
    #: .network_step`; 1 on slices about as thick as a canvas pixel or thicker), 1 = every slice
    network_step: Optional[int] = None
    #: the engine's numeric precision on the CPU: ``auto`` (the machine's rule, never a timing:
    #: :func:`~UniverSegLogic.core.engine.resolve_precision`; ``UNIVERSEG_CPU_BF16=0/1`` sets
    #: it), ``fp32`` or ``bf16``
    precision: str = "auto"
    #: the fusion: ``logistic`` (the calibrated per-pixel rule; the default: the learned fusion
    #: costs 1.47x its propagation time on the clinical benchmark's CT, README "Quality"),
    #: ``learned`` / ``auto`` (the learned fusion where the weights have one, else the logistic
    #: rule), or a learned-fusion file (.pt) (:mod:`fusion_net`)
    fusion_model: str = "logistic"

    def __post_init__(self) -> None:
        def integer(name: str, low: Optional[int], allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise UsageError(f"{name} must be an integer, got {value!r}")
            if low is not None and value < low:
                raise UsageError(f"{name} must be at least {low}, got {value}")
            setattr(self, name, int(value))

        integer("support_size", 1)
        integer("ensemble", 1)
        integer("batch_size", 1, allow_none=True)
        integer("max_extrapolation", -1, allow_none=True)
        integer("seed", None)
        integer("network_step", 1, allow_none=True)
        for name in ("flips", "use_prior"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise UsageError(f"{name} must be True or False, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        for name in ("device", "weights"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UsageError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        fm = self.fusion_model
        if not isinstance(fm, str) or not (
            fm in ("auto", "learned", "logistic") or fm.endswith(".pt")
        ):
            raise UsageError(
                f"fusion_model must be auto, learned, logistic or a .pt file, got {fm!r}"
            )
        if self.precision not in PRECISION_CHOICES:
            raise UsageError(
                f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}"
            )
        if isinstance(self.axis, bool) or not isinstance(self.axis, (str, int, np.integer)):
            raise UsageError(f"axis must be a name or an array axis 0/1/2, got {self.axis!r}")

    @classmethod
    def from_mapping(cls, values: Dict[str, object]) -> PropagationOptions:
        """Options from a dict (e.g. keyword arguments); unknown names raise UsageError."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r} (valid: {', '.join(sorted(valid))})")
        return cls(**values)


# ------------------------------------------------------------------------------------ inputs


@dataclass
class SegmentInput:
    """One segment to propagate.

    ``key`` identifies the segment for the caller (a segment ID): results are matched back by it,
    never by name. ``name`` matches the segment in support volumes. ``mask`` is its boolean KJI
    mask on the image grid; ``labeled_slices`` optionally lists slices that count as labeled in
    addition to the painted ones (an empty listed slice is labeled background).
    """

    key: str
    name: str
    mask: np.ndarray
    labeled_slices: Optional[Sequence[int]] = None


@dataclass
class SupportVolume:
    """Another labeled volume whose slices can serve as support (masks matched by name)."""

    image: Volume
    masks: Dict[str, np.ndarray]


@dataclass
class SegmentResult:
    """The propagation of one segment (KJI arrays on the image grid)."""

    key: str
    name: str
    mask: np.ndarray  # bool: the user's labels on labeled slices, the prediction elsewhere
    labeled_slices: List[int]
    predicted_slices: List[int]
    #: how unsure the propagation is on each slice (:mod:`suggest`; never sees a ground truth)
    uncertainty: Optional[SliceUncertainty] = None
    #: fused probability of each predicted slice over its region (canonical frame)
    probabilities: RegionProbabilities = field(default_factory=dict, repr=False)
    _frame: Optional[SliceFrame] = field(default=None, repr=False)
    _user: Optional[np.ndarray] = field(default=None, repr=False)
    #: bool KJI: where the result may be foreground at all (None: everywhere; :meth:`keep_within`)
    _within: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def probability(self) -> np.ndarray:
        """float32 KJI probability (0/1 on labeled slices; 0 outside the region each predicted
        slice was fused in, where nothing can be foreground). Built when asked for: a
        clinical-size volume's would take four times the mask's memory."""
        if self._frame is None:
            return self.mask.astype(np.float32)
        out = assemble_probability(self._frame, self._user, self.labeled_slices, self.probabilities)
        if self._within is not None:
            out[~self._within] = 0.0
        return out

    def keep_within(self, allowed: np.ndarray, painted: np.ndarray) -> None:
        """Limit the result to the bool KJI voxels ``allowed`` (e.g. a scan's field of view),
        keeping the ``painted`` voxels: the mask and, from then on, the probability are 0
        elsewhere."""
        allowed = np.asarray(allowed, dtype=bool)
        painted = np.asarray(painted, dtype=bool)
        self.mask = (np.asarray(self.mask, dtype=bool) & allowed) | painted
        keep = allowed | painted
        self._within = keep if self._within is None else (self._within & keep)

    def probability_at(self, where: Tuple[np.ndarray, ...]) -> np.ndarray:
        """:attr:`probability` at the KJI voxels ``where`` (one float32 per voxel), without
        building the volume's probability."""
        if self._frame is None:
            return np.asarray(self.mask[tuple(where)], dtype=np.float32)
        out = probability_at(
            self._frame, self._user, self.labeled_slices, self.probabilities, where
        )
        if self._within is not None:
            out[~self._within[tuple(where)]] = 0.0
        return out

    @property
    def slice_uncertainty(self) -> Dict[int, float]:
        """{slice: expected wrong voxels} for every slice along the axis (labeled slices 0)."""
        return self.uncertainty.as_dict() if self.uncertainty is not None else {}

    def suggested_slices(self, n: int = 1) -> List[int]:
        """Up to ``n`` slices to paint next, best first (:func:`suggest.suggest_slices`)."""
        return suggest_slices(self.uncertainty, n) if self.uncertainty is not None else []


@dataclass
class PropagationResult:
    """What one :meth:`Propagator.propagate` call returned."""

    axis: int  # array axis that was sliced
    segments: List[SegmentResult]
    device: str
    weights: str
    seconds: float
    #: one-time messages for the user (e.g. hand-set fusion defaults for these weights)
    notes: List[str] = field(default_factory=list)
    #: (target, support) network evaluations run in this call / taken from the session's cache
    network_runs: int = 0
    network_reused: int = 0
    #: keys of the segments left out because they have no labeled slice (a note says so)
    skipped: List[str] = field(default_factory=list)
    #: the engine's numeric precision (fp32, bf16, fp16) and why it was chosen
    precision: str = ""
    precision_reason: str = ""

    def tags(self) -> Dict[str, str]:
        """Segment tags recording how this result was computed (device, precision): written
        into every predicted segment (``.seg.nrrd`` and MRML). Values avoid ``|`` and ``:``,
        which Slicer's tag format reserves."""
        return {TAG_DEVICE: _tag_value(self.device), TAG_PRECISION: _tag_value(self.precision)}

    def get(self, key: str) -> SegmentResult:
        """The result of the segment with this key (or, failing that, this name)."""
        for s in self.segments:
            if s.key == key:
                return s
        for s in self.segments:
            if s.name == key:
                return s
        raise KeyError(key)


# ------------------------------------------------------------------------------------ helpers


def _tag_value(text: str) -> str:
    return str(text).replace("|", "/").replace(":", "-")


def _same_device(requested: str, actual: str) -> bool:
    """True when an engine on ``actual`` is what ``requested`` (an options.device) asks for."""
    want = (requested or "auto").strip().lower()
    return want == "auto" or want == actual or (want == "cuda" and actual.startswith("cuda"))


def slice_fingerprint(plane: np.ndarray) -> str:
    """Content fingerprint of one boolean slice (its shape and voxels)."""
    plane = np.ascontiguousarray(plane, dtype=bool)
    h = hashlib.blake2b(digest_size=12)
    h.update(str(plane.shape).encode())
    h.update(np.packbits(plane).tobytes())
    return h.hexdigest()


class _ImageStack:
    """A volume viewed in the canonical frame, normalized slice by slice as the canvas needs
    it (its canvas slices are cached; no normalized copy of the volume is made)."""

    #: slices normalized and put on the canvas at once (bounds the float32 working copy)
    CHUNK = 32

    def __init__(self, volume: Volume, axis: AxisSpec):
        import torch

        from .canvas import Canvas, intensity_window

        self._torch = torch
        self.frame = SliceFrame.of(volume, axis)
        self.window = intensity_window(volume.array)
        self.raw = self.frame.to_frame(volume.array)  # a view
        n, r, c = self.raw.shape
        self.n = n
        self.canvas = Canvas.for_slices(r, c, self.frame.spacing[1], self.frame.spacing[2])
        #: size of one canvas pixel (mm)
        self.canvas_pixel_mm = max(r * self.frame.spacing[1], c * self.frame.spacing[2]) / float(
            self.canvas.size
        )
        self._cache: Dict[int, object] = {}

    def canvas_images(self, idx: Sequence[int]):
        """(N, 1, size, size) canvas images of slices ``idx`` (cached)."""
        from .canvas import scale_intensity

        torch = self._torch
        missing = sorted({int(i) for i in idx if i not in self._cache})
        for b in range(0, len(missing), self.CHUNK):
            chunk = missing[b : b + self.CHUNK]
            images = scale_intensity(self.raw[chunk], self.window)
            t = self.canvas.to_canvas(torch.from_numpy(images))
            for i, x in zip(chunk, t):
                self._cache[i] = x.clone()
        return torch.stack([self._cache[i] for i in idx])

    def canvas_masks(self, mask_stack: np.ndarray, idx: Sequence[int]):
        """(N, 1, size, size) canvas labels of slices ``idx`` of a canonical mask stack."""
        return self.canvas.mask_to_canvas(
            self._torch.from_numpy(np.ascontiguousarray(mask_stack[list(idx)], dtype=np.float32))
        )

    def native(self, inner: Sequence[np.ndarray], region: Region) -> List[np.ndarray]:
        """Logits on the canvas' inner part -> float32 planes over ``region`` of the slice grid
        (resized back whole, then cropped: the values are those of the whole slice)."""
        torch = self._torch
        out: List[np.ndarray] = []
        for b in range(0, len(inner), 16):
            x = torch.from_numpy(np.stack(inner[b : b + 16])[:, None])
            full = self.canvas.from_inner(x).numpy()
            out.extend(np.ascontiguousarray(region.crop(f)) for f in full)
        return out


@dataclass
class _Plan:
    seg: SegmentInput
    mask_stack: np.ndarray  # canonical (slices, rows, cols) user labels
    labeled: List[int]
    fingerprints: Dict[int, str]  # labeled slice -> fingerprint of its label
    external: Optional[ExternalSupport]
    targets: List[int]
    #: targets the network runs on; the others' logits are interpolated between ``between[t]``
    computed: List[int] = field(default_factory=list)
    between: Dict[int, Tuple[int, int]] = field(default_factory=dict)


class _LRU:
    """Values by key, least recently used dropped beyond a byte budget."""

    def __init__(self) -> None:
        self._data: OrderedDict = OrderedDict()
        self.bytes = 0
        self.used_this_call = 0

    def get(self, key):
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
            self.used_this_call += _nbytes(value)
        return value

    def put(self, key, value) -> None:
        if key in self._data:
            self.bytes -= _nbytes(self._data.pop(key))
        self._data[key] = value
        size = _nbytes(value)
        self.bytes += size
        self.used_this_call += size

    def trim(self, budget: int) -> None:
        while self.bytes > budget and self._data:
            _, value = self._data.popitem(last=False)
            self.bytes -= _nbytes(value)

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)


def _nbytes(value) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, _Fused):
        return _nbytes(value.probs) + _nbytes(value.prior.planes())
    return 64


@dataclass
class _Fused:
    """A fused gap: its region, the probability of each of its targets there, the prior."""

    region: Region
    probs: Dict[int, np.ndarray]
    prior: ShapePrior


class _SlicePriors:
    """The shape prior each predicted slice was fused with (for :mod:`suggest`)."""

    def __init__(self) -> None:
        self.by_slice: Dict[int, ShapePrior] = {}

    def for_slice(self, t: int) -> ShapePrior:
        return self.by_slice[t]


def _gap_planes(region: Region, lo: int, hi: int, block) -> Dict[int, np.ndarray]:
    """Fill between slices' result on each slice strictly between ``lo`` and ``hi``, over
    ``region`` (``block``: (row, col, (hi - lo - 1, h, w) array) or None: empty)."""
    planes = {t: np.zeros(region.shape, dtype=bool) for t in range(lo + 1, hi)}
    if block is None:
        return planes
    r0, c0, arr = block
    rs = slice(max(r0, region.r0), min(r0 + arr.shape[1], region.r1))
    cs = slice(max(c0, region.c0), min(c0 + arr.shape[2], region.c1))
    if rs.stop <= rs.start or cs.stop <= cs.start:
        return planes
    for t, plane in planes.items():
        plane[
            rs.start - region.r0 : rs.stop - region.r0, cs.start - region.c0 : cs.stop - region.c0
        ] = arr[t - lo - 1, rs.start - r0 : rs.stop - r0, cs.start - c0 : cs.stop - c0]
    return planes


# ------------------------------------------------------------------------------------ session


class Propagator:
    """A propagation session for one volume along one axis: set the image once, propagate many.

    ``engine``: an :class:`~UniverSegLogic.core.engine.InferenceEngine` to use; else one is taken
    from ``engines`` (an :class:`~UniverSegLogic.core.engines.EngineStore`, shared by the
    caller's sessions) or loaded for ``options.weights`` / ``options.device``. ``fusion``: the
    fusion parameters (default: those calibrated for the weights). ``support_volumes``: other
    labeled volumes whose segments of the same name add support slices. ``regions=False``
    fuses every slice whole instead of in a region around the painting (the same masks, slower:
    for checks).
    """

    def __init__(
        self,
        image: Volume,
        options: Optional[PropagationOptions] = None,
        *,
        engine=None,
        engines=None,
        fusion: Optional[FusionParams] = None,
        support_volumes: Sequence[SupportVolume] = (),
        regions: bool = True,
    ):
        if not isinstance(image, Volume):
            raise UsageError("image must be a geometry.Volume")
        self.options = options if options is not None else PropagationOptions()
        if not isinstance(self.options, PropagationOptions):
            raise UsageError("options must be PropagationOptions")
        self.image = image
        self.axis = resolve_axis(image, self.options.axis)
        self.notes: List[str] = []
        self._notes_given = False
        if engine is None:
            from .engines import EngineStore

            store = engines if engines is not None else EngineStore()  # an empty store is falsy
            loaded = store.get(
                self.options.weights, self.options.device, precision=self.options.precision
            )
            engine, self.weights_description = loaded.engine, loaded.description
        else:
            if engines is not None:
                raise UsageError("give an engine or an engine store, not both")
            if not _same_device(self.options.device, str(getattr(engine, "device", "cpu"))):
                raise UsageError(
                    f"options.device is {self.options.device!r} but the engine given runs on "
                    f"{getattr(engine, 'device', 'cpu')!r}: ask for one device only"
                )
            self.weights_description = "caller-provided engine"
            given = getattr(engine, "precision", "fp32")  # a test double computes in fp32
            if self.options.precision not in ("auto", given):
                raise UsageError(
                    f"the engine given computes in {given}, the options ask for "
                    f"{self.options.precision}"
                )
        self.engine = engine
        self.batch_size = int(self.options.batch_size or engine.batch_size)
        custom_fusion = fusion is not None
        if fusion is None:
            from .prior import fusion_for

            fusion, note = fusion_for(self.options.weights)
            if note:
                self.notes.append(note)
        self.fusion = fusion
        self.stack = _ImageStack(image, self.axis)
        #: the learned fusion's refine step (None: the logistic rule alone)
        self.refine = self._learned_fusion(custom_fusion)
        self.frame = self.stack.frame
        self.n_slices = self.stack.n
        #: the network runs on every ``step``-th slice (:attr:`PropagationOptions.network_step`)
        self.step = int(
            self.options.network_step
            or network_step(self.frame.spacing[0], self.stack.canvas_pixel_mm)
        )
        rows, cols = self.stack.raw.shape[1:]
        self._full = Region.full(rows, cols)
        canvas = self.stack.canvas
        #: regions smaller than the slice where each native pixel is a bilinear mix of canvas
        #: pixels (so bounds on the canvas bound the slice)
        self._regions = bool(regions) and canvas.upsamples
        #: the learned fusion works in the same rectangles, regions or not (:meth:`_refine_in`)
        self._windows = self.refine is not None and canvas.upsamples
        self._footprints = (
            canvas_footprints(rows, canvas.inner[0]),
            canvas_footprints(cols, canvas.inner[1]),
        )
        self._fbs_gaps = _LRU()
        self._pending: Dict[tuple, object] = {}  # Fill between slices computing in the worker
        self._executor = None
        self._support_volumes = list(support_volumes)
        self._support_stacks: Dict[int, _ImageStack] = {}
        self._external: Dict[str, Optional[ExternalSupport]] = {}
        self._logits = _LRU()
        self._gaps = _LRU()
        self._sdf: Dict[Tuple[str, Region], np.ndarray] = {}
        self._fbs_missing_note = False

    # -------------------------------------------------------------------------- public
    def propagate(
        self,
        segments: Sequence[SegmentInput],
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
    ) -> PropagationResult:
        """Propagate every segment; raises :class:`Cancelled` when ``cancel()`` turns True
        (nothing else changes), :class:`SupportError` / :class:`GeometryError` on bad input."""
        t0 = time.perf_counter()
        skipped: List[SegmentInput] = []
        plans = self._plans(segments, skipped=skipped)
        opts = self.options
        total = sum(len(p.targets) for p in plans) * opts.ensemble or 1
        state = {"done": 0, "runs": 0, "reused": 0}
        for cache in (self._logits, self._gaps, self._fbs_gaps):
            cache.used_this_call = 0

        def tick(msg: str, slices: int) -> None:
            state["done"] += slices
            if cancel is not None and cancel():
                raise Cancelled("propagation cancelled")
            if progress is not None and msg:
                progress(min(1.0, state["done"] / total), msg)

        tick("starting", 0)
        results = []
        try:
            self._prefetch_fill_between(plans)
            results = self._results(plans, tick, state)
        finally:
            self._stop_prefetch()
        resolve_overlaps(
            [r.mask for r in results],
            [r.probability_at for r in results],
            [r.labeled_slices for r in results],
            self.axis,
        )
        for cache in (self._logits, self._gaps, self._fbs_gaps):
            cache.trim(max(MIN_CACHE_BYTES, 2 * cache.used_this_call))
        live = {fp for plan in plans for fp in plan.fingerprints.values()}
        self._sdf = {k: v for k, v in self._sdf.items() if k[0] in live}
        if progress is not None:
            progress(1.0, "done")
        notes = [] if self._notes_given else list(self.notes)
        self._notes_given = True
        notes += [self._skip_note(seg) for seg in skipped]
        return PropagationResult(
            self.axis,
            results,
            self.engine.device,
            self.weights_description,
            time.perf_counter() - t0,
            notes,
            state["runs"],
            state["reused"],
            skipped=[seg.key for seg in skipped],
            precision=getattr(self.engine, "precision", "fp32"),
            precision_reason=getattr(self.engine, "precision_reason", "test double"),
        )

    def _results(self, plans: List[_Plan], tick, state: Dict) -> List[SegmentResult]:
        """Propagate, restack and score every segment."""
        results = []
        for plan in plans:
            probs, priors = self._segment_probabilities(plan, tick, state)
            tick(f"{plan.seg.name}: restacking", 0)
            mask = assemble_mask(self.frame, plan.seg.mask, plan.labeled, probs)
            planes = {t: p for t, (_, p) in probs.items()}
            results.append(
                SegmentResult(
                    plan.seg.key,
                    plan.seg.name,
                    mask,
                    list(plan.labeled),
                    sorted(probs),
                    slice_uncertainty(planes, plan.mask_stack, plan.labeled, priors),
                    probs,
                    self.frame,
                    plan.seg.mask,
                )
            )
        return results

    def _fbs_key(self, plan: _Plan, lo: int, hi: int) -> tuple:
        return (plan.fingerprints[lo], plan.fingerprints[hi], hi - lo, self.frame.spacing)

    def _prefetch_fill_between(self, plans: List[_Plan]) -> None:
        """Start Fill between slices of every gap not cached yet in a worker thread: it runs
        while the network runs (the filter is mostly one thread and releases the GIL; on 2 cores
        that hid about half of its time)."""
        from . import fill_between

        if not (self.options.use_prior and self.fusion.uses_fbs()):
            return
        if not fill_between.available():
            return
        jobs = []
        for plan in plans:
            if not plan.labeled:
                continue
            for lo, hi, _ in gaps_of(plan.labeled, plan.targets):
                key = self._fbs_key(plan, lo, hi)
                if key not in self._pending and self._fbs_gaps.get(key) is None:
                    self._pending[key] = None
                    jobs.append((key, plan.mask_stack, lo, hi))
        if not jobs:
            return
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(1, thread_name_prefix="universeg-fbs")
        for key, stack, lo, hi in jobs:
            self._pending[key] = self._executor.submit(
                fill_between.fill_between_gap, stack, lo, hi, self.frame.spacing
            )

    def _stop_prefetch(self) -> None:
        """Wait for the worker (a filter run cannot be interrupted) and drop what is left."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._pending.clear()

    def suggest_slices(self, result, n: int = 1):
        """Slices to paint next: for a :class:`SegmentResult`, up to ``n`` slice numbers (best
        first); for a :class:`PropagationResult`, ``{segment key: [slices]}``. Computed from what
        the propagation returned (its per-slice uncertainty), never from a ground truth."""
        if isinstance(result, PropagationResult):
            return {s.key: s.suggested_slices(n) for s in result.segments}
        if isinstance(result, SegmentResult):
            return result.suggested_slices(n)
        raise UsageError("suggest_slices takes a PropagationResult or a SegmentResult")

    def network_logits(self, segment: SegmentInput, extrapolation: int) -> Tuple[_Plan, Dict]:
        """(plan, network logit of every target on the whole slice) for one segment,
        ``extrapolation`` slices beyond each end and no extent rule: the raw material of the
        fusion's calibration."""
        plan = self._plans([segment], extrapolation=extrapolation)[0]
        state = {"done": 0, "runs": 0, "reused": 0}
        inner = self._network(plan, plan.targets, lambda m, k: None, state)
        ts = sorted(inner)
        return plan, dict(zip(ts, self.stack.native([inner[t] for t in ts], self._full)))

    def _learned_fusion(self, custom_fusion: bool):
        """The learned fusion's ``refine`` step (:mod:`fusion_net`), or None for the logistic
        rule alone: asked for, no prior, no learned fusion for these weights (a note), or
        ``auto`` with caller-given fusion parameters (the net corrects the shipped rule only)."""
        mode = self.options.fusion_model
        if not self.options.use_prior or (mode == "auto" and custom_fusion):
            return None
        from dataclasses import replace

        from .fusion_net import LearnedFusion, fusion_net_for

        net, note = fusion_net_for(self.options.weights, mode)
        if note:
            self.notes.append(note)
        if net is None:
            return None
        if net.extrapolation_gaps is not None:
            self.fusion = replace(self.fusion, extrapolation_gaps=net.extrapolation_gaps)
        return LearnedFusion(net, self.stack.canvas, self.stack.canvas_images)

    def clear_cache(self) -> None:
        """Forget every cached logit, fused gap and Fill-between-slices result (the next call
        recomputes everything)."""
        self._logits.clear()
        self._gaps.clear()
        self._fbs_gaps.clear()
        self._sdf.clear()

    # -------------------------------------------------------------------------- planning
    def _skip_note(self, seg: SegmentInput) -> str:
        return (
            f"{seg.name}: no labeled slice along the {axis_name(self.image, self.axis)} axis: "
            "skipped (left as it is)"
        )

    def _plans(
        self,
        segments: Sequence[SegmentInput],
        extrapolation: Optional[int] = None,
        skipped: Optional[List[SegmentInput]] = None,
    ) -> List[_Plan]:
        """Labeled slices and targets of every segment (input errors surface here). With a
        ``skipped`` list, segments without a labeled slice go there instead (an error only when
        no segment has one)."""
        if not segments:
            raise SupportError("no segment to propagate")
        shape = self.image.array.shape
        plans = []
        keys = set()
        for seg in segments:
            if not isinstance(seg, SegmentInput):
                raise UsageError("segments must be SegmentInput items")
            if seg.key in keys:
                raise UsageError(f"two segments share the key {seg.key!r}")
            keys.add(seg.key)
            if np.shape(seg.mask) != shape:
                raise GeometryError(
                    f"segment {seg.name!r}: mask shape {np.shape(seg.mask)} does "
                    f"not match the image {shape}"
                )
            mask_stack = self.frame.to_frame(np.asarray(seg.mask, dtype=bool))
            external = self._external_support(seg.name)
            if seg.labeled_slices is None and external is not None and not mask_stack.any():
                labeled: List[int] = []
            elif skipped is not None and not seg.labeled_slices and not mask_stack.any():
                skipped.append(seg)
                continue
            else:
                labeled = labeled_slices_of(mask_stack, seg.labeled_slices, seg.name)
            prints = {i: slice_fingerprint(mask_stack[i]) for i in labeled}
            targets = self._targets(labeled, mask_stack, external, extrapolation)
            computed, between = network_slices(labeled, targets, self.step)
            plans.append(
                _Plan(seg, mask_stack, labeled, prints, external, targets, computed, between)
            )
        if not plans:
            names = ", ".join(repr(seg.name) for seg in skipped or ())
            raise SupportError(
                f"no labeled slice in any segment ({names}) along the "
                f"{axis_name(self.image, self.axis)} axis: paint at least one slice"
            )
        return plans

    def _targets(
        self,
        labeled: List[int],
        mask_stack: np.ndarray,
        external: Optional[ExternalSupport],
        extrapolation: Optional[int],
    ) -> List[int]:
        """Slices to predict: between the labeled slices, plus the extrapolation beyond each end.

        Nothing is predicted beyond an end slice that is labeled but empty (the user confirmed
        that the structure has ended there)."""
        n = self.n_slices
        if not labeled:  # external support only: the relative range the structure covers there
            rel = self.frame.relative_position(np.arange(n), n)
            lo, hi = external.positions.min() - 0.1, external.positions.max() + 0.1
            return [int(t) for t in np.flatnonzero((rel >= lo) & (rel <= hi))]
        limit = self.options.max_extrapolation if extrapolation is None else extrapolation
        if limit is None:
            ext = (
                0
                if labeled_run(labeled)
                else extrapolation_slices(labeled, n, self.fusion.extrapolation_gaps)
            )
        else:
            ext = n if limit < 0 else int(limit)
        ends = (bool(mask_stack[labeled[0]].any()), bool(mask_stack[labeled[-1]].any()))
        return prediction_targets(n, labeled, ends, ext)

    def _external_support(self, name: str) -> Optional[ExternalSupport]:
        """Canvas slices of ``name`` from every support volume (computed once per name)."""
        if name in self._external:
            return self._external[name]
        import torch

        imgs, labs, pos = [], [], []
        for i, sv in enumerate(self._support_volumes):
            if name not in sv.masks:
                continue
            if i not in self._support_stacks:
                self._support_stacks[i] = _ImageStack(sv.image, self.options.axis)
            st = self._support_stacks[i]
            ms = st.frame.to_frame(np.asarray(sv.masks[name], dtype=bool))
            idx = nonempty_slices(ms, 0)
            if not idx:
                continue
            imgs.append(st.canvas_images(idx))
            labs.append(st.canvas_masks(ms, idx))
            pos.append(st.frame.relative_position(np.array(idx), st.n))
        ext = (
            ExternalSupport(torch.cat(imgs), torch.cat(labs), np.concatenate(pos)) if imgs else None
        )
        self._external[name] = ext
        return ext

    # -------------------------------------------------------------------------- network
    def _support_sets(self, plan: _Plan, t: int) -> List[Tuple[tuple, Tuple[int, ...], tuple]]:
        """(cache key, internal slices, external indices) of each ensemble member of ``t``."""
        opts = self.options
        internal = select_support(t, plan.labeled, opts.support_size) if plan.labeled else ()
        ext: Tuple[int, ...] = ()
        room = opts.support_size - len(internal)
        if plan.external is not None and room > 0:
            rel = float(self.frame.relative_position(t, self.n_slices))
            pos = round(rel * 16) / 16  # quantized: keeps batches large
            ext = tuple(sorted(int(i) for i in plan.external.nearest(pos, room)))
        subsets = (
            ensemble_subsets(internal, opts.ensemble, opts.seed)
            if internal
            else [()] * opts.ensemble
        )
        out = []
        for subset in subsets:
            key = (
                tuple((i, plan.fingerprints[i]) for i in subset),
                (plan.seg.name, ext) if ext else (),
                opts.flips,
            )
            out.append((key, subset, ext))
        return out

    def _network(
        self, plan: _Plan, targets: Sequence[int], tick: Callable[[str, int], None], state: Dict
    ) -> Dict[int, np.ndarray]:
        """Mean network logit over the ensemble of each target, on the canvas' inner part: run
        for the targets the network runs on (:attr:`_Plan.computed`), interpolated linearly
        between two of those for the others."""
        need = set()
        for t in targets:
            need.update(plan.between.get(t, (t,)))
        computed = self._run_network(plan, sorted(need), tick, state)
        out = {}
        for t in targets:
            if t in computed:
                out[t] = computed[t]
                continue
            a, b = plan.between[t]
            out[t] = (computed[a] * np.float32(b - t) + computed[b] * np.float32(t - a)) / (
                np.float32(b - a)
            )
            tick("", self.options.ensemble)
        return out

    def _run_network(
        self, plan: _Plan, targets: Sequence[int], tick: Callable[[str, int], None], state: Dict
    ) -> Dict[int, np.ndarray]:
        """Mean network logit (canvas' inner part) of each target over the ensemble; cached
        per (target, support set). Targets sharing a support set run as one batch."""
        import torch

        fresh = state.setdefault("fresh", set())  # computed in this call: not "reused"
        groups: Dict[tuple, Tuple[Tuple[int, ...], Tuple[int, ...], List[int]]] = {}
        members: Dict[int, List[tuple]] = {}
        for t in targets:
            for key, subset, ext in self._support_sets(plan, t):
                groups.setdefault(key, (subset, ext, []))[2].append(t)
                members.setdefault(t, []).append(key)
        engine, stack = self.engine, self.stack
        for key, (subset, ext, group) in groups.items():
            todo = [t for t in group if self._logits.get((t, key)) is None]
            reused = sum(1 for t in group if t not in todo and (t, key) not in fresh)
            state["reused"] += reused
            if reused:
                tick("", reused)
            if not todo:
                continue
            s_img = [stack.canvas_images(subset)] if subset else []
            s_lab = [stack.canvas_masks(plan.mask_stack, subset)] if subset else []
            if ext:
                s_img.append(plan.external.images[list(ext)])
                s_lab.append(plan.external.labels[list(ext)])
            s_img_t, s_lab_t = torch.cat(s_img), torch.cat(s_lab)
            if self.options.flips:
                s_img_t = torch.cat([s_img_t, s_img_t.flip(-1)])
                s_lab_t = torch.cat([s_lab_t, s_lab_t.flip(-1)])
            for b in range(0, len(todo), self.batch_size):
                chunk = todo[b : b + self.batch_size]
                tick(f"{plan.seg.name}: slices {chunk[0]}..{chunk[-1]}", 0)
                logits = engine.logits(stack.canvas_images(chunk), s_img_t, s_lab_t)
                inner = stack.canvas.inner_part(logits)[:, 0].float().numpy()
                for t, lg in zip(chunk, inner):
                    self._logits.put((t, key), np.array(lg, dtype=np.float32))
                    fresh.add((t, key))
                state["runs"] += len(chunk)
                tick("", len(chunk))
        out = {}
        for t in targets:
            parts = [self._logits.get((t, key)) for key in members[t]]
            out[t] = parts[0] if len(parts) == 1 else np.mean(parts, axis=0, dtype=np.float32)
        return out

    def _logit_keys(self, plan: _Plan, targets: Sequence[int]) -> tuple:
        return tuple((t, tuple(k for k, _, _ in self._support_sets(plan, t))) for t in targets)

    # -------------------------------------------------------------------------- fusion
    def _segment_probabilities(
        self, plan: _Plan, tick, state
    ) -> Tuple[RegionProbabilities, Optional[_SlicePriors]]:
        """((region, fused probability) of every target of one segment, the shape priors they
        were fused with, by slice; None without a prior)."""

        def network(ts: Sequence[int]) -> Dict[int, np.ndarray]:
            return self._network(plan, ts, tick, state)

        if not (self.options.use_prior and plan.labeled):
            inner = network(plan.targets)
            ts = sorted(inner)
            native = self.stack.native([inner[t] for t in ts], self._full)
            return {t: (self._full, sigmoid(lg)) for t, lg in zip(ts, native)}, None
        probs: RegionProbabilities = {}
        priors = _SlicePriors()
        uses_fbs = self.fusion.uses_fbs() and self._fbs_available()
        for lo, hi, ts in gaps_of(plan.labeled, plan.targets):
            gap = self._gap(plan, lo, hi, ts, uses_fbs, network, tick, state)
            for t, p in gap.probs.items():
                probs[t] = (gap.region, p)
                priors.by_slice[t] = gap.prior
        for end, side in outside_sides(plan.labeled, plan.targets):
            if side:
                fused = self._side(plan, end, side, network, tick, state)
                for t, p in fused.probs.items():
                    probs[t] = (fused.region, p)
                    priors.by_slice[t] = fused.prior
        return probs, priors

    def _prior(self, plan: _Plan, region: Region, fbs=None) -> ShapePrior:
        """The shape prior of a segment over ``region`` (signed distances of labeled slices
        computed once per label and region)."""
        prior = ShapePrior(plan.mask_stack, plan.labeled, self.frame.spacing, fbs, region)
        prior.sdf_cache = (self._sdf, plan.fingerprints)
        return prior

    def _fbs_available(self) -> bool:
        """True when Slicer's vtkITK can be used (a note once where it cannot)."""
        from . import fill_between

        if fill_between.available():
            return True
        if not self._fbs_missing_note:
            self._fbs_missing_note = True
            self.notes.append(
                "Fill between slices (Slicer's vtkITK) is not available: the "
                "shape prior uses the interpolated distance only"
            )
        return False

    def _gap_fbs(self, plan: _Plan, lo: int, hi: int):
        """Fill between slices of the gap's two slices (:func:`fill_between.fill_between_gap`;
        cached by their labels): (row, col, block), None where it is empty, or the string
        ``"refused"`` for a painting the filter cannot take (and a note)."""
        from . import fill_between

        key = self._fbs_key(plan, lo, hi)
        hit = self._fbs_gaps.get(key)
        if hit is not None:
            return hit[0]
        try:
            future = self._pending.pop(key, None)
            if future is not None:
                result = future.result()
            else:
                result = fill_between.fill_between_gap(plan.mask_stack, lo, hi, self.frame.spacing)
        except fill_between.FillBetweenUnavailable as exc:
            note = f"{plan.seg.name}: {exc}; the shape prior uses the interpolated distance only"
            if note not in self.notes:
                self.notes.append(note)
                self._notes_given = False
            result = "refused"
        self._fbs_gaps.put(key, [result])
        return result

    def _grow(self) -> Tuple[int, int]:
        """The margin of a fusion region around what is painted (pixels along rows, cols)."""
        mm = REGION_MARGIN_CANVAS_PIXELS * self.stack.canvas_pixel_mm
        sp = self.frame.spacing
        return int(np.ceil(mm / sp[1])), int(np.ceil(mm / sp[2]))

    def _refine_in(self, box):
        """The learned fusion's refine step for a gap or an end whose painting (and Fill between
        slices) covers ``box``: on slices the canvas upsamples, it sees and corrects only the
        rectangle a fusion region around ``box`` has (:meth:`_grow`) -- whether or not the
        logistic rule is fused in that region, so regions never change a mask."""
        if self.refine is None or not self._windows:
            return self.refine
        window = Region.around(box, *self._full.shape, self._grow())
        learned = self.refine
        return lambda prior, items: learned(prior, items, window)

    def _gap(self, plan: _Plan, lo: int, hi: int, ts, uses_fbs: bool, network, tick, state):
        """The fused gap between labeled ``lo`` and ``hi`` (cached: a gap whose labels, Fill
        between slices and logits did not change since an earlier call is not recomputed)."""
        fbs = self._gap_fbs(plan, lo, hi) if uses_fbs else "refused"
        rule = self.fusion.inside_rule(fbs != "refused")
        key = (
            lo,
            hi,
            plan.fingerprints[lo],
            plan.fingerprints[hi],
            fbs != "refused",
            self._logit_keys(plan, ts),
            id(rule),
            id(self.refine),
            self.step,
        )
        cached = self._gaps.get(key)
        if cached is not None:  # the gap's logits are not even looked at
            state["reused"] += len(ts) * self.options.ensemble
            tick("", len(ts) * self.options.ensemble)
            return cached
        logits = network(ts)
        block = fbs if isinstance(fbs, tuple) else None
        box = None
        region = self._full
        if self._regions or self._windows:
            planes = [plan.mask_stack[lo], plan.mask_stack[hi]]
            if block is not None:
                planes.append((block[2].any(axis=0), block[0], block[1]))
            box = bounding_box(planes)
        if self._regions:
            region = Region.around(box, *self._full.shape, self._grow())
        refine = self._refine_in(box)
        while True:
            planes_fbs = None if fbs == "refused" else _gap_planes(region, lo, hi, block)
            prior = self._prior(plan, region, planes_fbs)
            if not region.is_full and not self._inside_exact(prior, rule, lo, hi, ts, logits, box):
                region = self._full
                continue
            native = dict(zip(ts, self.stack.native([logits[t] for t in ts], region)))
            probs = fuse_gap(prior, self.fusion, native, refine)
            if region.is_full or not any(region.touches_border(p >= 0.5) for p in probs.values()):
                break
            region = self._full  # cannot happen when the bound held; kept as a guard
        gap = _Fused(region, probs, prior)
        self._gaps.put(key, gap)
        return gap

    def _inside_exact(self, prior: ShapePrior, rule, lo: int, hi: int, ts, logits, box) -> bool:
        """True when no pixel outside ``prior.region`` can come out foreground in the gap: the
        inside rule's upper bound there (:func:`prior.inside_upper_bound`) is negative on every
        target. Outside the region each native pixel is at least ``D`` mm from the painting and
        Fill between slices (``box``), so its normalised distances are at least ``a (D - h) /
        r``; its network logit is at most the largest of the canvas pixels it is mixed from."""
        region = prior.region
        (fr0, fr1), (fc0, fc1) = self._footprints
        inside = ((fr0 >= region.r0) & (fr1 < region.r1))[:, None] & (
            (fc0 >= region.c0) & (fc1 < region.c1)
        )[None, :]
        outside = ~inside
        if not outside.any():
            return True
        sp = prior.in_plane
        dist = box_distance_mm((fr0[:, None], fr1[:, None], fc0[None, :], fc1[None, :]), box, sp)
        dist = np.minimum(dist - 0.25 * (sp[0] + sp[1]), EMPTY_DISTANCE_MM).astype(np.float32)
        dist = dist[outside]  # only the canvas pixels that reach outside the region
        painted_nb = np.where(dist > 0, -MODEL_CLIP, MODEL_CLIP).astype(np.float32)
        tops = {t: max_filter3(np.clip(logits[t], -MODEL_CLIP, MODEL_CLIP))[outside] for t in ts}
        labeled = set(prior.labeled)
        for t in ts:
            scale = prior.distance_scale(t, lo, hi)
            if scale is None:
                return False
            _, r, gap, gap_r = prior.gap_scalars(t, lo, hi)
            nbs = [painted_nb if u in labeled else tops.get(u, tops[t]) for u in (t - 1, t + 1)]
            args = (tops[t], (nbs[0] + nbs[1]) / np.float32(2.0), scale * dist / r)
            # the largest logit, the largest neighbours' and the smallest distance together
            # first: when even that bound is negative, no pixel needs looking at
            whole = inside_upper_bound(
                rule,
                *(np.float32(a.max()) for a in args[:2]),
                np.float32(args[2].min()),
                gap,
                gap_r,
            )
            if float(whole) < -BOUND_SLACK:
                continue
            if bool((inside_upper_bound(rule, *args, gap, gap_r) >= -BOUND_SLACK).any()):
                return False
        return True

    def _side(self, plan: _Plan, end: int, side: List[int], network, tick, state) -> _Fused:
        """The fused targets beyond painted ``end`` (cached like a gap): in a region around the
        end slice, again on the whole slice when a slice came out foreground on an inner side
        of the region (where it may go on outside it)."""
        key = (
            "side",
            end,
            plan.fingerprints[end],
            tuple(side),
            self._logit_keys(plan, side),
            id(self.fusion.outside),
            id(self.refine),
            # beyond an end, how far a slice lies is counted in typical gaps (a feature of the
            # learned fusion and of the hand-set outside rule): the gaps elsewhere matter too
            typical_gap(plan.labeled, self.n_slices),
            self.step,
        )
        cached = self._gaps.get(key)
        if cached is not None:
            state["reused"] += len(side) * self.options.ensemble
            tick("", len(side) * self.options.ensemble)
            return cached
        region = self._full
        box = bounding_box([plan.mask_stack[end]]) if self._regions or self._windows else None
        if self._regions:
            region = Region.around(box, *self._full.shape, self._grow())
        refine = self._refine_in(box)
        while True:
            prior = self._prior(plan, region)

            def native(ts: Sequence[int], region=region) -> Dict[int, np.ndarray]:
                inner = network(ts)
                return dict(zip(ts, self.stack.native([inner[t] for t in ts], region)))

            result = fuse_side(
                prior,
                self.fusion,
                end,
                side,
                native,
                self.batch_size,
                lambda k: tick("", k * self.options.ensemble),
                refine,
            )
            if not result.touched or region.is_full:
                break
            region = self._full
        fused = _Fused(region, result.probs, prior)
        self._gaps.put(key, fused)
        return fused
