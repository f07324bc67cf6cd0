"""glibc malloc tuning for a long-running, multithreaded process: one arena, a fixed mmap threshold, and freed
memory given back after a reload.

Each thread that allocates gets a malloc arena of its own (up to 8 per core), and memory freed in an arena stays
in the process. A daemon that replaces its threads on every reload (SIGHUP) then grows by the arenas of threads
long gone: measured +75 % RSS over 30 reloads of the demo config. Two arenas still fragmented: 4 cameras with a
viewer and a subscriber, reloaded every 30 s, grew 282 -> 309 MB in 20 reloads (heap 117 -> 152 MB while in use
stayed at ~97 MB). One arena, same run and threshold: 274 -> 281 MB, heap flat (114 -> 120 MB), at no measurable
CPU cost (the heavy work runs inside onnxruntime and OpenCV).

glibc also raises its mmap threshold each time a mapped block is freed (up to 32 MB), so what is mapped depends on
history; a fixed threshold makes it the same every run. At 256 kB every frame, every detector activation and every
resize was mapped and faulted in anew on each call: +35 % CPU per camera (bench/bench_peer.py, scene clip: 0.117
against 0.087 CPU-s per camera-second). At 8 MB frames up to 1080p and the detector's buffers are reused from the
heap; only the age model's batch activations are mapped (and given back at once). The price is resident memory:
those reused buffers stay, ~+100 MB with 4 cameras (the same reload run: 376 -> 388 MB over 20 reloads, flat).
A no-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3
MALLOC_ARENAS = 1
MMAP_THRESHOLD_BYTES = 8 * 1024 * 1024  # above a 1080p frame (6.2 MB), below the age model's batch activations


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
