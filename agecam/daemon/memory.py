"""glibc malloc tuning for a long-running, multithreaded process: few arenas, and freed memory given back.

Each thread that allocates gets a malloc arena of its own (up to 8 per core), and memory freed in an arena stays
in the process. A daemon that replaces its threads on every reload (SIGHUP) then grows by the arenas of threads
long gone: measured +75 % RSS over 30 reloads of the demo config, flat after 15. Two arenas serve its few busy
threads as well (the heavy work runs inside onnxruntime and OpenCV with their own pools), and trimming after a
reload returns what the old threads freed. A no-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3
MALLOC_ARENAS = 2
# Frames (640x480x3 = 900 kB) and decoder buffers are large: served by mmap they go back to the system when freed.
# glibc raises its mmap threshold each time such a block is freed (up to 32 MB), after which frames come from the
# heap and fragment it; a fixed threshold keeps them mmapped.
MMAP_THRESHOLD_BYTES = 256 * 1024


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(n: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas and fix its mmap threshold (call before starting threads); False where unsupported."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, n) == 1 and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1)


def trim() -> bool:
    """Give freed heap memory back to the system (after a reload); False where unsupported."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0) in (0, 1))
