"""This process's memory as Linux reports it, and glibc's knobs that make the figures mean
something: used to measure a step's peak (edgetune.apps.measure, bench/), and what a kernel
allocates (edgetune.compiler.backends.scratch); and the knobs that spare a step its page
faults (keep_freed_memory, edgetune.compiler.backends.choice).

With MALLOC_MMAP_THRESHOLD_ (or set_mmap_threshold) at 64 KiB, glibc serves every larger
allocation with its own mmap, so a freed tensor leaves the resident set at once and the
high-water mark (VmHWM, reset through /proc/self/clear_refs) follows live memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re

MMAP_THRESHOLD = 65536  # bytes; the benchmarks' MALLOC_MMAP_THRESHOLD_=65536
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
# The largest M_MMAP_THRESHOLD glibc takes on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); the trim
# threshold is a C int.
_LARGEST_MMAP_THRESHOLD, _NEVER_TRIM = 32 * 2**20, 2**31 - 1
_pinned = False  # set_mmap_threshold was called: a measurement depends on the threshold


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


def minor_faults() -> int | None:
    """Minor page faults of this process so far (a fresh page's first touch), or None where
    the platform has no getrusage (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
    start-up), with the default trim threshold; False where there is no glibc mallopt. From
    then on keep_freed_memory leaves the allocator alone: a measurement depends on it."""
    global _pinned
    _pinned = True
    return _mallopt(_M_MMAP_THRESHOLD, nbytes) and _mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse in this process: allocations up to 32 MiB come from
    its heap instead of a fresh mmap each, and the heap is not trimmed. A training step frees
    and allocates the same large buffers every step; given back to the OS, they come back as
    fresh pages whose first touch is a page fault each. The peak resident set stays what it
    was (the same buffers, reused); what changes is that it stays resident between steps.

    Not done (False) where the process already chose: MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ in the environment, or set_mmap_threshold called (a measurement),
    or no glibc."""
    if _pinned or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    return _mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD) and _mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(_libc().mallopt(param, value))
    except (OSError, AttributeError):
        return False


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def occupy_free_heap(smallest: int = MMAP_THRESHOLD) -> bool:
    """Take every free chunk of `smallest` bytes or more out of this thread's malloc arena, so
    that from now on each large allocation is a fresh mmap, as in a fresh process.

    glibc serves an allocation from a free chunk of its heap before it considers the mmap
    threshold. In a fork of a process that trained (its freed tensors kept in the heap), a
    step's 20 MB tensor then lands in a free chunk whose pages release_free_heap gave back, and
    the next step's in another one: measured, twice the step's need. The chunks taken here are
    never touched past their header, so they cost no resident memory; the process keeps them
    until it exits (call this only in a process made to measure). False without glibc's
    mallinfo2 (glibc < 2.33), where nothing is done."""
    try:
        libc = _libc()
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return False
    mallinfo2.restype, libc.malloc.restype = _MallInfo2, ctypes.c_void_p
    libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
    size = 1 << max(mallinfo2().fordblks, smallest).bit_length()
    while size >= smallest:
        mapped_before = mallinfo2().hblks
        chunk = libc.malloc(size)
        if chunk and mallinfo2().hblks == mapped_before:
            continue  # served from a free chunk: keep it, and look for another of this size
        libc.free(chunk)  # a fresh mapping (or nothing): no free chunk this large is left
        size //= 2
    return True
