"""lra.training.allocator: glibc's malloc keeps large blocks when asked, nothing when told not to."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource
from lra.training import allocator
tuned = allocator.tune_allocator()
assert allocator.tune_allocator() == tuned and allocator.allocator_tuned() == tuned  # applied once
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 64 << 20  # above any mmap threshold glibc allows
def cycle():  # allocate, touch every page, free: what a training step does to a large activation
    p = libc.malloc(size); libc.memset(p, 1, size); libc.free(p)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(env_value: str | None) -> tuple[bool, int]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "LRA_MALLOC_TUNING"}
    if env_value is not None:
        env["LRA_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_reuses_large_blocks_and_the_switch_restores_glibc_defaults():
    tuned, faults_tuned = _probe(None)
    off, faults_default = _probe("0")
    assert tuned and not off
    pages = 5 * (64 << 20) // 4096  # what five fresh 64 MiB blocks cost in page faults
    assert faults_default > pages // 2  # glibc: every block is a fresh mmap, faulted in page by page
    assert faults_tuned < pages // 10  # tuned: the freed block is reused
