"""Calibrating the fusion of network and painted-slice prior on validation episodes.

An *episode* is one validation structure painted on ``k`` slices exactly as in the evaluation
protocol (:func:`~UniverSegLogic.core.slices.evaluation_slices`). For each episode the network's raw logits are
computed once (every slice inside the painted range and :data:`EXTRAPOLATION_GAPS_MAX` typical gaps
beyond each end; cached on disk per weights file) together with Fill between slices' result. The
fusion (:class:`prior.FusionParams`) is then fitted without running the network again:

1. the inside and outside rules are logistic regressions over named features
   (:mod:`prior`), fitted by weighted maximum likelihood on pixels sampled from every episode
   (all pixels near the structure, the network's or the prior's foreground; a weighted sample of
   the rest) -- one rule for all structures, no per-structure parameter;
2. the rules' biases and the extent rule (``extrapolation_gaps``, ``chain_outside``) are chosen
   to maximise the mean whole-volume Dice over episodes (mean over k of the mean over
   structures), by running the real fusion code (:func:`~UniverSegLogic.core.prior.fused_probabilities`);
3. which feature set to use is decided the same way, on leave-one-case-out predictions (fit on
   the other validation cases, score on the held-out one), so a set that only fits is not chosen.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from UniverSegLogic.core.fill_between import fill_between_slices, labeled_only
from UniverSegLogic.core.metrics import dice
from UniverSegLogic.core.prior import FusionParams, LogisticRule, ShapePrior, fused_probabilities
from UniverSegLogic.core.slices import (
    evaluation_slices,
    extrapolation_slices,
    prediction_targets,
    slice_extent,
)

from .evaluate import EvalCase

#: Candidate feature sets (name -> features) for the rule inside the painted range.
INSIDE_SETS: Dict[str, List[str]] = {
    "sdf_gap": ["model", "sdf_n", "gap", "model*gap", "sdf_n*gap", "gap_r", "sdf_n*gap_r"],
    "sdf_fbs": [
        "model",
        "sdf_n",
        "fbs_n",
        "gap",
        "model*gap",
        "sdf_n*gap",
        "fbs_n*gap",
        "gap_r",
        "sdf_n*gap_r",
    ],
    "sdf_fbs_nb": [
        "model",
        "model_nb",
        "sdf_n",
        "fbs_n",
        "gap",
        "model*gap",
        "sdf_n*gap",
        "fbs_n*gap",
        "gap_r",
        "sdf_n*gap_r",
    ],
}
#: Candidate feature sets for the rule beyond the painted range.
OUTSIDE_SETS: Dict[str, List[str]] = {
    "model": ["model"],
    "model_nb": ["model", "model_nb"],
    "model_end_nb": ["model", "model_nb", "end_n", "beyond", "model*beyond", "end_n*beyond"],
}
CALIBRATION_KS = (2, 3, 5, 8)
#: Logits are cached this many typical gaps beyond each painted end.
EXTRAPOLATION_GAPS_MAX = 1.5


@dataclass
class Episode:
    """Cached raw material of one (structure, k): all in the canonical slice frame."""

    case: str
    structure: str
    k: int
    spacing: Tuple[float, float, float]
    truth: np.ndarray  # (slices, rows, cols) bool
    labeled: List[int]
    logits: Dict[int, np.ndarray]  # target -> float32 logit
    fbs: Optional[np.ndarray]  # Fill between slices on the stack (bool) or None

    @property
    def painted(self) -> np.ndarray:
        return labeled_only(self.truth, self.labeled, 0)

    @property
    def name(self) -> str:
        return f"{self.case}/{self.structure}"

    def save(self, path: str) -> None:
        ts = sorted(self.logits)
        np.savez_compressed(
            path,
            truth=np.packbits(self.truth),
            shape=np.array(self.truth.shape),
            labeled=np.array(self.labeled),
            spacing=np.array(self.spacing),
            targets=np.array(ts, dtype=np.int64),
            logits=np.stack([self.logits[t] for t in ts]).astype(np.float16)
            if ts
            else np.zeros((0,) + self.truth.shape[1:], np.float16),
            fbs=np.packbits(self.fbs) if self.fbs is not None else np.zeros(0, np.uint8),
            meta=np.array(
                json.dumps({"case": self.case, "structure": self.structure, "k": self.k})
            ),
        )

    @classmethod
    def load(cls, path: str) -> Episode:
        z = np.load(path)
        shape = tuple(int(s) for s in z["shape"])
        size = int(np.prod(shape))
        meta = json.loads(str(z["meta"]))
        truth = np.unpackbits(z["truth"])[:size].reshape(shape).astype(bool)
        fbs = np.unpackbits(z["fbs"])[:size].reshape(shape).astype(bool) if z["fbs"].size else None
        logits = {int(t): z["logits"][i].astype(np.float32) for i, t in enumerate(z["targets"])}
        return cls(
            meta["case"],
            meta["structure"],
            int(meta["k"]),
            tuple(float(s) for s in z["spacing"]),
            truth,
            [int(i) for i in z["labeled"]],
            logits,
            fbs,
        )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def weights_key(path: str) -> str:
    """Short content hash of a weights file (cache key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def build_episodes(
    cases: Sequence[EvalCase],
    engine,
    cache_dir: Optional[str],
    ks: Sequence[int] = CALIBRATION_KS,
    axis: int = 0,
    support_size: int = 2,
    log: Optional[Callable[[str], None]] = None,
) -> List[Episode]:
    """Episodes of every structure of ``cases`` for every k (network run once, then cached)."""
    from UniverSegLogic.core.propagator import PropagationOptions, Propagator, SegmentInput

    out = []
    sessions: Dict[int, Propagator] = {}  # one session per case image
    for c in cases:
        for m in c.masks:
            ext = slice_extent(m.mask, axis)
            for k in ks:
                path = None
                if cache_dir:
                    os.makedirs(cache_dir, exist_ok=True)
                    path = os.path.join(
                        cache_dir,
                        f"{_safe(c.name)}__{_safe(m.name)}__a{axis}_k{k}_s{support_size}.npz",
                    )
                    if os.path.exists(path):
                        out.append(Episode.load(path))
                        continue
                t0 = time.perf_counter()
                labeled = evaluation_slices(ext[0], ext[1], k)
                painted = labeled_only(m.mask, labeled, axis)
                opts = PropagationOptions(axis=axis, support_size=support_size, use_prior=False)
                session = sessions.get(id(c))
                if session is None:
                    session = sessions[id(c)] = Propagator(c.image, opts, engine=engine)
                extra = extrapolation_slices(labeled, session.n_slices, EXTRAPOLATION_GAPS_MAX)
                plan, logits = session.network_logits(
                    SegmentInput(m.name, m.name, painted, labeled), extra
                )
                frame = session.frame
                truth = np.ascontiguousarray(frame.to_frame(m.mask))
                fbs = np.ascontiguousarray(
                    fill_between_slices(plan.mask_stack, labeled, 0, frame.spacing)
                )
                ep = Episode(
                    c.name,
                    m.name,
                    int(k),
                    tuple(frame.spacing),
                    truth,
                    list(labeled),
                    logits,
                    fbs,
                )
                if path:
                    ep.save(path)
                if log:
                    log(
                        f"episode {ep.name} k={k}: {len(logits)} slices "
                        f"{time.perf_counter() - t0:.1f} s"
                    )
                out.append(ep)
    return out


# ------------------------------------------------------------------------------ scoring


class _EpisodeLogits:
    """The cached network, as :func:`~UniverSegLogic.core.prior.fused_probabilities` wants it."""

    def __init__(self, ep: Episode):
        self.ep = ep

    def __call__(self, targets: Iterable[int]) -> Dict[int, np.ndarray]:
        return {t: self.ep.logits[t] for t in targets if t in self.ep.logits}


def _prior(ep: Episode, uses_fbs: bool, priors: Optional[Dict] = None) -> ShapePrior:
    key = (id(ep), uses_fbs)
    if priors is not None and key in priors:
        return priors[key]
    p = ShapePrior(ep.painted, ep.labeled, ep.spacing, ep.fbs if uses_fbs else None)
    if priors is not None:
        priors[key] = p
    return p


def predict_episode(
    ep: Episode, fusion: FusionParams, priors: Optional[Dict] = None, refine=None
) -> np.ndarray:
    """The fused segmentation (canonical stack) of an episode: what propagate would return
    (``refine``: a learned fusion on the episode's canvas, :mod:`~UniverSegLogic.core.fusion_net`)."""
    prior = _prior(ep, fusion.uses_fbs(), priors)
    n = ep.truth.shape[0]
    extra = extrapolation_slices(
        ep.labeled, n, min(fusion.extrapolation_gaps, EXTRAPOLATION_GAPS_MAX)
    )
    ends = (bool(prior.masks[ep.labeled[0]].any()), bool(prior.masks[ep.labeled[-1]].any()))
    targets = prediction_targets(n, ep.labeled, ends, extra)
    probs = fused_probabilities(prior, fusion, targets, _EpisodeLogits(ep), refine=refine)
    out = np.zeros(ep.truth.shape, dtype=bool)
    for t, p in probs.items():
        out[t] = p >= 0.5
    out[ep.labeled] = prior.masks[ep.labeled]
    return out


def score(
    episodes: Sequence[Episode], fusion: FusionParams, priors: Optional[Dict] = None
) -> Dict[int, float]:
    """Mean whole-volume Dice per k."""
    per_k: Dict[int, List[float]] = {}
    for ep in episodes:
        per_k.setdefault(ep.k, []).append(dice(predict_episode(ep, fusion, priors), ep.truth))
    return {k: float(np.mean(v)) for k, v in sorted(per_k.items())}


def objective(per_k: Dict[int, float]) -> float:
    return float(np.mean(list(per_k.values()))) if per_k else 0.0


# ------------------------------------------------------------------------------ fitting


def _roi(*masks: np.ndarray, margin: int = 4) -> Tuple[slice, slice]:
    m = np.zeros_like(masks[0], dtype=bool)
    for x in masks:
        m |= x
    if not m.any():
        return slice(0, 0), slice(0, 0)
    r = np.flatnonzero(m.any(1))
    c = np.flatnonzero(m.any(0))
    return (
        slice(max(0, r[0] - margin), r[-1] + margin + 1),
        slice(max(0, c[0] - margin), c[-1] + margin + 1),
    )


def pixel_samples(
    episodes: Sequence[Episode],
    region: str,
    features: Sequence[str],
    extrapolation_gaps: float = 1.0,
    per_slice: int = 1000,
    rest: int = 100,
    seed: int = 0,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, weight) pixel samples of every target slice of ``region``
    ("inside"/"outside"; outside: at most ``extrapolation_gaps`` typical gaps beyond the ends).

    Pixels near the structure (a box around the truth, the network's and the prior's foreground)
    are sampled up to ``per_slice``; ``rest`` other pixels stand for the remainder (weighted), so
    that weighted sums estimate whole-slice sums."""
    rng = np.random.default_rng(seed)
    uses_fbs = any("fbs" in f for f in features)
    xs, ys, ws = [], [], []
    for ep in episodes:
        prior = ShapePrior(ep.painted, ep.labeled, ep.spacing, ep.fbs if uses_fbs else None)
        lim = extrapolation_gaps * prior.gap
        for t, lg in ep.logits.items():
            reg, feats = prior.features(t, lg, ep.logits)
            if reg != region:
                continue
            if region == "outside" and abs(t - prior.end_of(t)) > lim:
                continue
            near = [ep.truth[t], lg > 0]
            if region == "inside":
                near.append(feats.get("sdf_n") < 0.5)
            else:
                near.append(prior.masks[prior.end_of(t)])
            rs, cs = _roi(*near)
            inroi = np.zeros(lg.shape, dtype=bool)
            inroi[rs, cs] = True
            X = feats.matrix(features)
            y = ep.truth[t].reshape(-1)
            flat = inroi.reshape(-1)
            idx_in = np.flatnonzero(flat)
            idx_out = np.flatnonzero(~flat)
            for idx, cap in ((idx_in, per_slice), (idx_out, rest)):
                if len(idx) == 0:
                    continue
                pick = idx if len(idx) <= cap else rng.choice(idx, cap, replace=False)
                xs.append(X[pick])
                ys.append(y[pick])
                ws.append(np.full(len(pick), len(idx) / len(pick), np.float32))
    if not xs:
        return (
            np.zeros((0, len(features)), np.float32),
            np.zeros(0, bool),
            np.zeros(0, np.float32),
        )
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


def fit_logistic(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float = 1e-3, balance: bool = False
) -> Tuple[np.ndarray, float]:
    """Weighted L2-regularised logistic regression (LBFGS); returns (weights, bias).

    With ``balance`` the classes carry equal total weight (off by default: measured worse for
    Dice than the natural weighting of the sampled pixels, whose bias is tuned afterwards)."""
    import torch

    if len(y) == 0:
        return np.zeros(X.shape[1]), 0.0
    w = w.astype(np.float64).copy()
    if balance and y.any() and (~y).any():
        w[y] *= 0.5 * w.sum() / w[y].sum()
        w[~y] *= 0.5 * w.sum() / w[~y].sum()
    w /= w.mean()
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Xt = torch.tensor((X - mu) / sd, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    wt = torch.tensor(w, dtype=torch.float64)
    beta = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b0 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta, b0], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = Xt @ beta + b0
        loss = (
            wt * torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="none")
        ).mean() + l2 * (beta**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    b = beta.detach().numpy() / sd
    bias = float(b0.detach().numpy()[0] - (mu / sd) @ beta.detach().numpy())
    return b, bias


def fit_rules(
    episodes: Sequence[Episode], inside_set: str, outside_set: str, extrapolation_gaps: float = 1.0
) -> FusionParams:
    """Logistic rules fitted on ``episodes`` (their biases and the extent are tuned afterwards by
    :func:`tune`); with Fill-between-slices features, also the fallback rule without them."""
    fi, fo = INSIDE_SETS[inside_set], OUTSIDE_SETS[outside_set]

    def rule(region: str, feats: List[str]) -> LogisticRule:
        w, b = fit_logistic(*pixel_samples(episodes, region, feats, extrapolation_gaps))
        return LogisticRule(list(feats), [float(v) for v in w], b)

    fallback = [f for f in fi if "fbs" not in f]
    return FusionParams(
        inside=rule("inside", fi),
        inside_no_fbs=rule("inside", fallback) if len(fallback) < len(fi) else None,
        outside=rule("outside", fo),
        extrapolation_gaps=extrapolation_gaps,
    )


def tune(
    episodes: Sequence[Episode],
    params: FusionParams,
    bias_steps: Sequence[float] = (-2.0, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 2.0),
    gaps: Sequence[float] = (0.25, 0.35, 0.5, 0.65, 0.75, 1.0, 1.5),
    rounds: int = 3,
    log: Optional[Callable[[str], None]] = None,
) -> Tuple[FusionParams, Dict[int, float]]:
    """Coordinate search (``rounds`` passes, until nothing improves) over the inside bias, the
    extent rule and the outside bias, maximising :func:`objective` of :func:`score`; then the
    bias of the no-Fill-between-slices fallback rule the same way."""
    priors: Dict = {}

    def search(start: FusionParams, moves) -> Tuple[FusionParams, Dict[int, float]]:
        best, best_score = start, score(episodes, start, priors)
        for _ in range(rounds):
            improved = False
            for what, candidates in moves:
                base = best
                for label, cand in candidates(base):
                    s = score(episodes, cand, priors)
                    if objective(s) > objective(best_score) + 1e-5:
                        best, best_score, improved = cand, s, True
                        if log:
                            log(
                                f"  tune {what} {label}: {objective(s):.4f} "
                                + " ".join(f"k{k}={v:.3f}" for k, v in s.items())
                            )
            if not improved:
                break
        return best, best_score

    def inside_bias(base):
        return [
            (f"{d:+}", replace(base, inside=replace(base.inside, bias=base.inside.bias + d)))
            for d in bias_steps
        ]

    def outside_bias(base):
        return [
            (f"{d:+}", replace(base, outside=replace(base.outside, bias=base.outside.bias + d)))
            for d in bias_steps
        ]

    def extent_rule(base):
        return [
            (f"{g} chain={c}", replace(base, extrapolation_gaps=g, chain_outside=c))
            for g in gaps
            for c in (True, False)
            if (g, c) != (base.extrapolation_gaps, base.chain_outside)
        ]

    best, best_score = search(
        params,
        [("inside bias", inside_bias), ("extent", extent_rule), ("outside bias", outside_bias)],
    )
    if best.inside_no_fbs is not None:  # the fallback gets its own inside bias
        nofbs, _ = search(
            replace(best, inside=best.inside_no_fbs, inside_no_fbs=None),
            [("fallback inside bias", inside_bias)],
        )
        best = replace(best, inside_no_fbs=nofbs.inside)
    return best, best_score


def calibrate(
    episodes: Sequence[Episode],
    log: Optional[Callable[[str], None]] = None,
    inside_sets: Optional[Sequence[str]] = None,
    outside_sets: Optional[Sequence[str]] = None,
) -> Tuple[FusionParams, Dict]:
    """Choose feature sets on leave-one-case-out scores, then fit and tune on all episodes.

    Returns the parameters and a report (per-candidate cross-validated scores)."""
    cases = sorted({ep.case for ep in episodes})
    inside_sets = list(inside_sets or INSIDE_SETS)
    outside_sets = list(outside_sets or OUTSIDE_SETS)
    per_k: Dict[int, List[float]] = {}
    for ep in episodes:
        if ep.fbs is not None:
            per_k.setdefault(ep.k, []).append(dice(ep.fbs, ep.truth))
    report: Dict = {
        "cases": cases,
        "episodes": len(episodes),
        "candidates": {},
        "fill_between_slices": {k: float(np.mean(v)) for k, v in sorted(per_k.items())},
    }
    best_key, best_obj = None, -1.0
    for i_set in inside_sets:
        for o_set in outside_sets:
            key = f"{i_set}+{o_set}"
            held: Dict[int, List[float]] = {}
            for c in cases if len(cases) > 1 else []:
                train = [e for e in episodes if e.case != c]
                test = [e for e in episodes if e.case == c]
                p, _ = tune(train, fit_rules(train, i_set, o_set))
                for k, v in score(test, p).items():
                    held.setdefault(k, []).extend([v] * sum(1 for e in test if e.k == k))
            cv = {k: float(np.mean(v)) for k, v in sorted(held.items())}
            report["candidates"][key] = cv
            obj = objective(cv) if cv else 0.0
            if log:
                log(
                    f"{key:<22} leave-one-case-out "
                    + " ".join(f"k{k}={v:.3f}" for k, v in cv.items())
                    + f"  mean {obj:.4f}"
                )
            if best_key is None or obj > best_obj:
                best_key, best_obj = key, obj
    i_set, o_set = best_key.split("+")
    params, fitted = tune(episodes, fit_rules(episodes, i_set, o_set), log=log)
    params.source = (
        f"calibrated on {len(episodes)} episodes of {len(cases)} validation cases "
        f"({', '.join(cases)}); features {best_key}"
    )
    report.update({"chosen": best_key, "in_sample": fitted})
    return params, report
