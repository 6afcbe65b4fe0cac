"""The reverse listener as an attacker meets it: raw bytes in, what comes back and what
the backend received. The backend here is a raw recorder, so nothing between the proxy
and the assertions normalises what went over the wire."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import (
    answer_while_sending,
    free_port,
    raw_request,
    read_response,
    upstream_yaml,
)


@dataclass
class Recorder:
    """An HTTP/1.1 origin that records each raw request head and answers 200 (keep-alive)."""

    port: int
    heads: list[bytes] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                if head.startswith(b"GET /ws"):
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                                 + self.accept + b"\r\n\r\n")
                    await writer.drain()
                    while data := await reader.read(65536):
                        self.heads.append(b"TUNNEL:" + data)
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    accept: bytes = b"bogus"

    server: asyncio.Server | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        async def go() -> None:
            self.server = await asyncio.start_server(self.serve, "127.0.0.1", self.port)

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def stop(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        assert self.thread is not None
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def edge(module_kanal) -> Iterator[tuple[int, Recorder]]:
    recorder = Recorder(free_port())
    recorder.start()
    files = {
        "up.yaml": f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: rec}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {recorder.port}}}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: rec}}
spec:
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /private}}}}]
      backends: [{{upstream: not-here}}]
    - backends: [{{upstream: rec}}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: limits}}
spec:
  hostnames: [limits.test]
  rules:
    - backends: [{{upstream: rec}}]
      maxRequestBodySize: 1Ki
      allowWebSocket: false
""",
    }
    k = module_kanal(files)
    yield k.port, recorder
    recorder.stop()


async def status_of(port: int, data: bytes) -> tuple[int, str]:
    [answer] = await raw_request(port, data)
    return answer.status, answer.reason


def received(recorder: Recorder, marker: bytes) -> list[bytes]:
    return [head for head in recorder.heads if marker in head]


async def test_connection_cannot_strip_end_to_end_headers(edge) -> None:
    port, recorder = edge
    status, _ = await status_of(
        port, b"GET /conn-host HTTP/1.1\r\nHost: a.test\r\nConnection: Host, Content-Length, "
              b"Transfer-Encoding, X-Drop\r\nX-Drop: 1\r\n\r\n")
    assert status == 200
    [head] = received(recorder, b"/conn-host")
    lower = head.lower()
    assert b"\r\nhost: a.test" in lower
    assert b"x-drop" not in lower


async def test_header_names_with_underscores_are_dropped(edge) -> None:
    port, recorder = edge
    status, _ = await status_of(
        port, b"GET /underscore HTTP/1.1\r\nHost: a.test\r\nX_Forwarded_For: 6.6.6.6\r\n"
              b"Content_Length: 5\r\nX-Fine: yes\r\n\r\n")
    assert status == 200
    [head] = received(recorder, b"/underscore")
    assert b"_" not in head.split(b"\r\n", 1)[1].replace(b"/underscore", b"")
    assert b"X-Fine: yes" in head


@pytest.mark.parametrize("name", [b"Authorization", b"Host", b"Content-Type",
                                  b"Content-Length", b"Origin"])
async def test_duplicate_singletons_are_400(edge, name: bytes) -> None:
    port, recorder = edge
    marker = b"/dup-" + name
    data = b"GET " + marker + b" HTTP/1.1\r\nHost: a.test\r\n"
    value = b"0" if name == b"Content-Length" else b"x"
    if name != b"Host":
        data += name + b": " + value + b"\r\n"
    data += name + b": " + value + b"2\r\n" if name != b"Content-Length" else name + b": 1\r\n"
    data += b"\r\n"
    status, _ = await status_of(port, data)
    assert status == 400
    assert not received(recorder, marker)


@pytest.mark.parametrize("line", [
    b"GET /frag#f HTTP/1.1",
    b"GET * HTTP/1.1",
    b"GET https://a.test/abs HTTP/1.1",
    b"GET /nover",
])
async def test_bad_request_targets_are_400_and_never_forwarded(edge, line: bytes) -> None:
    port, recorder = edge
    before = len(recorder.heads)
    status, _ = await status_of(port, line + b"\r\nHost: a.test\r\n\r\n")
    assert status == 400
    assert len(recorder.heads) == before


async def test_unsupported_version_is_505(edge) -> None:
    port, recorder = edge
    status, _ = await status_of(port, b"GET /v2 HTTP/2.0\r\nHost: a.test\r\n\r\n")
    assert status in (400, 505)
    assert not received(recorder, b"/v2 ")


@pytest.mark.parametrize("host", [b"a b", b"a/b", b"a@b", b"[::1", b"a,b", b"a.test:65536",
                                  b"a.test:x"])
async def test_invalid_host_values_are_400(edge, host: bytes) -> None:
    port, recorder = edge
    marker = b"/badhost-" + host.replace(b" ", b"_").replace(b"/", b"_")
    status, _ = await status_of(port, b"GET " + marker + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert status == 400
    assert not received(recorder, marker)


async def test_path_parameters_do_not_dodge_a_path_match(edge) -> None:
    port, recorder = edge
    # /private goes nowhere (5xx); a servlet container reads /private;x=1/a as /private/a,
    # so the router must too, instead of letting the catch-all forward it
    guarded, _ = await status_of(port, b"GET /private/a HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert guarded >= 500
    status, _ = await status_of(port, b"GET /private;x=1/a HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert status == guarded
    assert not received(recorder, b"/private")


async def test_a_valid_request_before_a_malformed_one_is_answered_first(edge) -> None:
    port, recorder = edge
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /first-ok HTTP/1.1\r\nHost: a.test\r\n\r\n"
                     b"GET /second bad HTTP/1.1\r\nHost: a.test\r\n\r\n")
        async with asyncio.timeout(10):
            first = await read_response(reader)
            second = await read_response(reader)
            rest = await reader.read()
    finally:
        writer.close()
    assert first.status == 200 and first.body == b"ok"
    assert second.status == 400
    assert rest == b""
    assert received(recorder, b"/first-ok")


async def test_a_head_in_two_pieces_with_a_body_is_not_431(edge) -> None:
    port, _ = edge
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = b"x" * 200_000
        writer.write(b"POST /two-pieces HTTP/1.1\r\nHost: a.test\r\n")
        await writer.drain()
        writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await read_response(reader)
    finally:
        writer.close()
    assert answer.status == 200


async def test_many_pipelined_requests_are_each_answered(edge) -> None:
    port, _ = edge
    count = 2000
    answers = await raw_request(port, b"GET /pipe HTTP/1.1\r\nHost: a.test\r\n\r\n" * count,
                                responses=count, timeout=60)
    assert [a.status for a in answers] == [200] * count


@pytest.mark.parametrize(("data", "status", "reason"), [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a.test\r\n\r\n", 414, "URI Too Long"),
    (b"GET /big HTTP/1.1\r\nHost: a.test\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431,
     "Request Header Fields Too Large"),
])
async def test_limits_use_standard_reason_phrases(edge, data: bytes, status: int,
                                                  reason: str) -> None:
    port, _ = edge
    assert await status_of(port, data) == (status, reason)


@pytest.mark.parametrize("head", [
    b"POST /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
])
async def test_invalid_websocket_upgrades_are_400(edge, head: bytes) -> None:
    port, recorder = edge
    before = len(recorder.heads)
    status, _ = await status_of(port, head)
    assert status == 400
    assert len(recorder.heads) == before


async def test_a_101_without_the_right_accept_opens_no_tunnel(edge) -> None:
    port, recorder = edge
    recorder.accept = b"bogus"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await read_response(reader)
        assert answer.status == 502
        # the connection is closed: what the client sends next goes nowhere (a reset is
        # fine too: the bytes may land after the close)
        with contextlib.suppress(ConnectionError):
            writer.write(b"GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(10):
                assert await reader.read() == b""
    finally:
        writer.close()
    assert not any(b"/smuggled" in head for head in recorder.heads)


async def test_a_101_with_the_right_accept_opens_the_tunnel(edge) -> None:
    port, recorder = edge
    recorder.accept = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455's example
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await read_response(reader, head_request=True)
        assert answer.status == 101
        writer.write(b"frame-bytes")
        await writer.drain()
        async def tunneled() -> bool:
            return any(h == b"TUNNEL:frame-bytes" for h in recorder.heads)
        async with asyncio.timeout(10):
            while not await tunneled():
                await asyncio.sleep(0.01)
    finally:
        writer.close()


async def test_a_backtracking_pattern_cannot_stall_the_proxy(kanal, backends) -> None:
    web = await backends("web")
    k = kanal({
        "web.yaml": upstream_yaml("web", web),
        "route.yaml": """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: evil}
spec:
  rules:
    - matches: [{path: {type: RegularExpression, value: "/r/(a+)+$"}}]
      backends: [{upstream: web}]
""",
    })
    # Python's backtracking engine needs about 2**30 steps (minutes) for this path; RE2
    # answers at once. The bounded deadline of raw_request is the check.
    [answer] = await raw_request(k.port, b"GET /r/" + b"a" * 30 + b"b HTTP/1.1\r\n"
                                 b"Host: a.test\r\n\r\n", timeout=10)
    assert answer.status == 404
    [answer] = await raw_request(k.port, b"GET /r/aaa HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert answer.status == 200


def test_a_pattern_re2_cannot_run_is_refused_at_load(tmp_path) -> None:
    import subprocess
    import sys

    (tmp_path / "route.yaml").write_text("""\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: backref}
spec:
  rules:
    - matches: [{path: {type: RegularExpression, value: "/(a)\\\\1"}}]
      backends: [{upstream: web}]
""")
    result = subprocess.run([sys.executable, "-m", "kanal", "validate", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "RE2" in result.stdout + result.stderr


async def serve_once(answer: bytes) -> tuple[asyncio.Server, int]:
    """An origin that reads one request head and sends `answer`, then closes."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_upstream_answers_are_bounded_and_framed_as_rfc_9112_says(kanal) -> None:
    huge, huge_port = await serve_once(
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2_000_000 + b"\r\nContent-Length: 2\r\n\r\nok")
    odd, odd_port = await serve_once(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    try:
        k = kanal({"routes.yaml": f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: huge}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {huge_port}}}]
---
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata: {{name: odd}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {odd_port}}}]
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {{name: r}}
spec:
  rules:
    - matches: [{{path: {{value: /huge}}}}]
      backends: [{{upstream: huge}}]
    - matches: [{{path: {{value: /odd}}}}]
      backends: [{{upstream: odd}}]
"""})
        [answer] = await raw_request(k.port, b"GET /huge HTTP/1.1\r\nHost: a.test\r\n\r\n")
        assert answer.status == 502
        assert b"larger than" in answer.body
        [answer] = await raw_request(k.port, b"GET /odd HTTP/1.1\r\nHost: a.test\r\n\r\n")
        # not chunked: the body runs to the connection's end, bytes as they came
        assert answer.status == 200
        assert answer.body == b"5\r\nhello\r\n0\r\n\r\n"
    finally:
        huge.close()
        odd.close()


async def test_a_body_over_the_rules_limit_is_413(edge) -> None:
    port, recorder = edge
    # declared: refused before anything is forwarded
    status, reason = await status_of(port, b"POST /declared HTTP/1.1\r\nHost: limits.test\r\n"
                                           b"Content-Length: 1025\r\n\r\n" + b"x" * 1025)
    assert (status, reason) == (413, "Content Too Large")
    assert not received(recorder, b"/declared")
    # at the limit: forwarded
    status, _ = await status_of(port, b"POST /at-limit HTTP/1.1\r\nHost: limits.test\r\n"
                                      b"Content-Length: 1024\r\n\r\n" + b"x" * 1024)
    assert status == 200
    # chunked: cut when it goes past the limit, answered 413 if nothing was answered yet
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # One write: the limit is passed before the backend (which answers without
        # reading bodies) can have answered.
        writer.write(b"POST /streamed HTTP/1.1\r\nHost: limits.test\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     + (b"200\r\n" + b"x" * 512 + b"\r\n") * 3)
        with contextlib.suppress(ConnectionResetError):
            # The proxy may answer and close before the last chunk is even sent.
            await writer.drain()
        async with asyncio.timeout(10):
            answer = await read_response(reader)
    finally:
        writer.close()
    assert answer.status == 413


async def test_a_rule_can_refuse_websocket_upgrades(edge) -> None:
    port, recorder = edge
    status, _ = await status_of(
        port, b"GET /ws HTTP/1.1\r\nHost: limits.test\r\nConnection: Upgrade\r\n"
              b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert status == 403
    # (Not a count of all heads: an earlier test's request may still be on its way.)
    assert not [h for h in received(recorder, b"GET /ws ") if b"Host: limits.test" in h]


async def test_head_and_body_deadlines_answer_408(kanal, backends) -> None:
    web = await backends("web")
    k = kanal({"web.yaml": upstream_yaml("web", web), "route.yaml": """\
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata: {name: r}
spec:
  rules: [{backends: [{upstream: web}]}]
"""}, "--request-head-timeout", "1", "--request-body-timeout", "1")
    # a head trickled in: 408 once a second has passed since its first byte
    reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await read_response(reader)
        assert answer.status == 408 and "head" in answer.body.decode()
    finally:
        writer.close()
    # a body that stops: 408
    reader, writer = await asyncio.open_connection("127.0.0.1", k.port)
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await read_response(reader)
        assert answer.status == 408 and "body" in answer.body.decode()
    finally:
        writer.close()



@pytest.mark.parametrize("line", [
    b"GET  /spaced-a HTTP/1.1",
    b"GET /spaced-b  HTTP/1.1",
    b"GET   /spaced-c   HTTP/1.1",
    b"\r\nGET  /spaced-d HTTP/1.1",
    b"GET\t/spaced-e HTTP/1.1",
    b"GET /spaced-f\tHTTP/1.1",
    b"GET /spaced-g HTTP/1.1 ",
])
async def test_request_lines_with_extra_whitespace_are_400_and_closed(edge, line: bytes) -> None:
    port, recorder = edge
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(line + b"\r\nHost: a.test\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await read_response(reader)
            assert answer.status == 400
            assert await reader.read() == b""  # and the connection is closed
    finally:
        writer.close()
    assert not received(recorder, line.split()[1])


async def test_a_spaced_request_line_behind_a_valid_one_is_caught(edge) -> None:
    port, recorder = edge
    # in the same read as a valid request, and split over two reads at the spaces
    answers = await raw_request(port, b"GET /piped-ok HTTP/1.1\r\nHost: a.test\r\n\r\n"
                                      b"GET  /piped-bad HTTP/1.1\r\nHost: a.test\r\n\r\n",
                                responses=2)
    assert [a.status for a in answers] == [200, 400]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /split-bad ")
        await writer.drain()
        writer.write(b" HTTP/1.1\r\nHost: a.test\r\n\r\n")
        async with asyncio.timeout(10):
            assert (await read_response(reader)).status == 400
    finally:
        writer.close()
    assert received(recorder, b"/piped-ok")
    assert not received(recorder, b"/piped-bad") and not received(recorder, b"/split-bad")


async def test_empty_lines_before_a_request_line_are_ignored(edge) -> None:
    port, recorder = edge
    answers = await raw_request(port, b"\r\nGET /lead-1 HTTP/1.1\r\nHost: a.test\r\n\r\n"
                                      b"\r\n\r\nGET /lead-2 HTTP/1.1\r\nHost: a.test\r\n\r\n",
                                responses=2)
    assert [a.status for a in answers] == [200, 200]
    assert received(recorder, b"GET /lead-1 HTTP/1.1") and received(recorder, b"GET /lead-2 ")


async def test_an_error_answer_survives_a_client_that_goes_on_sending(edge) -> None:
    port, recorder = edge
    # The 413 goes out at the head, and the body keeps coming.
    answer = await answer_while_sending(
        port, b"POST /linger HTTP/1.1\r\nHost: limits.test\r\n"
              b"Content-Length: %d\r\n\r\n" % (16 << 20), 16 << 20)
    assert (answer.status, answer.reason) == (413, "Content Too Large")
    assert answer.body.startswith(b"kanal: 413 request body larger than 1024 bytes")
    assert not received(recorder, b"/linger")
