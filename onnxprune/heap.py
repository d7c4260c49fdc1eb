"""The ``onnxprune`` command's heap: large arrays reuse freed memory instead of fresh pages.

glibc's malloc maps each allocation above a threshold (128 KiB at first, raised as such blocks are freed, to
32 MiB at most) as fresh pages and unmaps it when it is freed. A prune makes arrays of the weights' size more
than once (the pruned weights, their bytes for the protobuf, the protobuf itself, ONNX Runtime's copies), and
the first touch of every fresh page is a page fault: on this repository's 2-core VM about 15,000 of them in a
ResNet-50 prune's analysis and rewrite (some 40 ms there, as much again in its ONNX check). Serving allocations
up to 32 MiB from the heap, and keeping up to 64 MiB freed at its top, lets each new array reuse memory an
earlier one left; larger ones (a big model's weights) are still mapped and unmapped as before.

Only ``onnxprune prune``, ``run`` and ``inspect`` set this, in a process of their own (a library leaves its host's
allocator alone; training keeps glibc's defaults), only on glibc, and not where the user tuned malloc through the
environment.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 << 20  # bytes: larger allocations are still mapped (glibc's largest dynamic threshold)
TRIM_THRESHOLD = 64 << 20  # bytes freed at the top of the heap kept for reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def reuse_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (see the module docstring); True if they were set."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc thresholds %s", "set" if done else "left as they were")
    return done
