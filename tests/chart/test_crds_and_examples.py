"""The chart's CRDs are the generator's, and every example's custom resources fit them.

- charts/kanal/crds/ holds exactly what `kanal.operator.crdgen.crd_files()` writes (the
  same files as crds/): regenerate with `python -m kanal.operator.crdgen charts/kanal/crds`;
- the kanal.dev resources in the chart's examples, the end-to-end manifests and the
  README validate against those CRDs' schemas and pass `kanal validate`; their other
  documents validate against the Kubernetes schemas.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kanal.operator.crdgen import crd_files
from tests.chart.conftest import CHART, REPO
from tests.chart.test_chart import validate_kubernetes

REGENERATE = "python -m kanal.operator.crdgen charts/kanal/crds"
EXAMPLES = [*sorted((CHART / "examples").glob("*.yaml")),
            *sorted((REPO / "tests" / "e2e" / "manifests").glob("*.yaml"))]


def test_chart_crds_are_what_the_generator_writes() -> None:
    expected = crd_files()
    present = {p.name: p.read_text(encoding="utf-8") for p in (CHART / "crds").glob("*.yaml")}
    assert sorted(present) == sorted(expected), f"regenerate with `{REGENERATE}`"
    stale = [name for name in expected if present[name] != expected[name]]
    assert not stale, f"charts/kanal/crds/{stale} differ from the models: `{REGENERATE}`"
    for name, text in expected.items():
        assert (REPO / "crds" / name).read_text(encoding="utf-8") == text, name


def crd_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for text in crd_files().values():
        crd = yaml.safe_load(text)
        (version,) = crd["spec"]["versions"]
        kind = crd["spec"]["names"]["kind"]
        schemas[f"{crd['spec']['group']}/{version['name']}/{kind}"] = \
            version["schema"]["openAPIV3Schema"]
    return schemas


def readme_yaml_blocks() -> list[dict[str, Any]]:
    """kanal.dev documents in the README's ```yaml blocks (its Kubernetes section)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    docs = []
    for block in re.findall(r"```ya?ml\n(.*?)```", text, flags=re.DOTALL):
        docs += [d for d in yaml.safe_load_all(block) if d and "kanal.dev" in d.get("apiVersion", "")]
    return docs


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_example_manifests_validate(path: Path) -> None:
    schemas = crd_schemas()
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    assert docs
    for doc in docs:
        key = f"{doc['apiVersion']}/{doc['kind']}"
        if doc["apiVersion"].startswith("kanal.dev/"):
            assert key in schemas, f"{path}: no CRD for {key}"
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
                      for e in jsonschema.Draft4Validator(schemas[key]).iter_errors(doc)]
            assert not errors, f"{path}: {doc['metadata']['name']}: {errors}"
        else:
            validate_kubernetes(doc, str(path))
    result = subprocess.run([sys.executable, "-m", "kanal", "validate", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_kubernetes_section_resources_validate() -> None:
    schemas = crd_schemas()
    docs = readme_yaml_blocks()
    assert any(d["kind"] == "Route" for d in docs), "the README shows no Route"
    for doc in docs:
        errors = [e.message for e in jsonschema.Draft4Validator(
            schemas[f"{doc['apiVersion']}/{doc['kind']}"]).iter_errors(doc)]
        assert not errors, (doc["metadata"], errors)
