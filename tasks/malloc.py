"""glibc malloc settings for PyTorch's CPU training and inference loops.

PyTorch's CPU allocator takes every tensor from malloc. glibc serves blocks above its
mmap threshold (dynamic, 128 KiB to 32 MiB) with a fresh mmap and returns them on free,
and trims the heap top beyond its trim threshold: a training step's activations (the
seed CNN's first conv: 64 x 64 x 26 x 26 floats, 11 MB) are then mapped, page-faulted and
zeroed by the kernel again on every step. Measured on a 2-core AVX2 EPYC: the seed CNN's
epoch takes 24 s that way and 14.4 s with the thresholds below, with the same numbers
(allocation only decides where tensors live, not what is computed). PyTorch's
performance guide recommends jemalloc or tcmalloc for the same reason; mallopt does it
without a preloaded library. Other C libraries (macOS, musl) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 128 MiB come from the heap and are reused: every activation of a training
# or inference batch (the largest, a 1000-image validation batch of the seed CNN, 173 MB,
# is still mapped: once per epoch). Up to 256 MiB of freed heap is kept, not trimmed.
MMAP_THRESHOLD = 128 * 2**20
TRIM_THRESHOLD = 256 * 2**20


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc: its allocator has its own policy
    # mallopt returns 1 on success, 0 on error
    done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if not done:
        log.debug("mallopt refused the thresholds; glibc's defaults stay")
    return done
