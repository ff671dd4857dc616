"""The process heap: glibc keeps freed blocks in the RSS unless told otherwise (no-ops elsewhere)."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_large_frees() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap and unmap it when freed. By default the
    threshold rises to the largest block freed so far, after which such blocks come from the heap and freed ones stay
    in RSS: a cache that repacks evicted experts would then grow past any budget."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)          # M_MMAP_THRESHOLD


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim, 1-5 ms on a 300 MB heap): loading frees many
    transient buffers (the layout timing's samples, unquantized tensors), and a server's batches of ever-changing
    shapes leave freed blocks between live ones, which glibc would otherwise keep in the process's RSS."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
