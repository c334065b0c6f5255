"""Give freed heap memory back to the system after large updates.

A push of thousands of resources allocates and frees a lot at once; glibc
keeps the freed pages in the process unless asked (malloc_trim), which would
leave the daemon's RSS at its peak for good.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc
    _libc = None


def trim() -> None:
    if _libc is not None:
        _libc.malloc_trim(0)
