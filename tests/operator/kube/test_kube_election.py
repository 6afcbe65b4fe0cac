"""The parts of leader election that need no API server: settings, counting, merging.

Taking, renewing and handing back the Lease, and the shared records, run against a
real kube-apiserver in tests/k8s/test_operator.py, and against kmock's emulator (with
PUT added by tests/operator/kube/conftest.py) in test_kube_split_status.py.
"""

from __future__ import annotations

import pytest

from kanal.operator.kube.election import (
    RECORD_PREFIX,
    DataplaneRecord,
    ElectionSettings,
    annotation_key,
    count,
    merge,
    micro_time,
    parse_time,
)


def test_off_unless_the_environment_turns_it_on() -> None:
    assert ElectionSettings.from_env({}) is None
    assert ElectionSettings.from_env({"KANAL_LEADER_ELECTION": "false"}) is None
    settings = ElectionSettings.from_env({
        "KANAL_LEADER_ELECTION": "true", "POD_NAME": "kanal-operator-abc",
        "POD_NAMESPACE": "kanal-system", "KANAL_LEASE_DURATION": "12"})
    assert settings == ElectionSettings(namespace="kanal-system", name="kanal-operator",
                                        identity="kanal-operator-abc", lease_duration=12.0,
                                        retry_period=2.0)
    assert settings.records_name == "kanal-operator-dataplanes"
    assert settings.renew_deadline == 8.0


def test_a_lease_too_short_for_its_retries_is_refused() -> None:
    with pytest.raises(ValueError, match="lease duration"):
        ElectionSettings.from_env({"KANAL_LEADER_ELECTION": "1", "KANAL_LEASE_DURATION": "0.5"})
    with pytest.raises(ValueError, match="twice the retry"):
        ElectionSettings("ns", "lease", "me", lease_duration=2, retry_period=1.5)


def test_micro_time_round_trips() -> None:
    assert micro_time(1_700_000_000.25) == "2023-11-14T22:13:20.250000Z"
    assert parse_time(micro_time(1_700_000_000.25)) == 1_700_000_000.25
    assert parse_time("not a time") is None and parse_time(None) is None


def test_a_dataplane_is_counted_once_by_its_freshest_record() -> None:
    moved_from = {"dp-a": DataplaneRecord("v1", None, seen=10.0)}
    moved_to = {"dp-a": DataplaneRecord("v2", None, seen=20.0),
                "dp-b": DataplaneRecord("v2", None, seen=15.0)}
    merged = merge([moved_to, moved_from])
    assert merged == {"dp-a": moved_to["dp-a"], "dp-b": moved_to["dp-b"]}
    assert count(merged, "v2") == (2, 2, ())


def test_refusals_of_the_current_version_are_named() -> None:
    records = {"dp-a": DataplaneRecord("v1", ("v2", "bad certificate"), seen=1.0),
               "dp-b": DataplaneRecord("v2", ("v1", "old trouble"), seen=1.0),
               "dp-c": DataplaneRecord(None, None, seen=1.0)}
    assert count(records, "v2") == (1, 3, (("dp-a", "bad certificate"),))
    assert DataplaneRecord.from_json(records["dp-a"].to_json()) == records["dp-a"]
    assert DataplaneRecord.from_json({"acked": 3, "seen": 1}) is None


def test_a_dataplanes_split_report_travels_in_its_record() -> None:
    from kanal.contract.splits import SplitObservation, SplitShare
    from kanal.operator.kube.election import SPLITS_PER_DATAPLANE

    canary = SplitObservation("default/shop", 0, "main", (
        SplitShare("default/v1", 90, 897), SplitShare("default/v2", 10, 103)))
    record = DataplaneRecord("v2", None, seen=1.0, splits=(canary,))
    assert DataplaneRecord.from_json(record.to_json()) == record
    # A record without splits is written as before; splits that do not parse are left out.
    assert "splits" not in DataplaneRecord("v2", None, seen=1.0).to_json()
    broken = {**record.to_json(), "splits": [["default/shop", "x", None, []], canary_json(record)]}
    assert DataplaneRecord.from_json(broken) == record
    # Bounded: the rules with the largest windows are kept.
    many = tuple(SplitObservation("default/r", i, None, (SplitShare("a", 1, i), SplitShare("b", 1, 0)))
                 for i in range(SPLITS_PER_DATAPLANE + 20))
    kept = DataplaneRecord.from_json(DataplaneRecord("v2", None, 1.0, many).to_json())
    assert kept is not None and len(kept.splits) == SPLITS_PER_DATAPLANE
    assert min(o.window for o in kept.splits) == 20


def canary_json(record: DataplaneRecord) -> list[object]:
    (item,) = record.to_json()["splits"]
    return list(item)


def test_annotation_keys_are_valid_names() -> None:
    assert annotation_key("kanal-operator-7d9c-x2b") == RECORD_PREFIX + "kanal-operator-7d9c-x2b"
    hashed = annotation_key("host/with:odd" + "x" * 80)
    assert hashed.startswith(RECORD_PREFIX) and len(hashed) - len(RECORD_PREFIX) == 32
