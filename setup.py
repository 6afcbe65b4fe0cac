"""Compiles the dataplane's hot modules with mypyc; everything else is in pyproject.toml.

`KANAL_PURE=1 pip install ...` installs the pure-Python package without compiling
(no C compiler needed). The list of modules lives in dataplane/compiled.py.
"""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path
from typing import Any

from setuptools import setup

HERE = Path(__file__).resolve().parent


def ext_modules() -> list[Any]:
    if os.environ.get("KANAL_PURE") == "1":
        return []
    from mypyc.build import mypycify

    compiled = runpy.run_path(str(HERE / "dataplane" / "compiled.py"))
    names = compiled["COMPILED"]
    # What is compiled now, so a later edit of a source is seen as a stale build.
    digests = compiled["source_digests"](HERE / "dataplane")
    (HERE / "dataplane" / compiled["STAMP"]).write_text(json.dumps(digests, indent=1) + "\n")
    # The build environment holds only the build requirements: third-party imports
    # are read as untyped there (the strict check runs with the tests).
    return mypycify(
        ["--ignore-missing-imports", "--allow-subclassing-any", "--allow-untyped-calls",
         "--no-warn-return-any", "--no-warn-unused-ignores",
         *(f"kanal/dataplane/{name}.py" for name in names)],
        opt_level="3",
        # The modules' shared runtime goes inside the package (kanal/dataplane__mypyc),
        # not at the top of site-packages, so an editable install finds it too.
        group_name="kanal.dataplane",
    )


setup(ext_modules=ext_modules())
