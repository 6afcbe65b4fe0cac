"""Render the chart with a real `helm` (see tests/chart/helm.py) and parse the output."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.helm import HelmNotFound, find_helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kanal"
VALUES = Path(__file__).resolve().parent / "values"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
RELEASE = "kanal"
NAMESPACE = "kanal-system"

# The realistic value sets every check runs over: name -> values file (None: defaults).
VALUE_SETS: dict[str, Path | None] = {
    "default": None,
    **{path.stem: path for path in sorted(VALUES.glob("*.yaml"))},
    "e2e-kind": REPO / "tests" / "e2e" / "values-kind.yaml",
}


@dataclass
class Rendered:
    name: str
    docs: list[dict[str, Any]]
    values: dict[str, Any]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [doc for doc in self.of_kind(kind)
                 if doc["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"{self.name}: expected one {kind} *{name_suffix}, got {found}"
        return found[0]


@dataclass
class Helm:
    path: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.path), *args], capture_output=True, text=True,
                              env=self.env, timeout=120, check=check)

    def template(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # On a fresh machine the helm fixture builds helm (and the rest of tests/k8s's
    # binaries) from Go once, for minutes: the timeout covers the test bodies only.
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.timeout(120, func_only=True))


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    try:
        path = find_helm()
    except HelmNotFound as exc:
        pytest.skip(str(exc))
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
    return Helm(path, env)


def values_args(values_file: Path | None) -> list[str]:
    return ["--values", str(values_file)] if values_file else []


@pytest.fixture(scope="session")
def render(helm: Helm) -> Iterator[Callable[[str], Rendered]]:
    """`render("namespaced")`: the chart rendered (CRDs included) with a value set, cached."""
    # helm spends a second or two per render (it makes the webhook CA): render every
    # value set at once, in parallel, on first use.
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}
    cache: dict[str, Rendered] = {}

    def go(name: str) -> Rendered:
        if not outputs:
            with ThreadPoolExecutor(max_workers=4) as pool:
                futures = {set_name: pool.submit(helm.template, "--include-crds",
                                                 *values_args(values_file))
                           for set_name, values_file in VALUE_SETS.items()}
                outputs.update({set_name: f.result() for set_name, f in futures.items()})
        if name not in cache:
            values_file = VALUE_SETS[name]
            result = outputs[name]
            assert result.returncode == 0, f"helm template ({name}) failed:\n{result.stderr}"
            docs = [doc for doc in yaml.load_all(result.stdout, Loader=LOADER) if doc]
            values = yaml.safe_load((CHART / "values.yaml").read_text())
            if values_file:
                values = merge(values, yaml.safe_load(values_file.read_text()) or {})
            cache[name] = Rendered(name, docs, values)
        return cache[name]

    yield go


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
