"""Render the Slicer-extension figures from the sources (matplotlib only, no Qt needed).

    python docs/render_slicer_figures.py

* ``docs/slicer_panel.png`` -- a *schematic* of the module panel (not a screenshot: it is drawn
  here, laid out from ``UniverSegSlicer.ui`` -- widget order, labels, texts -- with example
  content, and says so in the picture);
* ``docs/slicer_loop.png`` -- the annotation loop: painted, predicted and corrected slices;
* ``Resources/Icons/UniverSeg.png`` and ``UniverSegSlicer/Resources/Icons/UniverSegSlicer.png``
  -- the extension and module icons (128 x 128).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Ellipse, FancyBboxPatch, Polygon, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UI = ROOT / "UniverSegSlicer" / "Resources" / "UI" / "UniverSegSlicer.ui"

#: Example content shown in the panel figure (what a user would see mid-session).
EXAMPLES = {
    "inputVolumeSelector": "CTChest",
    "segmentationSelector": "Segmentation",
    "segmentsList": [("lungs", "#7fb3d5", True), ("heart", "#e8523f", False)],
    "effectHintLabel": "Tip: in Segment Editor, the UniverSeg effect previews the propagated "
    "segments before you apply them and honours the editor's masking.",
    "axisComboBox": "auto",
    "summaryLabel": "lungs \u2014 axial: 4 labeled (20, 31, 45, 60), 1 corrected, 38 predicted",
    "outputModeComboBox": "fill",
    "supportSizeSpinBox": "2",
    "ensembleSpinBox": "1",
    "deviceComboBox": "auto",
    "weightsComboBox": "starter",
    "fusionComboBox": "logistic",
    "weightsPathLineEdit": "",
    "supportList": [("atlas  (CT-atlas)", None, False)],
    "progressBar": 40,
    "statusLabel": "lungs: slices 49..52",
}


def _text(widget, prop="text"):
    for p in widget.findall("property"):
        if p.get("name") == prop:
            return p.findtext("string") or ""
    return ""


def _rows(layout):
    """(label, widget) rows of a form/box layout in display order."""
    items = layout.findall("item")
    if layout.get("class") == "QFormLayout":
        grid = {}
        for item in items:
            grid.setdefault(int(item.get("row")), {})[int(item.get("column", 0))] = item
        for r in sorted(grid):
            cells = grid[r]
            if 0 in cells and 1 in cells:
                yield cells[0][0], cells[1][0]
            else:
                yield None, next(iter(cells.values()))[0]
    else:
        for item in items:
            if len(item):
                yield None, item[0]


def _draw_widget(ax, w, x, y, width, h):
    cls, name = w.get("class"), w.get("name")
    value = EXAMPLES.get(name, "")
    box = dict(boxstyle="round,pad=0,rounding_size=0.006", lw=0.8)
    if cls in ("qMRMLNodeComboBox", "QComboBox", "QSpinBox", "ctkPathLineEdit"):
        ax.add_patch(FancyBboxPatch((x, y - h), width, h, fc="white", ec="#9aa3ad", **box))
        ax.text(x + 0.012, y - h / 2, str(value), va="center", fontsize=7.5)
        if cls != "ctkPathLineEdit":
            ax.text(
                x + width - 0.02,
                y - h / 2,
                "\u25be" if cls != "QSpinBox" else "\u21c5",
                va="center",
                ha="center",
                fontsize=8,
                color="#555",
            )
        else:
            ax.text(x + width - 0.02, y - h / 2, "\u2026", va="center", ha="center", fontsize=8)
        return h
    if cls == "QListWidget":
        rows = value or []
        hh = max(1, len(rows)) * h * 0.9 + 0.01
        ax.add_patch(FancyBboxPatch((x, y - hh), width, hh, fc="white", ec="#9aa3ad", **box))
        for n, (label, color, checked) in enumerate(rows):
            yy = y - 0.006 - (n + 0.5) * h * 0.9
            ax.add_patch(
                Rectangle((x + 0.01, yy - 0.008), 0.016, 0.016, fc="white", ec="#555", lw=0.7)
            )
            if checked:
                ax.text(x + 0.018, yy, "\u2713", ha="center", va="center", fontsize=7)
            dx = 0.035
            if color:
                ax.add_patch(Rectangle((x + dx, yy - 0.007), 0.014, 0.014, fc=color, ec="none"))
                dx += 0.022
            ax.text(x + dx, yy, label, va="center", fontsize=7.5)
        return hh
    if cls == "QPushButton":
        ax.add_patch(FancyBboxPatch((x, y - h), width, h, fc="#eef1f5", ec="#8a939c", **box))
        ax.text(x + width / 2, y - h / 2, _text(w), ha="center", va="center", fontsize=7.5)
        return h
    if cls == "QProgressBar":
        ax.add_patch(
            FancyBboxPatch((x, y - h * 0.8), width, h * 0.8, fc="white", ec="#9aa3ad", **box)
        )
        ax.add_patch(
            Rectangle((x, y - h * 0.8), width * value / 100, h * 0.8, fc="#4a90d9", ec="none")
        )
        ax.text(x + width / 2, y - h * 0.4, f"{value}%", ha="center", va="center", fontsize=7)
        return h * 0.8
    if cls == "QLabel":
        text = value or _text(w)
        if not text:
            return 0.0
        import textwrap

        lines = textwrap.wrap(text, 70)
        for n, line in enumerate(lines):
            ax.text(x, y - 0.012 - n * 0.02, line, fontsize=7, color="#333", va="center")
        return 0.02 * len(lines) + 0.004
    return 0.0


def _draw_layout(ax, layout, y, x0=0.04, x1=0.96):
    h = 0.032
    for label, widget in _rows(layout):
        if widget.tag == "layout":  # a row of buttons
            buttons = [it[0] for it in widget.findall("item") if len(it)]
            width = (x1 - x0 - 0.01 * (len(buttons) - 1)) / len(buttons)
            for n, b in enumerate(buttons):
                _draw_widget(ax, b, x0 + n * (width + 0.01), y, width, h)
            y -= h + 0.012
            continue
        if widget.tag != "widget":
            continue
        cls = widget.get("class")
        if cls == "ctkCollapsibleButton":
            ax.add_patch(
                FancyBboxPatch(
                    (x0, y - h),
                    x1 - x0,
                    h,
                    fc="#dde3ea",
                    ec="#b7c0ca",
                    boxstyle="round,pad=0,rounding_size=0.006",
                    lw=0.8,
                )
            )
            ax.text(
                x0 + 0.012,
                y - h / 2,
                "\u25be  " + _text(widget),
                va="center",
                fontsize=8,
                weight="bold",
            )
            y -= h + 0.012
            inner = widget.find("layout")
            if inner is not None:
                y = _draw_layout(ax, inner, y, x0 + 0.015, x1 - 0.01)
            y -= 0.006
            continue
        if label is not None:
            ax.text(x0, y - h / 2, _text(label), va="center", fontsize=7.5)
            used = _draw_widget(ax, widget, x0 + 0.27, y, x1 - x0 - 0.27, h)
        else:
            used = _draw_widget(ax, widget, x0, y, x1 - x0, h)
        if used:
            y -= used + 0.012
    return y


def render_panel(path: Path) -> None:
    """The panel schematic; the figure grows downwards to hold every widget of the ``.ui``."""
    root = ET.parse(UI).getroot().find("widget")
    height = 7.4  # inches for the y range 0..1 (the unit every widget size is given in)
    fig = plt.figure(figsize=(4.2, height), dpi=150)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.axis("off")
    ax.text(0.04, 0.975, "UniverSeg", fontsize=11, weight="bold", va="center")
    ax.text(
        0.96,
        0.975,
        "Modules \u25b8 Segmentation",
        fontsize=7,
        color="#666",
        ha="right",
        va="center",
    )
    # show the collapsed Settings section expanded in the figure
    bottom = _draw_layout(ax, root.find("layout"), 0.945)
    low = min(0.0, bottom - 0.045)
    ax.set_ylim(low, 1)
    fig.set_size_inches(4.2, height * (1 - low))
    ax.add_patch(Rectangle((0, low), 1, 1 - low, fc="#f6f7f9", ec="none", zorder=-1))
    ax.text(
        0.5,
        low + 0.012,
        "SCHEMATIC drawn from UniverSegSlicer.ui with example content - not a screenshot",
        fontsize=6.5,
        color="#a33",
        ha="center",
        va="bottom",
    )
    fig.savefig(path, dpi=150)
    plt.close(fig)


def render_loop(path: Path) -> None:
    """Slices along the axis: run 1 predicts, the user corrects one, run 2 uses it as support."""
    fig, axes = plt.subplots(1, 3, figsize=(9.0, 2.8), dpi=150)
    colors = {
        "painted": "#e8523f",
        "predicted": "#f5a623",
        "corrected": "#7b3fe4",
        "empty": "#ffffff",
    }
    stages = [
        ("1. paint a few slices", {2: "painted", 8: "painted", 13: "painted"}),
        (
            "2. Propagate: the rest is predicted",
            {**{i: "predicted" for i in range(0, 16)}, 2: "painted", 8: "painted", 13: "painted"},
        ),
        (
            "3. correct one slice, Propagate again",
            {
                **{i: "predicted" for i in range(0, 16)},
                2: "painted",
                8: "painted",
                13: "painted",
                5: "corrected",
            },
        ),
    ]
    for ax, (title, kinds) in zip(axes, stages):
        ax.set_xlim(-0.5, 15.5)
        ax.set_ylim(-1.6, 1.4)
        ax.axis("off")
        ax.set_title(title, fontsize=9)
        for i in range(16):
            kind = kinds.get(i, "empty")
            ax.add_patch(Rectangle((i - 0.4, -0.5), 0.8, 1.0, fc=colors[kind], ec="#555", lw=0.6))
            if kind in ("painted", "corrected") and title.startswith("3"):
                ax.text(i, 0.75, "S", ha="center", fontsize=7, weight="bold")
        ax.text(7.5, -1.05, "slice index along the slicing axis \u2192", ha="center", fontsize=7)
    fig.text(
        0.5,
        0.13,
        "S = support for run 2: painted and corrected slices. Untouched "
        "predictions are predicted again and never serve as support.",
        ha="center",
        fontsize=7,
    )
    handles = [Rectangle((0, 0), 1, 1, fc=c, ec="#555") for c in colors.values()]
    fig.legend(
        handles,
        ["painted (labeled)", "predicted", "corrected (becomes labeled)", "not labeled"],
        loc="lower center",
        ncol=4,
        fontsize=7,
        frameon=False,
    )
    fig.subplots_adjust(bottom=0.22, top=0.85, wspace=0.05, left=0.01, right=0.99)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def render_icon(path: Path, size: int = 128) -> None:
    fig = plt.figure(figsize=(1, 1), dpi=size)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    fig.patch.set_alpha(0)
    ax.add_patch(
        FancyBboxPatch(
            (0.04, 0.04),
            0.92,
            0.92,
            fc="#1f2a44",
            ec="none",
            boxstyle="round,pad=0,rounding_size=0.16",
        )
    )
    n = 5
    for s in range(n):
        y = 0.18 + s * 0.135
        painted = s in (0, n - 1)
        ax.add_patch(
            Polygon(
                [(0.14, y), (0.62, y), (0.86, y + 0.11), (0.38, y + 0.11)],
                closed=True,
                fc="#e8edf5" if painted else "#8fa0bd",
                ec="#1f2a44",
                lw=size / 128 * 1.2,
                alpha=0.97,
            )
        )
        r = 0.15 - 0.035 * abs(s - 2)
        ax.add_patch(
            Ellipse(
                (0.5, y + 0.055),
                r * 2,
                r * 0.62,
                fc="#e8523f" if painted else "#f5a623",
                ec="none",
                alpha=1.0 if painted else 0.9,
            )
        )
    fig.savefig(path, dpi=size, transparent=True)
    plt.close(fig)


if __name__ == "__main__":
    render_panel(ROOT / "docs" / "slicer_panel.png")
    render_loop(ROOT / "docs" / "slicer_loop.png")
    render_icon(ROOT / "Resources" / "Icons" / "UniverSeg.png")
    render_icon(ROOT / "UniverSegSlicer" / "Resources" / "Icons" / "UniverSegSlicer.png")
    print("figures written")
