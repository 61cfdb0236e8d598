"""Packaging of the Slicer extension, checked from the sources (no CMake or Slicer needed).

The installed extension contains only the files its CMake lists name, so these checks fail when
a Python file the module needs, or a file it loads, is not listed; when the ExtensionsIndex entry
(UniverSeg.json) and the top-level CMakeLists.txt disagree; and when the widget uses a
``self.ui.<name>`` that the .ui file does not define. Each check is also run on a broken copy of
the repository to show that it can fail.
"""

import ast
import json
import py_compile
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = "UniverSegSlicer"
LOGIC_DIR = "UniverSegLogic"

sys.path.insert(0, str(Path(__file__).resolve().parent))
import update_cmake_lists  # noqa: E402

# --------------------------------------------------------------------------------------------
# reading the sources


def _strip_cmake_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def cmake_set(text: str, name: str) -> List[str]:
    """Values of ``set(<name> ...)`` (all occurrences concatenated), comments removed."""
    values: List[str] = []
    for m in re.finditer(
        r"\bset\(\s*" + re.escape(name) + r"\b(.*?)\)", _strip_cmake_comments(text), re.S
    ):
        values += [v.strip('"') for v in m.group(1).split()]
    return values


def cmake_call_args(text: str, command: str) -> List[str]:
    return [
        m.group(1).strip()
        for m in re.finditer(r"\b" + command + r"\(\s*(.*?)\)", _strip_cmake_comments(text), re.S)
    ]


def module_cmake(root: Path) -> Dict[str, List[str]]:
    text = (root / MODULE_DIR / "CMakeLists.txt").read_text()
    name = cmake_set(text, "MODULE_NAME")[0]
    sub = lambda values: [v.replace("${MODULE_NAME}", name) for v in values]  # noqa: E731
    return {
        "text": text,
        "name": name,
        "scripts": sub(cmake_set(text, "MODULE_PYTHON_SCRIPTS")),
        "resources": sub(cmake_set(text, "MODULE_PYTHON_RESOURCES")),
        "logic": cmake_set(text, "UNIVERSEG_LOGIC_FILES"),
        "data": cmake_set(text, "UNIVERSEG_DATA_FILES"),
    }


def _module_parts(path: Path, root: Path) -> List[str]:
    """Dotted parts of the package a file belongs to, relative to UniverSegLogic."""
    rel = path.resolve().relative_to((root / LOGIC_DIR).resolve())
    return list(rel.parts[:-1])


def imported_modules(path: Path, root: Path = ROOT, package: str = LOGIC_DIR) -> Set[str]:
    """Dotted names (relative to ``package``) of the package's modules that ``path`` imports,
    absolutely or relatively; ``from X import name`` also yields ``X.name`` (it may be a module).
    """
    tree = ast.parse(path.read_text(), str(path))
    inside = (root / LOGIC_DIR).resolve() in path.resolve().parents
    here = _module_parts(path, root) if inside else None
    found: Set[str] = set()

    def add(parts: List[str], names=()):
        found.add(".".join(parts) or "__init__")
        for n in names:
            found.add(".".join(parts + [n]))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package:
                    add(parts[1:])
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 0 and node.module and node.module.split(".")[0] == package:
                add(node.module.split(".")[1:], names)
            elif node.level > 0 and here is not None:
                base = here[: len(here) - (node.level - 1)]
                add(base + (node.module.split(".") if node.module else []), names)
    return found


def module_file(root: Path, dotted: str):
    """The file of module ``dotted`` (relative to UniverSegLogic), or None."""
    if dotted == "__init__":
        return root / LOGIC_DIR / "__init__.py"
    base = root / LOGIC_DIR / Path(*dotted.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def runtime_closure(root: Path, start: Path) -> Dict[str, Path]:
    """Every UniverSegLogic module ``start`` needs at run time (its imports, theirs, and the
    ``__init__`` of each package on the way), as dotted name -> file."""
    found: Dict[str, Path] = {}
    todo = [start]
    while todo:
        for mod in imported_modules(todo.pop(), root):
            parts = mod.split(".") if mod != "__init__" else []
            for i in range(len(parts) + 1):  # the packages' __init__ run first
                name = ".".join(parts[:i]) if i else "__init__"
                path = module_file(root, name)
                if i < len(parts) and name != "__init__":
                    init = root / LOGIC_DIR / Path(*parts[:i]) / "__init__.py"
                    path = init if init.is_file() else None
                    name = name + ".__init__"
                if path is not None and name not in found:
                    found[name] = path
                    todo.append(path)
            if module_file(root, mod) is None and len(parts) > 1:
                parent = module_file(root, ".".join(parts[:-1]))
                if parent is None:
                    found.setdefault("missing:" + mod, None)
            elif module_file(root, mod) is None and parts:
                found.setdefault("missing:" + mod, None)
    return found


def ui_widget_names(ui_path: Path) -> Set[str]:
    tree = ET.parse(ui_path)
    return {w.get("name") for w in tree.iter() if w.tag in ("widget", "layout", "spacer")}


def ui_parameter_names(ui_path: Path) -> Set[str]:
    names = set()
    for widget in ET.parse(ui_path).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names.add(prop.findtext("string"))
    return names


def parameter_node_fields(module_path: Path) -> Set[str]:
    tree = ast.parse(module_path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
    return set()


# --------------------------------------------------------------------------------------------
# checks (each returns a list of problems)


def check_module_files(root: Path) -> List[str]:
    """Module .py files and the files the module loads are listed and exist."""
    cm = module_cmake(root)
    problems = []
    module_dir = root / MODULE_DIR
    for path in sorted(module_dir.glob("*.py")):
        if path.name not in cm["scripts"]:
            problems.append(f"{MODULE_DIR}/{path.name} is not in MODULE_PYTHON_SCRIPTS")
    for script in cm["scripts"]:
        if not script.startswith("${") and not (module_dir / script).is_file():
            problems.append(f"MODULE_PYTHON_SCRIPTS lists missing file {script}")
    for resource in cm["resources"]:
        if not (module_dir / resource).is_file():
            problems.append(f"MODULE_PYTHON_RESOURCES lists missing file {resource}")
    main = module_dir / f"{cm['name']}.py"
    source = main.read_text()
    loaded = {f"Resources/{p}" for p in re.findall(r"resourcePath\(\s*[\"']([^\"']+)[\"']", source)}
    loaded.add(f"Resources/Icons/{cm['name']}.png")  # the module icon Slicer shows
    for resource in sorted(loaded - set(cm["resources"])):
        problems.append(f"{cm['name']}.py loads {resource}, not in MODULE_PYTHON_RESOURCES")
    if (
        "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" not in cm["text"]
        or "RESOURCES ${MODULE_PYTHON_RESOURCES}" not in cm["text"]
    ):
        problems.append("slicerMacroBuildScriptedModule does not get the module's lists")
    return problems


def check_logic_files(root: Path) -> List[str]:
    """Every shipped UniverSegLogic file (and everything the module imports from the package)
    is listed; nothing under cli/ or research/ is listed or imported by the module."""
    cm = module_cmake(root)
    problems = []
    logic_dir = root / LOGIC_DIR
    present = update_cmake_lists.logic_files(root)
    for name in present:
        if name not in cm["logic"]:
            problems.append(
                f"{LOGIC_DIR}/{name} is not in UNIVERSEG_LOGIC_FILES "
                "(run python Testing/update_cmake_lists.py)"
            )
    for name in cm["logic"]:
        if not (logic_dir / name).is_file():
            problems.append(f"UNIVERSEG_LOGIC_FILES lists missing file {LOGIC_DIR}/{name}")
        if name.split("/")[0] in update_cmake_lists.NOT_SHIPPED:
            problems.append(
                f"UNIVERSEG_LOGIC_FILES lists {name}: {name.split('/')[0]}/ is "
                "never shipped in the extension"
            )
    # what the module needs at run time: its imports, and theirs, inside the package
    for script in sorted((root / MODULE_DIR).glob("*.py")):
        for name, path in runtime_closure(root, script).items():
            if name.startswith("missing:"):
                problems.append(
                    f"{script.name} imports {LOGIC_DIR}.{name[8:]}, which does not exist"
                )
                continue
            rel = path.relative_to(logic_dir).as_posix()
            if rel.split("/")[0] in update_cmake_lists.NOT_SHIPPED:
                problems.append(
                    f"{script.name} imports {LOGIC_DIR}/{rel}, which is never "
                    "shipped in the extension"
                )
            elif rel not in cm["logic"]:
                problems.append(f"{LOGIC_DIR}/{rel} is imported but not listed")
    if (
        "list(APPEND MODULE_PYTHON_SCRIPTS ${CMAKE_CURRENT_BINARY_DIR}/UniverSegLogic/${_file})"
        not in cm["text"]
    ):
        problems.append("UNIVERSEG_LOGIC_FILES are not added to MODULE_PYTHON_SCRIPTS")
    # data the shipped logic loads from Resources/
    logic_source = "\n".join((logic_dir / name).read_text() for name in present)
    for data in sorted(set(re.findall(r"[\"'](starter_\w+\.(?:pt|json))[\"']", logic_source))):
        if data not in cm["data"]:
            problems.append(f"the logic loads Resources/{data}, not in UNIVERSEG_DATA_FILES")
    return problems


def check_ui_names(root: Path) -> List[str]:
    """Every ``self.ui.<name>`` exists in the .ui file; parameter names match the wrapper."""
    cm = module_cmake(root)
    module = root / MODULE_DIR / f"{cm['name']}.py"
    ui = root / MODULE_DIR / "Resources" / "UI" / f"{cm['name']}.ui"
    names = ui_widget_names(ui)
    used = set(re.findall(r"\bself\.ui\.(\w+)", module.read_text()))
    problems = [
        f"{module.name} uses self.ui.{n}, not defined in {ui.name}" for n in sorted(used - names)
    ]
    fields = parameter_node_fields(module)
    problems += [
        f"{ui.name}: SlicerParameterName {n!r} is not a parameter of the module"
        for n in sorted(ui_parameter_names(ui) - fields)
    ]
    return problems


def check_extension_metadata(root: Path) -> List[str]:
    """UniverSeg.json (ExtensionsIndex entry) agrees with the top-level CMakeLists.txt."""
    text = (root / "CMakeLists.txt").read_text()
    problems = []
    projects = cmake_call_args(text, "project")
    if len(projects) != 1:
        return ["top-level CMakeLists.txt must have exactly one project()"]
    name = projects[0].split()[0]
    index = root / f"{name}.json"
    if not index.is_file():
        return [f"no ExtensionsIndex entry {name}.json for project({name})"]
    entry = json.loads(index.read_text())
    depends = [d for d in cmake_set(text, "EXTENSION_DEPENDS") if d != "NA"]
    if sorted(entry.get("build_dependencies", [])) != sorted(depends):
        problems.append(
            f"{index.name} build_dependencies {entry.get('build_dependencies')} != "
            f"EXTENSION_DEPENDS {depends}"
        )
    category = " ".join(cmake_set(text, "EXTENSION_CATEGORY"))
    if entry.get("category") != category:
        problems.append(f"{index.name} category {entry.get('category')!r} != {category!r}")
    homepage = " ".join(cmake_set(text, "EXTENSION_HOMEPAGE"))
    norm = lambda u: u.rstrip("/").removesuffix(".git")  # noqa: E731
    if norm(entry.get("scm_url", "")) != norm(homepage):
        problems.append(f"{index.name} scm_url {entry.get('scm_url')!r} != EXTENSION_HOMEPAGE")
    for key in ("scm_url", "scm_revision", "build_subdirectory", "category"):
        if not entry.get(key):
            problems.append(f"{index.name} lacks {key}")
    for var in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        if not cmake_set(text, var):
            problems.append(f"top-level CMakeLists.txt does not set {var}")
    for needed in (
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        f"add_subdirectory({MODULE_DIR})",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        if needed not in text:
            problems.append(f"top-level CMakeLists.txt lacks {needed}")
    icon = re.search(r"/main/(.+\.png)", " ".join(cmake_set(text, "EXTENSION_ICONURL")))
    if icon and not (root / icon.group(1)).is_file():
        problems.append(f"EXTENSION_ICONURL points to {icon.group(1)}, not in the repository")
    return problems


CHECKS = [check_module_files, check_logic_files, check_ui_names, check_extension_metadata]


# --------------------------------------------------------------------------------------------
# the repository passes


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_repository(check):
    assert check(ROOT) == []


def test_module_source_compiles(tmp_path):
    # the module needs Slicer's Qt to import; compiling at least catches syntax errors
    for path in (ROOT / MODULE_DIR).glob("*.py"):
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)


def test_update_script_reports_the_repository_up_to_date():
    assert update_cmake_lists.main(["--check", "--root", str(ROOT)]) == 0


# --------------------------------------------------------------------------------------------
# each check fails on a broken copy


@pytest.fixture
def copy(tmp_path):
    root = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pt", "*.png")
    shutil.copytree(ROOT / MODULE_DIR, root / MODULE_DIR, ignore=ignore)
    shutil.copytree(ROOT / LOGIC_DIR, root / LOGIC_DIR, ignore=ignore)
    for name in ("CMakeLists.txt", "UniverSeg.json"):
        shutil.copy(ROOT / name, root / name)
    (root / MODULE_DIR / "Resources" / "Icons").mkdir(parents=True, exist_ok=True)
    (root / MODULE_DIR / "Resources" / "Icons" / f"{MODULE_DIR}.png").write_bytes(b"png")
    (root / "Resources" / "Icons").mkdir(parents=True)
    (root / "Resources" / "Icons" / "UniverSeg.png").write_bytes(b"png")
    for check in CHECKS:
        assert check(root) == [], check.__name__
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_new_logic_file_must_be_listed_and_the_update_script_lists_it(copy):
    (copy / LOGIC_DIR / "newfeature.py").write_text("X = 1\n")
    assert any(
        "newfeature.py is not in UNIVERSEG_LOGIC_FILES" in p for p in check_logic_files(copy)
    )
    assert update_cmake_lists.main(["--check", "--root", str(copy)]) == 1
    assert update_cmake_lists.main(["--root", str(copy)]) == 0
    assert check_logic_files(copy) == []
    assert "  newfeature.py\n" in (copy / MODULE_DIR / "CMakeLists.txt").read_text()
    (copy / LOGIC_DIR / "core" / "newcore.py").write_text("X = 1\n")
    assert any(
        "core/newcore.py is not in UNIVERSEG_LOGIC_FILES" in p for p in check_logic_files(copy)
    )
    (copy / LOGIC_DIR / "research" / "newtool.py").write_text("X = 1\n")
    assert update_cmake_lists.main(["--root", str(copy)]) == 0
    assert "research/newtool.py" not in (copy / MODULE_DIR / "CMakeLists.txt").read_text()


def test_removed_logic_file_must_leave_the_list(copy):
    (copy / LOGIC_DIR / "core" / "restack.py").unlink()
    assert any(
        "lists missing file UniverSegLogic/core/restack.py" in p for p in check_logic_files(copy)
    )


def test_module_import_of_an_unlisted_or_missing_logic_module_fails(copy):
    module = copy / MODULE_DIR / f"{MODULE_DIR}.py"
    _edit(module, "import logging\n", "import logging\nimport UniverSegLogic.ghost\n")
    assert any("UniverSegLogic.ghost, which does not exist" in p for p in check_logic_files(copy))
    _edit(copy / MODULE_DIR / "CMakeLists.txt", "  core/geometry.py\n", "")
    assert any("core/geometry.py is imported but not listed" in p for p in check_logic_files(copy))


def test_module_import_of_research_or_cli_fails(copy):
    module = copy / MODULE_DIR / f"{MODULE_DIR}.py"
    _edit(module, "import logging\n", "import logging\nfrom UniverSegLogic.research import train\n")
    assert any("research/train.py, which is never shipped" in p for p in check_logic_files(copy))


def test_unlisted_module_script_and_resource_fail(copy):
    (copy / MODULE_DIR / "Helpers.py").write_text("pass\n")
    _edit(
        copy / MODULE_DIR / f"{MODULE_DIR}.py",
        'resourcePath("UI/UniverSegSlicer.ui")',
        'resourcePath("UI/Other.ui")',
    )
    problems = check_module_files(copy)
    assert any("Helpers.py is not in MODULE_PYTHON_SCRIPTS" in p for p in problems)
    assert any("loads Resources/UI/Other.ui" in p for p in problems)


def test_unlisted_starter_data_fails(copy):
    _edit(copy / MODULE_DIR / "CMakeLists.txt", "  starter_fusion.json\n", "")
    assert any(
        "starter_fusion.json, not in UNIVERSEG_DATA_FILES" in p for p in check_logic_files(copy)
    )


def test_unknown_ui_name_fails(copy):
    _edit(
        copy / MODULE_DIR / f"{MODULE_DIR}.py",
        "self.ui.cancelButton.clicked",
        "self.ui.stopButton.clicked",
    )
    assert check_ui_names(copy) == [
        f"{MODULE_DIR}.py uses self.ui.stopButton, not defined in {MODULE_DIR}.ui"
    ]


def test_ui_parameter_without_wrapper_field_fails(copy):
    _edit(
        copy / MODULE_DIR / "Resources" / "UI" / f"{MODULE_DIR}.ui",
        "<string>ensemble</string>",
        "<string>ensembleSize</string>",
    )
    assert any("'ensembleSize'" in p for p in check_ui_names(copy))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            (
                "CMakeLists.txt",
                'set(EXTENSION_DEPENDS "PyTorch")',
                'set(EXTENSION_DEPENDS "PyTorch NNUNet")',
            ),
            "build_dependencies",
        ),
        (("UniverSeg.json", '"Segmentation"', '"Examples"'), "category"),
        (
            ("CMakeLists.txt", "project(UniverSeg)", "project(UniverSegExtension)"),
            "no ExtensionsIndex entry UniverSegExtension.json",
        ),
        (("UniverSeg.json", 'SlicerUniverSeg"', 'SlicerUniverSeg2"'), "scm_url"),
    ],
)
def test_metadata_disagreement_fails(copy, edit, message):
    _edit(copy / edit[0], edit[1], edit[2])
    assert any(message in p for p in check_extension_metadata(copy))
