"""Golden files: `testdata/<case>.in.yaml` (manifests) -> `<case>.out.yaml` (what Kanal makes).

One pair per behaviour, in the manner of Envoy Gateway's internal/gatewayapi/testdata.
The output holds the manifest errors, the status of every object and the Snapshot
exactly as the dataplane receives it. After an intended change, rewrite them with
`pytest tests/compiler --update-golden` and read the diff.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from kanal.operator.compiler import compile_snapshot
from kanal.operator.manifests import load_manifests

TESTDATA = Path(__file__).parent / "testdata"
CASES = sorted(path.name.removesuffix(".in.yaml") for path in TESTDATA.glob("*.in.yaml"))


def _golden(case: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], list[Any]]:
    monkeypatch.chdir(TESTDATA)  # error messages name the file as given: `<case>.in.yaml`
    manifests, errors = load_manifests([f"{case}.in.yaml"])
    resources = [manifest.resource for manifest in manifests]
    result = compile_snapshot(resources)
    output = {
        "errors": [str(error) for error in errors],
        "statuses": [status.to_dict() for status in result.statuses],
        "snapshot": result.snapshot.to_dict(),
    }
    return output, resources


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PEM texts) as literal blocks, so the files read like Secrets."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=4096, allow_unicode=True)


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 8, CASES


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, update_golden: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    output, _ = _golden(case, monkeypatch)
    expected_path = TESTDATA / f"{case}.out.yaml"
    if update_golden:
        expected_path.write_text(_dump(output))
    assert expected_path.exists(), f"no {expected_path.name}: run pytest with --update-golden"
    expected = yaml.safe_load(expected_path.read_text())
    assert output == expected, (
        f"{case}: the compiler's output changed; if that is intended, run "
        "`pytest tests/compiler --update-golden` and review the diff"
    )


@pytest.mark.parametrize("case", CASES)
def test_output_does_not_depend_on_input_order(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    output, resources = _golden(case, monkeypatch)
    for seed in range(5):
        shuffled = list(resources)
        random.Random(seed).shuffle(shuffled)
        result = compile_snapshot(shuffled)
        assert result.snapshot.to_dict() == output["snapshot"]
        assert [s.to_dict() for s in result.statuses] == output["statuses"]


@pytest.mark.parametrize("case", CASES)
def test_snapshot_round_trips_and_is_versioned(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kanal.contract.snapshot import Snapshot, content_version

    output, _ = _golden(case, monkeypatch)
    snapshot = Snapshot.from_dict(output["snapshot"])
    assert snapshot.version == content_version(snapshot)
    assert snapshot.to_dict() == output["snapshot"]
