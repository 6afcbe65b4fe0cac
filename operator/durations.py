"""Durations as users write them (`400ms`, `2s`, `1m30s`, `1h`) and as the dataplane uses them.

The format is Gateway API's `Duration`: one to four groups of a number of at most
five digits and a unit among `h`, `m`, `s` and `ms`, with nothing in between, i.e.
the regular expression ``^([0-9]{1,5}(h|m|s|ms)){1,4}$``. So `1h30m`, `90s`, `0s`
and `1500ms` are durations; `1.5s`, `-1s`, `10` (no unit), `1d`, `500us` and the
empty string are not. We chose this over Go's wider `time.ParseDuration` because the
same pattern goes into the CRD schema, where the API server enforces it: a manifest
that `kanal validate` accepts is one that `kubectl apply` accepts.

In manifests a duration stays the string the user wrote (models round-trip
unchanged); the compiler turns it into float seconds with `parse_duration`, so the
dataplane never parses human forms.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

DURATION_PATTERN = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"
"""Gateway API's Duration pattern; also the CRD schema's `pattern` for every duration."""

_WHOLE = re.compile(DURATION_PATTERN)
# `ms` must be tried before `m`, or `500ms` would read as 500 minutes and a stray `s`.
_GROUP = re.compile(r"([0-9]{1,5})(ms|h|m|s)")
_SECONDS_PER_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}

DURATION_HELP = "a duration like 400ms, 2s, 1m30s or 1h (units h, m, s, ms)"


def parse_duration(text: str) -> float:
    """Return the duration `text` in seconds; raise ValueError when it is not one.

    >>> parse_duration("1m30s")
    90.0
    """
    if not isinstance(text, str) or not _WHOLE.fullmatch(text):
        raise ValueError(f"must be {DURATION_HELP}, got {text!r}")
    total_ms = 0
    for number, unit in _GROUP.findall(text):
        # Integer milliseconds avoid float drift (`1h1ms` stays exact).
        total_ms += int(number) * int(_SECONDS_PER_UNIT[unit] * 1000)
    return total_ms / 1000.0


def format_duration(seconds: float) -> str:
    """The shortest duration string for `seconds` (rounded to milliseconds).

    Used where the control plane writes durations back for people (status, explain).
    """
    if seconds < 0:
        raise ValueError(f"durations are never negative, got {seconds}")
    remaining = round(seconds * 1000)
    if remaining == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _check_duration(text: str) -> str:
    parse_duration(text)
    return text


def _check_positive(text: str) -> str:
    if parse_duration(text) <= 0:
        raise ValueError(f"must be longer than 0s, got {text!r}")
    return text


_SCHEMA = WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN})

Duration = Annotated[str, AfterValidator(_check_duration), _SCHEMA]
"""A duration string, validated and kept as written (see the module's docstring)."""

PositiveDuration = Annotated[str, AfterValidator(_check_positive), _SCHEMA]
"""A duration that must be longer than zero (intervals, connect timeouts)."""
