"""Training and choosing the learned fusion (:mod:`UniverSegLogic.core.fusion_net`) on the CPU.

Training (:func:`train`): the samples of :mod:`UniverSegResearch.fusion_data` (training volumes
only), batches drawn by a generator seeded with ``(seed, step)`` -- so a run resumed from a
checkpoint takes exactly the batches an uninterrupted run takes --, random 90-degree rotations and
flips of each sample and, inside the painted range, swapping the two bracketing slices (``w`` ->
``1 - w``); loss: binary cross-entropy of ``base + correction`` against the truth on the canvas.
One thread, ``torch.use_deterministic_algorithms``: the same seed and samples give bit-identical
weights. A checkpoint (weights, optimizer, step) is written every ``every`` steps; a run finds
its last one and goes on from there.

Choosing (:func:`select`): every checkpoint is scored on the validation episodes of the
calibration (24 structures x k = 2, 3, 5, 8; the evaluation protocol) with the real fusion code
(:func:`UniverSegResearch.calibrate.score` with the net as ``refine``), then the extent beyond the
painted range for the best one. Only validation is looked at; the unseen chest CT never is.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

Log = Callable[[str], None]
WARMUP = 200
MIN_LR_FRACTION = 0.05
WEIGHT_DECAY = 1e-4
#: Extents (typical gaps beyond the painted range) tried for the chosen checkpoint.
EXTENT_CHOICES = (0.35, 0.5, 0.75, 1.0)


# ------------------------------------------------------------------------------ training


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over :data:`WARMUP` steps, then cosine down to 5 % of ``peak``."""
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    f = (step - WARMUP) / max(1, steps - WARMUP)
    return peak * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * f)))


def augment(x, s, y, g):
    """Random rot90 / flip per sample and, inside the painted range, a swap of the bracketing
    slices (``image_lo``/``image_hi``, ``label_lo``/``label_hi``, ``w`` -> ``1 - w``); ``g``: a
    seeded torch generator."""
    import torch

    from UniverSegLogic.core.fusion_net import MAP_CHANNELS, SCALAR_CHANNELS

    n = x.shape[0]
    rot = torch.randint(0, 4, (n,), generator=g)
    flip = torch.randint(0, 2, (n,), generator=g)
    swap = torch.randint(0, 2, (n,), generator=g)
    xs, ys = [], []
    for i in range(n):
        xi, yi = x[i], y[i]
        k = int(rot[i])
        if k:
            xi, yi = torch.rot90(xi, k, (1, 2)), torch.rot90(yi, k, (0, 1))
        if flip[i]:
            xi, yi = xi.flip(2), yi.flip(1)
        xs.append(xi)
        ys.append(yi)
    x, y = torch.stack(xs), torch.stack(ys)
    s = s.clone()
    inside = s[:, SCALAR_CHANNELS.index("inside")] > 0.5
    do = inside & (swap > 0)
    if do.any():
        pairs = [("image_lo", "image_hi"), ("label_lo", "label_hi")]
        for a, b in pairs:
            ia, ib = MAP_CHANNELS.index(a), MAP_CHANNELS.index(b)
            xa = x[do, ia].clone()
            x[do, ia] = x[do, ib]
            x[do, ib] = xa
        iw = SCALAR_CHANNELS.index("w")
        s[do, iw] = 1.0 - s[do, iw]
    return x.contiguous(), s, y.contiguous()


def _inputs(x, s):
    import torch

    h, w = x.shape[2:]
    return torch.cat([x, s[:, :, None, None].expand(-1, -1, h, w)], 1).contiguous()


def _save_atomic(obj, path: str) -> None:
    import io

    import torch

    from UniverSegLogic.core.atomic import write_bytes

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def train(
    sample_dir: str,
    run_dir: str,
    steps: int = 6000,
    batch: int = 16,
    lr: float = 2e-3,
    widths: Sequence[int] = (12, 24, 48, 96),
    seed: int = 0,
    every: int = 500,
    log: Optional[Log] = None,
    sample_paths: Optional[Sequence[str]] = None,
    stop_at: Optional[int] = None,
    dice_weight: float = 1.0,
) -> str:
    """Train (or resume) the fusion net; returns the path of the last checkpoint. ``stop_at``:
    leave after that many steps (a later call resumes from the checkpoint written there)."""
    import torch
    from torch.nn import functional as F

    from UniverSegLogic.core.fusion_net import (
        CHANNELS,
        LOGIT_SCALE,
        MAP_CHANNELS,
        FusionNet,
        FusionUNet,
        fusion_net_from_state,
        parameter_count,
    )

    from .fusion_data import case_balanced_weights, dequantize, load_samples

    torch.use_deterministic_algorithms(True)
    paths = sorted(sample_paths or glob.glob(os.path.join(sample_dir, "*.npz")))
    if not paths:
        raise FileNotFoundError(f"no sample files in {sample_dir} (run 'fusion data' first)")
    data = load_samples(paths)
    X, S, Y = (torch.from_numpy(data[k]) for k in ("x", "s", "y"))
    weights = torch.from_numpy(case_balanced_weights(data["case"]))
    n = X.shape[0]
    config = {
        "samples": int(n),
        "sampling": "case-balanced (share ~ sqrt(samples of the case))",
        "loss": f"BCE + {float(dice_weight)} x (1 - soft Dice per sample)",
        "files": [os.path.relpath(p, os.path.dirname(os.path.dirname(p))) for p in paths],
        "steps": int(steps),
        "batch": int(batch),
        "lr": float(lr),
        "widths": [int(w) for w in widths],
        "seed": int(seed),
        "threads": int(torch.get_num_threads()),
    }
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(seed)
    model = FusionUNet(len(CHANNELS), widths)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    last = os.path.join(run_dir, "last.pt")
    start = 0
    history: List[Dict[str, float]] = []
    if os.path.exists(last):
        ck = torch.load(last, map_location="cpu", weights_only=True)
        if ck["config"] != config:
            raise ValueError(f"{last} was made with another configuration: {ck['config']}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = int(ck["step"])
        history = list(ck["history"])
        if log:
            log(f"resuming {run_dir} at step {start}")
    if log:
        log(
            f"{n} samples from {len(paths)} files; {parameter_count(model):,} parameters; "
            f"{steps} steps x {batch}, lr {lr}, seed {seed}, {torch.get_num_threads()} thread(s)"
        )
    ib = MAP_CHANNELS.index("base")
    t0, acc, acc_base, cnt = time.perf_counter(), 0.0, 0.0, 0
    model.train()
    end = steps if stop_at is None else min(steps, int(stop_at))
    for step in range(start, end):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + step)
        idx = torch.multinomial(weights, batch, replacement=True, generator=g)
        x, s, y = augment(dequantize(X[idx]), S[idx], Y[idx].float() / 255.0, g)
        base = x[:, ib] * LOGIT_SCALE
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        z = base + model(_inputs(x, s))[:, 0]
        loss = F.binary_cross_entropy_with_logits(z, y)
        if dice_weight:
            p = torch.sigmoid(z)
            inter = (p * y).sum((1, 2))
            soft = (2 * inter + 1.0) / (p.sum((1, 2)) + y.sum((1, 2)) + 1.0)
            loss = loss + dice_weight * (1.0 - soft.mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            acc += float(loss)
            pb = torch.sigmoid(base)
            base_loss = F.binary_cross_entropy_with_logits(base, y)
            if dice_weight:
                soft_b = (2 * (pb * y).sum((1, 2)) + 1.0) / (pb.sum((1, 2)) + y.sum((1, 2)) + 1.0)
                base_loss = base_loss + dice_weight * (1.0 - soft_b.mean())
            acc_base += float(base_loss)
            cnt += 1
        done = step + 1
        if done % every == 0 or done == end:
            history.append({"step": done, "loss": acc / cnt, "base_loss": acc_base / cnt})
            state = FusionNet(model, None, f"checkpoint {done} of {run_dir}").state()
            fusion_net_from_state(state)  # the file form loads back
            _save_atomic(state, os.path.join(run_dir, f"step_{done:06d}.pt"))
            _save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": done,
                    "config": config,
                    "history": history,
                },
                last,
            )
            if log:
                log(
                    f"step {done}: loss {acc / cnt:.4f} (logistic alone {acc_base / cnt:.4f}), "
                    f"lr {learning_rate(step, steps, lr):.2e}, "
                    f"{time.perf_counter() - t0:.0f} s"
                )
            acc, acc_base, cnt = 0.0, 0.0, 0
    if end == steps:
        with open(os.path.join(run_dir, "history.json"), "w", encoding="utf-8") as f:
            json.dump({"config": config, "history": history}, f, indent=1)
    return last


# ------------------------------------------------------------------------------ choosing


def validation_episodes(manifest: str, folder: str, engine, log: Optional[Log] = None):
    """The calibration's validation episodes (k = 2, 3, 5, 8; cached in ``folder``)."""
    from . import calibrate as cal
    from .evaluate import load_manifest

    cases = load_manifest(manifest, ["val"])
    return cases, cal.build_episodes(cases, engine, folder, cal.CALIBRATION_KS, 0, 2, log=log)


def refiners(cases, net, engine) -> Dict[str, object]:
    """{case name: LearnedFusion on that case's canvas} (axis 0, as the episodes)."""
    from UniverSegLogic.core.fusion_net import LearnedFusion
    from UniverSegLogic.core.propagator import PropagationOptions, Propagator

    out = {}
    for c in cases:
        session = Propagator(
            c.image, PropagationOptions(axis=0, fusion_model="logistic"), engine=engine
        )
        out[c.name] = LearnedFusion(net, session.stack.canvas, session.stack.canvas_images)
    return out


def score_net(episodes, fusion, refine_by_case: Optional[Dict[str, object]]) -> Dict[int, float]:
    """Mean whole-volume Dice per k of the episodes (``refine_by_case`` None: logistic)."""
    from UniverSegLogic.core.metrics import dice

    from .calibrate import predict_episode

    per_k: Dict[int, List[float]] = {}
    for ep in episodes:
        refine = refine_by_case[ep.case] if refine_by_case else None
        per_k.setdefault(ep.k, []).append(
            dice(predict_episode(ep, fusion, refine=refine), ep.truth)
        )
    return {k: float(np.mean(v)) for k, v in sorted(per_k.items())}


def _fmt(s: Dict[int, float]) -> str:
    return (
        " ".join(f"k{k}={v:.4f}" for k, v in s.items()) + f"  mean {np.mean(list(s.values())):.4f}"
    )


def select(
    run_dir: str,
    manifest: str,
    episode_dir: str,
    steps: Optional[Sequence[int]] = None,
    out: Optional[str] = None,
    log: Log = print,
    weights: str = "starter",
) -> Dict[str, object]:
    """Score the checkpoints of ``run_dir`` on the validation episodes, then the extent for the
    best; write it to ``out`` (when given) with its scores. Returns the report."""
    from dataclasses import replace

    from UniverSegLogic.core.engines import EngineStore
    from UniverSegLogic.core.fusion_net import load_fusion_net, save_fusion_net
    from UniverSegLogic.core.prior import fusion_for

    engine = EngineStore().get(weights, "cpu").engine
    cases, episodes = validation_episodes(manifest, episode_dir, engine)
    fusion = fusion_for(weights)[0]
    report: Dict[str, object] = {"episodes": len(episodes), "checkpoints": {}}
    base = score_net(episodes, fusion, None)
    report["logistic"] = base
    log(f"logistic rule            {_fmt(base)}")
    files = sorted(glob.glob(os.path.join(run_dir, "step_*.pt")))
    if steps:
        files = [f for f in files if int(os.path.basename(f)[5:11]) in set(steps)]
    best = None
    for f in files:
        net = load_fusion_net(f)
        s = score_net(episodes, fusion, refiners(cases, net, engine))
        report["checkpoints"][os.path.basename(f)] = s
        log(f"{os.path.basename(f):<24} {_fmt(s)}")
        if best is None or np.mean(list(s.values())) > np.mean(list(best[1].values())):
            best = (f, s)
    if best is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    net = load_fusion_net(best[0])
    rf = refiners(cases, net, engine)
    extents = {}
    for g in EXTENT_CHOICES:
        s = (
            best[1]
            if g == fusion.extrapolation_gaps
            else score_net(episodes, replace(fusion, extrapolation_gaps=g), rf)
        )
        extents[g] = s
        log(f"  extent {g:<5} gaps        {_fmt(s)}")
    g_best = max(extents, key=lambda g: (np.mean(list(extents[g].values())), -g))
    report.update(
        {
            "chosen": os.path.basename(best[0]),
            "extents": {str(k): v for k, v in extents.items()},
            "extent": g_best,
            "validation": extents[g_best],
        }
    )
    log(f"chosen {os.path.basename(best[0])}, extent {g_best} gaps: {_fmt(extents[g_best])}")
    if out:
        hist = os.path.join(run_dir, "history.json")
        net.extrapolation_gaps = None if g_best == fusion.extrapolation_gaps else float(g_best)
        net.source = (
            f"{os.path.basename(best[0])} of {os.path.basename(run_dir)}, chosen on "
            f"{len(episodes)} validation episodes"
        )
        net.info = {
            "validation_dice": {str(k): round(v, 4) for k, v in extents[g_best].items()},
            "logistic_validation_dice": {str(k): round(v, 4) for k, v in base.items()},
        }
        if os.path.exists(hist):
            with open(hist, encoding="utf-8") as fh:
                net.info["training"] = json.load(fh)["config"]
        save_fusion_net(net, out)
        log(f"wrote {out}")
    return report


# ------------------------------------------------------------------------------ speed


def speed(
    shape=(200, 256, 256),
    fusion_model: str = "learned",
    repeats: int = 3,
    weights: str = "starter",
    json_path: Optional[str] = None,
    log: Log = print,
) -> Dict[str, object]:
    """Propagation time with the logistic rule and with the learned fusion, in the same process,
    alternating (``repeats`` times each; medians): the synthetic volume of the benchmark
    (:func:`UniverSegLogic.benchmark.speed.synthetic_volume`), one segment painted on 5 slices,
    a new session per run (image preparation included). ``shape="clinical"``: the clinical
    benchmark's 512x512x400 CT and its painting instead (right lung on 5 axial slices,
    :mod:`UniverSegLogic.benchmark.clinical`)."""
    import platform

    import torch

    from UniverSegLogic.benchmark.speed import synthetic_volume
    from UniverSegLogic.core.engines import EngineStore
    from UniverSegLogic.core.geometry import Volume
    from UniverSegLogic.core.metrics import dice
    from UniverSegLogic.core.propagator import PropagationOptions, Propagator, SegmentInput
    from UniverSegLogic.core.slices import nonempty_slices

    if shape == "clinical":
        from UniverSegLogic.benchmark import clinical

        volume, masks = clinical.build_case(clinical.CLINICAL_SHAPE, clinical.ONE_SEGMENT)
        mask = masks[clinical.ONE_SEGMENT[0]]
        picks, painted = clinical.painting(mask)
        picks = np.asarray(picks)
        shape = volume.array.shape
    else:
        img, mask = synthetic_volume(tuple(shape), 0)
        present = np.array(nonempty_slices(mask, 0))
        picks = present[np.linspace(0, len(present) - 1, 7).round().astype(int)[1:-1]]
        painted = np.zeros_like(mask)
        painted[picks] = mask[picks]
        volume = Volume(img, np.diag([1.0, 1.0, 1.0, 1.0]))
    engine = EngineStore().get(weights, "cpu").engine
    seg = [SegmentInput("s", "structure", painted)]

    def once(model: str):
        import gc

        gc.collect()
        t0 = time.perf_counter()
        session = Propagator(
            volume, PropagationOptions(axis=0, weights=weights, fusion_model=model), engine=engine
        )
        r = session.propagate(seg)
        return time.perf_counter() - t0, r

    once("logistic")  # warm-up: imports, Slicer's vtkITK, thread pools
    times: Dict[str, List[float]] = {"logistic": [], fusion_model: []}
    results = {}
    digests: Dict[str, List[str]] = {"logistic": [], fusion_model: []}
    for _ in range(int(repeats)):
        for model in ("logistic", fusion_model):
            sec, r = once(model)
            times[model].append(sec)
            results[model] = r
            m = np.packbits(r.segments[0].mask)
            digests[model].append(hashlib.sha256(m.tobytes()).hexdigest())
    med = {m: float(np.median(v)) for m, v in times.items()}
    out = {
        "shape_kji": [int(v) for v in shape],
        "labeled_slices": [int(p) for p in picks],
        "device": engine.device,
        "threads": int(torch.get_num_threads()),
        "machine": platform.processor() or platform.machine(),
        "seconds": times,
        "median_s": med,
        "ratio_learned_over_logistic": med[fusion_model] / med["logistic"],
        "predicted_slices": {m: len(r.segments[0].predicted_slices) for m, r in results.items()},
        "network_runs": {m: int(r.network_runs) for m, r in results.items()},
        "dice_vs_truth": {m: float(dice(r.segments[0].mask, mask)) for m, r in results.items()},
        "runs_identical": {m: len(set(d)) == 1 for m, d in digests.items()},
    }
    log(
        f"propagation {shape}: logistic {med['logistic']:.2f} s, {fusion_model} "
        f"{med[fusion_model]:.2f} s (x{out['ratio_learned_over_logistic']:.3f}); "
        f"predicted slices {out['predicted_slices']}; Dice {out['dice_vs_truth']}"
    )
    if json_path:
        from UniverSegLogic.core.atomic import write_text

        write_text(json_path, json.dumps(out, indent=1) + "\n")
    return out
