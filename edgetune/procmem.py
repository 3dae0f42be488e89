"""This process's memory as Linux reports it, and glibc's knobs that make the figures mean
something: used to measure a step's peak (edgetune.apps.measure, bench/), and what a kernel
allocates (edgetune.compiler.backends.scratch).

With MALLOC_MMAP_THRESHOLD_ (or set_mmap_threshold) at 64 KiB, glibc serves every larger
allocation with its own mmap, so a freed tensor leaves the resident set at once and the
high-water mark (VmHWM, reset through /proc/self/clear_refs) follows live memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re

MMAP_THRESHOLD = 65536  # bytes; the benchmarks' MALLOC_MMAP_THRESHOLD_=65536
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def vm_hwm_bytes() -> int:
    """Peak resident set since the process started or since reset_hwm()."""
    return _status_bytes("VmHWM")


def vm_rss_bytes() -> int:
    return _status_bytes("VmRSS")


def rss_file_bytes() -> int:
    """Resident pages of file mappings (library code, mapped files)."""
    return _status_bytes("RssFile")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux: '5' to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def release_free_heap() -> bool:
    """glibc's malloc_trim(0): free pages of every arena go back to the OS; False without glibc."""
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False


@functools.cache  # find_library forks ldconfig: a child as large as this process, seen by RUSAGE_CHILDREN
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc's M_MMAP_THRESHOLD for this process (as MALLOC_MMAP_THRESHOLD_ would set it at
    start-up); False where there is no glibc mallopt."""
    try:
        return bool(_libc().mallopt(_M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False
