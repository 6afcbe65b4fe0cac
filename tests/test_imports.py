"""Every module imports in a fresh interpreter, and `operator` stays the standard library's."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import kanal
import kanal.commands
import kanal.contract
import kanal.dataplane
import kanal.operator


def all_modules() -> list[str]:
    names = ["kanal"]
    for package in (kanal.contract, kanal.operator, kanal.dataplane, kanal.commands):
        names.append(package.__name__)
        names.extend(
            info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
        )
    return sorted(names)


def test_every_module_imports_and_stdlib_operator_is_intact() -> None:
    modules = all_modules()
    assert "kanal.commands.cli" in modules and "kanal.dataplane.proxy" in modules
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import operator\n"
        "assert operator.__name__ == 'operator', operator\n"
        "assert operator.__file__ is None or 'kanal' not in operator.__file__, operator.__file__\n"
        "assert operator.add(2, 3) == 5 and hasattr(operator, 'itemgetter')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dataplane_does_not_import_the_control_plane() -> None:
    """The dataplane runs without kopf, the CRD models or the compiler."""
    script = (
        "import sys, importlib, pkgutil, kanal.dataplane\n"
        "for info in pkgutil.walk_packages(kanal.dataplane.__path__, 'kanal.dataplane.'):\n"
        "    importlib.import_module(info.name)\n"
        "bad = [m for m in sys.modules if m.startswith(('kanal.operator', 'kopf'))]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_repository_root_on_sys_path_does_not_shadow_operator() -> None:
    """Run from the repository root (`python -m pytest` there), `operator` is still Python's."""
    root = Path(__file__).resolve().parent.parent
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "sys.modules.pop('operator', None)\n"
        "import operator, collections, dataclasses\n"
        "assert operator.add(2, 3) == 5 and hasattr(operator, 'itemgetter'), operator\n"
        "import kanal.operator.compiler\n"
        "assert sys.modules['operator'] is operator\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=root)
    assert result.returncode == 0, result.stderr


def test_the_contract_imports_nothing_of_either_plane() -> None:
    """Both planes import the contract; it imports neither, nor any HTTP machinery."""
    script = (
        "import sys, importlib, pkgutil, kanal.contract\n"
        "for info in pkgutil.walk_packages(kanal.contract.__path__, 'kanal.contract.'):\n"
        "    importlib.import_module(info.name)\n"
        "bad = [m for m in sys.modules if m.startswith(('kanal.operator', 'kanal.dataplane',\n"
        "       'kanal.commands', 'kopf', 'pydantic', 'aiohttp', 'httptools'))]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_module_of_kanal_imports_itself_back() -> None:
    """No import cycles: a module's imports never lead back to it, at any depth."""
    import grimp

    graph = grimp.build_graph("kanal")
    modules = sorted(m for m in graph.modules if m.startswith("kanal."))
    assert "kanal.dataplane.proxy" in modules and "kanal.operator.kube.handlers" in modules
    cycles = sorted(
        f"{module} -> {imported}"
        for module in modules
        for imported in graph.find_modules_directly_imported_by(module)
        if imported.startswith("kanal.") and graph.chain_exists(importer=imported, imported=module)
    )
    assert not cycles, cycles
