"""The Subscriber in-process: Snapshot checks, state on disk, backoff on virtual time.

The backoff test runs a real Subscriber against a real (closed, then served, then
closed again) port on 127.0.0.1 under `looptime`: the retry times are asserted exactly
on the loop's virtual clock and take no real time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import random
from pathlib import Path

import pytest

from kanal.contract.codec import SnapshotDecoder, SnapshotRejected, parse_snapshot
from kanal.contract.snapshot import Backend, Endpoint, Route, Rule, Snapshot, Upstream
from kanal.dataplane.runtime import Runtime
from kanal.dataplane.subscriber import Backoff, Subscriber, SubscriberOptions
from kanal.operator.publisher import Publisher, serve_publisher, shared_token_authenticator
from tests.conftest import free_port


def snapshot(port: int = 9001) -> Snapshot:
    return Snapshot(
        routes=(Route(key="default/app", rules=(Rule(index=0, backends=(Backend("default/v1"),)),)),),
        upstreams=(Upstream(key="default/v1", endpoints=(Endpoint("127.0.0.1", port),)),),
    ).with_version()


def test_parse_checks_the_version_against_the_content() -> None:
    good = snapshot()
    assert parse_snapshot(good.to_json()) == good

    tampered = json.loads(good.to_json())
    tampered["upstreams"][0]["endpoints"][0]["port"] = 6666
    with pytest.raises(SnapshotRejected, match=f"version {good.version} does not match"):
        parse_snapshot(json.dumps(tampered))

    # Not canonical (spaces, other key order) but the same content: accepted.
    loose = json.dumps(json.loads(good.to_json()), indent=2)
    assert parse_snapshot(loose) == good

    for body, why in [
        (good.to_json()[:-10], "not JSON"),
        ("[]", "not a JSON object"),
        (json.dumps({**json.loads(good.to_json()), "version": ""}), "no version"),
        (json.dumps({**json.loads(good.to_json()), "extra": 1}), "unknown fields"),
    ]:
        with pytest.raises(SnapshotRejected, match=why):
            parse_snapshot(body)


def test_backoff_grows_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.2, 10.0, random.Random(7))
    delays = [backoff.next() for _ in range(12)]
    for n, delay in enumerate(delays):
        ceiling = min(10.0, 0.2 * 2 ** (n + 1))
        assert max(0.2, ceiling / 2) <= delay <= ceiling
    assert max(delays) <= 10.0 and delays[-1] >= 5.0
    assert len(set(delays[-4:])) == 4  # jittered even at the cap
    backoff.reset()
    assert 0.2 <= backoff.next() <= 0.4


@pytest.mark.looptime
async def test_reconnects_with_backoff_and_resets_it_on_success(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    port = free_port()
    token = tmp_path / "token"
    token.write_text("tok")
    subscriber = Subscriber(
        SubscriberOptions(control_plane=f"http://127.0.0.1:{port}", token_file=token,
                          dataplane_id="dp", state_dir=tmp_path / "state"),
        rng=random.Random(42),
    )
    expected = Backoff(0.2, 10.0, random.Random(42))
    runtime = Runtime()
    stop = asyncio.Event()
    start = loop.time()
    task = loop.create_task(subscriber.run(runtime, stop))

    # The control plane is down: attempts at 0, then after each backoff delay.
    await asyncio.sleep(60)
    times = [t - start for t, _ in subscriber.attempts]
    assert all(outcome.startswith("unreachable") for _, outcome in subscriber.attempts)
    planned = [0.0]
    for _ in range(len(times) - 1):
        planned.append(planned[-1] + expected.next())
    assert times == pytest.approx(planned, abs=1e-3)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) <= 10.0 + 1e-3 and len(times) >= 8

    # It comes up: the next attempt gets the Snapshot, and the backoff starts again.
    publisher = Publisher(shared_token_authenticator("tok"), clock=loop.time)
    current = snapshot()
    publisher.publish(current)
    runner = await serve_publisher(publisher, "127.0.0.1", port)
    up_at = loop.time()
    next_attempt = start + planned[-1] + expected.next()
    await asyncio.sleep(next_attempt - up_at + 1)
    assert runtime.config is not None and runtime.config.version == current.version
    assert publisher.programmed(current.version) == (1, 1)
    assert subscriber.backoff.failures == 0
    assert (tmp_path / "state" / "snapshot.json").read_bytes() == current.to_json().encode()

    # Down again: the first retry comes after 0.2 to 0.4 s, not after the old delay.
    await runner.cleanup()
    down_at = loop.time()
    await asyncio.sleep(2)
    retries = [t - down_at for t, _ in subscriber.attempts if t >= down_at]
    assert len(retries) >= 2
    assert 0.2 - 1e-3 <= retries[0] <= 0.4 + 1e-3
    assert 0.4 - 1e-3 <= retries[1] - retries[0] <= 0.8 + 1e-3

    stop.set()
    async with asyncio.timeout(11):
        await task


def test_state_is_written_atomically_and_loaded_at_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    options = SubscriberOptions(control_plane="http://127.0.0.1:1", state_dir=state)
    current = snapshot()
    Subscriber(options).save_state(current.to_json().encode())
    assert os.listdir(state) == ["snapshot.json"]  # no temporary file left behind

    runtime = Runtime()
    restarted = Subscriber(options)
    assert restarted.load_state(runtime) == current
    assert runtime.config is not None and runtime.config.version == current.version
    assert restarted.known == restarted.applied == current.version
    assert restarted._params()["applied"] == current.version


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"routes": []}'])
def test_a_damaged_state_file_is_ignored(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "snapshot.json").write_bytes(content)
    runtime = Runtime()
    subscriber = Subscriber(SubscriberOptions(control_plane="http://127.0.0.1:1", state_dir=tmp_path))
    assert subscriber.load_state(runtime) is None
    assert runtime.config is None and subscriber.known is None


def test_a_kept_snapshot_that_does_not_run_is_ignored(tmp_path: Path) -> None:
    from kanal.contract.snapshot import Match, PathMatch

    good = snapshot()
    route = dataclasses.replace(good.routes[0], rules=(dataclasses.replace(
        good.routes[0].rules[0], matches=(Match(path=PathMatch("RegularExpression", "/(")),)),))
    broken = dataclasses.replace(good, routes=(route,)).with_version()
    (tmp_path / "snapshot.json").write_bytes(broken.to_json().encode())
    runtime = Runtime()
    assert Subscriber(SubscriberOptions(control_plane="http://x", state_dir=tmp_path)).load_state(runtime) is None
    assert runtime.config is None


def test_the_token_is_read_afresh_each_time(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    subscriber = Subscriber(SubscriberOptions(control_plane="http://x", token_file=token))
    assert subscriber._headers() == {"Authorization": "Bearer one"}
    token.write_text("two")
    assert subscriber._headers() == {"Authorization": "Bearer two"}
    token.unlink()
    assert subscriber._headers() == {}


def test_the_decoder_reuses_what_did_not_change_and_agrees_with_the_full_decoder() -> None:
    base = snapshot()
    more = Upstream(key="default/v2", endpoints=(Endpoint("127.0.0.2", 80),))
    first = dataclasses.replace(base, upstreams=(*base.upstreams, more)).with_version()
    route = first.routes[0]
    changed_rule = dataclasses.replace(route.rules[0], backends=(Backend("default/v2"),))
    second = dataclasses.replace(first, routes=(dataclasses.replace(route, rules=(changed_rule,)),)
                                 ).with_version()

    decoder = SnapshotDecoder()
    one = decoder.parse(first.to_json())
    two = decoder.parse(second.to_json())
    assert one == first and two == second == Snapshot.from_json(second.to_json())
    assert two.upstreams[0] is one.upstreams[0] and two.upstreams[1] is one.upstreams[1]
    assert two.routes[0] is not one.routes[0]

    # Canonical bytes with a changed content but the old version: refused all the same.
    tampered = json.loads(second.to_json())
    tampered["upstreams"][1]["endpoints"][0]["port"] = 81
    body = json.dumps(tampered, sort_keys=True, separators=(",", ":"))
    with pytest.raises(SnapshotRejected, match="does not match"):
        decoder.parse(body)
    assert decoder.parse(second.to_json()) == second
