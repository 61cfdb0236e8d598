"""Docs a user finds: the module panel figure is what docs/render_slicer_figures.py draws from
the current .ui, docs/slicer.md names every button of the panel, and the README covers the
browser app, the next-slice suggestion and the device a run used."""

import runpy
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "UniverSegSlicer" / "Resources" / "UI" / "UniverSegSlicer.ui"


def test_the_panel_figure_is_drawn_from_the_current_ui(tmp_path):
    import matplotlib.image

    script = runpy.run_path(str(ROOT / "docs" / "render_slicer_figures.py"))
    script["render_panel"](tmp_path / "panel.png")
    drawn = matplotlib.image.imread(tmp_path / "panel.png")
    committed = matplotlib.image.imread(ROOT / "docs" / "slicer_panel.png")
    assert drawn.shape == committed.shape, "run: python docs/render_slicer_figures.py"
    differing = np.abs(drawn - committed).max(axis=-1) > 0.1
    assert differing.mean() < 0.005, "run: python docs/render_slicer_figures.py"


def test_docs_name_every_button_and_field_of_the_panel():
    root = ET.parse(UI).getroot()
    texts = []
    for widget in root.iter("widget"):
        if widget.get("class") in ("QPushButton", "QLabel", "ctkCollapsibleButton"):
            for prop in widget.findall("property"):
                if prop.get("name") == "text" and prop.findtext("string"):
                    texts.append(prop.findtext("string").rstrip(":"))
    doc = " ".join((ROOT / "docs" / "slicer.md").read_text().split())
    names = [t for t in texts if len(t) < 40]  # buttons and field labels, not the hint texts
    assert "Go to suggested slice" in names and "Slicing axis" in names
    missing = [t for t in names if t.lower() not in doc.lower()]
    assert not missing, missing


def test_the_readme_covers_the_browser_app_suggestions_and_the_device():
    readme = (ROOT / "README.md").read_text()
    for needle in (
        "universeg-slicer web",
        "docs/web_app.png",
        "token",
        "--suggest",
        "--report",
        "Go to suggested slice",
        "--device auto|cpu|cuda|mps",
        "--axis auto",
        'pip install ".[web]"',
    ):
        assert needle in readme, needle
    assert "universeg-slicer[" not in readme and "propagate_segmentation" not in readme
