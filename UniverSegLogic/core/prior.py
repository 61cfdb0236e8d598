"""Shape prior from the painted slices, and its calibrated fusion with the network.

UniverSeg predicts each slice on its own; the painted slices themselves say a lot about the slices
between them, and a little about the slices just beyond them. This module turns, for one segment,
the network's logit on a target slice plus the painted slices into a fused logit:

*Inside the painted range* (a target between two labeled slices ``lo < t < hi``), per pixel:

* ``sdf`` -- the signed distance (mm, negative inside) of the two bracketing painted slices,
  interpolated linearly in slice position (an empty labeled slice counts as "far outside", so the
  shape shrinks towards it); ``sdf_n`` is the same divided by the structure's equivalent radius
  ``r = sqrt(area / pi)`` (interpolated too), so that the rule does not depend on the structure's
  size;
* ``fbs`` / ``fbs_n`` -- Slicer's Fill between slices result (the morphological contour interpolator,
  :mod:`fill_between`) as +-1 / as its signed distance over ``r``, when that filter is importable;
  a gap it leaves empty although both bracketing slices are painted (it drops tiny fragments) is
  replaced by the interpolated distance;
* ``gap`` -- ``4 w (1 - w)`` for the relative position ``w`` in the gap (0 on a painted slice,
  1 half-way), ``gap_r`` -- the gap length over ``r``;
* ``model`` -- the network's logit (clipped to +-12); ``model_nb`` -- the mean of that logit on
  the slices just above and below (a painted neighbour counts as a confident +-12 of its
  painting): a little 3D context for a 2D network.

*Beyond the painted range* (up to an extent rule, see :class:`FusionParams`):

* ``end_n`` -- signed distance of the nearest painted end slice over its ``r``;
* ``beyond`` -- slices past that end over the typical gap between painted slices; ``beyond_r`` --
  the same distance in mm over ``r``;
* ``model``, ``model_nb``.

A rule is a logistic regression over named features; ``a*b`` names a product. Rules and extent
settings are calibrated on validation episodes (:mod:`calibrate`) and shipped in
``Resources/starter_fusion.json``; :class:`FusionParams` defaults are a hand-set fallback.

Extent rule beyond the painted range: at most ``extrapolation_gaps`` typical gaps past each end;
walking outwards, a slice keeps only the connected regions that overlap the slice before it
(towards the painted range), and once a slice comes out empty every slice further out is empty.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from .region import Region
from .slices import typical_gap

#: Signed distance given to every pixel of an empty labeled slice (mm, "far outside").
EMPTY_DISTANCE_MM = 50.0
#: Clip of the network logit used as a feature.
MODEL_CLIP = 12.0
#: Clip of distances normalised by the equivalent radius.
NORM_CLIP = 3.0


def signed_distance(mask: np.ndarray, spacing: Tuple[float, float]) -> np.ndarray:
    """Signed Euclidean distance (mm) to the boundary of a 2D mask; negative inside.

    ``distance <= 0`` gives the mask back exactly."""
    import SimpleITK as sitk

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, EMPTY_DISTANCE_MM, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, -EMPTY_DISTANCE_MM, dtype=np.float32)
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing((float(spacing[1]), float(spacing[0])))  # x = columns, y = rows
    d = sitk.SignedMaurerDistanceMap(
        img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    # Maurer's map is 0 on the mask's own contour pixels; the boundary lies half a pixel further
    # out, so shift by half a pixel: contour pixels and their outer neighbours become -h and +h
    out = sitk.GetArrayFromImage(d).astype(np.float32) - np.float32(
        0.25 * (spacing[0] + spacing[1])
    )
    return np.clip(out, -EMPTY_DISTANCE_MM, EMPTY_DISTANCE_MM)


def equivalent_radius(mask: np.ndarray, spacing: Tuple[float, float]) -> float:
    """Radius (mm) of the disc with the area of ``mask`` (0 for an empty mask)."""
    area = float(np.count_nonzero(mask)) * float(spacing[0]) * float(spacing[1])
    return float(np.sqrt(area / np.pi))


def keep_overlapping(mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The connected regions (8-connected) of 2D ``mask`` that overlap ``reference``."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or not np.any(reference):
        return np.zeros_like(mask)
    import SimpleITK as sitk

    cc = sitk.GetArrayFromImage(
        sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    )
    keep = np.unique(cc[np.asarray(reference, dtype=bool) & mask])
    keep = keep[keep > 0]
    return np.isin(cc, keep)


# ------------------------------------------------------------------------------------ rules


@dataclass
class LogisticRule:
    """``logit = bias + sum_i weights[i] * feature[features[i]]`` (``a*b`` = product)."""

    features: List[str]
    weights: List[float]
    bias: float = 0.0

    def logit(self, feats: FeatureSource) -> np.ndarray:
        out = np.full(feats.shape, self.bias, dtype=np.float32)
        for name, w in zip(self.features, self.weights):
            if w:
                out += np.float32(w) * feats.get(name)
        return out

    @classmethod
    def from_dict(cls, d: Dict) -> LogisticRule:
        """A rule from its JSON form; a malformed one raises :class:`InputError`."""
        if not isinstance(d, dict) or "features" not in d or "weights" not in d:
            raise InputError("a fusion rule needs 'features' and 'weights'")
        features, weights = d["features"], d["weights"]
        if not isinstance(features, list) or not all(
            isinstance(f, str) and all(p.isidentifier() for p in f.split("*")) for f in features
        ):
            raise InputError(
                f"fusion rule: 'features' must be a list of feature names: {features!r}"
            )
        try:
            values = [float(w) for w in weights] + [float(d.get("bias", 0))]
        except (TypeError, ValueError):
            raise InputError(
                f"fusion rule: 'weights' and 'bias' must be numbers: {weights!r}"
            ) from None
        if len(values) - 1 != len(features) or not np.all(np.isfinite(values)):
            raise InputError(
                "fusion rule: one finite weight per feature is needed "
                f"({len(features)} features, {len(values) - 1} weights)"
            )
        return cls(list(features), values[:-1], values[-1])


def _default_inside() -> LogisticRule:
    return LogisticRule(["model", "sdf_n"], [0.5, -6.0], 0.0)


def _default_outside() -> LogisticRule:
    return LogisticRule(["model", "end_n", "beyond"], [1.0, -1.0, -1.0], 0.0)


@dataclass
class FusionParams:
    """How the network and the painted-slice prior are combined (see the module docstring)."""

    inside: LogisticRule = field(default_factory=_default_inside)
    #: the inside rule without the Fill-between-slices features (used when vtkITK is missing)
    inside_no_fbs: Optional[LogisticRule] = None
    outside: LogisticRule = field(default_factory=_default_outside)
    #: predict at most this many typical gaps beyond the first/last painted slice
    extrapolation_gaps: float = 1.0
    #: beyond the painted range, keep only regions overlapping the previous slice; stop when empty
    chain_outside: bool = True
    source: str = "default (uncalibrated)"

    def uses_fbs(self) -> bool:
        """True when the inside rule needs Fill between slices."""
        return any("fbs" in f for f in self.inside.features)

    def inside_rule(self, fbs_available: bool) -> LogisticRule:
        if fbs_available or not self.uses_fbs():
            return self.inside
        if self.inside_no_fbs is None:
            return _default_inside()
        return self.inside_no_fbs

    # -------------------------------------------------------------------------- files
    @classmethod
    def from_dict(cls, data: Dict) -> FusionParams:
        """Parameters from their JSON form; a malformed one raises :class:`InputError`."""
        if not isinstance(data, dict):
            raise InputError("fusion parameters must be a JSON object")
        out = cls()
        if "inside" in data:
            out.inside = LogisticRule.from_dict(data["inside"])
        if data.get("inside_no_fbs"):
            out.inside_no_fbs = LogisticRule.from_dict(data["inside_no_fbs"])
        if "outside" in data:
            out.outside = LogisticRule.from_dict(data["outside"])
        for k in ("extrapolation_gaps", "chain_outside", "source"):
            if k in data:
                kind = type(getattr(out, k))
                if (
                    kind is float
                    and isinstance(data[k], (int, float))
                    and not isinstance(data[k], bool)
                ):
                    setattr(out, k, float(data[k]))
                elif kind is not float and isinstance(data[k], kind):
                    setattr(out, k, data[k])
                else:
                    raise InputError(f"fusion parameter {k!r} must be a {kind.__name__}")
        return out

    @classmethod
    def load(cls, path: Path) -> FusionParams:
        """Read a fusion JSON; a missing, unreadable or malformed file raises InputError."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"fusion parameters not found: {path}") from None
        except IsADirectoryError:
            raise InputError(f"fusion parameters: expected a file, got a folder: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read fusion parameters {path}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            ) from None
        try:
            return cls.from_dict(data)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None

    def to_dict(self) -> Dict:
        return asdict(self)

    def save(self, path: Path, extra: Optional[Dict] = None) -> None:
        from .atomic import write_text

        data = self.to_dict()
        if extra:
            data.update(extra)
        write_text(str(path), json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------- features


class UnknownFeature(InputError, KeyError):
    """A fusion rule names a feature that this region of a slice does not have (a fusion JSON
    made for another version, or edited by hand): one line for the user, a KeyError for code."""

    __str__ = Exception.__str__


class FeatureSource:
    """Named per-pixel features of one target slice, computed on demand."""

    def __init__(self, base: Dict[str, object], shape: Tuple[int, int]):
        self._base = base
        self._cache: Dict[str, np.ndarray] = {}
        self.shape = shape

    def get(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if "*" in name:
                a, b = name.split("*", 1)
                self._cache[name] = self.get(a) * self.get(b)
            else:
                if name not in self._base:
                    raise UnknownFeature(
                        f"unknown fusion feature {name!r} here "
                        f"(available: {', '.join(sorted(self._base))})"
                    )
                v = self._base[name]
                v = v() if callable(v) else v
                self._cache[name] = np.broadcast_to(np.asarray(v, np.float32), self.shape)
        return self._cache[name]

    def matrix(self, names: Sequence[str]) -> np.ndarray:
        """(pixels, len(names)) float32 feature matrix."""
        return np.stack([np.ascontiguousarray(self.get(n)).reshape(-1) for n in names], axis=1)


class ShapePrior:
    """The painted slices of one segment in the canonical frame, and the features they give.

    ``mask_stack`` (slices, rows, cols) holds the user's labels; ``labeled`` the labeled slices
    (an empty one is confirmed background); ``spacing`` is (slice, row, col) mm; ``fbs_stack``
    optionally Fill between slices' result: a stack on the whole grid like ``mask_stack``, or
    anything indexed by slice that gives region-sized planes. ``region``
    (:class:`~UniverSegLogic.core.region.Region`, default the whole slice): every plane the prior
    takes and gives (masks, distances, features; the logits given to :meth:`features`) covers only
    that rectangle. Inside it the values are those of the whole slice as long as the labeled
    slices used (the two around a target, or its painted end) lie inside it.
    """

    def __init__(
        self,
        mask_stack: np.ndarray,
        labeled: Sequence[int],
        spacing: Sequence[float],
        fbs_stack=None,
        region: Optional[Region] = None,
    ):
        rows, cols = mask_stack.shape[1:]
        self.region = region if region is not None else Region.full(rows, cols)
        self.masks = self.region.crop(mask_stack)
        if isinstance(fbs_stack, np.ndarray):
            fbs_stack = self.region.crop(fbs_stack)
        self.labeled = sorted(int(i) for i in labeled)
        self._labeled_set = set(self.labeled)
        self.spacing = tuple(float(s) for s in spacing)
        self.fbs = fbs_stack
        self._sdf: Dict[int, np.ndarray] = {}
        self._radius: Dict[int, float] = {}
        self._fbs_features: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        #: (dict, {slice: label fingerprint}) shared between priors: signed distances by
        #: (label, region); None: each prior computes its own
        self.sdf_cache: Optional[Tuple[Dict, Dict[int, str]]] = None
        #: typical gap between painted slices (slices; see :func:`slices.typical_gap`)
        self.gap = typical_gap(self.labeled, mask_stack.shape[0])

    @property
    def in_plane(self) -> Tuple[float, float]:
        return self.spacing[1], self.spacing[2]

    def set_sdf(self, i: int, sdf: np.ndarray) -> None:
        """Provide the signed distance of labeled slice ``i`` (computed earlier for the same
        label)."""
        self._sdf[i] = sdf

    def has_sdf(self, i: int) -> bool:
        """True when the signed distance of slice ``i`` has been computed."""
        return i in self._sdf

    def sdf(self, i: int) -> np.ndarray:
        """Signed distance (mm) of the label of slice ``i`` (computed once; with
        :attr:`sdf_cache` -- (dict, {slice: label fingerprint}) -- once per label and region)."""
        if i not in self._sdf:
            key = None
            if self.sdf_cache is not None:
                store, prints = self.sdf_cache
                key = (prints.get(i), self.region)
                if key[0] is not None and key in store:
                    self._sdf[i] = store[key]
                    return self._sdf[i]
            self._sdf[i] = signed_distance(self.masks[i], self.in_plane)
            if key is not None and key[0] is not None:
                store[key] = self._sdf[i]
        return self._sdf[i]

    def planes(self) -> List[np.ndarray]:
        """The arrays the prior holds (signed distances, Fill-between-slices features)."""
        out = list(self._sdf.values())
        for pair in self._fbs_features.values():
            out.extend(pair)
        return out

    def radius(self, i: int) -> float:
        if i not in self._radius:
            self._radius[i] = equivalent_radius(self.masks[i], self.in_plane)
        return self._radius[i]

    def bracket(self, t: int) -> Optional[Tuple[int, int]]:
        """(lo, hi) labeled slices around ``t`` when ``t`` is strictly inside the painted range."""
        lab = self.labeled
        if not lab or not lab[0] < t < lab[-1] or t in lab:
            return None
        hi = next(i for i in lab if i > t)
        lo = max(i for i in lab if i < t)
        return lo, hi

    def inside_range(self, t: int) -> bool:
        return self.bracket(t) is not None

    def distance(self, t: int) -> Optional[np.ndarray]:
        """Interpolated signed distance (mm) at slice ``t``, or None outside the painted range."""
        b = self.bracket(t)
        if b is None:
            return None
        return self._interpolate(t, *b)

    def _interpolate(self, t: int, lo: int, hi: int) -> np.ndarray:
        """Signed distance interpolated between labeled slices ``lo`` and ``hi``.

        An empty labeled slice next to a painted one takes the constant distance that makes the
        shape shrink to nothing half-way (the painted slice's depth): the structure is expected to
        end in the middle of the gap. Two empty slices give "far outside" everywhere."""
        w = (t - lo) / float(hi - lo)
        a, b = self.sdf(lo), self.sdf(hi)
        ea, eb = not self.masks[lo].any(), not self.masks[hi].any()
        if ea != eb:
            depth = float(-(b if ea else a).min())
            if ea:
                a = np.full_like(a, depth)
            else:
                b = np.full_like(b, depth)
        return ((1.0 - w) * a + w * b).astype(np.float32)

    def gap_scalars(self, t: int, lo: int, hi: int) -> Tuple[float, float, float, float]:
        """(w, r, gap, gap_r) of target ``t`` between labeled ``lo`` and ``hi``: its relative
        position, the interpolated equivalent radius (at least a pixel), ``4 w (1 - w)`` and the
        gap length over ``r`` (at most 10)."""
        w = (t - lo) / float(hi - lo)
        r = max((1.0 - w) * self.radius(lo) + w * self.radius(hi), min(self.in_plane))
        return w, r, 4.0 * w * (1.0 - w), min(10.0, (hi - lo) * self.spacing[0] / r)

    def distance_scale(self, t: int, lo: int, hi: int) -> float:
        """A factor ``a`` with ``distance(t) >= a * (D - h)`` at every pixel whose distance to
        the painted shapes of ``lo`` and ``hi`` is ``D`` mm (``h``: the half-pixel shift of
        :func:`signed_distance`): 1 when both are painted, the weight of the painted one when
        the other is labeled empty; None when both are empty (then the distance is constant)."""
        w = (t - lo) / float(hi - lo)
        ea, eb = not self.masks[lo].any(), not self.masks[hi].any()
        if ea and eb:
            return None
        if ea:
            return w
        if eb:
            return 1.0 - w
        return 1.0

    def end_of(self, t: int) -> Optional[int]:
        """The painted end slice nearest to ``t`` when ``t`` lies beyond the painted range."""
        if not self.labeled:
            return None
        if t < self.labeled[0]:
            return self.labeled[0]
        if t > self.labeled[-1]:
            return self.labeled[-1]
        return None

    def _fbs_feature(self, t: int, d: np.ndarray, r: float, lo: int, hi: int) -> Tuple:
        """(+-1 indicator, normalised signed distance) of Fill between slices at ``t``."""
        if t not in self._fbs_features:
            self._fbs_features[t] = self._compute_fbs_feature(t, d, r, lo, hi)
        return self._fbs_features[t]

    def _compute_fbs_feature(self, t: int, d: np.ndarray, r: float, lo: int, hi: int) -> Tuple:
        f = self.fbs[t]
        if not (f.any() and self.masks[lo].any() and self.masks[hi].any()):
            # the interpolator dropped the gap (a tiny fragment vanished in its morphology), or
            # a bracketing slice is labeled empty (which the interpolator cannot know): fall
            # back on the distance prior
            ind = np.where(d <= 0, 1.0, -1.0).astype(np.float32)
            return ind, np.clip(d / r, -NORM_CLIP, NORM_CLIP)
        fd = signed_distance(f, self.in_plane)
        return (np.where(f, 1.0, -1.0).astype(np.float32), np.clip(fd / r, -NORM_CLIP, NORM_CLIP))

    def _neighbour_logit(
        self, t: int, own: np.ndarray, neighbours: Optional[Dict[int, np.ndarray]]
    ) -> np.ndarray:
        """Mean clipped network logit of slices t-1 and t+1 (a labeled one counts as a confident
        logit of its painting; one not computed counts as slice t itself)."""
        acc = np.zeros(own.shape, np.float32)
        for u in (t - 1, t + 1):
            if u in self._labeled_set:
                acc += np.where(self.masks[u], MODEL_CLIP, -MODEL_CLIP).astype(np.float32)
            elif neighbours is not None and u in neighbours:
                acc += np.clip(np.asarray(neighbours[u], np.float32), -MODEL_CLIP, MODEL_CLIP)
            else:
                acc += own
        return acc / 2.0

    def features(
        self, t: int, model_logit: np.ndarray, neighbours: Optional[Dict[int, np.ndarray]] = None
    ) -> Tuple[str, FeatureSource]:
        """("inside" | "outside", features) for target slice ``t``; ``neighbours`` holds the
        network logits of other slices (for ``model_nb``)."""
        shape = tuple(np.shape(model_logit))
        model = np.clip(np.asarray(model_logit, np.float32), -MODEL_CLIP, MODEL_CLIP)
        base: Dict[str, object] = {
            "model": model,
            "model_nb": lambda: self._neighbour_logit(t, model, neighbours),
            "one": 1.0,
        }
        b = self.bracket(t)
        if b is not None:
            lo, hi = b
            _, r, gap, gap_r = self.gap_scalars(t, lo, hi)
            d = self._interpolate(t, lo, hi)
            base.update(
                {
                    "sdf": np.clip(d, -30.0, 30.0),
                    "sdf_n": np.clip(d / r, -NORM_CLIP, NORM_CLIP),
                    "gap": gap,
                    "gap_r": gap_r,
                }
            )
            if self.fbs is not None:
                base["fbs"] = lambda: self._fbs_feature(t, d, r, lo, hi)[0]
                base["fbs_n"] = lambda: self._fbs_feature(t, d, r, lo, hi)[1]
            return "inside", FeatureSource(base, shape)
        e = self.end_of(t)
        if e is None:
            return "outside", FeatureSource(base, shape)
        r = max(self.radius(e), min(self.in_plane))
        s = abs(t - e)
        base.update(
            {
                "end_n": np.clip(self.sdf(e) / r, -NORM_CLIP, NORM_CLIP),
                "beyond": min(4.0, s / max(1.0, self.gap)),
                "beyond_r": min(10.0, s * self.spacing[0] / r),
            }
        )
        return "outside", FeatureSource(base, shape)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


#: Features whose range :func:`inside_upper_bound` knows beyond the painted shapes.
_BOUNDED = ("model", "model_nb", "sdf_n", "fbs_n", "fbs", "gap", "gap_r", "one")


def inside_upper_bound(
    rule: LogisticRule,
    model_hi: np.ndarray,
    nb_hi: np.ndarray,
    norm_lo: np.ndarray,
    gap: float,
    gap_r: float,
) -> np.ndarray:
    """An upper bound of an inside rule's logit at pixels outside Fill between slices' result
    where the clipped network logit is at most ``model_hi``, ``model_nb`` at most ``nb_hi`` and
    the normalised distances ``sdf_n``, ``fbs_n`` at least ``norm_lo`` (arrays of one shape; the
    slice's ``gap`` and ``gap_r`` as given). The rule is multilinear in its features, so its
    largest value over that box is at a corner: every corner is evaluated. ``+inf`` where the
    rule uses a feature without such a bound (then nothing outside the painted shapes is known).
    """
    shape = np.shape(model_hi)
    factors = [f.split("*") for f in rule.features]
    if any(p not in _BOUNDED for fs in factors for p in fs) or any(
        len(set(fs)) < len(fs) for fs in factors
    ):
        return np.full(shape, np.inf, dtype=np.float32)
    ranges = {
        "model": (np.float32(-MODEL_CLIP), model_hi),
        "model_nb": (np.float32(-MODEL_CLIP), nb_hi),
        "sdf_n": (np.clip(norm_lo, -NORM_CLIP, NORM_CLIP), np.float32(NORM_CLIP)),
        "fbs_n": (np.clip(norm_lo, -NORM_CLIP, NORM_CLIP), np.float32(NORM_CLIP)),
    }
    used = [n for n in ranges if any(n in f.split("*") for f in rule.features)]
    best = np.full(shape, -np.inf, dtype=np.float32)
    for corner in range(1 << len(used)):
        base: Dict[str, object] = {"fbs": -1.0, "gap": gap, "gap_r": gap_r, "one": 1.0}
        for bit, name in enumerate(used):
            base[name] = ranges[name][(corner >> bit) & 1]
        np.maximum(best, rule.logit(FeatureSource(base, shape)), out=best)
    return best


def fuse_inside(
    prior: ShapePrior,
    params: FusionParams,
    t: int,
    model_logit: np.ndarray,
    neighbours: Optional[Dict[int, np.ndarray]] = None,
) -> np.ndarray:
    """Fused probability of a target inside the painted range."""
    _, feats = prior.features(t, model_logit, neighbours)
    return sigmoid(params.inside_rule(prior.fbs is not None).logit(feats))


class OutsideChain:
    """Fuses the targets beyond one painted end, pushed in order outwards from that end.

    With ``params.chain_outside`` a slice keeps only the regions overlapping the slice before it
    (the painted end slice first), and once a slice comes out empty the chain is :attr:`stopped`:
    slices further out are empty and need not be computed.
    """

    def __init__(
        self, prior: ShapePrior, params: FusionParams, end: int, refine: Optional[Refine] = None
    ):
        self.prior, self.params, self.refine = prior, params, refine
        self.prev = np.asarray(prior.masks[end], dtype=bool)
        self.stopped = params.chain_outside and not self.prev.any()
        self.seen: Dict[int, np.ndarray] = {}
        #: True once a slice came out foreground on a side of the prior's region that is not
        #: the edge of the slice (the result may then differ from the whole slice's)
        self.touched = False

    def push(
        self, t: int, model_logit: np.ndarray, neighbours: Optional[Dict[int, np.ndarray]] = None
    ) -> np.ndarray:
        """Fused probability of the next target outwards (zeros once stopped); ``neighbours``:
        network logits of other slices (those pushed before are remembered)."""
        self.seen[t] = model_logit
        if self.stopped:
            return np.zeros(np.shape(model_logit), dtype=np.float32)
        nb = dict(self.seen)
        if neighbours:
            nb.update(neighbours)
        _, feats = self.prior.features(t, model_logit, nb)
        z = self.params.outside.logit(feats)
        if self.refine is not None:
            z = self.refine(self.prior, {t: ("outside", feats, z)})[t]
        p = sigmoid(z).astype(np.float32)
        if not self.prior.region.is_full and self.prior.region.touches_border(p >= 0.5):
            self.touched = True
        if self.params.chain_outside:
            keep = keep_overlapping(p >= 0.5, self.prev)
            p = np.where(keep, p, np.float32(0.0))
            self.stopped = not keep.any()
            self.prev = keep
        return p


#: Where a weights file's own calibrated fusion is looked for: ``<weights file>`` + this suffix.
FUSION_SIDECAR_SUFFIX = ".fusion.json"


def fusion_for(weights_source: str) -> Tuple[FusionParams, Optional[str]]:
    """(fusion parameters calibrated for ``weights_source``, note or None).

    The calibration follows the weights' content, not their name: ``starter``, and a weights file
    byte-identical to the starter weights (e.g. a copy given by path), get the shipped
    ``Resources/starter_fusion.json``. A weights file ``X.pt`` with its own calibration ``X.pt`` +
    :data:`FUSION_SIDECAR_SUFFIX` (``universeg-slicer calibrate`` writes one) gets that one first.
    Otherwise the hand-set defaults, and a note saying so (shown once to the user).
    """
    from .weights import is_starter_content, resource_file

    path: Optional[Path] = None
    if weights_source == "starter":
        path = resource_file("starter_fusion.json")
    elif weights_source not in ("official",):
        sidecar = Path(str(weights_source) + FUSION_SIDECAR_SUFFIX)
        if sidecar.is_file():
            path = sidecar
        elif is_starter_content(str(weights_source)):
            path = resource_file("starter_fusion.json")
    if path is not None:
        try:
            return FusionParams.load(path), None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            from ..errors import WeightsError

            raise WeightsError(f"cannot read the fusion parameters {path}: {exc}") from None
    return FusionParams(), (
        f"the network/shape-prior fusion for weights {weights_source!r} uses hand-set defaults "
        "(calibrated only for the starter weights; `universeg-slicer calibrate` fits it)"
    )


# ------------------------------------------------------------------------------- fusion


#: The seam for a learned fusion (:class:`~UniverSegLogic.core.fusion_net.LearnedFusion`):
#: ``refine(prior, {t: (region, features, logistic logit)}) -> {t: fused logit}``, on the
#: prior's planes (its region of the slice).
Refine = Callable[[ShapePrior, Dict[int, Tuple[str, FeatureSource, np.ndarray]]], Dict]


def fuse_gap(
    prior: ShapePrior,
    params: FusionParams,
    logits: Dict[int, np.ndarray],
    refine: Optional[Refine] = None,
) -> Dict[int, np.ndarray]:
    """Fused probabilities (float32) of the targets of one gap between two labeled slices, from
    their network logits (``logits`` holds every target of the gap: they are each other's
    neighbours); ``refine`` corrects the logistic logits of the whole gap at once."""
    if refine is None:
        return {
            t: fuse_inside(prior, params, t, lg, logits).astype(np.float32)
            for t, lg in logits.items()
        }
    rule = params.inside_rule(prior.fbs is not None)
    items = {}
    for t, lg in logits.items():
        _, feats = prior.features(t, lg, logits)
        items[t] = ("inside", feats, rule.logit(feats))
    return {t: sigmoid(z).astype(np.float32) for t, z in refine(prior, items).items()}


def fuse_outside(
    prior: ShapePrior,
    params: FusionParams,
    targets: Sequence[int],
    network: Callable[[Sequence[int]], Dict[int, np.ndarray]],
    batch: int = 8,
    skip: Optional[Callable[[int], None]] = None,
    refine: Optional[Refine] = None,
) -> Dict[int, np.ndarray]:
    """Fused probabilities of the targets beyond each painted end, computed outwards in batches
    of ``batch``; once a side stops (:class:`OutsideChain`), its remaining targets are not
    computed (``skip(count)`` is told how many)."""
    probs: Dict[int, np.ndarray] = {}
    for end, side in outside_sides(prior.labeled, targets):
        probs.update(fuse_side(prior, params, end, side, network, batch, skip, refine).probs)
    return probs


def outside_sides(labeled: Sequence[int], targets: Sequence[int]) -> List[Tuple[int, List[int]]]:
    """(painted end slice, its targets beyond it, outwards) for the first and the last end."""
    lab = sorted(int(i) for i in labeled)
    return [
        (lab[0], sorted((t for t in targets if t < lab[0]), reverse=True)),
        (lab[-1], sorted(t for t in targets if t > lab[-1])),
    ]


@dataclass
class SideResult:
    """What :func:`fuse_side` gives: the fused probabilities of one side, and whether a slice
    came out foreground on an inner side of the prior's region (see :class:`OutsideChain`)."""

    probs: Dict[int, np.ndarray]
    touched: bool


def fuse_side(
    prior: ShapePrior,
    params: FusionParams,
    end: int,
    side: Sequence[int],
    network: Callable[[Sequence[int]], Dict[int, np.ndarray]],
    batch: int = 8,
    skip: Optional[Callable[[int], None]] = None,
    refine: Optional[Refine] = None,
) -> SideResult:
    """Fused probabilities of the targets ``side`` beyond the painted ``end`` (outwards)."""
    probs: Dict[int, np.ndarray] = {}
    chain = OutsideChain(prior, params, end, refine)
    for b in range(0, len(side), batch):
        if chain.stopped:  # the structure has ended: the rest stays empty
            if skip is not None:
                skip(len(side) - b)
            break
        chunk = list(side[b : b + batch])
        lgs = network(chunk)
        for t in chunk:
            probs[t] = chain.push(t, lgs[t], lgs)
    return SideResult(probs, chain.touched)


def gaps_of(labeled: Sequence[int], targets: Sequence[int]) -> List[Tuple[int, int, List[int]]]:
    """(lo, hi, targets strictly between them) for each pair of consecutive labeled slices."""
    lab = sorted(int(i) for i in labeled)
    wanted = set(int(t) for t in targets)
    out = []
    for lo, hi in zip(lab[:-1], lab[1:]):
        ts = [t for t in range(lo + 1, hi) if t in wanted]
        if ts:
            out.append((lo, hi, ts))
    return out


def fused_probabilities(
    prior: ShapePrior,
    params: FusionParams,
    targets: Sequence[int],
    network: Callable[[Sequence[int]], Dict[int, np.ndarray]],
    batch: int = 8,
    skip: Optional[Callable[[int], None]] = None,
    refine: Optional[Refine] = None,
) -> Dict[int, np.ndarray]:
    """Fused probability of every target: :func:`fuse_gap` for each gap inside the painted
    range, :func:`fuse_outside` beyond it (what a propagation computes; the calibration scores
    candidate parameters with it on cached logits)."""
    probs: Dict[int, np.ndarray] = {}
    for _lo, _hi, ts in gaps_of(prior.labeled, targets):
        probs.update(fuse_gap(prior, params, network(ts), refine))
    probs.update(fuse_outside(prior, params, targets, network, batch, skip, refine))
    return probs
