"""Scenario: HTTP/2 limits and attacks, as raw frames on a socket, against `kanal run`.

The client side is the h2 library (with its outbound checks off where an attack needs
it) and hyperframe/hpack for frames h2 would never send. Each attack must be bounded
and answered with the right code: GOAWAY(ENHANCE_YOUR_CALM) for floods and rapid
reset, GOAWAY(PROTOCOL_ERROR) for a CONTINUATION flood, RST_STREAM for a malformed
stream or one over the stream limit; a zero window that never opens is reset after the body timeout; a graceful
stop finishes the streams in flight.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame

from tests.conftest import upstream_yaml

ROUTE = """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: app}
spec:
  rules: [{backends: [{upstream: echo}]}]
"""


class RawH2:
    """An HTTP/2 client connection on a plain socket: frames in, events out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 settings: dict[int, int] | None = None) -> None:
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config=config)
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.closed = False
        self.bodies: dict[int, bytes] = {}
        self.hold: set[int] = set()  # streams whose windows this client never opens

    @classmethod
    async def open(cls, port: int, settings: dict[int, int] | None = None) -> RawH2:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer, settings)
        client.flush()
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def raw(self, data: bytes) -> None:
        self.writer.write(data)

    def request(self, path: str, *, end: bool = True, extra: list[tuple[bytes, bytes]] | None = None,
                method: bytes = b"GET") -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(b":method", method), (b":scheme", b"http"), (b":authority", b"app.test"),
                   (b":path", path.encode()), *(extra or [])]
        self.conn.send_headers(stream_id, headers, end_stream=end)
        self.flush()
        return stream_id

    async def until(self, predicate: Any, timeout: float = 10.0) -> h2.events.Event | None:
        """Read until an event matches `predicate` (returned), or the connection closes
        (None); fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            if self.closed:
                return None
            left = deadline - time.monotonic()
            assert left > 0, f"no matching event within {timeout}s: {self.events[-5:]}"
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except (TimeoutError, ConnectionError):
                data = b""
            if not data:
                self.closed = True
                continue
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.closed = True
                continue
            for event in events:
                if isinstance(event, h2.events.DataReceived):
                    self.bodies[event.stream_id] = self.bodies.get(event.stream_id, b"") + event.data
                    if event.stream_id not in self.hold:
                        self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                            event.stream_id)
            self.events.extend(events)
            self.flush()

    async def goaway(self, timeout: float = 10.0) -> h2.events.ConnectionTerminated:
        event = await self.until(lambda e: isinstance(e, h2.events.ConnectionTerminated), timeout)
        assert isinstance(event, h2.events.ConnectionTerminated), self.events[-5:]
        return event

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def ended(stream_id: int):
    return lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id


def reset(stream_id: int):
    return lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == stream_id


def status_of(client: RawH2, stream_id: int) -> int:
    for event in client.events:
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
            return int(dict(event.headers)[b":status"])
    raise AssertionError(f"no answer on stream {stream_id}: {client.events}")


@pytest.fixture(scope="module")
def proxy(module_kanal, module_backends):
    echo = module_backends("echo")
    return module_kanal({"route.yaml": ROUTE, "up.yaml": upstream_yaml("echo", echo)},
                        "--request-body-timeout", "1")


async def still_serves(port: int) -> None:
    client = await RawH2.open(port)
    stream_id = client.request("/after")
    await client.until(ended(stream_id))
    assert status_of(client, stream_id) == 200
    await client.close()


async def test_settings_announce_the_limits_and_a_request_is_answered(proxy):
    client = await RawH2.open(proxy.port)
    stream_id = client.request("/x")
    await client.until(ended(stream_id))
    changed = next(e for e in client.events if isinstance(e, h2.events.RemoteSettingsChanged))
    values = {code: setting.new_value for code, setting in changed.changed_settings.items()}
    assert values[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 100
    assert values[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] == 65536
    assert status_of(client, stream_id) == 200
    assert b'"path": "/x"' in client.bodies[stream_id]
    await client.close()


async def test_a_stream_over_the_limit_is_refused_and_the_others_finish(proxy):
    """RFC 9113 5.1.2: the stream past SETTINGS_MAX_CONCURRENT_STREAMS is refused alone
    (REFUSED_STREAM: safe to send again); the streams already open get their answers,
    and the connection takes new streams once some have ended."""
    client = await RawH2.open(proxy.port)
    # Sent before the server's SETTINGS are read, so the client library does not stop it.
    opened = [client.request(f"/sleep/0.5?n={n}") for n in range(100)]
    over = client.request("/sleep/0.5?n=over", method=b"POST", end=False)
    client.conn.send_data(over, b"x" * 16000, end_stream=True)  # its body still arrives
    client.flush()
    refused = await client.until(reset(over))
    assert isinstance(refused, h2.events.StreamReset)
    assert refused.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
    for stream_id in opened:
        await client.until(ended(stream_id))
    assert [status_of(client, s) for s in opened] == [200] * 100
    assert all(f'"path": "/sleep/0.5?n={n}"'.encode() in client.bodies[s]
               for n, s in enumerate(opened))
    again = client.request("/again")
    await client.until(ended(again))
    assert status_of(client, again) == 200
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)
    await client.close()


async def test_a_flood_of_streams_over_the_limit_ends_the_connection(proxy):
    client = await RawH2.open(proxy.port)
    for _ in range(100 + 150):  # 150 refused in a row: more than a race with SETTINGS
        client.request("/sleep/2")
    event = await client.goaway()
    assert event.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    await client.close()
    await still_serves(proxy.port)


async def test_rapid_reset_ends_the_connection_with_enhance_your_calm(proxy):
    client = await RawH2.open(proxy.port)
    for _ in range(300):
        stream_id = client.request("/sleep/5")
        client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        client.flush()
    event = await client.goaway()
    assert event.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    await client.close()
    await still_serves(proxy.port)


@pytest.mark.parametrize("kind", ["ping", "settings"])
async def test_ping_and_settings_floods_end_the_connection(proxy, kind):
    client = await RawH2.open(proxy.port)
    for index in range(1200 if kind == "ping" else 150):
        if kind == "ping":
            client.conn.ping(index.to_bytes(8, "big"))
        else:
            client.conn.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384 + index})
        client.flush()
    event = await client.goaway()
    assert event.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    await client.close()


async def test_continuation_flood_is_refused(proxy):
    client = await RawH2.open(proxy.port)
    block = hpack.Encoder().encode([(b":method", b"GET"), (b":scheme", b"http"),
                                    (b":authority", b"app.test"), (b":path", b"/")])
    frame = HeadersFrame(1)
    frame.data = block
    frame.flags.add("END_STREAM")  # no END_HEADERS: CONTINUATION frames follow
    client.raw(frame.serialize())
    for _ in range(200):
        continuation = ContinuationFrame(1)
        continuation.data = b"\x00" * 16
        client.raw(continuation.serialize())
    event = await client.goaway()
    assert event.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert await client.until(lambda e: False) is None  # and the connection is closed
    await client.close()


async def test_hpack_bomb_is_stopped_by_the_header_list_limit(proxy):
    client = await RawH2.open(proxy.port)
    # One 4 KiB field in the dynamic table, referenced 200 times: a small block that
    # would decode to 800 KiB.
    bomb = [(b"x-bomb", b"a" * 4000)] * 200
    client.request("/", extra=bomb)
    event = await client.goaway()
    assert event.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    await client.close()
    await still_serves(proxy.port)


@pytest.mark.parametrize("field", [
    (b"x-smuggle", b"a\r\nx-injected: 1"),
    (b"x-nul", b"a\x00b"),
    (b"bad name", b"1"),
])
async def test_fields_http1_would_read_otherwise_reset_the_stream(proxy, module_backends, field):
    client = await RawH2.open(proxy.port)
    stream_id = client.request("/smuggle", extra=[field])
    event = await client.until(
        lambda e: isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)))
    assert event is not None
    assert event.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    if isinstance(event, h2.events.StreamReset):
        assert event.stream_id == stream_id
    await client.close()
    await still_serves(proxy.port)


async def test_a_window_kept_at_zero_is_reset_after_the_body_timeout(proxy):
    client = await RawH2.open(proxy.port,
                              settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    stream_id = client.request("/bytes/200000")
    started = time.monotonic()
    event = await client.until(reset(stream_id), timeout=10)
    assert isinstance(event, h2.events.StreamReset)
    assert event.error_code == h2.errors.ErrorCodes.CANCEL
    assert 0.9 < time.monotonic() - started < 6
    # Meanwhile the connection itself still serves (a HEAD needs no window).
    head = client.request("/head", method=b"HEAD")
    await client.until(ended(head))
    assert status_of(client, head) == 200
    await client.close()


async def test_a_slow_reader_stalls_only_its_own_stream(proxy):
    """A stream whose window the client does not open waits; another stream on the same
    connection gets its whole answer meanwhile."""
    client = await RawH2.open(proxy.port,
                              settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024})
    stalled = client.request("/bytes/100000")
    client.hold.add(stalled)
    await client.until(lambda e: isinstance(e, h2.events.DataReceived)
                       and e.stream_id == stalled)
    other = client.request("/small")
    client.conn.increment_flow_control_window(1 << 20, stream_id=other)
    client.flush()
    await client.until(ended(other))
    assert status_of(client, other) == 200
    assert len(client.bodies.get(stalled, b"")) <= 1024
    await client.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_graceful_stop_finishes_streams_in_flight(kanal, backends):
    """SIGTERM: GOAWAY(NO_ERROR) naming the last stream taken, and that stream's answer
    still arrives whole (curl reads on after a graceful GOAWAY, as browsers do)."""
    echo = await backends("echo")
    k = kanal({"route.yaml": ROUTE, "up.yaml": upstream_yaml("echo", echo)})
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--http2-prior-knowledge", "-w", "\n%{http_version} %{http_code}",
        k.url + "/sleep/1.5", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    client = await RawH2.open(k.port)
    first = client.request("/sleep/1.5")
    deadline = time.monotonic() + 5
    while len(echo.received) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # poll: both requests reached the backend
    assert len(echo.received) == 2
    assert k.process is not None
    k.process.send_signal(signal.SIGTERM)
    goaway = await client.goaway()
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id >= first
    out, err = await asyncio.wait_for(curl.communicate(), 15)
    assert curl.returncode == 0, err
    body, _, status = out.decode().rpartition("\n")
    assert status == "2 200" and '"path": "/sleep/1.5"' in body
    await client.close()


async def test_in_flight_streams_survive_a_configuration_change(kanal, backends):
    old, new = await backends("old"), await backends("new")
    k = kanal({"route.yaml": ROUTE, "up.yaml": upstream_yaml("echo", old)})
    client = await RawH2.open(k.port)
    first = client.request("/sleep/1")
    version = k.version()
    k.write("up.yaml", upstream_yaml("echo", new))
    await asyncio.to_thread(k.wait_for_new_version, version)
    second = client.request("/now")
    await client.until(ended(second))
    await client.until(ended(first))
    assert status_of(client, first) == 200 and b'"backend": "old"' in client.bodies[first]
    assert b'"backend": "new"' in client.bodies[second]
    await client.close()
