"""ITK's default threader in a plain Python process that uses slicer-core.

slicer-core's ITK runs its filters on Intel TBB's thread pool by default. After Slicer's Fill
between slices (``vtkITKMorphologicalContourInterpolator``) has run on that pool, a script that
imported ``slicer`` can die at interpreter exit with a segmentation fault (exit code 139) although
everything it did succeeded. ITK's ``Platform`` threader does not leave that behind.

ITK reads ``ITK_GLOBAL_DEFAULT_THREADER`` only once, when a filter first asks for the default --
often before our code runs (reading a volume through a Slicer storage node is enough). So
:func:`use_platform_threader` sets the variable *and* calls ITK's own
``MultiThreaderBase::SetGlobalDefaultThreader`` in the ITK library the process has loaded. It is
called before the interpolator's first use, only with slicer-core (inside the Slicer application
Slicer owns its threads and exits cleanly), and never overrides a threader the user chose with
the variable. Filters created afterwards use the ``Platform`` threader (still multi-threaded).
"""

from __future__ import annotations

import ctypes
import glob
import os
from typing import List, Optional

#: The variable ITK reads its default threader from (Platform, Pool or TBB).
THREADER_VARIABLE = "ITK_GLOBAL_DEFAULT_THREADER"
#: ``itk::MultiThreaderBaseEnums::Threader::Platform``.
PLATFORM = 0
#: C++ namespaces ITK is built in: slicer-core renames it; a plain ITK build does not.
NAMESPACES = ("slicer_itk", "itk")

_done: Optional[bool] = None


def _mangled(namespace: str, name: str, arguments: str) -> str:
    """Itanium C++ ABI name of ``namespace::MultiThreaderBase::name`` (Linux and macOS)."""
    return f"_ZN{len(namespace)}{namespace}17MultiThreaderBase{len(name)}{name}{arguments}"


def setter_symbols() -> List[str]:
    """Symbol names of ``MultiThreaderBase::SetGlobalDefaultThreader(Threader)``."""
    args = "ENS_22MultiThreaderBaseEnums8ThreaderE"
    return [_mangled(ns, "SetGlobalDefaultThreader", args) for ns in NAMESPACES]


def getter_symbols() -> List[str]:
    """Symbol names of ``MultiThreaderBase::GetGlobalDefaultThreader()``."""
    return [_mangled(ns, "GetGlobalDefaultThreader", "Ev") for ns in NAMESPACES]


def loaded_itk_common_libraries() -> List[str]:
    """Paths of the ITKCommon libraries loaded in this process (Linux: from ``/proc/self/maps``)
    or shipped inside the ``slicer_core`` package (its wheel's bundled libraries)."""
    found: List[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.split()[-1] if line.strip() else ""
                if "libITKCommon" in os.path.basename(path) and path not in found:
                    found.append(path)
    except OSError:
        pass
    try:
        import slicer_core  # the slicer-core wheel's package of compiled modules

        root = os.path.dirname(slicer_core.__file__)
        for pattern in ("*.libs/libITKCommon*", ".dylibs/libITKCommon*", "libITKCommon*"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if path not in found:
                    found.append(path)
    except ImportError:
        pass
    return found


def itk_default_threader() -> Optional[int]:
    """The default threader ITK reports in this process (0 Platform, 1 Pool, 2 TBB), or None
    when no loaded ITK library offers the call."""
    libraries = []
    for path in loaded_itk_common_libraries():
        try:
            libraries.append(ctypes.CDLL(path))
        except OSError:
            continue
    for symbol in getter_symbols():  # slicer-core's renamed ITK first
        for library in libraries:
            getter = getattr(library, symbol, None)
            if getter is not None:
                getter.restype = ctypes.c_int8
                return int(getter())
    return None


def use_platform_threader() -> bool:
    """Make ITK's ``Platform`` threader the default of slicer-core's ITK in this process (see
    the module docstring); once per process. Returns True when ITK reports ``Platform`` after
    the call, False when the user chose another threader or the library offers no such call
    (then only the variable is set). Never raises."""
    global _done
    if _done is not None:
        return _done
    choice = os.environ.setdefault(THREADER_VARIABLE, "Platform")
    _done = False
    if choice.strip().lower() != "platform":
        return _done
    libraries = []
    for path in loaded_itk_common_libraries():
        try:
            libraries.append(ctypes.CDLL(path))  # already loaded: the same library, no copy
        except OSError:
            continue
    for symbol in setter_symbols():  # slicer-core's renamed ITK first
        for library in libraries:
            setter = getattr(library, symbol, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int8]
                setter.restype = None
                setter(PLATFORM)
                _done = itk_default_threader() == PLATFORM
                return _done
    return _done
