"""Evaluation: our propagation against Slicer's Fill between slices and a nearest-slice copy.

Protocol, for one ground-truth mask (full binary label on the image grid) and one ``k``:

* ``[z0, z1]`` = first and last non-empty slice of the mask along the slicing axis;
* labeled slices (:func:`~UniverSegLogic.core.slices.evaluation_slices`): ``z0 + floor((i + 0.5) * (z1 - z0) / k + 0.5)`` for
  ``i = 0 .. k-1`` -- spread over the extent, *not* at its ends, so a method must extrapolate to
  reach the first and last slices; every other slice is hidden;
* methods: ``universeg`` (a :class:`~UniverSegLogic.core.propagator.Propagator`), ``fill_between_slices`` (Slicer's effect,
  :mod:`fill_between`), ``nearest_slice`` (each slice between the first and last labeled slice
  copies the nearest labeled slice; nothing outside that range);
* scores: ``dice`` over the whole volume, ``dice_unlabeled`` over the hidden slices only (labeled
  slices are identical to the truth for every method, so this is the honest number).

Dice of two empty masks is 1.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from UniverSegLogic.core.fill_between import (
    FillBetweenUnavailable,
    fill_between_slices,
    labeled_only,
)
from UniverSegLogic.core.metrics import dice, dice_unlabeled
from UniverSegLogic.core.slices import evaluation_slices, slice_extent

METHODS: Tuple[str, ...] = ("universeg", "fill_between_slices", "nearest_slice")


# ------------------------------------------------------------------------------ protocol pieces


def nearest_slice_copy(mask: np.ndarray, labeled: Sequence[int], axis: int = 0) -> np.ndarray:
    """Every slice in ``[min(labeled), max(labeled)]`` copies its nearest labeled slice of ``mask``
    (the lower one on ties); slices outside that range are empty."""
    m = np.moveaxis(np.asarray(mask, dtype=bool), axis, 0)
    lab = np.array(sorted(int(i) for i in labeled))
    out = np.zeros_like(m)
    for z in range(int(lab[0]), int(lab[-1]) + 1):
        out[z] = m[int(lab[np.argmin(np.abs(lab - z))])]
    return np.moveaxis(out, 0, axis)


# ------------------------------------------------------------------------------ one case


@dataclass
class EvalMask:
    """One ground-truth structure of an evaluation case."""

    name: str
    mask: np.ndarray


@dataclass
class EvalCase:
    """An image with ground-truth masks on its grid."""

    name: str
    image: object  # geometry.Volume
    masks: List[EvalMask]
    role: str = ""


@dataclass
class Outcome:
    """One method's result for one (mask, k): the JSON row plus what the figures need."""

    mask: str
    k: int
    method: str
    dice: float
    dice_unlabeled: float
    seconds: float
    labeled: List[int] = field(default_factory=list)
    prediction: Optional[np.ndarray] = None
    case: str = ""

    def row(self) -> Dict[str, object]:
        return {
            "mask": self.mask,
            "k": int(self.k),
            "method": self.method,
            "dice": float(self.dice),
            "dice_unlabeled": float(self.dice_unlabeled),
            "seconds": float(self.seconds),
        }


def run_universeg(
    session, painted: np.ndarray, labeled: Sequence[int], name: str = "structure"
) -> np.ndarray:
    """Our propagation of ``painted`` (labeled slices only) with a
    :class:`~UniverSegLogic.core.propagator.Propagator` session -> boolean KJI mask."""
    from UniverSegLogic.core.propagator import SegmentInput

    return session.propagate([SegmentInput(name, name, painted, list(labeled))]).segments[0].mask


def make_session(image, axis: int, engine=None, options=None, fusion=None):
    """A :class:`~UniverSegLogic.core.propagator.Propagator` for evaluating masks of ``image``."""
    from dataclasses import replace

    from UniverSegLogic.core.propagator import PropagationOptions, Propagator

    opts = replace(options or PropagationOptions(), axis=int(axis))
    return Propagator(image, opts, engine=engine, fusion=fusion)


def evaluate_mask(
    image,
    truth: np.ndarray,
    name: str,
    ks: Sequence[int],
    axis: int = 0,
    methods: Sequence[str] = METHODS,
    engine=None,
    options=None,
    fusion=None,
    keep_predictions: bool = False,
    case: str = "",
    log: Optional[Callable[[str], None]] = None,
    session=None,
) -> List[Outcome]:
    """Every method for every ``k`` on one ground-truth mask (``session``: a Propagator of
    ``image`` along ``axis`` to reuse; made here when None and ``universeg`` is evaluated)."""
    truth = np.asarray(truth, dtype=bool)
    ext = slice_extent(truth, axis)
    if ext is None:
        raise ValueError(f"mask {name!r} is empty")
    spacing = image.spacing_kji
    out: List[Outcome] = []
    for k in ks:
        labeled = evaluation_slices(ext[0], ext[1], int(k))
        painted = labeled_only(truth, labeled, axis)
        for method in methods:
            t0 = time.perf_counter()
            if method == "universeg":
                if session is None:
                    session = make_session(image, axis, engine, options, fusion)
                pred = run_universeg(session, painted, labeled, name)
            elif method == "fill_between_slices":
                try:
                    pred = fill_between_slices(painted, labeled, axis, spacing)
                except FillBetweenUnavailable:
                    pred = labeled_only(painted, labeled, axis)  # what the effect leaves: nothing
            elif method == "nearest_slice":
                pred = nearest_slice_copy(painted, labeled, axis)
            else:
                raise ValueError(f"unknown method {method!r}")
            sec = time.perf_counter() - t0
            o = Outcome(
                name,
                int(k),
                method,
                dice(pred, truth),
                dice_unlabeled(pred, truth, labeled, axis),
                sec,
                list(labeled),
                pred if keep_predictions else None,
                case,
            )
            if log:
                log(
                    f"{name:<32} k={k:<2} {method:<20} dice {o.dice:.3f}  "
                    f"unlabeled {o.dice_unlabeled:.3f}  {sec:6.2f} s"
                )
            out.append(o)
    return out


# ------------------------------------------------------------------------------ cases, manifest


def load_manifest(path: str, roles: Optional[Sequence[str]] = None) -> List[EvalCase]:
    """Cases of an ``eval/manifest.json`` (``{"cases": [{"case", "role", "image",
    "structures": [{"name", "mask"}]}]}``, paths relative to the manifest's folder)."""
    from UniverSegLogic.core.io import InputError, read_image

    if not os.path.isfile(path):
        raise InputError(f"manifest not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    root = os.path.dirname(os.path.abspath(path))
    cases = []
    for c in data.get("cases", []):
        if roles and c.get("role") not in roles:
            continue
        image = read_image(os.path.join(root, c["image"]))
        masks = [
            EvalMask(s["name"], read_mask(os.path.join(root, s["mask"]), image))
            for s in c.get("structures", [])
        ]
        cases.append(
            EvalCase(c.get("case", os.path.dirname(c["image"])), image, masks, c.get("role", ""))
        )
    if not cases:
        raise InputError(
            f"{path}: no evaluation case" + (f" with role {', '.join(roles)}" if roles else "")
        )
    return cases


def read_mask(path: str, image) -> np.ndarray:
    """A binary mask file (any non-zero label) on the grid of ``image``."""
    from UniverSegLogic.core.io import read_segmentation

    seg = read_segmentation(path, image)
    out = np.zeros(image.array.shape, dtype=bool)
    for s in seg.segments:
        out |= s.mask
    return out


def evaluate_cases(
    cases: Sequence[EvalCase],
    ks: Sequence[int],
    axis: int = 0,
    methods: Sequence[str] = METHODS,
    engine=None,
    options=None,
    fusion=None,
    keep_predictions: bool = False,
    log: Optional[Callable[[str], None]] = None,
    session_factory: Optional[Callable[[EvalCase], object]] = None,
) -> List[Outcome]:
    """:func:`evaluate_mask` for every mask of every case (mask names become ``case/name`` when
    there is more than one case); ``session_factory(case)`` may supply each case's Propagator."""
    out: List[Outcome] = []
    prefix = len(cases) > 1
    for c in cases:
        session = None  # one Propagator per image, shared by its masks
        if "universeg" in methods:
            session = (
                session_factory(c)
                if session_factory is not None
                else make_session(c.image, axis, engine, options, fusion)
            )
        for m in c.masks:
            name = f"{c.name}/{m.name}" if prefix else m.name
            out.extend(
                evaluate_mask(
                    c.image,
                    m.mask,
                    name,
                    ks,
                    axis,
                    methods,
                    engine,
                    options,
                    fusion,
                    keep_predictions,
                    c.name,
                    log,
                    session=session,
                )
            )
    return out


# ------------------------------------------------------------------------------ reporting


def summary_rows(outcomes: Sequence[Outcome], key: str = "dice") -> List[Dict[str, object]]:
    """Mean ``key`` per (k, method), plus universeg - fill_between_slices per k."""
    ks = sorted({o.k for o in outcomes})
    rows = []
    for k in ks:
        row: Dict[str, object] = {"k": k}
        for m in METHODS:
            vals = [getattr(o, key) for o in outcomes if o.k == k and o.method == m]
            row[m] = float(np.mean(vals)) if vals else None
        u, f = row.get("universeg"), row.get("fill_between_slices")
        row["universeg_minus_fbs"] = (u - f) if u is not None and f is not None else None
        row["n"] = len({o.mask for o in outcomes if o.k == k})
        rows.append(row)
    return rows


def summary_table(outcomes: Sequence[Outcome], title: str = "") -> str:
    """Plain-text table of mean dice and dice_unlabeled per k and method."""
    lines = [title] if title else []
    for key in ("dice", "dice_unlabeled"):
        lines.append(f"mean {key} ({len({o.mask for o in outcomes})} masks)")
        lines.append(
            f"{'k':>3} {'universeg':>10} {'fill_betw.':>10} {'nearest':>10} {'ours-FBS':>9}"
        )
        for r in summary_rows(outcomes, key):
            cells = [f"{r[m]:>10.3f}" if r[m] is not None else f"{'-':>10}" for m in METHODS]
            d = r["universeg_minus_fbs"]
            lines.append(
                f"{r['k']:>3} {' '.join(cells)} "
                + (f"{d:>+9.3f}" if d is not None else f"{'-':>9}")
            )
    return "\n".join(lines)


def write_json(path: str, outcomes: Sequence[Outcome]) -> None:
    """``{"results": [row, ...]}`` written atomically."""
    from UniverSegLogic.core.atomic import write_text

    write_text(path, json.dumps({"results": [o.row() for o in outcomes]}, indent=1) + "\n")


def write_figures(
    folder: str,
    outcomes: Sequence[Outcome],
    cases: Sequence[EvalCase],
    axis: int = 0,
    montage_k: Optional[int] = None,
) -> List[str]:
    """Dice-vs-k curves (mean, per case role, per mask; PNG) and one overlay montage per mask
    (JPEG: the slices cropped around the structure, k nearest 3); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    colors = {
        "universeg": "tab:red",
        "fill_between_slices": "tab:blue",
        "nearest_slice": "tab:gray",
    }
    names = list(dict.fromkeys(o.mask for o in outcomes))
    ks = sorted({o.k for o in outcomes})

    # curves: mean over masks (all cases, then per case role), then one small panel per mask
    roles: Dict[str, List[str]] = {}
    for c in cases:
        roles.setdefault(c.role or "all", []).append(c.name)
    groups = [("", "all cases", list(outcomes))]
    if len(roles) > 1:
        groups += [
            (f"_{r}", f"role {r} ({', '.join(n)})", [o for o in outcomes if o.case in n])
            for r, n in roles.items()
        ]
    for suffix, title, sel in groups:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax_i, key in enumerate(("dice", "dice_unlabeled")):
            ax = axes[ax_i]
            for m in METHODS:
                ys = [
                    np.mean(
                        [getattr(o, key) for o in sel if o.k == k and o.method == m] or [np.nan]
                    )
                    for k in ks
                ]
                ax.plot(ks, ys, "o-", color=colors[m], label=m)
            ax.set_xlabel("k (labeled slices)")
            ax.set_ylabel(f"mean {key}")
            ax.set_xticks(ks)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0].legend(loc="lower right")
        fig.suptitle(
            f"Dice vs k, {title}: mean over {len({o.mask for o in sel})} masks", fontsize=9
        )
        fig.tight_layout()
        p = os.path.join(folder, f"dice_vs_k{suffix}.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)

    cols = min(6, len(names))
    rows = int(math.ceil(len(names) / cols)) if names else 0
    if rows:
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows), squeeze=False)
        for i, n in enumerate(names):
            ax = axes[i // cols][i % cols]
            for m in METHODS:
                ys = [
                    next(
                        (
                            o.dice_unlabeled
                            for o in outcomes
                            if o.mask == n and o.k == k and o.method == m
                        ),
                        np.nan,
                    )
                    for k in ks
                ]
                ax.plot(ks, ys, "o-", ms=3, color=colors[m])
            ax.set_title(n[-28:], fontsize=7)
            ax.set_ylim(0, 1)
            ax.set_xticks(ks)
            ax.tick_params(labelsize=6)
        for j in range(len(names), rows * cols):
            axes[j // cols][j % cols].axis("off")
        fig.suptitle("dice_unlabeled vs k per mask (red ours, blue FBS, gray nearest)", fontsize=9)
        fig.tight_layout()
        p = os.path.join(folder, "dice_vs_k_per_mask.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)

    # montages
    by_name = {}
    for c in cases:
        for m in c.masks:
            by_name[f"{c.name}/{m.name}" if len(cases) > 1 else m.name] = (c, m)
    k_show = montage_k if montage_k is not None else min(ks, key=lambda k: abs(k - 3))
    from UniverSegLogic.core.canvas import intensity_window, scale_intensity

    for n in names:
        if n not in by_name:
            continue
        c, m = by_name[n]
        preds = {
            o.method: o
            for o in outcomes
            if o.mask == n and o.k == k_show and o.prediction is not None
        }
        if not preds:
            continue
        img = np.moveaxis(scale_intensity(c.image.array, intensity_window(c.image.array)), axis, 0)
        truth = np.moveaxis(m.mask, axis, 0)
        z0, z1 = slice_extent(m.mask, axis)
        lo, hi = max(0, z0 - 1), min(truth.shape[0] - 1, z1 + 1)
        labeled = next(iter(preds.values())).labeled
        hidden = [
            z for z in np.linspace(lo, hi, 10).round().astype(int).tolist() if z not in labeled
        ]
        show = sorted(set(labeled[:4]) | set(hidden[: max(4, 10 - min(4, len(labeled)))]))
        methods = [mm for mm in METHODS if mm in preds]
        union = truth.any(0)
        for mm in methods:
            union = union | np.moveaxis(preds[mm].prediction, axis, 0).any(0)
        rr, cc = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
        pad = max(4, int(0.15 * max(rr[-1] - rr[0], cc[-1] - cc[0])))
        box = (
            slice(max(0, rr[0] - pad), rr[-1] + pad + 1),
            slice(max(0, cc[0] - pad), cc[-1] + pad + 1),
        )
        fig, axes = plt.subplots(
            len(methods), len(show), figsize=(1.7 * len(show), 1.8 * len(methods)), squeeze=False
        )
        for r, mm in enumerate(methods):
            pr = np.moveaxis(preds[mm].prediction, axis, 0)
            for cidx, z in enumerate(show):
                ax = axes[r][cidx]
                ax.imshow(img[z][box], cmap="gray", interpolation="nearest", vmin=0, vmax=1)
                if truth[z][box].any():
                    ax.contour(truth[z][box], levels=[0.5], colors="lime", linewidths=0.8)
                if pr[z][box].any():
                    ax.contour(pr[z][box], levels=[0.5], colors=colors[mm], linewidths=0.8)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"z={z}" + (" (L)" if z in labeled else ""), fontsize=7)
                if cidx == 0:
                    ax.set_ylabel(f"{mm}\n{preds[mm].dice_unlabeled:.2f}", fontsize=7)
        fig.suptitle(f"{n}  k={k_show}  (green truth; L = labeled slice)", fontsize=8)
        fig.tight_layout()
        p = os.path.join(folder, f"montage_{n.replace('/', '__')}_k{k_show}.jpg")
        fig.savefig(p, dpi=80, pil_kwargs={"quality": 80})
        plt.close(fig)
        written.append(p)
    return written
