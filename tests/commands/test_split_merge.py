"""`kanal run --workers N`: the group's /metrics says the split of all workers together."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kanal.commands.supervisor import merge_metrics


def worker(v1: int, v2: int) -> str:
    """A worker's split families, as its SplitCollector writes them."""
    window = v1 + v2
    lines = [
        "# TYPE kanal_split_declared_weight gauge",
        'kanal_split_declared_weight{route="shop/web",rule="0",upstream="shop/v1"} 90.0',
        'kanal_split_declared_weight{route="shop/web",rule="0",upstream="shop/v2"} 10.0',
        "# TYPE kanal_split_declared_share gauge",
        'kanal_split_declared_share{route="shop/web",rule="0",upstream="shop/v1"} 0.9',
        'kanal_split_declared_share{route="shop/web",rule="0",upstream="shop/v2"} 0.1',
        "# TYPE kanal_split_observed_share gauge",
        f'kanal_split_observed_share{{route="shop/web",rule="0",upstream="shop/v1"}} {v1 / window}',
        f'kanal_split_observed_share{{route="shop/web",rule="0",upstream="shop/v2"}} {v2 / window}',
        "# TYPE kanal_split_window_requests gauge",
        f'kanal_split_window_requests{{route="shop/web",rule="0"}} {window}',
        "# TYPE kanal_split_choices counter",
        f'kanal_split_choices_total{{route="shop/web",rule="0",upstream="shop/v1"}} {v1}',
        f'kanal_split_choices_total{{route="shop/web",rule="0",upstream="shop/v2"}} {v2}',
    ]
    return "\n".join(lines) + "\n"


def values(text: str) -> dict[tuple[str, str], float]:
    return {(sample.name, sample.labels.get("upstream", "")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_shares_are_weighted_by_windows_and_declarations_said_once() -> None:
    merged = values(merge_metrics([worker(900, 100), worker(180, 20), ""]))
    assert merged[("kanal_split_observed_share", "shop/v1")] == 0.9
    assert merged[("kanal_split_observed_share", "shop/v2")] == 0.1
    assert merged[("kanal_split_declared_weight", "shop/v1")] == 90
    assert merged[("kanal_split_declared_share", "shop/v2")] == 0.1
    assert merged[("kanal_split_window_requests", "")] == 1200
    assert merged[("kanal_split_choices_total", "shop/v1")] == 1080
    uneven = values(merge_metrics([worker(90, 10), worker(50, 50)]))
    assert uneven[("kanal_split_observed_share", "shop/v2")] == 60 / 200
