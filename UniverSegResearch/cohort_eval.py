"""Cohort labeling against atlas registration, on pairs of different scans with ground truth.

``universeg-slicer evaluate --cohort`` takes two labeled scans (by default the two TotalSegmentator
CT training cases ``ts_ct_abdomen`` and ``ts_ct_dicom``; never a held-out case) and, in both
directions, uses one as the labeled *reference* and segments the other (the *target*) with

* ``ours``: what ``universeg-slicer cohort`` does by default -- the reference aligned onto the
  target by its body extent (:func:`~UniverSegLogic.cohort.align.align_reference`,
  ``extent``), then the :class:`~UniverSegLogic.core.propagator.Propagator` with the aligned
  reference as its only support (:func:`~UniverSegLogic.cohort.case.segment_masks`, the very
  function a cohort worker runs);
* ``atlas``: the classical anchor -- SimpleITK affine + B-spline registration of the reference
  onto the target (``register(kind="deformable")``), the reference labels warped by nearest
  neighbour;
* ``ours_affine``: ours after an affine registration (``align=affine``) instead of the extent;
* ``atlas_affine`` (diagnostic): the labels warped by the affine registration alone, to show what
  the B-spline stage adds.

Each structure is scored by Dice (:func:`UniverSegLogic.core.metrics.dice`) against the target's
own ground truth on the target grid. Each (pair, method) is timed as one case: the wall time of
alignment + propagation (ours) or registration + warping (atlas), one thread for PyTorch and for
SimpleITK, the weights loaded beforehand (once per process, as on a cohort worker).

The structures are chosen by a fixed rule, never by their scores: the ones both scans label with
at least :data:`MIN_VOXELS` voxels over at least :data:`MIN_SLICES` axial slices.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from UniverSegLogic.core.geometry import Volume
from UniverSegLogic.core.metrics import dice
from UniverSegLogic.errors import UsageError

#: The pair of the default evaluation (TotalSegmentator CT training cases).
DEFAULT_CASES = ("ts_ct_abdomen", "ts_ct_dicom")
#: Cases that are held out of every tuning and must not be used here.
HELD_OUT = ("ts_mr_abdomen", "colin27_aal_heldout", "slicerio_chest_ct")
#: Structure rule: labeled in both scans with at least this many voxels ...
MIN_VOXELS = 500
#: ... spanning at least this many slices along the slicing axis (array axis 0).
MIN_SLICES = 3
#: The methods: (label, what it is).
METHODS: Dict[str, str] = {
    "ours": "extent alignment + UniverSeg propagation (cohort default)",
    "atlas": "SimpleITK affine + B-spline registration, labels warped (nearest neighbour)",
    "ours_affine": "affine registration + UniverSeg propagation (cohort --align affine)",
    "atlas_affine": "SimpleITK affine registration only, labels warped (diagnostic)",
}
DEFAULT_METHODS = ("ours", "atlas", "ours_affine", "atlas_affine")
#: Issue targets: ours within this much mean Dice of the atlas (or better) ...
TARGET_DICE_GAP = 0.03
#: ... at no more than this fraction of its time per case.
TARGET_TIME_RATIO = 1.0 / 3.0
JSON_VERSION = 1


@dataclass
class LabeledScan:
    """A scan with ground-truth masks (boolean KJI arrays on its grid, by structure name)."""

    name: str
    image: Volume
    masks: Dict[str, np.ndarray]


def slices_spanned(mask: np.ndarray) -> int:
    """Slices along array axis 0 that hold part of ``mask``."""
    m = np.asarray(mask, dtype=bool)
    return int(np.count_nonzero(m.reshape(m.shape[0], -1).any(axis=1)))


def shared_structures(
    scans: Sequence[LabeledScan],
    min_voxels: int = MIN_VOXELS,
    min_slices: int = MIN_SLICES,
) -> List[str]:
    """Names labeled in every scan with ``>= min_voxels`` voxels over ``>= min_slices`` slices
    (sorted by name)."""
    names = set.intersection(*(set(s.masks) for s in scans)) if scans else set()
    return sorted(
        n
        for n in names
        if all(
            int(np.count_nonzero(s.masks[n])) >= min_voxels
            and slices_spanned(s.masks[n]) >= min_slices
            for s in scans
        )
    )


def load_scans(cache: str, names: Sequence[str] = DEFAULT_CASES) -> List[LabeledScan]:
    """The TotalSegmentator cases ``names`` (fetched into ``cache`` once); held-out ones refused."""
    from .data import fetch_totalsegmentator, load_totalsegmentator

    bad = [n for n in names if n in HELD_OUT]
    if bad:
        raise UsageError(f"{bad[0]} is held out; the cohort evaluation does not use it")
    cases = {c.spec.name: c for c in load_totalsegmentator(fetch_totalsegmentator(cache))}
    missing = [n for n in names if n not in cases]
    if missing:
        raise UsageError(f"no case {missing[0]!r}; use {', '.join(DEFAULT_CASES)}")
    return [LabeledScan(n, cases[n].volume, cases[n].structure_masks()) for n in names]


def set_single_thread() -> None:
    """One thread for PyTorch and SimpleITK (the evaluation's timing conditions)."""
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _settings(align: str, weights: str, device: str, structures: Sequence[str] = ()):
    from UniverSegLogic.cohort.case import CohortSettings

    segments = tuple(structures) or None
    return CohortSettings(segments, align=align, weights=weights, device=device, threads=1)


def _reference(scan: LabeledScan, structures: Sequence[str]):
    from UniverSegLogic.cohort.case import Reference

    masks = {n: scan.masks[n] for n in structures}
    return Reference(scan.name, scan.image, masks, {}, {}, "")


def run_ours(
    reference: LabeledScan, target: Volume, structures: Sequence[str], align: str, weights, device
) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """(predicted mask by structure, timings) of cohort labeling with ``align``."""
    from UniverSegLogic.cohort.case import segment_masks

    settings = _settings(align, weights, device, structures)
    seg = segment_masks(target, [_reference(reference, structures)], settings)
    out = {n: np.zeros(target.array.shape, dtype=bool) for n in structures}
    if seg.result is not None:
        for inp in seg.inputs:
            out[inp.name] = np.asarray(seg.result.get(inp.key).mask, dtype=bool)
    return out, dict(seg.timings)


def run_atlas(
    reference: LabeledScan, target: Volume, structures: Sequence[str], kind: str
) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """(warped reference mask by structure, timings) of atlas registration ``kind``."""
    from UniverSegLogic.cohort.align import align_reference

    aligned = align_reference(
        reference.image, {n: reference.masks[n] for n in structures}, target, kind
    )
    return aligned.masks, {"register_and_warp": aligned.seconds}


def warm_up(weights: str, device: str) -> str:
    """Load the weights once (as a cohort worker does before its first task); its device."""
    from UniverSegLogic.cohort.case import worker_engines

    store = worker_engines(_settings("extent", weights, device))
    return str(store.get(weights, device).engine.device)


def evaluate_pairs(
    scans: Sequence[LabeledScan],
    structures: Sequence[str],
    methods: Sequence[str] = DEFAULT_METHODS,
    weights: str = "starter",
    device: str = "cpu",
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, object]:
    """Every ordered pair (reference, target) of ``scans`` x every method: Dice per structure and
    seconds per case (the JSON payload, without the command)."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"unknown method {bad[0] if bad else '(none)'}; use {', '.join(METHODS)}")
    if len(scans) < 2:
        raise UsageError("the cohort evaluation needs two labeled scans")
    if not structures:
        raise UsageError("no structure to evaluate")
    for s in scans:
        missing = [n for n in structures if n not in s.masks]
        if missing:
            raise UsageError(f"{s.name} has no structure {missing[0]!r}")
    set_single_thread()
    used_device = warm_up(weights, device) if any(m.startswith("ours") for m in methods) else ""
    rows, seconds = [], []
    for ref in scans:
        for tgt in scans:
            if tgt is ref:
                continue
            pair = f"{ref.name}->{tgt.name}"
            for method in methods:
                t0 = time.perf_counter()
                if method == "ours":
                    pred, timings = run_ours(ref, tgt.image, structures, "extent", weights, device)
                elif method == "ours_affine":
                    pred, timings = run_ours(ref, tgt.image, structures, "affine", weights, device)
                elif method == "atlas":
                    pred, timings = run_atlas(ref, tgt.image, structures, "deformable")
                else:
                    pred, timings = run_atlas(ref, tgt.image, structures, "affine")
                sec = time.perf_counter() - t0
                seconds.append(
                    {
                        "pair": pair,
                        "reference": ref.name,
                        "target": tgt.name,
                        "method": method,
                        "seconds": round(sec, 3),
                        "timings": {k: round(float(v), 3) for k, v in timings.items()},
                    }
                )
                for name in structures:
                    p, t = pred[name], tgt.masks[name]
                    rows.append(
                        {
                            "pair": pair,
                            "reference": ref.name,
                            "target": tgt.name,
                            "structure": name,
                            "method": method,
                            "dice": round(float(dice(p, t)), 4),
                            "predicted_voxels": int(np.count_nonzero(p)),
                            "truth_voxels": int(np.count_nonzero(t)),
                        }
                    )
                if log:
                    mean = np.mean([r["dice"] for r in rows[-len(structures) :]])
                    log(f"{pair:32s} {method:13s} mean Dice {mean:.3f}  {sec:7.1f} s")
    payload = {
        "version": JSON_VERSION,
        "scans": [
            {"name": s.name, "shape_kji": list(s.image.array.shape), "spacing_mm": _spacing(s)}
            for s in scans
        ],
        "structures": list(structures),
        "structure_rule": f">= {MIN_VOXELS} voxels and >= {MIN_SLICES} axial slices in every scan",
        "methods": {m: METHODS[m] for m in methods},
        "conditions": {
            "torch_threads": 1,
            "simpleitk_threads": 1,
            "device": used_device or device,
            "weights": weights,
            "support_size": 2,
            "axis": "axial",
        },
        "rows": rows,
        "seconds": seconds,
    }
    payload["summary"] = summarize(payload)
    return payload


def _spacing(scan: LabeledScan) -> List[float]:
    m = np.asarray(scan.image.ijk_to_ras)[:3, :3]
    return [round(float(v), 4) for v in np.linalg.norm(m, axis=0)]


def summarize(payload: Dict[str, object]) -> Dict[str, object]:
    """Mean Dice and mean seconds per case by method, and the issue targets (ours vs atlas)."""
    rows, seconds = payload["rows"], payload["seconds"]
    methods = list(payload["methods"])
    out: Dict[str, object] = {"by_method": {}}
    for m in methods:
        d = [r["dice"] for r in rows if r["method"] == m]
        s = [r["seconds"] for r in seconds if r["method"] == m]
        out["by_method"][m] = {
            "mean_dice": round(float(np.mean(d)), 4),
            "mean_seconds_per_case": round(float(np.mean(s)), 3),
        }
    bm = out["by_method"]
    for ours in ("ours", "ours_affine"):
        if ours in bm and "atlas" in bm:
            gap = bm[ours]["mean_dice"] - bm["atlas"]["mean_dice"]
            ratio = bm[ours]["mean_seconds_per_case"] / max(
                bm["atlas"]["mean_seconds_per_case"], 1e-9
            )
            out[f"{ours}_vs_atlas"] = {
                "dice_difference": round(float(gap), 4),
                "time_ratio": round(float(ratio), 4),
                "dice_target_met": bool(gap >= -TARGET_DICE_GAP),
                "time_target_met": bool(ratio <= TARGET_TIME_RATIO),
            }
    return out


def write_json(path: str, payload: Dict[str, object]) -> None:
    from UniverSegLogic.core.atomic import write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, json.dumps(payload, indent=1) + "\n")


def table(payload: Dict[str, object]) -> str:
    """Markdown table: Dice per structure (mean over the pairs) and per pair, by method; means,
    seconds per case and the time ratio to the atlas."""
    rows, methods = payload["rows"], list(payload["methods"])
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    lookup = {(r["pair"], r["structure"], r["method"]): r["dice"] for r in rows}
    head = "| structure | pair | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (2 + len(methods))]
    for name in payload["structures"]:
        for pair in pairs:
            vals = [lookup[(pair, name, m)] for m in methods]
            best = max(vals)
            cells = [f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in vals]
            lines.append(f"| {name} | {_short(pair)} | " + " | ".join(cells) + " |")
    summary = payload["summary"]["by_method"]
    for pair in pairs:
        vals = [
            np.mean([r["dice"] for r in rows if r["pair"] == pair and r["method"] == m])
            for m in methods
        ]
        lines.append(
            f"| **mean** | {_short(pair)} | " + " | ".join(f"{v:.3f}" for v in vals) + " |"
        )
    lines.append(
        "| **mean** | both | "
        + " | ".join(f"**{summary[m]['mean_dice']:.3f}**" for m in methods)
        + " |"
    )
    sec = payload["seconds"]
    for pair in pairs:
        vals = [
            next(s["seconds"] for s in sec if s["pair"] == pair and s["method"] == m)
            for m in methods
        ]
        lines.append(
            f"| seconds per case | {_short(pair)} | " + " | ".join(f"{v:.1f}" for v in vals) + " |"
        )
    lines.append(
        "| seconds per case | mean | "
        + " | ".join(f"{summary[m]['mean_seconds_per_case']:.1f}" for m in methods)
        + " |"
    )
    if "atlas" in summary:
        atlas = summary["atlas"]["mean_seconds_per_case"]
        lines.append(
            "| time / atlas time | mean | "
            + " | ".join(f"{summary[m]['mean_seconds_per_case'] / atlas:.2f}" for m in methods)
            + " |"
        )
    return "\n".join(lines)


def _short(pair: str) -> str:
    a, b = pair.split("->")
    return f"{a.replace('ts_ct_', '')} -> {b.replace('ts_ct_', '')}"


def where_ours_loses(payload: Dict[str, object], ours: str = "ours", margin: float = 0.03):
    """(pair, structure, ours Dice, atlas Dice) where ``ours`` is below the atlas by > margin."""
    lookup = {(r["pair"], r["structure"], r["method"]): r["dice"] for r in payload["rows"]}
    out = []
    for (pair, name, method), d in lookup.items():
        if method == ours and (pair, name, "atlas") in lookup:
            a = lookup[(pair, name, "atlas")]
            if d < a - margin:
                out.append((pair, name, d, a))
    return out


def markdown(payload: Dict[str, object], command: str, notes: Sequence[str] = ()) -> str:
    """The Markdown report: the table, the issue targets, the command, where ours loses."""
    summary = payload["summary"]
    lines = [
        "# Cohort labeling vs atlas registration",
        "",
        "Each of the two TotalSegmentator CT training cases segmented with the other as the "
        "labeled reference ("
        + ", ".join(
            s["name"] + " " + "x".join(map(str, s["shape_kji"])) + " KJI" for s in payload["scans"]
        )
        + "). Structures: "
        + payload["structure_rule"]
        + f" ({len(payload['structures'])}). Dice against the target's own ground truth on the "
        "target grid (`core.metrics.dice`); seconds per case = wall time of the whole case "
        "(alignment + propagation, or registration + warping), 1 PyTorch and 1 SimpleITK "
        f"thread, device {payload['conditions']['device']}, weights "
        f"{payload['conditions']['weights']} loaded beforehand.",
        "",
        "Methods: " + "; ".join(f"`{m}`: {d}" for m, d in payload["methods"].items()) + ".",
        "",
        table(payload),
        "",
        "## Issue targets",
        "",
    ]
    for ours in ("ours", "ours_affine"):
        key = f"{ours}_vs_atlas"
        if key in summary:
            t = summary[key]
            lines.append(
                f"* `{ours}` vs `atlas`: mean Dice difference {t['dice_difference']:+.3f} "
                f"(target >= -{TARGET_DICE_GAP}: {'met' if t['dice_target_met'] else 'NOT met'}); "
                f"time ratio {t['time_ratio']:.2f} (target <= 1/3: "
                f"{'met' if t['time_target_met'] else 'NOT met'})."
            )
    lines += ["", "## Where ours loses (Dice below the atlas by more than 0.03)", ""]
    for ours in ("ours", "ours_affine"):
        if ours not in payload["methods"]:
            continue
        losses = where_ours_loses(payload, ours)
        lines.append(
            f"`{ours}`: "
            + (
                f"{len(losses)} of {len(payload['rows']) // len(payload['methods'])} structure-pairs"
                if losses
                else "nowhere"
            )
        )
        lines += [f"* {_short(p)} {n}: {d:.3f} vs {a:.3f}" for p, n, d, a in losses]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]
    lines += ["## Reproduce", "", "```", command, "```", ""]
    return "\n".join(lines)


def write_figure(folder: str, payload: Dict[str, object]) -> str:
    """A bar chart of Dice per structure (mean over the two directions) by method; its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    methods, names = list(payload["methods"]), payload["structures"]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [
            np.mean(
                [r["dice"] for r in payload["rows"] if r["method"] == m and r["structure"] == n]
            )
            for n in names
        ]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("Dice (mean of both directions)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(folder, "cohort_dice.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def command_line(args) -> str:
    """The command reproducing ``args``."""
    parts = ["universeg-slicer evaluate --cohort", f"--cache {args.cache}"]
    if args.structures:
        parts.append(f"--structures {args.structures}")
    if args.methods:
        parts.append(f"--methods {args.methods}")
    if args.weights != "starter":
        parts.append(f"--weights {args.weights}")
    if args.device != "auto":
        parts.append(f"--device {args.device}")
    parts.append(f"--json {args.json}")
    if args.figures:
        parts.append(f"--figures {args.figures}")
    return " ".join(parts)


def run_cli(args) -> int:
    """``universeg-slicer evaluate --cohort``."""
    from UniverSegLogic.core.io import check_output_path

    if args.mask:
        raise UsageError("--mask goes with --image, not with --cohort")
    md_path = os.path.splitext(args.json)[0] + ".md"
    check_output_path(md_path, [args.json], option="--json (its .md report)")
    methods = [m for m in (args.methods or ",".join(DEFAULT_METHODS)).split(",") if m.strip()]
    methods = [m.strip() for m in methods]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(
            f"--methods: unknown method {bad[0] if bad else '(none)'}; use {', '.join(METHODS)}"
        )
    set_single_thread()
    scans = load_scans(args.cache)
    if args.structures:
        structures = [n.strip() for n in args.structures.split(",") if n.strip()]
        for s in scans:
            missing = [n for n in structures if n not in s.masks or not s.masks[n].any()]
            if missing:
                raise UsageError(f"--structures: {s.name} does not label {missing[0]!r}")
    else:
        structures = shared_structures(scans)
    log = None if args.quiet else (lambda s: print(s, flush=True))
    payload = evaluate_pairs(scans, structures, methods, args.weights, args.device, log)
    command = command_line(args)
    payload["command"] = command
    write_json(args.json, payload)
    from UniverSegLogic.core.atomic import write_text

    write_text(md_path, markdown(payload, command))
    print(table(payload))
    print(f"wrote {args.json} and {md_path}")
    if args.figures:
        print(f"wrote {write_figure(args.figures, payload)}")
    return 0
