"""Freed heap memory handed back to the system after a configuration change.

Building a Config from a big Snapshot allocates and frees many megabytes (the decoded
JSON, the objects of the configuration it replaces, the build's temporaries, much of
it in the worker thread's malloc arena). glibc keeps freed memory in its arenas for
later use, so a sidecar that applied 1,000 Routes once stays that much larger for
good. `malloc_trim(0)` returns the free pages of every arena (not only the top of
the heap). It runs once per applied configuration, never per request. Elsewhere than
glibc it does nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_looked_up = False


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim, _looked_up
    if not _looked_up:
        _looked_up = True
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                _trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                _trim = None
    return _trim


def release_free_memory() -> bool:
    """Return free heap pages to the system; whether anything was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
