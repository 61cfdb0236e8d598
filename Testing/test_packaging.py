"""Packaging of the Slicer extension, checked from the sources (no CMake or Slicer needed).

The installed extension contains only the files its CMake lists name, so these checks fail when
a Python file the module needs, or a file it loads, is not listed; when the ExtensionsIndex entry
(UniverSeg.json) and the top-level CMakeLists.txt disagree; when the widget uses a
``self.ui.<name>`` that the .ui file does not define; when the Segment Editor effect is not
registered the way Slicer registers scripted effects; and when a ``UniverSegLogic`` module that
the module or the effect imports at load time (or before the PyTorch check) needs torch -- the
import is run in a fresh interpreter where torch cannot be imported. Each check is also run on a
broken copy of the repository to show that it can fail.
"""

import ast
import json
import py_compile
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

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


def module_python_files(root: Path) -> List[Path]:
    """The module's own Python files (the module and the effect package; not Testing/)."""
    module_dir = root / MODULE_DIR
    return sorted(
        p for p in module_dir.rglob("*.py") if "Testing" not in p.relative_to(module_dir).parts
    )


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
    for path in module_python_files(root):
        rel = path.relative_to(module_dir).as_posix()
        if rel not in cm["scripts"]:
            problems.append(f"{MODULE_DIR}/{rel} is not in MODULE_PYTHON_SCRIPTS")
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
    is listed; nothing under cli/, benchmark/, cohort/ or web/ is listed or imported by the module."""
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
    for script in module_python_files(root):
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
    for var, name in (
        ("EXTENSION_LICENSE_FILE", "LICENSE"),
        ("EXTENSION_README_FILE", "README.md"),
    ):
        value = " ".join(cmake_set(text, var))
        if value != "${CMAKE_CURRENT_SOURCE_DIR}/" + name:
            problems.append(f"{var} must be ${{CMAKE_CURRENT_SOURCE_DIR}}/{name} (else Slicer's)")
        elif not (root / name).is_file():
            problems.append(f"{var} points to {name}, not in the repository")
    for url in " ".join(cmake_set(text, "EXTENSION_SCREENSHOTURLS")).split():
        path = re.search(r"/main/(.+)$", url)
        if not path or not path.group(1).startswith(SCREENSHOT_DIR + "/"):
            problems.append(
                f"EXTENSION_SCREENSHOTURLS {url}: real screenshots live in {SCREENSHOT_DIR}/"
            )
        elif not (root / path.group(1)).is_file():
            problems.append(
                f"EXTENSION_SCREENSHOTURLS points to {path.group(1)}, not in the repository"
            )
    return problems


#: Screenshots of the module running in Slicer (never schematics) for the extension catalog.
SCREENSHOT_DIR = "docs/screenshots"
#: Files the installed extension must carry besides code: the model card and the licenses.
INSTALLED_DOCS = {
    "UNIVERSEG_DATA_FILES": ["MODEL_CARD.md"],
    "UNIVERSEG_LICENSE_FILES": ["LICENSE", "NOTICE"],
}


def check_installed_docs(root: Path) -> List[str]:
    """The model card, LICENSE and NOTICE are copied into the installed Resources folder."""
    cm = module_cmake(root)
    problems = []
    for var, names in INSTALLED_DOCS.items():
        listed = cmake_set(cm["text"], var)
        for name in names:
            if name not in listed:
                problems.append(f"{name} is not in {var}: it would not be installed")
    for name in cmake_set(cm["text"], "UNIVERSEG_LICENSE_FILES"):
        if not (root / name).is_file():
            problems.append(f"UNIVERSEG_LICENSE_FILES lists missing file {name}")
    for name in cmake_set(cm["text"], "UNIVERSEG_DATA_FILES"):
        if not (root / "Resources" / name).is_file():
            problems.append(f"UNIVERSEG_DATA_FILES lists missing file Resources/{name}")
    return problems


# --------------------------------------------------------------------------------------------
# the Segment Editor effect is registered the way Slicer registers scripted effects


def _calls(tree: ast.AST) -> List[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _module_constants(tree: ast.Module) -> Dict[str, str]:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for t in node.targets:
                if isinstance(t, ast.Name) and isinstance(node.value.value, str):
                    out[t.id] = node.value.value
    return out


def check_effect_registration(root: Path) -> List[str]:
    """As Slicer's ScriptedSegmentEditorEffectModuleTemplate does it: the module connects
    ``startupCompleted()`` to a method that creates a ``qSlicerSegmentEditorScriptedEffect``,
    calls ``setPythonSource(<file>)`` and ``self().register()``; Slicer then imports the file's
    folder as the Python module and instantiates the class named after the file (``+Effect``),
    which must derive from a scripted effect base class, set ``scriptedEffect.name`` and clone
    itself from ``__file__``; the folder's ``__init__.py`` exposes the class; every file is
    listed in the CMake lists."""
    cm = module_cmake(root)
    module_dir = root / MODULE_DIR
    main = module_dir / f"{cm['name']}.py"
    tree = ast.parse(main.read_text())
    constants = _module_constants(tree)
    problems = []
    module_class = next(
        (
            n
            for n in tree.body
            if isinstance(n, ast.ClassDef)
            and any(getattr(b, "id", "") == "ScriptedLoadableModule" for b in n.bases)
        ),
        None,
    )
    if module_class is None:
        return [f"{main.name} defines no ScriptedLoadableModule"]
    methods = {n.name: n for n in module_class.body if isinstance(n, ast.FunctionDef)}
    init = methods.get("__init__")
    slot = None
    for call in _calls(init) if init else []:
        if (
            _call_name(call) == "connect"
            and call.args
            and isinstance(call.args[0], ast.Constant)
            and call.args[0].value == "startupCompleted()"
            and len(call.args) > 1
            and isinstance(call.args[1], ast.Attribute)
        ):
            slot = call.args[1].attr
    if slot is None:
        return [f"{main.name}: the module does not connect startupCompleted() to a registration"]
    register = methods.get(slot)
    if register is None:
        return [f"{main.name}: startupCompleted() is connected to {slot}, which does not exist"]
    names = [_call_name(c) for c in _calls(register)]
    for needed in ("qSlicerSegmentEditorScriptedEffect", "setPythonSource", "register"):
        if needed not in names:
            problems.append(f"{main.name}: {slot}() does not call {needed}")
    sources = [
        constants.get(a.id) if isinstance(a, ast.Name) else a.value
        for c in _calls(register)
        if _call_name(c) == "join"
        for a in c.args[1:]
        if isinstance(a, (ast.Name, ast.Constant))
    ]
    sources = [x for x in sources if isinstance(x, str) and x.endswith(".py")]
    if len(sources) != 1:
        return problems + [f"{main.name}: {slot}() does not name one effect .py file"]
    effect_rel = sources[0]
    effect_file = module_dir / effect_rel
    if not effect_file.is_file():
        return problems + [f"the effect source {effect_rel} does not exist"]
    for rel in (effect_rel, str(Path(effect_rel).parent / "__init__.py")):
        if rel not in cm["scripts"]:
            problems.append(f"{rel} is not in MODULE_PYTHON_SCRIPTS")
    class_name = (
        effect_file.stem if effect_file.stem.endswith("Effect") else effect_file.stem + "Effect"
    )
    etree = ast.parse(effect_file.read_text())
    cls = next(
        (n for n in etree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None
    )
    if cls is None:
        return problems + [f"{effect_rel} has no class {class_name} (Slicer instantiates that)"]
    bases = [getattr(b, "id", getattr(b, "attr", "")) for b in cls.bases]
    if not any(re.fullmatch(r"AbstractScriptedSegmentEditor\w*Effect", b) for b in bases):
        problems.append(f"{class_name} does not derive from a scripted segment editor effect")
    emethods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    sets_name = any(
        isinstance(t, ast.Attribute) and t.attr == "name"
        for n in ast.walk(emethods.get("__init__", cls))
        if isinstance(n, ast.Assign)
        for t in n.targets
    )
    if not sets_name:
        problems.append(f"{class_name}.__init__ does not set scriptedEffect.name")
    clone = emethods.get("clone")
    if clone is None or "setPythonSource" not in [_call_name(c) for c in _calls(clone)]:
        problems.append(f"{class_name}.clone() does not recreate the effect from its file")
    package_init = effect_file.parent / "__init__.py"
    exposed = package_init.is_file() and any(
        isinstance(n, ast.ImportFrom)
        and n.module == effect_file.stem
        and any(a.name == class_name for a in n.names)
        for n in ast.parse(package_init.read_text()).body
    )
    if not exposed:
        problems.append(f"{package_init.parent.name}/__init__.py does not expose {class_name}")
    for png in re.findall(r"[\"']([\w/]+\.png)[\"']", effect_file.read_text()):
        rel = (Path(effect_rel).parent / png).as_posix()
        if rel not in cm["resources"]:
            problems.append(f"the effect icon {rel} is not in MODULE_PYTHON_RESOURCES")
        elif not (module_dir / rel).is_file():
            problems.append(f"the effect icon {rel} does not exist")
    return problems


# --------------------------------------------------------------------------------------------
# imports the module and the effect make before PyTorch is there


def logic_imports(path: Path, root: Path) -> List[Tuple[str, Optional[str], int]]:
    """(dotted UniverSegLogic module, enclosing function or None, line) for every import of the
    package in a module file. ``from X import name`` counts as ``X.name`` when that is a
    module, else as ``X``."""
    tree = ast.parse(path.read_text())
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def function_of(node) -> Optional[str]:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return None

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == LOGIC_DIR]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != LOGIC_DIR:
                continue
            names = []
            for a in node.names:
                sub = node.module + "." + a.name
                rel = ".".join(sub.split(".")[1:])
                names.append(sub if module_file(root, rel) is not None else node.module)
        else:
            continue
        for name in names:
            out.append((name, function_of(node), node.lineno))
    return out


_BLOCK_TORCH = """
import importlib, json, sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch' (blocked: a fresh install)")
        return None
sys.meta_path.insert(0, BlockTorch())
for name in [m for m in list(sys.modules) if m == "torch" or m.startswith("torch.")]:
    del sys.modules[name]
sys.path.insert(0, sys.argv[1])
result = {}
for module in json.loads(sys.argv[2]):
    before = set(sys.modules)
    try:
        importlib.import_module(module)
        result[module] = None
    except BaseException as exc:
        result[module] = f"{type(exc).__name__}: {exc}"
    for name in set(sys.modules) - before:
        if name.split(".")[0] == "UniverSegLogic":
            del sys.modules[name]
print(json.dumps(result))
"""


def import_without_torch(root: Path, modules: List[str]) -> Dict[str, Optional[str]]:
    """Import each module in a fresh interpreter where torch cannot be imported (as on a fresh
    Slicer install): module -> None, or the error."""
    out = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH, str(root), json.dumps(sorted(set(modules)))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _called_after_torch_check(root: Path, function: str) -> bool:
    """Every call of ``function`` in the module files comes after a call of ``ensureTorch`` in
    the same function body (and there is at least one call)."""
    calls = 0
    for path in module_python_files(root):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            inner = _calls(fn)
            checks = [c.lineno for c in inner if _call_name(c) == "ensureTorch"]
            for c in inner:
                if _call_name(c) == function:
                    calls += 1
                    if not any(line < c.lineno for line in checks):
                        return False
    return calls > 0


def check_torch_free_imports(root: Path) -> List[str]:
    """Every UniverSegLogic module the module files import at load time, or in a function that
    may run before the PyTorch check, imports without torch."""
    imports = [
        (path, name, fn, line)
        for path in module_python_files(root)
        for name, fn, line in logic_imports(path, root)
    ]
    if not imports:
        return []
    errors = import_without_torch(root, [name for _, name, _, _ in imports])
    problems = []
    for path, name, fn, line in imports:
        error = errors.get(name)
        if error is None:
            continue
        where = f"{path.relative_to(root).as_posix()}:{line}"
        if fn is None:
            problems.append(f"{where} imports {name} at load time, which needs torch ({error})")
        elif not _called_after_torch_check(root, fn):
            problems.append(
                f"{where} imports {name} in {fn}(), which may run before the PyTorch check "
                f"and needs torch ({error})"
            )
    return problems


CHECKS = [
    check_module_files,
    check_logic_files,
    check_ui_names,
    check_extension_metadata,
    check_installed_docs,
    check_effect_registration,
    check_torch_free_imports,
]


# --------------------------------------------------------------------------------------------
# the repository passes


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_repository(check):
    assert check(ROOT) == []


def test_module_source_compiles(tmp_path):
    # the module needs Slicer's Qt to import; compiling at least catches syntax errors
    for path in module_python_files(ROOT):
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
    for name in ("CMakeLists.txt", "UniverSeg.json", "LICENSE", "NOTICE", "README.md"):
        shutil.copy(ROOT / name, root / name)
    for png in (ROOT / MODULE_DIR).rglob("*.png"):  # placeholders: only their presence counts
        target = root / png.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"png")
    (root / "Resources" / "Icons").mkdir(parents=True)
    (root / "Resources" / "Icons" / "UniverSeg.png").write_bytes(b"png")
    for name in ("starter_fusion.json", "MODEL_CARD.md"):
        shutil.copy(ROOT / "Resources" / name, root / "Resources" / name)
    for name in ("starter_weights.pt", "starter_fusion_net.pt"):
        (root / "Resources" / name).write_bytes(b"weights")
    for check in CHECKS:
        if check is not check_torch_free_imports:  # (slower: runs an interpreter; own tests)
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
    (copy / LOGIC_DIR / "benchmark" / "newtool.py").write_text("X = 1\n")
    assert update_cmake_lists.main(["--root", str(copy)]) == 0
    assert "benchmark/newtool.py" not in (copy / MODULE_DIR / "CMakeLists.txt").read_text()


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


def test_module_import_of_benchmark_or_cli_fails(copy):
    module = copy / MODULE_DIR / f"{MODULE_DIR}.py"
    _edit(
        module, "import logging\n", "import logging\nfrom UniverSegLogic.benchmark import speed\n"
    )
    assert any("benchmark/speed.py, which is never shipped" in p for p in check_logic_files(copy))


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


# --------------------------------------------------------------------------------------------
# imports without torch


def test_the_checked_imports_are_the_ones_the_module_and_effect_make():
    found = {
        (path.name, name, fn)
        for path in module_python_files(ROOT)
        for name, fn, _ in logic_imports(path, ROOT)
    }
    top = {(f, n) for f, n, fn in found if fn is None}
    assert ("UniverSegSlicer.py", "UniverSegLogic.mrml.panel") in top
    assert ("SegmentEditorEffect.py", "UniverSegLogic.mrml.effect") in top
    # the one torch-needing import sits behind the PyTorch check
    assert ("UniverSegSlicer.py", "UniverSegLogic.core.weights", "ensureOfficialWeights") in found
    errors = import_without_torch(ROOT, ["UniverSegLogic.core.weights", "UniverSegLogic.mrml"])
    assert "torch" in errors["UniverSegLogic.core.weights"]
    assert errors["UniverSegLogic.mrml"] is None


def test_torch_needed_at_load_time_fails(copy):
    assert check_torch_free_imports(copy) == []
    _edit(copy / LOGIC_DIR / "mrml" / "panel.py", "import sys\n", "import sys\n\nimport torch\n")
    problems = check_torch_free_imports(copy)
    assert any(
        "UniverSegSlicer.py" in p and "imports UniverSegLogic.mrml.panel at load time" in p
        for p in problems
    )
    assert any("SegmentEditorEffect.py" in p and "mrml.panel at load time" in p for p in problems)


def test_engine_import_before_the_torch_check_fails(copy):
    # the first-run bug: Cancelled imported from the engine (torch) before ensureTorch
    _edit(
        copy / MODULE_DIR / f"{MODULE_DIR}.py",
        "        self._cancelRequested = False\n        self.setRunning(True)\n",
        "        from UniverSegLogic.core.engine import Cancelled  # noqa: F811\n\n"
        "        self._cancelRequested = False\n        self.setRunning(True)\n",
    )
    assert any(
        "imports UniverSegLogic.core.engine in onPropagate(), which may run before the "
        "PyTorch check" in p
        for p in check_torch_free_imports(copy)
    )


def test_weights_import_without_the_torch_check_first_fails(copy):
    _edit(
        copy / MODULE_DIR / f"{MODULE_DIR}.py",
        "        if not self.ensureTorch(progress, cancel):\n            return None\n",
        "",
    )
    assert any(
        "UniverSegLogic.core.weights in ensureOfficialWeights()" in p
        for p in check_torch_free_imports(copy)
    )


def test_effect_importing_torch_code_at_load_time_fails(copy):
    _edit(
        copy / MODULE_DIR / "SegmentEditorUniverSegLib" / "SegmentEditorEffect.py",
        "from UniverSegLogic.errors import Cancelled  # noqa: E402\n",
        "from UniverSegLogic.core.pipeline import Cancelled  # noqa: E402\n",
    )
    assert any(
        "SegmentEditorEffect.py" in p and "UniverSegLogic.core.pipeline at load time" in p
        for p in check_torch_free_imports(copy)
    )


# --------------------------------------------------------------------------------------------
# the effect's registration, the extension's license, screenshots and installed documents


EFFECT = Path(MODULE_DIR) / "SegmentEditorUniverSegLib" / "SegmentEditorEffect.py"


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            (
                f"{MODULE_DIR}/{MODULE_DIR}.py",
                '"startupCompleted()", self.registerEditorEffect',
                '"aboutToQuit()", self.registerEditorEffect',
            ),
            "does not connect startupCompleted()",
        ),
        (
            (f"{MODULE_DIR}/{MODULE_DIR}.py", "instance.self().register()", "instance.self()"),
            "does not call register",
        ),
        (
            (
                f"{MODULE_DIR}/{MODULE_DIR}.py",
                '"SegmentEditorUniverSegLib/SegmentEditorEffect.py"',
                '"SegmentEditorUniverSegLib/Effect.py"',
            ),
            "does not exist",
        ),
        (
            (str(EFFECT), "class SegmentEditorEffect(", "class UniverSegEffect("),
            "has no class SegmentEditorEffect",
        ),
        (
            (str(EFFECT), "(AbstractScriptedSegmentEditorAutoCompleteEffect):", "(object):"),
            "does not derive from a scripted segment editor effect",
        ),
        (
            (str(EFFECT), "clonedEffect.setPythonSource(", "clonedEffect.setSource("),
            "clone() does not recreate the effect",
        ),
        (
            (
                f"{MODULE_DIR}/SegmentEditorUniverSegLib/__init__.py",
                "from .SegmentEditorEffect import SegmentEditorEffect",
                "",
            ),
            "__init__.py does not expose SegmentEditorEffect",
        ),
        (
            (
                f"{MODULE_DIR}/CMakeLists.txt",
                "  SegmentEditorUniverSegLib/SegmentEditorEffect.py\n",
                "",
            ),
            "SegmentEditorUniverSegLib/SegmentEditorEffect.py is not in MODULE_PYTHON_SCRIPTS",
        ),
        (
            (
                f"{MODULE_DIR}/CMakeLists.txt",
                "  SegmentEditorUniverSegLib/SegmentEditorEffect.png\n",
                "",
            ),
            "effect icon SegmentEditorUniverSegLib/SegmentEditorEffect.png is not in",
        ),
    ],
)
def test_effect_not_registered_as_slicer_does_fails(copy, edit, message):
    _edit(copy / edit[0], edit[1], edit[2])
    assert any(message in p for p in check_effect_registration(copy))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            (
                'set(EXTENSION_SCREENSHOTURLS "")',
                'set(EXTENSION_SCREENSHOTURLS "https://raw.githubusercontent.com/universeg-slicer/'
                'SlicerUniverSeg/main/docs/slicer_panel.png")',
            ),
            "real screenshots live in docs/screenshots/",
        ),
        (
            (
                'set(EXTENSION_SCREENSHOTURLS "")',
                'set(EXTENSION_SCREENSHOTURLS "https://raw.githubusercontent.com/universeg-slicer/'
                'SlicerUniverSeg/main/docs/screenshots/effect.png")',
            ),
            "points to docs/screenshots/effect.png, not in the repository",
        ),
        (
            ("set(EXTENSION_LICENSE_FILE ${CMAKE_CURRENT_SOURCE_DIR}/LICENSE)\n", ""),
            "EXTENSION_LICENSE_FILE must be",
        ),
    ],
)
def test_screenshot_and_license_metadata_fail(copy, edit, message):
    _edit(copy / "CMakeLists.txt", edit[0], edit[1])
    assert any(message in p for p in check_extension_metadata(copy))


def test_uninstalled_model_card_or_notice_fails(copy):
    _edit(copy / MODULE_DIR / "CMakeLists.txt", "  MODEL_CARD.md\n", "")
    _edit(copy / MODULE_DIR / "CMakeLists.txt", "  NOTICE\n", "")
    problems = check_installed_docs(copy)
    assert any("MODEL_CARD.md is not in UNIVERSEG_DATA_FILES" in p for p in problems)
    assert any("NOTICE is not in UNIVERSEG_LICENSE_FILES" in p for p in problems)


# --------------------------------------------------------------------------------------------
# widget conventions that cannot run without Slicer's Qt, read from the sources


def _methods(root: Path, class_suffix: str) -> Dict[str, ast.FunctionDef]:
    tree = ast.parse((root / MODULE_DIR / f"{MODULE_DIR}.py").read_text())
    cls = next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith(class_suffix)
    )
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}


def _source(node: ast.AST) -> str:
    return ast.unparse(node)


def check_widget_conventions(root: Path) -> List[str]:
    """What the first real Slicer session showed to go wrong, checked in the widget's source:
    scene observers only while the module is shown, the segmentation *node* observed (a sequence
    replaces its vtkSegmentation), Reload also reloading UniverSegLogic, image volumes listed
    (RGB shown, labelmaps hidden), the weights path not a pathlib parameter (it shows '.')."""
    problems = []
    widget = _methods(root, "Widget")
    setup, enter, exit_ = (_source(widget.get(n, ast.Pass())) for n in ("setup", "enter", "exit"))
    for event in ("NodeAddedEvent", "NodeRemovedEvent"):
        if event in setup:
            problems.append(f"setup() observes {event}: it would stay active after leaving")
        if event not in enter or event not in exit_ or "removeObserver" not in exit_:
            problems.append(f"{event} is not observed in enter() and removed in exit()")
    observe = _source(widget.get("observeSegmentation", ast.Pass()))
    if "GetSegmentation()" in observe:
        problems.append("observeSegmentation observes the vtkSegmentation, not the node")
    if "not self.parent.isEntered" not in _source(widget.get("refresh", ast.Pass())):
        problems.append("refresh() recomputes summaries while the module is hidden")
    reload_ = _source(widget.get("onReload", ast.Pass()))
    if "forget_modules" not in reload_ or "UniverSegLogic" not in reload_:
        problems.append("onReload does not drop UniverSegLogic from sys.modules")
    elif reload_.index("forget_modules") > reload_.find("ScriptedLoadableModuleWidget.onReload"):
        problems.append("onReload reloads the module before dropping UniverSegLogic")
    tree = ast.parse((root / MODULE_DIR / f"{MODULE_DIR}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "weightsFile":
            if "Path" in _source(node.annotation):
                problems.append("weightsFile is a pathlib.Path parameter (an empty one shows '.')")
    ui = ET.parse(root / MODULE_DIR / "Resources" / "UI" / f"{MODULE_DIR}.ui")
    for w in ui.iter("widget"):
        props = {p.get("name"): p for p in w.findall("property")}
        if w.get("name") == "inputVolumeSelector":
            show = props.get("showChildNodeTypes")
            if show is not None and show.findtext("bool") == "false":
                problems.append("inputVolumeSelector hides RGB (vector) volumes")
            hidden = (
                [s.text for s in props["hideChildNodeTypes"].iter("string")]
                if ("hideChildNodeTypes" in props)
                else []
            )
            if "vtkMRMLLabelMapVolumeNode" not in hidden:
                problems.append("inputVolumeSelector lists labelmaps")
        if w.get("class") == "ctkPathLineEdit" and "SlicerParameterName" in props:
            problems.append(f"{w.get('name')} is bound to a pathlib parameter (shows '.')")
    return problems


def test_widget_conventions():
    assert check_widget_conventions(ROOT) == []


def test_the_widget_before_the_fixes_fails_the_conventions(tmp_path):
    old = subprocess.run(
        ["git", "show", "b6e1f66:UniverSegSlicer/UniverSegSlicer.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    old_ui = subprocess.run(
        ["git", "show", "b6e1f66:UniverSegSlicer/Resources/UI/UniverSegSlicer.ui"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if old.returncode or old_ui.returncode:
        pytest.skip("the repository history is not available")
    root = tmp_path / "old"
    (root / MODULE_DIR / "Resources" / "UI").mkdir(parents=True)
    (root / MODULE_DIR / f"{MODULE_DIR}.py").write_text(old.stdout)
    (root / MODULE_DIR / "Resources" / "UI" / f"{MODULE_DIR}.ui").write_text(old_ui.stdout)
    problems = check_widget_conventions(root)
    for expected in (
        "setup() observes NodeAddedEvent",
        "observes the vtkSegmentation",
        "while the module is hidden",
        "onReload does not drop",
        "weightsFile is a pathlib.Path parameter",
        "hides RGB",
        "lists labelmaps",
    ):
        assert any(expected in p for p in problems), expected


def test_the_runtime_package_imports_no_research_module():
    """What users install never pulls in the developer tools (UniverSegResearch): the modules
    the CLI, the Slicer bridge, the propagation and the benchmark load at run time, as
    ``python -X importtime`` lists them in a fresh interpreter."""
    modules = (
        "UniverSegLogic.cli",
        "UniverSegLogic.cli.propagate",
        "UniverSegLogic.cli.demo",
        "UniverSegLogic.core.propagator",
        "UniverSegLogic.mrml",
        "UniverSegLogic.benchmark.clinical",
    )
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import " + ", ".join(modules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if "|" in line]
    assert "UniverSegLogic.core.propagator" in imported  # the listing is what it seems
    assert not [m for m in imported if m.startswith("UniverSegResearch")]
