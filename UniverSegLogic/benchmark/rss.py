"""The process's resident memory on Linux, for the benchmarks' peak-memory figures: one home for
reading ``/proc/self/status`` and resetting the peak (``VmHWM``) before a measured block."""

from __future__ import annotations

from typing import Optional


def proc_status_kb(key: str) -> Optional[int]:
    """A ``/proc/self/status`` field in kB (e.g. ``VmRSS``, ``VmHWM``); None where unreadable."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_rss_peak() -> bool:
    """Reset the process's peak resident memory to its current value; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
