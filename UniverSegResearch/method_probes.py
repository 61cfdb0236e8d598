"""Probes of ways to raise the Dice at small k without training, on the validation role only.

Two kinds, both printed as tables (``docs/results/evaluation/probes_log.txt``):

* **Extent rule probes** on the calibration episodes (cached network logits, the shipped fusion;
  mean whole-volume Dice per validation case and k): the shipped rule; a wider extrapolation
  (0.5 / 0.75 / 1.0 typical gaps instead of 0.35); the oracle extent (the network beyond the
  painted range exactly on the slices where the truth is non-empty: an upper bound for any extent
  rule); a confidence-gated extension (past 0.35 gaps, go on up to 1.5 gaps while the chained
  prediction's mean probability on its foreground stays >= tau); copy-on-stop (where the chain
  comes out empty before its limit, copy the previous slice instead).
* **Network probes** (the real engine, k = 2 evaluation slices, bracketing support of 2, every
  slice inside the painted range and up to 3 beyond): voxels wrong per variant -- the plain
  network; test-time flips (target and support mirrored left-right, and also up-down, logits
  averaged); mirrored support copies (``PropagationOptions.flips``); and, beyond the painted
  range only, an in-context cascade (each slice outwards gets the previous slice's prediction as a
  third support item, as in In-context Cascade Segmentation).

Run::

    python -m UniverSegResearch.method_probes --cases .data/prepared/eval/manifest.json
"""

from __future__ import annotations

import argparse
import collections
import os
from dataclasses import replace
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from UniverSegLogic.core import prior as P
from UniverSegLogic.core.metrics import dice
from UniverSegLogic.core.slices import (
    evaluation_slices,
    extrapolation_slices,
    prediction_targets,
    slice_extent,
)

from . import calibrate as cal


def _fused(ep: cal.Episode, fusion: P.FusionParams, outside: Callable) -> np.ndarray:
    """The episode's segmentation: the shipped inside fusion, ``outside(prior, end, side, lg)``
    -> {slice: probability} beyond each end."""
    prior = P.ShapePrior(ep.painted, ep.labeled, ep.spacing, ep.fbs)
    n = ep.truth.shape[0]
    far = extrapolation_slices(ep.labeled, n, cal.EXTRAPOLATION_GAPS_MAX)
    targets = prediction_targets(n, ep.labeled, (True, True), far)
    net = cal._EpisodeLogits(ep)
    probs: Dict[int, np.ndarray] = {}
    for _lo, _hi, ts in P.gaps_of(ep.labeled, targets):
        probs.update(P.fuse_gap(prior, fusion, net(ts)))
    lab = ep.labeled
    for end, side in (
        (lab[0], sorted((t for t in targets if t < lab[0]), reverse=True)),
        (lab[-1], sorted(t for t in targets if t > lab[-1])),
    ):
        probs.update(outside(prior, end, side, net(side)))
    out = np.zeros(ep.truth.shape, dtype=bool)
    for t, p in probs.items():
        out[t] = p >= 0.5
    out[lab] = ep.painted[lab]
    return out


def _gated(fusion: P.FusionParams, tau: float, copy_on_stop: bool = False) -> Callable:
    def outside(prior, end, side, lg):
        base = extrapolation_slices(prior.labeled, prior.masks.shape[0], fusion.extrapolation_gaps)
        chain = P.OutsideChain(prior, fusion, end)
        prev = np.asarray(prior.masks[end], bool)
        out = {}
        for t in side:
            if t not in lg:
                break
            beyond_limit = abs(t - end) > base
            if beyond_limit and tau > 1.0:
                break
            p = chain.push(t, lg[t], lg)
            m = p >= 0.5
            if not m.any():
                if copy_on_stop and not beyond_limit and prev.any():
                    out[t] = prev.astype(np.float32)
                    chain.stopped, chain.prev = False, prev
                    continue
                break
            if beyond_limit and float(p[m].mean()) < tau:
                break
            out[t], prev = p, m
        return out

    return outside


def episode_probes(episodes: Sequence[cal.Episode], fusion: P.FusionParams, log=print) -> None:
    """Mean Dice per (validation case, k) of each extent-rule variant."""
    variants = [("shipped (0.35 gaps, chain)", lambda ep: cal.predict_episode(ep, fusion))]
    for g in (0.5, 0.75, 1.0):
        f = replace(fusion, extrapolation_gaps=g)
        variants.append((f"extrapolate {g} gaps", lambda ep, f=f: cal.predict_episode(ep, f)))

    def oracle(ep):
        seg = cal.predict_episode(ep, fusion)
        lab = ep.labeled
        for t, lg in ep.logits.items():
            if t < lab[0] or t > lab[-1]:
                seg[t] = (lg > 0) & ep.truth[t].any()
        return seg

    variants.append(("oracle extent (network)", oracle))
    for tau in (0.8, 0.9):
        variants.append(
            (f"gated extension tau={tau}", lambda ep, t=tau: _fused(ep, fusion, _gated(fusion, t)))
        )
    variants.append(
        ("copy on stop", lambda ep: _fused(ep, fusion, _gated(fusion, 2.0, copy_on_stop=True)))
    )
    keys = sorted({(ep.case, ep.k) for ep in episodes})
    log(f"{'variant':<28} " + " ".join(f"{c[:6]}{k:<2}" for c, k in keys))
    for name, fn in variants:
        per = collections.defaultdict(list)
        for ep in episodes:
            per[(ep.case, ep.k)].append(dice(fn(ep), ep.truth))
        log(f"{name:<28} " + " ".join(f"{np.mean(per[key]):>8.3f}" for key in keys))


def network_probes(cases, engine, k: int = 2, beyond: int = 3, log=print) -> None:
    """Voxels wrong (inside / beyond the painted range) of the network variants."""
    import torch

    from UniverSegLogic.core.propagator import _ImageStack
    from UniverSegLogic.core.support import select_support

    acc = collections.defaultdict(lambda: np.zeros(6))
    for c in cases:
        st = _ImageStack(c.image, 0)
        for m in c.masks:
            truth = st.frame.to_frame(m.mask)
            z0, z1 = slice_extent(m.mask, 0)
            lab = evaluation_slices(z0, z1, k)
            ts = [
                t
                for t in range(max(0, lab[0] - beyond), min(st.n, lab[-1] + beyond + 1))
                if t not in lab
            ]
            groups = collections.defaultdict(list)
            for t in ts:
                groups[select_support(t, lab, 2)].append(t)
            for sup, group in groups.items():
                si, sl = st.canvas_images(list(sup)), st.canvas_masks(truth, list(sup))
                x = st.canvas_images(group)
                base = engine.logits(x, si, sl)
                lr = engine.logits(x.flip(-1), si.flip(-1), sl.flip(-1)).flip(-1)
                ud = engine.logits(x.flip(-2), si.flip(-2), sl.flip(-2)).flip(-2)
                mirrored = engine.logits(
                    x, torch.cat([si, si.flip(-1)]), torch.cat([sl, sl.flip(-1)])
                )
                variants = [base, (base + lr) / 2, (base + lr + ud) / 3, mirrored]
                native = [
                    st.canvas.from_canvas(v).numpy().reshape((len(group),) + truth.shape[1:])
                    for v in variants
                ]
                for i, t in enumerate(group):
                    where = "inside" if lab[0] < t < lab[-1] else "beyond"
                    errs = [np.count_nonzero((v[i] > 0) ^ truth[t]) for v in native]
                    acc[(c.name, where)][:4] += errs
            # cascade beyond each end: the previous slice's prediction joins the support
            for end, nxt, step in (
                (lab[0], lab[min(1, len(lab) - 1)], -1),
                (lab[-1], lab[-2 if len(lab) > 1 else -1], 1),
            ):
                masks = {end: truth[end]}
                for j in range(1, beyond + 1):
                    t = end + step * j
                    if not 0 <= t < st.n:
                        break
                    sup = sorted({end, nxt})
                    prev = t - step
                    idx = ([prev] if prev != end else []) + sup
                    labs = [masks[prev]] if prev != end else []
                    labs += [truth[i] for i in sup]
                    lt = st.canvas.mask_to_canvas(
                        torch.from_numpy(np.stack(labs).astype(np.float32))
                    )
                    out = engine.logits(st.canvas_images([t]), st.canvas_images(idx), lt)
                    pred = st.canvas.from_canvas(out).numpy().reshape(truth.shape[1:]) > 0
                    masks[t] = pred
                    acc[(c.name, "beyond")][4] += np.count_nonzero(pred ^ truth[t])
                    acc[(c.name, "beyond")][5] += 1
        log(f"  {c.name}: done")
    log(
        f"{'case/region':<34} {'plain':>8} {'TTA LR':>8} {'TTA LRUD':>8} {'mirrored':>8} "
        f"{'cascade':>8}"
    )
    for key in sorted(acc):
        a = acc[key]
        cascade = f"{int(a[4]):>8}" if key[1] == "beyond" else f"{'-':>8}"
        log(
            f"{key[0] + '/' + key[1]:<34} "
            + " ".join(f"{int(v):>8}" for v in a[:4])
            + f" {cascade}"
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", required=True)
    p.add_argument("--roles", default="val")
    p.add_argument("--weights", default="starter")
    p.add_argument("--cache", default=os.path.join(".data", "calibration"))
    p.add_argument("--skip-network", action="store_true")
    args = p.parse_args(argv)
    from UniverSegLogic.core.engines import EngineStore
    from UniverSegLogic.core.weights import load_weights

    from .evaluate import load_manifest

    cases = load_manifest(args.cases, [r for r in args.roles.split(",") if r])
    engine = EngineStore().get(args.weights, "cpu").engine
    w = load_weights(args.weights)
    episodes = cal.build_episodes(cases, engine, os.path.join(args.cache, cal.weights_key(w.path)))
    fusion = P.fusion_for(args.weights)[0]
    print("== extent-rule probes: mean Dice per validation case and k (calibration episodes)")
    episode_probes(episodes, fusion)
    if not args.skip_network:
        print("== network probes: voxels wrong, k=2, inside / up to 3 slices beyond")
        network_probes(cases, engine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
