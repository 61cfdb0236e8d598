"""Rewrite the list of UniverSegLogic files in UniverSegSlicer/CMakeLists.txt.

The Slicer extension installs only the files listed there, so the list must name every
``UniverSegLogic/*.py`` of the repository. Run after adding or removing a file:

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


def logic_files(root: Path = ROOT) -> List[str]:
    """Every Python file of the package, sorted."""
    return sorted(p.name for p in (root / "UniverSegLogic").glob("*.py"))


def listed_files(text: str) -> Tuple[List[str], int, int]:
    """(files between the markers, offset after the BEGIN line, offset of the END line)."""
    begin = text.find(BEGIN)
    end = text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"{CMAKE}: markers '{BEGIN}' / '{END}' not found")
    start = text.index("\n", begin) + 1
    stop = text.rfind("\n", 0, end) + 1
    files = [line.strip() for line in text[start:stop].splitlines()
             if line.strip() and not line.strip().startswith("#")]
    return files, start, stop


def updated_text(text: str, files: List[str]) -> str:
    _, start, stop = listed_files(text)
    indent = re.match(r"[ \t]*", text[text.rfind("\n", 0, stop - 1) + 1:]).group(0) or "  "
    return text[:start] + "".join(f"{indent}{f}\n" for f in files) + text[stop:]


def main(argv=None) -> int:
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
    detail = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                    f"no longer present {', '.join(extra)}" if extra else "",
                                    "order" if not missing and not extra else "") if x)
    if args.check:
        print(f"{CMAKE}: out of date ({detail}); run python Testing/update_cmake_lists.py")
        return 1
    path.write_text(updated_text(text, wanted))
    print(f"{CMAKE}: updated ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
