"""Which dataplane modules ship compiled with mypyc, and the switch that runs them pure.

The request path lives in a handful of modules; compiled ahead of time with mypyc (the
code is `mypy --strict` clean, which is what mypyc needs) they cost about a third less
CPU per request. `setup.py` compiles the modules named here unless `KANAL_PURE=1` is
set at install time; the same variable at run time loads them from their sources even
when compiled copies exist.

Compiled modules sit beside their sources (an editable install builds them in place).
`setup.py` records a digest of each source it compiles (`STAMP`); a source whose digest
differs was edited after the build, and its compiled copy is stale. Compiled modules
call each other directly, so a mix of stale and fresh ones would disagree about their
own classes: any stale copy makes the whole set load from source, with a warning that
says how to rebuild. (Digests, not file times: a rebuild that finds the generated C
unchanged leaves old files in place, and unpacking a wheel sets times in any order.)
Only the standard library is imported here: `setup.py` runs this file before anything
is installed.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

COMPILED = (
    "balancer", "breaker", "context", "headers", "http1", "limits", "metrics", "pool", "proxy",
    "retry", "router", "split", "tlspolicy",
)
"""Dataplane modules compiled by `setup.py` (the request path and its pure cores)."""

PURE_SWITCH = "KANAL_PURE"
STAMP = "compiled-sources.json"
"""Written by `setup.py` beside the sources: the digest of each source it compiled."""
_PACKAGE = "kanal.dataplane"
_HERE = Path(__file__).resolve().parent


def source_digests(folder: Path = _HERE) -> dict[str, str]:
    """SHA-256 of each compiled module's source, by module name."""
    return {name: hashlib.sha256((folder / f"{name}.py").read_bytes()).hexdigest()
            for name in COMPILED}


def _compiled_copy(name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = _HERE / (name + suffix)
        if candidate.exists():
            return candidate
    return None


def mode() -> str:
    """`compiled`, `pure` (nothing built, or KANAL_PURE=1) or `stale` (loaded pure
    because a compiled copy is older than its source or missing)."""
    copies = {name: _compiled_copy(name) for name in COMPILED}
    if not any(copies.values()):
        return "pure"
    if os.environ.get(PURE_SWITCH) == "1":
        return "pure"
    if not all(copies.values()):
        return "stale"
    try:
        built = json.loads((_HERE / STAMP).read_text())
    except (OSError, ValueError):
        return "stale"
    return "compiled" if built == source_digests() else "stale"


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' sources before the import system finds their
    compiled copies (which it would otherwise prefer)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != _PACKAGE or name not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, _HERE / f"{name}.py")


def choose() -> str:
    """Decide once, before any compiled module is imported; returns the mode."""
    current = mode()
    if current != "compiled" and any(_compiled_copy(name) for name in COMPILED):
        if not any(isinstance(finder, _SourceFirst) for finder in sys.meta_path):
            sys.meta_path.insert(0, _SourceFirst())
        if current == "stale":
            warnings.warn(
                "kanal: the dataplane's compiled modules were built from other sources; "
                "running the sources (slower). Rebuild with `pip install -e .`, or set "
                f"{PURE_SWITCH}=1 to silence this.", RuntimeWarning, stacklevel=2)
    return current
