"""The project's static checks run with the tests, so CI fails when they fail.

`mypy --strict` over the whole package, `ruff check` with the configuration in
pyproject.toml, and `lint-imports` with the layer contracts written there. They read
the tree from the repository root (the `kanal/` folder names the parts by links), so
they see the same modules Python imports.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_mypy_strict_over_the_whole_package() -> None:
    result = run(sys.executable, "-m", "mypy", "-p", "kanal")
    assert result.returncode == 0, result.stdout + result.stderr
    # every part is checked, not only kanal/__init__.py
    checked = int(result.stdout.split(" source files")[0].rsplit(" ", 1)[-1])
    assert checked > 40, result.stdout


def test_ruff() -> None:
    result = run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_layers() -> None:
    lint_imports = shutil.which("lint-imports")
    if lint_imports is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]'")
    result = run(lint_imports)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout
