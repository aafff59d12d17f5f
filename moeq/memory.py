"""Returning freed host memory to the operating system between the pipeline's big steps.

glibc's allocator keeps freed heap memory for reuse: after one decoder layer's Hessians, weight copies and
activations are freed, the process's resident size stays at the high-water mark of all the fragments it
ever held, and the next layer's allocations land beside them instead of in them. Measured on the streaming
GPTQ pipeline (4 layers, H 1024, E 16, 1 thread): 0.35 GiB of a 1.97 GiB peak was such retention
(``benchmarks/results/stream_memory.md``). ``malloc_trim(0)`` hands it back; on other C libraries (musl,
macOS) there is no such call and nothing is done: memory behaviour only, results are unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        logger.debug("no malloc_trim in %s: freed memory stays with the process", name)
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_freed_memory() -> None:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
