"""Keep large CPU tensors' memory in the process between training steps (glibc only).

glibc's malloc hands any block above its mmap threshold (at most 32 MiB) to the kernel with `mmap`, and
gives it back with `munmap` when freed. A training step frees and reallocates the same large activation
tensors every step, so each of them is faulted in anew, one page at a time: on the 2-core development CPU
that was 60-150 thousand page faults a step, and 3-30 % of a ListOps preset step (`lra-bench` classifier,
idle, 2 threads: Linformer 681 -> 637 ms, softmax with attention dropout 2,965 -> 2,069 ms).
`tune_allocator()` turns `mmap` off for malloc and raises the trim threshold to 1 GiB, so freed blocks
are reused; peak memory moved by -1 to +5 % in those runs.

It changes no computed value. `lra-train` and `lra-bench`'s workers call it at start; set
`LRA_MALLOC_TUNING=0` to keep glibc's defaults (for example to time code the way another program runs).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30

_state: dict[str, bool] = {}


def tune_allocator() -> bool:
    """Apply the setting once per process; True if glibc's malloc now keeps large blocks (False: not
    Linux/glibc, mallopt refused, or LRA_MALLOC_TUNING=0)."""
    if "tuned" in _state:
        return _state["tuned"]
    tuned = False
    if sys.platform.startswith("linux") and os.environ.get("LRA_MALLOC_TUNING", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            tuned = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _state["tuned"] = tuned
    return tuned


def allocator_tuned() -> bool:
    """Whether tune_allocator() took effect in this process (False if it was never called)."""
    return _state.get("tuned", False)
