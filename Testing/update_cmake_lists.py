"""Rewrite the list of UniverSegLogic files in UniverSegSlicer/CMakeLists.txt.

The Slicer extension installs only the files listed there. It ships the runtime: the package's
top-level modules (but not ``__main__.py``, the command line's entry point, nor ``sample.py``),
``core/`` and ``mrml/``; the command line (``cli/``), the benchmarks (``benchmark/``), cohort
labeling (``cohort/``) and the browser app (``web/``) are never shipped, and the developer tools
live outside the package (``UniverSegResearch/``).
Run after adding or removing a file:

    python Testing/update_cmake_lists.py          # rewrite the list
    python Testing/update_cmake_lists.py --check  # exit 1 (and say what differs) if out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent
CMAKE = Path("UniverSegSlicer") / "CMakeLists.txt"
BEGIN = "# BEGIN UniverSegLogic files"
END = "# END UniverSegLogic files"
#: Sub-packages of UniverSegLogic that the extension ships (besides the top-level modules).
SHIPPED_PACKAGES = ("core", "mrml")
#: Sub-packages that must never be shipped in (or imported by) the extension.
NOT_SHIPPED = ("benchmark", "cli", "cohort", "web")
#: Top-level modules that are not shipped.
NOT_SHIPPED_MODULES = ("__main__.py", "sample.py")


def logic_files(root: Path = ROOT) -> List[str]:
    """Every shipped Python file of the package (paths relative to UniverSegLogic/), sorted."""
    pkg = root / "UniverSegLogic"
    files = [p.name for p in pkg.glob("*.py") if p.name not in NOT_SHIPPED_MODULES]
    for sub in SHIPPED_PACKAGES:
        files += [p.relative_to(pkg).as_posix() for p in (pkg / sub).rglob("*.py")]
    return sorted(files)


def listed_files(text: str) -> Tuple[List[str], int, int]:
    """(files between the markers, offset after the BEGIN line, offset of the END line)."""
    begin = text.find(BEGIN)
    end = text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"{CMAKE}: markers '{BEGIN}' / '{END}' not found")
    start = text.index("\n", begin) + 1
    stop = text.rfind("\n", 0, end) + 1
    files = [
        line.strip()
        for line in text[start:stop].splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    return files, start, stop


def updated_text(text: str, files: List[str]) -> str:
    """``text`` with the list between the markers replaced by ``files``."""
    _, start, stop = listed_files(text)
    indent = re.match(r"[ \t]*", text[text.rfind("\n", 0, stop - 1) + 1 :]).group(0) or "  "
    return text[:start] + "".join(f"{indent}{f}\n" for f in files) + text[stop:]


def main(argv=None) -> int:
    """Check or rewrite the list; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report, change nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    args = parser.parse_args(argv)
    path = args.root / CMAKE
    text = path.read_text()
    listed, _, _ = listed_files(text)
    wanted = logic_files(args.root)
    if listed == wanted:
        print(f"{CMAKE}: up to date ({len(wanted)} files)")
        return 0
    missing = sorted(set(wanted) - set(listed))
    extra = sorted(set(listed) - set(wanted))
    parts = [
        f"missing {', '.join(missing)}" if missing else "",
        f"no longer present {', '.join(extra)}" if extra else "",
        "order" if not missing and not extra else "",
    ]
    detail = "; ".join(x for x in parts if x)
    if args.check:
        print(f"{CMAKE}: out of date ({detail}); run python Testing/update_cmake_lists.py")
        return 1
    path.write_text(updated_text(text, wanted))
    print(f"{CMAKE}: updated ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
