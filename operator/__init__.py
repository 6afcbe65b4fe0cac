"""The Kanal control plane: API models, compiler, sources, publisher and the kopf glue.

This folder is the package `kanal.operator` (through the link `kanal/operator`). When the
repository root comes first on `sys.path` (`python -m pytest` run from there), Python
would also find it as a top-level `operator` and shadow the standard library's module of
that name; the guard below hands the standard library's module over instead, so shadowing
cannot happen whatever the working directory.
"""

if __name__ == "operator":
    # Only modules already loaded at start-up are used here: importing more could come
    # back to `operator` (collections does) before it exists.
    import importlib.machinery as _machinery
    import os as _os
    import sys as _sys

    _stdlib = _os.path.dirname(_os.__file__)
    _spec = _machinery.PathFinder.find_spec("operator", [_stdlib])
    if _spec is None or _spec.loader is None:  # pragma: no cover - a broken Python
        raise ImportError(f"the standard library's operator module is missing from {_stdlib}")
    _module = type(_sys)("operator")
    _module.__spec__, _module.__file__, _module.__loader__ = _spec, _spec.origin, _spec.loader
    _sys.modules["operator"] = _module
    _spec.loader.exec_module(_module)
