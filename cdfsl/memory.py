"""Peak resident memory of a block of code: ``with peak_rss() as memory: ...``.

On Linux the process's high-water mark (``VmHWM``) is reset on entry through
``/proc/self/clear_refs`` and read on exit; freed heap pages are first handed back to the OS
(glibc ``malloc_trim``) so that the block's own allocations show in the figure.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import resource
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def status_kb(field_name: str) -> int | None:
    """A ``VmHWM`` / ``VmRSS`` line of ``/proc/self/status`` in kB, or None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"{field_name}:\s+(\d+)\s+kB", text)
    return int(match.group(1)) if match else None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so a block's new allocations show in RSS.

    Without it, pages freed earlier but still resident are reused silently and the block's
    peak looks smaller than it is.
    """
    with suppress(OSError, AttributeError):  # not glibc: the figure is then a lower bound
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Peak resident memory (MB) of the process inside the block.

    Fills ``peak_mb`` (the high-water mark) and ``extra_mb`` (it minus the resident memory on
    entry: what the block itself added at its peak). On Linux the high-water mark is reset on
    entry through ``/proc/self/clear_refs``; elsewhere ``peak_mb`` is the process peak so far
    (``getrusage``) and ``extra_mb`` is NaN.
    """
    out: dict[str, float] = {}
    entry_kb = None
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        entry_kb = status_kb("VmRSS")
    except OSError:
        pass
    try:
        yield out
    finally:
        hwm = status_kb("VmHWM") if entry_kb is not None else None
        if hwm is None:  # ru_maxrss: kB on Linux, bytes on macOS
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hwm = rss // 1024 if os.uname().sysname == "Darwin" else rss
        out["peak_mb"] = hwm / 1024
        out["extra_mb"] = (hwm - entry_kb) / 1024 if entry_kb is not None else math.nan
