"""Fitting the slice-uncertainty model of :mod:`~UniverSegLogic.core.suggest` on validation
structures.

For every calibration episode (a validation structure painted on the evaluation's ``k`` slices,
:mod:`calibrate`; network logits cached on disk) the real fusion gives each predicted slice its
features (:func:`~UniverSegLogic.core.suggest.slice_features`) and its real error (voxels where the
prediction and the truth differ). Per region, the weights are the non-negative least-squares fit
of the error on the features. Beyond the predicted range, on each side whose end slice is painted,
the truth's area ``j`` slices past the outermost non-empty slice is compared with that slice's
area, and ``area ratio = first * exp(-(j - 1) / (reach * gap))`` is fitted by least squares
(``gap``: the typical gap between the painted slices, so the rule does not depend on the slice
thickness). The result is
printed as the constants of :mod:`~UniverSegLogic.core.suggest` and written as JSON.

Run (validation role only; the unseen chest CT is never used)::

    python -m UniverSegResearch.suggest_fit --cases .data/prepared/eval/manifest.json \\
        --json docs/results/session/uncertainty_fit.json
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from UniverSegLogic.core import suggest
from UniverSegLogic.core.prior import FusionParams, ShapePrior, fused_probabilities
from UniverSegLogic.core.slices import extrapolation_slices, prediction_targets

from . import calibrate as cal


def nnls(X: np.ndarray, y: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Non-negative least squares (Lawson-Hanson active set)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = X.shape[1]
    w = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(iterations):
        grad = X.T @ (y - X @ w)
        if passive.all() or np.max(np.where(passive, -np.inf, grad)) <= 1e-10:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, grad)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(X[:, passive], y, rcond=None)[0]
            if (z[passive] > 0).all():
                w = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(w[neg] / (w[neg] - z[neg] + 1e-300))
            w = w + alpha * (z - w)
            passive &= w > 1e-12
    return w


def fit_beyond(rows: Sequence[Dict]) -> Tuple[float, float]:
    """(first, reach) of ``area ratio = first * exp(-(j - 1) / (reach * gap))`` fitted by least
    squares (a grid over ``reach``, ``first`` in closed form)."""
    sel = [b for b in rows if b["area"] > 0]
    if not sel:
        return 0.0, 1.0
    y = np.array([b["truth"] / b["area"] for b in sel], dtype=np.float64)
    x = np.array([(b["j"] - 1) / max(1.0, b["gap"]) for b in sel], dtype=np.float64)
    best = None
    for reach in np.round(np.arange(0.02, 1.51, 0.02), 2):
        f = np.exp(-x / reach)
        first = float(max(0.0, (f @ y) / (f @ f)))
        sse = float(((first * f - y) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, first, float(reach))
    return round(best[1], 3), best[2]


def episode_rows(
    ep: cal.Episode, fusion: FusionParams, use_fbs: bool = True, refine=None
) -> Tuple[List[Dict], List[Dict]]:
    """(per predicted slice: region, features, error; per open side: areas beyond) of one
    episode, with the real fusion (``use_fbs`` False: as where vtkITK is missing; ``refine``: the
    learned fusion on the episode's canvas)."""
    fbs = ep.fbs if fusion.uses_fbs() and use_fbs else None
    prior = ShapePrior(ep.painted, ep.labeled, ep.spacing, fbs)
    n = ep.truth.shape[0]
    extra = extrapolation_slices(
        ep.labeled, n, min(fusion.extrapolation_gaps, cal.EXTRAPOLATION_GAPS_MAX)
    )
    ends = (bool(ep.painted[ep.labeled[0]].any()), bool(ep.painted[ep.labeled[-1]].any()))
    targets = prediction_targets(n, ep.labeled, ends, extra)
    probs = fused_probabilities(prior, fusion, targets, cal._EpisodeLogits(ep), refine=refine)
    rows = []
    for t, (region, feats) in suggest.slice_features(probs, ep.labeled, prior).items():
        err = int(np.count_nonzero((probs[t] >= 0.5) ^ ep.truth[t]))
        rows.append({"episode": ep.name, "k": ep.k, "t": t, "region": region, "err": err, **feats})
    areas = {t: int(np.count_nonzero(p >= 0.5)) for t, p in probs.items()}
    lab = ep.labeled
    for i in lab:
        areas[i] = int(np.count_nonzero(ep.painted[i]))
    beyond = []
    for end, step in ((lab[0], -1), (lab[-1], 1)):
        if areas[end] == 0:
            continue
        last = end
        while (last + step) in areas and areas[last + step] > 0 and (last + step) not in lab:
            last += step
        stopped = (last + step) in areas and (last + step) not in lab
        for j in range(1, 16):
            s = last + step * j
            if not 0 <= s < n:
                break
            beyond.append(
                {
                    "episode": ep.name,
                    "k": ep.k,
                    "case": "stopped" if stopped else "open",
                    "j": j,
                    "area": areas[last],
                    "gap": float(prior.gap),
                    "truth": int(np.count_nonzero(ep.truth[s])),
                }
            )
    return rows, beyond


def fit(
    episodes: Sequence[cal.Episode],
    fusion: FusionParams,
    refine_by_case: Optional[Dict[str, object]] = None,
) -> Dict:
    """The weights and beyond-range constants (and fit statistics) from ``episodes``
    (``refine_by_case``: {case: learned fusion} or None for the logistic rule)."""
    rows: List[Dict] = []
    beyond: List[Dict] = []
    for ep in episodes:
        refine = refine_by_case[ep.case] if refine_by_case else None
        r, b = episode_rows(ep, fusion, True, refine)
        rows += r
        beyond += b
        if fusion.uses_fbs():  # the fallback without Fill between slices: its inside rule
            rows += [
                x for x in episode_rows(ep, fusion, False, refine)[0] if x["region"] != "outside"
            ]
    weights: Dict[str, Dict[str, float]] = {}
    stats: Dict[str, Dict[str, float]] = {}
    for region in sorted({r["region"] for r in rows}):
        sel = [r for r in rows if r["region"] == region]
        names = sorted(k for k in sel[0] if k not in ("episode", "k", "t", "region", "err"))
        X = np.array([[r[k] for k in names] for r in sel], dtype=np.float64)
        y = np.array([r["err"] for r in sel], dtype=np.float64)
        w = nnls(X, y)
        pred = X @ w
        weights[region] = {k: round(float(v), 3) for k, v in zip(names, w)}
        stats[region] = {
            "slices": len(sel),
            "correlation": float(np.corrcoef(pred, y)[0, 1]) if len(sel) > 2 else float("nan"),
            "error_voxels": float(y.sum()),
            "predicted_voxels": float(pred.sum()),
        }
    # regions a propagation without a prior uses: the margin alone, per inside/outside
    for region, source in (("inside_no_prior", "inside"), ("outside_no_prior", "outside")):
        sel = [r for r in rows if r["region"] == source]
        if sel:
            e = np.array([r["margin"] for r in sel])
            y = np.array([r["err"] for r in sel], dtype=np.float64)
            weights[region] = {"margin": round(float(y.sum() / max(e.sum(), 1e-9)), 3)}
    beyond_fit: Dict[str, Tuple[float, float]] = {}
    for case in ("open", "stopped"):
        sel = [b for b in beyond if b["case"] == case and b["area"] > 0]
        if not sel:
            continue
        beyond_fit[case] = fit_beyond(sel)
        ratio = {}
        for j in range(1, 7):
            bj = [b for b in sel if b["j"] == j]
            if bj:
                ratio[f"ratio_j{j}"] = round(
                    sum(b["truth"] for b in bj) / max(1, sum(b["area"] for b in bj)), 4
                )
        stats[f"beyond_{case}"] = {"sides": sum(1 for b in sel if b["j"] == 1), **ratio}
    return {"weights": weights, "beyond": beyond_fit, "stats": stats, "episodes": len(episodes)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", required=True, help="evaluation manifest")
    p.add_argument("--roles", default="val")
    p.add_argument("--weights", default="starter")
    p.add_argument("--fusion", default=None, help="fusion JSON (default: shipped)")
    p.add_argument(
        "--fusion-model",
        default="auto",
        help="auto, learned, logistic or a learned-fusion .pt (default auto: the shipped one)",
    )
    p.add_argument("--cache", default=os.path.join(".data", "calibration"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from UniverSegLogic.core.engines import EngineStore
    from UniverSegLogic.core.prior import fusion_for
    from UniverSegLogic.core.weights import load_weights

    from .evaluate import load_manifest

    cases = load_manifest(args.cases, [r for r in args.roles.split(",") if r])
    w = load_weights(args.weights)
    engine = EngineStore().get(args.weights, "cpu").engine
    episodes = cal.build_episodes(
        cases, engine, os.path.join(args.cache, cal.weights_key(w.path)), log=print
    )
    fusion = FusionParams.load(args.fusion) if args.fusion else fusion_for(args.weights)[0]
    from dataclasses import replace

    from UniverSegLogic.core.fusion_net import describe, fusion_net_for

    from .fusion_train import refiners

    net, _ = fusion_net_for(args.weights, args.fusion_model)
    if net is not None and net.extrapolation_gaps is not None:
        fusion = replace(fusion, extrapolation_gaps=net.extrapolation_gaps)
    result = fit(episodes, fusion, refiners(cases, net, engine) if net is not None else None)
    result["fusion_model"] = describe(net)
    print("WEIGHTS =", json.dumps(result["weights"], indent=1))
    print("BEYOND =", result["beyond"])
    print(json.dumps(result["stats"], indent=1))
    if args.json:
        from UniverSegLogic.core.atomic import write_text

        result["cases"] = sorted({c.name for c in cases})
        result["fusion"] = fusion.source
        write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
