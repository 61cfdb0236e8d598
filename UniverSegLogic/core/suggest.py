"""How unsure a propagation is on each slice, and which slices to paint next.

Nothing here sees a ground truth: the inputs are what a propagation has -- the fused probability
of every predicted slice, the user's labeled slices and the painted-slice shape prior
(:class:`~UniverSegLogic.core.prior.ShapePrior`: the interpolated signed distance, Slicer's Fill
between slices where available, the painted end slices).

*Slice uncertainty* (:func:`slice_uncertainty`): the number of voxels of the slice expected to be
wrong, from per-slice features (:func:`slice_features`), each in voxels:

* ``margin`` -- ``sum(min(p, 1 - p))`` over the slice, ``p`` the fused probability (voxels on the
  wrong side of 0.5 if ``p`` were calibrated);
* inside the painted range: ``vs_fbs`` -- voxels where the prediction and Fill between slices
  disagree, ``vs_sdf`` -- voxels where it and the interpolated signed distance of the two
  bracketing painted slices disagree (one of the two is wrong there);
* beyond the painted range: ``vs_end`` -- voxels where it and the nearest painted end slice
  disagree (how much the shape changed since the last painted slice).

A predicted slice scores ``sum(weight * feature)`` with the weights of :data:`WEIGHTS`
(non-negative least squares of the real error on the validation structures,
``research/suggest_fit.py``; without a prior, the margin alone, scaled the same way). A slice
beyond the predicted range, on a side whose end slice is painted (the structure may go on), scores
``A`` the area of the outermost non-empty slice on that side
(predicted or painted), ``j`` slices further out: ``A * first * exp(-(j - 1) / (reach * gap))``
with ``gap`` the typical gap between painted slices; :data:`BEYOND` holds ``(first, reach)`` for the
two cases the validation structures tell apart -- the prediction reached its extent limit still
non-empty, or it came out empty before (the network lost the structure, which then often goes on).
Beyond an end slice labeled empty: 0 (the user said the structure ends there). A labeled slice: 0.

*Suggestion* (:func:`suggest_slices`): the expected gain of painting slice ``c`` is the
uncertainty of ``c`` itself plus the part of its neighbours' uncertainty that a painted slice at
``c`` removes (beyond the painted range counted :data:`OUTSIDE_GAIN` times: painting there also
moves the extrapolation limit). An unlabeled slice ``s`` between labeled slices ``a < s < b`` is modelled as wrong in
proportion to ``phi(s) = (s - a)(b - s) / (b - a)`` (the error of interpolating over the gap; with
only one labeled side, the distance to it), so painting ``c`` inside ``(a, b)`` multiplies the
uncertainty of ``s`` by ``phi'(s) / phi(s)``, ``phi'`` with ``c`` labeled. The best slice is taken,
the model updated as if it were painted, and the next one chosen the same way: the suggestions are
spread out, never a labeled slice, and may lie beyond the painted range (where an empty slice
marked labeled tells the propagation that the structure ends there). With a uniform uncertainty
this is bisection of the longest gap; uncertainty moves it to where the shape changes most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .slices import typical_gap

#: Weights of the per-slice features (expected wrong voxels), by region; fitted on the
#: validation structures (``python -m UniverSegResearch.suggest_fit``).
WEIGHTS: Dict[str, Dict[str, float]] = {
    "inside": {"margin": 0.153, "vs_fbs": 0.642, "vs_sdf": 0.359},
    "inside_no_fbs": {"margin": 0.371, "vs_sdf": 0.619},
    "outside": {"margin": 1.744, "vs_end": 0.524},
    "inside_no_prior": {"margin": 0.784},
    "outside_no_prior": {"margin": 2.642},
}
#: (first, reach in typical gaps) beyond the predicted range: the prediction reached its limit
#: non-empty / came out empty before it (fitted on the validation structures too).
BEYOND: Dict[str, Tuple[float, float]] = {"open": (0.77, 0.1), "stopped": (2.738, 0.14)}
#: In the gain of a painted slice, the uncertainty beyond the painted range counts this many
#: times (painting there also moves the extrapolation limit, which the ``phi`` model ignores);
#: chosen among 1, 2, 3 on the validation annotation sessions (``docs/results/session/``).
OUTSIDE_GAIN = 2.0
#: Beyond-range uncertainties below this many voxels are dropped (far from the structure).
MIN_VOXELS = 0.05


@dataclass
class SliceUncertainty:
    """Per-slice uncertainty of one segment's propagation (canonical slice numbers = array
    indices along the propagation axis) and what a suggestion needs besides it."""

    n_slices: int
    labeled: List[int]
    #: expected wrong voxels per slice (every slice of the stack; labeled slices 0)
    scores: Dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> Dict[int, float]:
        """{slice: expected wrong voxels} for every slice."""
        return dict(self.scores)


def expected_wrong_voxels(probability: np.ndarray) -> float:
    """``sum(min(p, 1 - p))``: voxels of a slice expected on the wrong side of 0.5."""
    p = np.asarray(probability, dtype=np.float32)
    return float(np.minimum(p, np.float32(1.0) - p).sum(dtype=np.float64))


def slice_features(
    probabilities: Mapping[int, np.ndarray], labeled: Sequence[int], prior=None
) -> Dict[int, Tuple[str, Dict[str, float]]]:
    """``{slice: (region, {feature: voxels})}`` of every predicted slice (see the module
    docstring); ``prior``: the segment's :class:`~UniverSegLogic.core.prior.ShapePrior` (or an
    object whose ``for_slice(t)`` gives slice ``t``'s, over the region that slice's probability
    covers), or None when the propagation used none (then only the margin)."""
    lab = sorted(int(i) for i in labeled)
    out: Dict[int, Tuple[str, Dict[str, float]]] = {}
    priors = prior
    for t, p in probabilities.items():
        t = int(t)
        feats = {"margin": expected_wrong_voxels(p)}
        # one prior, or one per slice (``for_slice``): each covers the region of its slices' p
        prior = priors.for_slice(t) if hasattr(priors, "for_slice") else priors
        if prior is None or not lab:
            inside = bool(lab) and lab[0] < t < lab[-1]
            out[t] = ("inside_no_prior" if inside else "outside_no_prior", feats)
            continue
        mask = np.asarray(p) >= 0.5
        b = prior.bracket(t)
        if b is not None:
            lo, hi = b
            feats["vs_sdf"] = float(np.count_nonzero(mask ^ (prior.distance(t) <= 0)))
            fbs = prior.fbs
            if fbs is not None:
                ref = fbs[t]
                if not (ref.any() and prior.masks[lo].any() and prior.masks[hi].any()):
                    ref = prior.distance(t) <= 0  # as the fusion does: the distance stands in
                feats["vs_fbs"] = float(np.count_nonzero(mask ^ ref))
                out[t] = ("inside", feats)
            else:
                out[t] = ("inside_no_fbs", feats)
        else:
            e = prior.end_of(t)
            feats["vs_end"] = float(np.count_nonzero(mask ^ np.asarray(prior.masks[e], bool)))
            out[t] = ("outside", feats)
    return out


def slice_uncertainty(
    probabilities: Mapping[int, np.ndarray],
    mask_stack: np.ndarray,
    labeled: Sequence[int],
    prior=None,
) -> SliceUncertainty:
    """The uncertainty of every slice of one segment's propagation.

    ``probabilities``: fused probability of each predicted slice (slice -> 2D array);
    ``mask_stack``: the user's labels, (slices, rows, cols); ``labeled``: the labeled slices (an
    empty one is labeled background); ``prior``: the painted-slice prior the propagation used
    (None: none). See the module docstring for the model."""
    n = int(mask_stack.shape[0])
    lab = sorted(int(i) for i in labeled)
    scores: Dict[int, float] = {i: 0.0 for i in range(n)}
    areas: Dict[int, int] = {}
    for t, (region, feats) in slice_features(probabilities, lab, prior).items():
        w = WEIGHTS[region]
        scores[t] = float(sum(w.get(k, 0.0) * v for k, v in feats.items()))
        areas[t] = int(np.count_nonzero(np.asarray(probabilities[t]) >= 0.5))
    for i in lab:
        scores[i] = 0.0
        areas[i] = int(np.count_nonzero(mask_stack[i]))
    gap = max(1.0, typical_gap(lab, n)) if lab else 1.0
    for end, step in ((lab[0], -1), (lab[-1], 1)) if lab else ():
        if areas[end] == 0:
            continue  # labeled empty: the structure ends here
        last = end  # the outermost non-empty slice of this side, predicted or painted
        while (last + step) in areas and areas[last + step] > 0 and (last + step) not in lab:
            last += step
        stopped = (last + step) in areas and (last + step) not in lab
        first, reach = BEYOND["stopped" if stopped else "open"]
        scale = max(1e-6, reach * gap)
        s = last + step
        while 0 <= s < n and s not in lab:
            u = areas[last] * first * float(np.exp(-(abs(s - last) - 1) / scale))
            if u < MIN_VOXELS:
                break
            scores[s] = max(scores[s], float(u))
            s += step
    return SliceUncertainty(n, lab, scores)


def _phi(s: np.ndarray, a: Optional[int], b: Optional[int]) -> np.ndarray:
    """Error-growth model of unlabeled slices ``s`` bracketed by labeled ``a`` (below) and ``b``
    (above); either may be None (no labeled slice on that side)."""
    s = np.asarray(s, dtype=np.float64)
    if a is not None and b is not None:
        return (s - a) * (b - s) / float(b - a)
    if a is not None:
        return s - a
    return b - s


def _ratios(s: np.ndarray, a: Optional[int], b: Optional[int], c: int, n: int) -> np.ndarray:
    """Factor on the uncertainty of slices ``s`` (one run between ``a`` and ``b``) once slice
    ``c`` of that run is painted (0 at ``c``). With no labeled slice at all (support from other
    volumes only), the error is taken to fall off within a typical gap of ``c``."""
    s = np.asarray(s, dtype=np.float64)
    if a is None and b is None:
        out = np.minimum(1.0, np.abs(s - c) / typical_gap([], n))
    else:
        phi = _phi(s, a, b)
        out = np.empty_like(phi)
        below = s < c
        out[below] = _phi(s[below], a, int(c)) / phi[below]
        out[~below] = _phi(s[~below], int(c), b) / phi[~below]
    out[s == c] = 0.0
    return out


def _brackets(
    labeled: Sequence[int], n: int
) -> List[Tuple[Optional[int], Optional[int], int, int]]:
    """(a, b, first, last) for each run of unlabeled slices ``first..last`` of ``0..n-1``, with
    ``a``/``b`` the labeled slices around it (None at the ends of the stack)."""
    lab = sorted(set(int(i) for i in labeled))
    runs = []
    prev: Optional[int] = None
    for i in lab + [None]:
        first = 0 if prev is None else prev + 1
        last = (n - 1) if i is None else i - 1
        if first <= last:
            runs.append((prev, i, first, last))
        prev = i
    return runs


def gains(unc: SliceUncertainty, labeled: Optional[Sequence[int]] = None) -> Dict[int, float]:
    """Expected voxels made right by painting each unlabeled slice (see the module docstring);
    ``labeled`` overrides the labeled slices (the scores are then taken as they are)."""
    lab = unc.labeled if labeled is None else labeled
    out: Dict[int, float] = {}
    for a, b, first, last in _brackets(lab, unc.n_slices):
        s = np.arange(first, last + 1)
        u = np.array([unc.scores.get(int(i), 0.0) for i in s], dtype=np.float64)
        if a is None or b is None:
            u = u * OUTSIDE_GAIN
        if not u.any():
            for c in s:
                out[int(c)] = 0.0
            continue
        for c in s:
            out[int(c)] = float(np.dot(u, 1.0 - _ratios(s, a, b, int(c), unc.n_slices)))
    return out


def _bisection_bonus(labeled: Sequence[int], n: int) -> Dict[int, float]:
    """A tie-breaker (tiny): prefers the middle of long gaps between labeled slices."""
    out: Dict[int, float] = {}
    for a, b, first, last in _brackets(labeled, n):
        s = np.arange(first, last + 1)
        if a is None or b is None:
            phi = np.zeros(len(s))  # outside the labeled range: no tie-break pull
        else:
            phi = _phi(s, a, b)
        for c, v in zip(s, phi):
            out[int(c)] = float(v)
    return out


def suggest_slices(unc: SliceUncertainty, n: int = 1) -> List[int]:
    """Up to ``n`` slices to paint next, best first (never a labeled slice; see the module
    docstring). Empty when every slice is labeled."""
    if n < 1:
        return []
    labeled = list(unc.labeled)
    scores = dict(unc.scores)
    out: List[int] = []
    for _ in range(int(n)):
        work = SliceUncertainty(unc.n_slices, labeled, scores)
        g = gains(work)
        if not g:
            break
        tie = _bisection_bonus(labeled, unc.n_slices)
        best = max(g, key=lambda c: (g[c] + 1e-9 * tie.get(c, 0.0), -c))
        if g[best] <= 0.0 and tie.get(best, 0.0) <= 0.0:
            break  # nothing left to gain anywhere
        out.append(int(best))
        scores = _after_painting(work, int(best))
        labeled = sorted(labeled + [int(best)])
    return out


def _after_painting(unc: SliceUncertainty, c: int) -> Dict[int, float]:
    """The scores as the model expects them once slice ``c`` is painted."""
    scores = dict(unc.scores)
    for a, b, first, last in _brackets(unc.labeled, unc.n_slices):
        if not first <= c <= last:
            continue
        s = np.arange(first, last + 1)
        for si, r in zip(s, _ratios(s, a, b, c, unc.n_slices)):
            scores[int(si)] = scores.get(int(si), 0.0) * float(r)
    return scores
