"""Session evaluation: how many painted slices until a structure is right.

A simulated annotator works on one ground-truth mask:

1. it starts from the evaluation's ``k = 2`` slices (:func:`~UniverSegLogic.core.slices.
   evaluation_slices` over the mask's extent along the axis), painted exactly as the truth;
2. the method fills the other slices, and the whole-volume Dice
   (:func:`~UniverSegLogic.core.metrics.dice`) is scored;
3. it stops at Dice >= ``target`` (0.90) or when ``max_painted`` (20) slices are painted;
   otherwise it paints the ground-truth slice the strategy picks (an empty one counts as a slice
   labeled empty: the user visited it and marked it) and goes back to 2.

Strategies:

* ``ours_suggest``: our propagation (:class:`~UniverSegLogic.core.propagator.Propagator`), next
  slice = its own suggestion (:func:`~UniverSegLogic.core.suggest.suggest_slices`: computed from the
  propagation alone, it never sees the truth);
* ``ours_bisect``: our propagation, next slice = :func:`bisection_slice`;
* ``fbs_bisect``: Slicer's Fill between slices (:func:`~UniverSegLogic.core.fill_between.
  fill_between_slices`; where it refuses a painting, the effect leaves the gaps empty), next slice
  = :func:`bisection_slice`.

:func:`bisection_slice` is the middle of the longest run of unlabeled slices within the
structure's extent: it knows where the structure is, which a real user roughly does; our
suggestion does not get that knowledge.

``slices_to_090`` = the number of painted slices (the start slices included) at which Dice first
reached the target; None when it was not reached within ``max_painted``.

Each case image gets one :class:`Propagator` shared by its masks and strategies: its caches are
keyed by content, so adding one slice recomputes only the gaps next to it, and a state seen before
(the same labeled slices with the same labels) costs no network run at all.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from UniverSegLogic.core.fill_between import (
    FillBetweenUnavailable,
    fill_between_slices,
    labeled_only,
)
from UniverSegLogic.core.metrics import dice
from UniverSegLogic.core.slices import evaluation_slices, slice_extent

STRATEGIES = ("ours_suggest", "ours_bisect", "fbs_bisect")
TARGET_DICE = 0.90
MAX_PAINTED = 20
START_K = 2

Log = Optional[Callable[[str], None]]


def target_key(target: float) -> str:
    """``0.9`` -> ``"slices_to_090"``."""
    return f"slices_to_{int(round(target * 100)):03d}"


def bisection_slice(labeled: Sequence[int], extent: Sequence[int]) -> Optional[int]:
    """The middle of the longest run of unlabeled slices within ``extent = (z0, z1)`` (the lower
    middle of an even run; the first run on ties); None when every slice there is labeled."""
    z0, z1 = int(extent[0]), int(extent[1])
    lab = set(int(i) for i in labeled)
    best = None  # (length, -start, start, end)
    start = None
    for z in range(z0, z1 + 2):
        free = z <= z1 and z not in lab
        if free and start is None:
            start = z
        elif not free and start is not None:
            run = (z - start, -start, start, z - 1)
            if best is None or run[:2] > best[:2]:
                best = run
            start = None
    if best is None:
        return None
    return (best[2] + best[3]) // 2


@dataclass
class SessionTrace:
    """One simulated annotation session."""

    mask: str
    strategy: str
    painted: List[int]  # labeled slices in the order they were painted (start slices first)
    dice: List[float]  # dice[i]: after the first start_k + i painted slices
    start_count: int  # painted slices at the start (the k=2 rule may give 1 on tiny extents)
    target: float
    stop: str  # "reached", "max_painted", "no_slice_left"
    seconds: float
    case: str = ""
    role: str = ""
    suggestions: List[List[int]] = field(default_factory=list)

    @property
    def counts(self) -> List[int]:
        """Painted slices for each entry of :attr:`dice`."""
        return [self.start_count + i for i in range(len(self.dice))]

    @property
    def slices_to_target(self) -> Optional[int]:
        for n, d in zip(self.counts, self.dice):
            if d >= self.target:
                return n
        return None

    def row(self) -> Dict[str, object]:
        return {
            "mask": self.mask,
            "case": self.case,
            "role": self.role,
            "strategy": self.strategy,
            "painted_slices": [int(i) for i in self.painted],
            "n_painted": self.counts,
            "dice": [float(d) for d in self.dice],
            target_key(self.target): self.slices_to_target,
            "stop": self.stop,
            "seconds": float(self.seconds),
        }


def run_session(
    truth: np.ndarray,
    strategy: str,
    session=None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    axis: int = 0,
    name: str = "structure",
    target: float = TARGET_DICE,
    max_painted: int = MAX_PAINTED,
    start_k: int = START_K,
    log: Log = None,
) -> SessionTrace:
    """Simulate one annotation session on ``truth`` (see the module docstring). ``session``: a
    :class:`~UniverSegLogic.core.propagator.Propagator` of the image along ``axis`` (for the
    ``ours_*`` strategies); ``spacing``: (k, j, i) mm, for Fill between slices."""
    from UniverSegLogic.core.propagator import SegmentInput

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (use {', '.join(STRATEGIES)})")
    if strategy.startswith("ours") and session is None:
        raise ValueError(f"strategy {strategy} needs a Propagator session")
    truth = np.asarray(truth, dtype=bool)
    ext = slice_extent(truth, axis)
    if ext is None:
        raise ValueError(f"mask {name!r} is empty")
    painted_order = list(evaluation_slices(ext[0], ext[1], start_k))
    start_count = len(painted_order)
    scores: List[float] = []
    suggestions: List[List[int]] = []
    stop = "max_painted"
    t0 = time.perf_counter()
    while True:
        labeled = sorted(painted_order)
        painted = labeled_only(truth, labeled, axis)
        result = None
        if strategy.startswith("ours"):
            result = session.propagate([SegmentInput(name, name, painted, labeled)]).segments[0]
            pred = result.mask
        else:
            try:
                pred = fill_between_slices(painted, labeled, axis, spacing)
            except FillBetweenUnavailable:
                pred = painted  # what the effect leaves: the gaps stay empty
        d = float(dice(pred, truth))
        scores.append(d)
        if log:
            log(f"  {name:<34} {strategy:<13} {len(labeled):>2} slices  dice {d:.3f}")
        if d >= target:
            stop = "reached"
            break
        if len(labeled) >= max_painted:
            break
        if strategy == "ours_suggest":
            picks = result.suggested_slices(3)
            suggestions.append(picks)
            nxt = picks[0] if picks else None
        else:
            nxt = bisection_slice(labeled, ext)
        if nxt is None:
            stop = "no_slice_left"
            break
        painted_order.append(int(nxt))
    return SessionTrace(
        name,
        strategy,
        painted_order,
        scores,
        start_count,
        target,
        stop,
        time.perf_counter() - t0,
        suggestions=suggestions,
    )


def run_sessions(
    cases,
    strategies: Sequence[str] = STRATEGIES,
    engine=None,
    options=None,
    fusion=None,
    axis: int = 0,
    target: float = TARGET_DICE,
    max_painted: int = MAX_PAINTED,
    start_k: int = START_K,
    log: Log = None,
    session_factory=None,
) -> List[SessionTrace]:
    """:func:`run_session` for every mask of every case and every strategy (mask names become
    ``case/name`` when there is more than one case). ``session_factory(case)`` may supply the
    Propagator of a case (default: :func:`~UniverSegResearch.evaluate.make_session`)."""
    from .evaluate import make_session

    out: List[SessionTrace] = []
    prefix = len(cases) > 1
    for c in cases:
        session = None
        if any(s.startswith("ours") for s in strategies):
            session = (
                session_factory(c)
                if session_factory is not None
                else make_session(c.image, axis, engine, options, fusion)
            )
        for m in c.masks:
            name = f"{c.name}/{m.name}" if prefix else m.name
            for strategy in strategies:
                tr = run_session(
                    m.mask,
                    strategy,
                    session,
                    c.image.spacing_kji,
                    axis,
                    name,
                    target,
                    max_painted,
                    start_k,
                    log,
                )
                tr.case, tr.role = c.name, c.role
                if log:
                    log(
                        f"{name:<36} {strategy:<13} {target_key(target)} "
                        f"{tr.slices_to_target}  ({tr.stop}, {tr.seconds:.1f} s)"
                    )
                out.append(tr)
    return out


# ------------------------------------------------------------------------------ reporting


def _censored(v: Optional[int], max_painted: int) -> float:
    return float(v) if v is not None else float(max_painted + 1)


def summary(
    traces: Sequence[SessionTrace], max_painted: int = MAX_PAINTED
) -> Dict[str, Dict[str, object]]:
    """Per strategy: masks, how many reached the target, the median painted slices to reach it
    (a session that never did counts as ``max_painted + 1``, i.e. "more than max_painted"), the
    mean of those censored counts, and the mean Dice after 2, 3, 5, 8 painted slices (a session
    that stopped at the target keeps its last Dice)."""
    out: Dict[str, Dict[str, object]] = {}
    for strategy in dict.fromkeys(t.strategy for t in traces):
        sel = [t for t in traces if t.strategy == strategy]
        vals = [_censored(t.slices_to_target, max_painted) for t in sel]
        med = float(np.median(vals)) if vals else None
        curve = mean_curve(sel, max_painted)
        out[strategy] = {
            "masks": len(sel),
            "reached": sum(1 for t in sel if t.slices_to_target is not None),
            "median_" + target_key(sel[0].target if sel else TARGET_DICE): med,
            "median_is_censored": bool(med is not None and med > max_painted),
            "mean_censored": float(np.mean(vals)) if vals else None,
            "mean_dice_at": {str(n): curve.get(n) for n in (2, 3, 5, 8)},
        }
    return out


def mean_curve(traces: Sequence[SessionTrace], max_painted: int = MAX_PAINTED) -> Dict[int, float]:
    """Mean Dice per painted-slice count (a session that stopped keeps its last Dice)."""
    counts = range(1, max_painted + 1)
    out: Dict[int, float] = {}
    for n in counts:
        vals = []
        for t in traces:
            if n < t.start_count:
                continue
            i = min(n - t.start_count, len(t.dice) - 1)
            vals.append(t.dice[i])
        if vals and len(vals) == len(traces):
            out[n] = float(np.mean(vals))
    return out


def summary_table(traces: Sequence[SessionTrace], title: str = "", max_painted: int = 20) -> str:
    """Plain-text table: per strategy, masks reaching the target and the median slices."""
    lines = [title] if title else []
    s = summary(traces, max_painted)
    key = "median_" + target_key(traces[0].target) if traces else ""
    lines.append(
        f"{'strategy':<14} {'masks':>5} {'reached':>7} {key:>18} {'mean(cens.)':>11}  "
        "mean dice @2/3/5/8"
    )
    for strategy, r in s.items():
        med = r[key]
        med_s = "-" if med is None else (f">{max_painted}" if med > max_painted else f"{med:g}")
        dd = "/".join(
            f"{r['mean_dice_at'][n]:.3f}" if r["mean_dice_at"][n] is not None else "-"
            for n in ("2", "3", "5", "8")
        )
        lines.append(
            f"{strategy:<14} {r['masks']:>5} {r['reached']:>7} {med_s:>18} "
            f"{r['mean_censored']:>11.2f}  {dd}"
        )
    return "\n".join(lines)


def write_json(
    path: str,
    traces: Sequence[SessionTrace],
    protocol: Dict[str, object],
    max_painted: int = MAX_PAINTED,
) -> None:
    """``{"protocol", "summary": {role: {strategy: ...}}, "sessions": [row, ...]}`` (atomic)."""
    from UniverSegLogic.core.atomic import write_text

    roles: Dict[str, List[SessionTrace]] = {}
    for t in traces:
        roles.setdefault(t.role or "all", []).append(t)
    data = {
        "protocol": protocol,
        "summary": {r: summary(ts, max_painted) for r, ts in roles.items()},
        "sessions": [t.row() for t in traces],
    }
    write_text(path, json.dumps(data, indent=1) + "\n")


COLORS = {"ours_suggest": "tab:red", "ours_bisect": "tab:orange", "fbs_bisect": "tab:blue"}


def write_figures(
    folder: str, traces: Sequence[SessionTrace], max_painted: int = MAX_PAINTED
) -> List[str]:
    """Dice vs painted slices (mean per role and strategy; the share of masks at the target; one
    panel per mask), PNG; returns the paths."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    roles: Dict[str, List[SessionTrace]] = {}
    for t in traces:
        roles.setdefault(t.role or "all", []).append(t)
    target = traces[0].target if traces else TARGET_DICE
    for role, sel in roles.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for strategy in dict.fromkeys(t.strategy for t in sel):
            ts = [t for t in sel if t.strategy == strategy]
            curve = mean_curve(ts, max_painted)
            xs = sorted(curve)
            axes[0].plot(xs, [curve[x] for x in xs], "o-", ms=3, color=COLORS.get(strategy))
            share = [
                np.mean([(t.slices_to_target or 10**9) <= n for t in ts])
                for n in range(1, max_painted + 1)
            ]
            axes[1].step(
                range(1, max_painted + 1),
                share,
                where="post",
                color=COLORS.get(strategy),
                label=strategy,
            )
        axes[0].axhline(target, color="gray", lw=0.8, ls="--")
        axes[0].set_xlabel("painted slices")
        axes[0].set_ylabel("mean Dice (stopped sessions keep their last Dice)")
        axes[0].set_ylim(0.5, 1.0)
        axes[1].set_xlabel("painted slices")
        axes[1].set_ylabel(f"share of masks with Dice >= {target:.2f}")
        axes[1].set_ylim(0, 1.02)
        axes[1].legend(loc="lower right")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.set_xticks(range(2, max_painted + 1, 2))
        n = len({t.mask for t in sel})
        fig.suptitle(f"Annotation sessions, role {role}: {n} masks", fontsize=9)
        fig.tight_layout()
        p = os.path.join(folder, f"dice_vs_painted_{role}.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)

        names = list(dict.fromkeys(t.mask for t in sel))
        cols = min(6, len(names))
        rows = int(math.ceil(len(names) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), squeeze=False)
        for i, name in enumerate(names):
            ax = axes[i // cols][i % cols]
            for t in (t for t in sel if t.mask == name):
                ax.plot(t.counts, t.dice, "o-", ms=2, lw=1, color=COLORS.get(t.strategy))
            ax.axhline(target, color="gray", lw=0.6, ls="--")
            ax.set_title(name[-30:], fontsize=7)
            ax.set_ylim(0, 1)
            ax.set_xlim(1, max_painted + 0.5)
            ax.tick_params(labelsize=6)
        for j in range(len(names), rows * cols):
            axes[j // cols][j % cols].axis("off")
        fig.suptitle(
            f"Dice vs painted slices per mask, role {role} "
            "(red ours+suggestion, orange ours+bisection, blue FBS+bisection)",
            fontsize=9,
        )
        fig.tight_layout()
        p = os.path.join(folder, f"dice_vs_painted_per_mask_{role}.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written


# ------------------------------------------------------------------------------ command line


def run_cli(args, cases, axis: int) -> int:
    """``python -m UniverSegResearch evaluate --session``: the sessions of every mask of ``cases``, their
    JSON (``--json``), tables per case role, and figures (``--figures``)."""
    from UniverSegLogic.core.prior import FusionParams
    from UniverSegLogic.core.propagator import PropagationOptions
    from UniverSegLogic.errors import UsageError

    strategies = [s for s in args.strategies.replace(" ", "").split(",") if s]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise UsageError(
            f"--strategies: unknown strategy {bad[0] if bad else '(none)'}; "
            f"use {', '.join(STRATEGIES)}"
        )
    if not 0.0 < args.target_dice <= 1.0:
        raise UsageError(f"--target-dice must be in (0, 1], got {args.target_dice}")
    if args.max_painted < START_K:
        raise UsageError(f"--max-painted must be at least {START_K}, got {args.max_painted}")
    options = PropagationOptions(
        device=args.device, weights=args.weights, fusion_model=args.fusion_model
    )
    if args.support_size is not None:
        if args.support_size < 1:
            raise UsageError("--support-size must be at least 1")
        options.support_size = args.support_size
    engine, fusion = None, None
    if any(s.startswith("ours") for s in strategies):
        from UniverSegLogic.core.engines import EngineStore

        engine = EngineStore().get(args.weights, args.device).engine
        if args.fusion:
            fusion = FusionParams.load(args.fusion)
    log = None if args.quiet else (lambda s: print(s, flush=True))
    factory = None
    if args.logit_cache and engine is not None:
        from .logit_store import session_factory

        factory = session_factory(args.logit_cache, args.weights, axis, engine, options, fusion)
    t0 = time.perf_counter()
    traces = run_sessions(
        cases,
        strategies,
        engine,
        options,
        fusion,
        axis,
        args.target_dice,
        args.max_painted,
        START_K,
        log,
        factory,
    )
    total = time.perf_counter() - t0
    protocol = {
        "start": f"evaluation_slices(z0, z1, {START_K})",
        "target_dice": args.target_dice,
        "max_painted": args.max_painted,
        "strategies": strategies,
        "axis": int(axis),
        "weights": args.weights,
        "fusion": args.fusion or "shipped for the weights",
        "fusion_model": args.fusion_model,
        "support_size": options.support_size,
        "median_censoring": f"a session that never reaches the target counts as "
        f"{args.max_painted + 1} slices",
        "seconds": round(total, 1),
    }
    write_json(args.json, traces, protocol, args.max_painted)
    roles: Dict[str, List[SessionTrace]] = {}
    for t in traces:
        roles.setdefault(t.role or "all", []).append(t)
    for role, sel in roles.items():
        names = sorted({t.case for t in sel})
        print(summary_table(sel, f"== role {role}: {', '.join(names)}", args.max_painted))
    print(f"{len(traces)} sessions in {total:.1f} s; wrote {args.json}")
    if args.figures:
        paths = write_figures(args.figures, traces, args.max_painted)
        print(f"wrote {len(paths)} figures to {args.figures}")
    return 0
