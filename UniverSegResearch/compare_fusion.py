"""Tables of the learned fusion against the logistic rule and Fill between slices, per case role.

``python -m UniverSegResearch.compare_fusion --manifest M --learned A.json --logistic B.json``
reads two ``evaluate --json`` outputs of the same cases and k (``A``: the learned fusion, with the
``fill_between_slices`` and ``nearest_slice`` rows; ``B``: the logistic rule) and prints Markdown:
mean Dice per role and k, the issue-20 targets (k=5 vs FBS k=8, k=3 vs FBS k=5), and each
structure's worst margin against Fill between slices. Developer tool only; never shipped.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

Table = Dict[Tuple[str, int, str], float]  # (mask, k, method) -> dice


def _rows(path: str, rename: Optional[Dict[str, str]] = None) -> Table:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    out: Table = {}
    for r in data["results"]:
        method = (rename or {}).get(r["method"], r["method"])
        out[(r["mask"], int(r["k"]), method)] = float(r["dice"])
    return out


def _roles(manifest: str) -> Dict[str, str]:
    """case name -> role."""
    with open(manifest, encoding="utf-8") as fh:
        return {c["case"]: c.get("role", "") for c in json.load(fh)["cases"]}


def report(manifest: str, learned: str, logistic: str) -> Tuple[str, Dict]:
    """(Markdown, the same numbers as a dict)."""
    table = _rows(learned, {"universeg": "learned"})
    table.update(_rows(logistic, {"universeg": "logistic"}))
    roles = _roles(manifest)
    ks = sorted({k for _, k, _ in table})
    by_role: Dict[str, List[str]] = defaultdict(list)
    for mask in sorted({m for m, _, _ in table}):
        by_role[roles.get(mask.split("/")[0], "")].append(mask)
    methods = ("learned", "logistic", "fill_between_slices", "nearest_slice")
    lines: List[str] = []
    numbers: Dict[str, Dict] = {}
    for role in sorted(by_role, key=lambda r: (r != "unseen", r)):
        masks = by_role[role]
        mean = {
            (k, m): float(np.mean([table[(x, k, m)] for x in masks]))
            for k in ks
            for m in methods
            if all((x, k, m) in table for x in masks)
        }
        lines += [
            f"**{role}** ({len(masks)} structures)",
            "",
            "| k | learned fusion | logistic rule | Fill between slices | nearest slice | "
            "learned − logistic | learned − FBS |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in ks:
            cell = [f"{mean[(k, m)]:.3f}" if (k, m) in mean else "–" for m in methods]
            d1 = mean[(k, "learned")] - mean[(k, "logistic")]
            d2 = mean[(k, "learned")] - mean[(k, "fill_between_slices")]
            lines.append(f"| {k} | " + " | ".join(cell) + f" | {d1:+.3f} | {d2:+.3f} |")
        lines.append("")
        targets = []
        for ours, fbs in ((5, 8), (3, 5)):
            if (ours, "learned") in mean and (fbs, "fill_between_slices") in mean:
                for m in ("learned", "logistic"):
                    a, b = mean[(ours, m)], mean[(fbs, "fill_between_slices")]
                    targets.append(
                        f"{m} k={ours} {a:.3f} vs FBS k={fbs} {b:.3f} ({a - b:+.3f}: "
                        f"{'met' if a >= b else 'missed'})"
                    )
        lines += ["Targets: " + "; ".join(targets) + ".", ""]
        worst = []
        for x in masks:
            for m in ("learned", "logistic"):
                gaps = [
                    (table[(x, k, m)] - table[(x, k, "fill_between_slices")], k)
                    for k in ks
                    if (x, k, m) in table and (x, k, "fill_between_slices") in table
                ]
                if gaps:
                    g, k = min(gaps)
                    worst.append((m, x, g, k))
        lines += [
            "Structures more than 0.02 below Fill between slices at some k (worst k):",
            "",
            "| structure | learned − FBS | logistic − FBS |",
            "|---|---|---|",
        ]
        names = sorted(
            {x for m, x, g, k in worst if g < -0.02},
            key=lambda x: min(g for m, y, g, k in worst if y == x),
        )
        cell = {(m, x): (g, k) for m, x, g, k in worst}
        for x in names:
            parts = []
            for m in ("learned", "logistic"):
                g, k = cell.get((m, x), (float("nan"), 0))
                parts.append(f"{g:+.3f} (k={k})")
            lines.append(f"| {x} | " + " | ".join(parts) + " |")
        if not names:
            lines.append("| (none) | | |")
        lines.append("")
        numbers[role] = {
            "masks": masks,
            "mean": {f"{m}@{k}": v for (k, m), v in mean.items()},
            "worst_vs_fbs": [
                {"method": m, "mask": x, "margin": g, "k": k} for m, x, g, k in sorted(worst)
            ],
        }
    return "\n".join(lines), numbers


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m UniverSegResearch.compare_fusion")
    p.add_argument("--manifest", required=True)
    p.add_argument("--learned", required=True, help="evaluate --json of the learned fusion")
    p.add_argument("--logistic", required=True, help="evaluate --json of the logistic rule")
    p.add_argument("--json", default=None, help="write the numbers here too")
    args = p.parse_args(argv)
    text, numbers = report(args.manifest, args.learned, args.logistic)
    print(text)
    if args.json:
        from UniverSegLogic.core.atomic import write_text

        write_text(args.json, json.dumps(numbers, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
