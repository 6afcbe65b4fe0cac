"""The hot modules run compiled unless told otherwise, and never half-compiled.

The suite runs against whatever the install built: `pip install -e .` compiles the
modules in `kanal.dataplane.compiled.COMPILED` with mypyc; `KANAL_PURE=1` (at install
or at run time) runs their sources. A stale build (a source edited after it) must run
the sources, not a mix, and must say so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kanal.dataplane
from kanal.dataplane import compiled

ROOT = Path(__file__).resolve().parents[2]


def _proxy_file(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c",
         "import kanal.dataplane as d, kanal.dataplane.proxy as p, kanal.dataplane.pool as q;"
         "print(d.BUILD, p.__file__, q.__file__)"],
        env=env, capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def test_the_suite_runs_the_build_it_was_given() -> None:
    if os.environ.get(compiled.PURE_SWITCH) == "1":
        assert kanal.dataplane.BUILD == "pure"
        return
    assert kanal.dataplane.BUILD != "stale", (
        "the compiled dataplane modules were built from other sources: rebuild with "
        "`pip install -e .` (or run with KANAL_PURE=1)")
    assert kanal.dataplane.BUILD == "compiled", (
        "the dataplane was installed without its compiled modules; `pip install -e .` "
        "builds them (a C compiler is needed), KANAL_PURE=1 runs the sources on purpose")


def test_the_pure_switch_loads_every_source() -> None:
    if not any(compiled._compiled_copy(name) for name in compiled.COMPILED):
        pytest.skip("no compiled modules in this install")
    env = {**os.environ, compiled.PURE_SWITCH: "1"}
    build, proxy_file, pool_file = _proxy_file(env).split()
    assert build == "pure"
    assert proxy_file.endswith("proxy.py") and pool_file.endswith("pool.py")
    env.pop(compiled.PURE_SWITCH)
    build, proxy_file, pool_file = _proxy_file(env).split()
    assert build == "compiled"
    assert not proxy_file.endswith(".py") and not pool_file.endswith(".py")
