"""REST/JSON to gRPC transcoding, the I/O part: a rule with `grpcTranscoder` reads the
client's JSON request whole (bounded), calls the gRPC method its `google.api.http`
annotation names on the rule's backend (through the Upstream's balancer, breakers,
pool and the rule's retries, like an aggregate's parts), and answers the message as
JSON, or the gRPC error as the matching HTTP status with a `{code, message}` body.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote

import httptools

from kanal.contract.snapshot import Rule
from kanal.dataplane.aggregate import AggregateAnswer, AggregateClient, deliver, exchange
from kanal.dataplane.grpc import frame, with_timeout
from kanal.dataplane.grpcerrors import TranscodeError, error_json

if TYPE_CHECKING:
    from kanal.contract.snapshot import Retries
    from kanal.dataplane.grpcjson import Binding, Transcoder
    from kanal.dataplane.runtime import UpstreamRuntime

MAX_JSON_BODY = 4 * 1024 * 1024
"""Bytes of a JSON request read for transcoding; a larger body is answered 413."""

_TRANSCODERS: dict[str, Transcoder | str] = {}


def transcoder(descriptor_set: str) -> Transcoder | str:
    """The Transcoder of a descriptor set (built once per content), or why there is none."""
    key = hashlib.sha256(descriptor_set.encode()).hexdigest()
    found = _TRANSCODERS.get(key)
    if found is None:
        # protobuf is loaded here, by the first rule that transcodes: a configuration
        # without one never pays for it.
        from kanal.dataplane.grpcjson import Transcoder

        try:
            found = Transcoder.from_base64(descriptor_set) if descriptor_set else (
                "no descriptor set (its Secret, ConfigMap or file is missing or lacks the key)")
        except (ValueError, KeyError, TypeError) as exc:
            found = f"the descriptor set does not load: {exc}"
        if len(_TRANSCODERS) > 64:
            _TRANSCODERS.clear()
        _TRANSCODERS[key] = found
    return found


class TranscodeRequest(Protocol):
    """What transcoding reads and sets of the request and its exchange (`proxy.Request`)."""

    method: bytes
    target: bytes
    host: bytes | None
    chunked: bool
    content_length: bytes | None
    complete: bool
    body: list[bytes]
    upstream_key: str
    set_cookie: bytes | None
    retries: Retries | None
    request_sent: bool
    route_timer: asyncio.TimerHandle | None  # the rule's `timeout`, when it has one


def begin(client: AggregateClient, request: TranscodeRequest, rule: Rule,
          upstream: UpstreamRuntime) -> None:
    """Serve `request`, the current one of `client`, by transcoding (the rule has a
    transcoder)."""
    settings = rule.grpc_transcoder
    assert settings is not None
    request.retries = None  # the answer is the transcoder's: never re-sent as it came
    answer = TranscodeAnswer(request.chunked, request.content_length)
    client.upstream = answer
    request.upstream_key = upstream.key
    request.set_cookie = None  # no session affinity cookie on a transcoded answer
    loop = asyncio.get_running_loop()
    found = transcoder(settings.descriptor_set)
    path, _, query = request.target.decode("latin-1").partition("?")
    if isinstance(found, str):
        loop.call_soon(deliver, client, answer, *error_json(14, found))
        return
    match = found.match(request.method.decode("latin-1"), path)
    if match is None:
        loop.call_soon(deliver, client, answer, *error_json(
            5, f"no gRPC method is bound to {request.method.decode('latin-1')} {path}"))
        return
    binding, variables = match
    authority = request.host.decode("latin-1") if request.host is not None else upstream.key
    deadline = (request.route_timer.when() if rule.timeout and request.route_timer is not None
                else math.inf)

    def call(body: bytes | None) -> None:
        if body is None:
            loop.call_soon(deliver, client, answer, 413,
                           b'{"code": 8, "message": "request body larger than %d bytes"}'
                           % MAX_JSON_BODY)
            return
        answer.task = loop.create_task(_call(client, answer, found, binding, variables, query,
                                             body, rule, upstream, authority, deadline))

    answer.ready = call
    request.request_sent = True
    for chunk in request.body:  # what arrived with the head
        answer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if request.chunked else chunk)
    request.body = []
    if answer.done:  # no body (Content-Length: 0), or all of it came with the head
        call(None if answer.too_large else bytes(answer.received))
    elif request.complete:
        answer.finish()


class TranscodeAnswer(AggregateAnswer):
    """Reads the client's body (as the request logic writes it upstream), then answers."""

    __slots__ = ("reader", "received", "ready", "done", "too_large")

    def __init__(self, chunked: bool, length: bytes | None) -> None:
        super().__init__()
        self.received = bytearray()
        self.ready: Callable[[bytes | None], None] | None = None
        self.done = False
        self.too_large = False
        self.reader = httptools.HttpRequestParser(self)
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %b" % (
            length or b"0")
        self.reader.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")

    def write(self, data: bytes) -> None:
        if self.done:
            return
        try:
            self.reader.feed_data(data)
        except httptools.HttpParserError:
            self.finish()

    # llhttp callbacks
    def on_body(self, body: bytes) -> None:
        self.received += body
        if len(self.received) > MAX_JSON_BODY:
            self.too_large = True
            self.finish()

    def on_message_complete(self) -> None:
        self.finish()

    def finish(self) -> None:
        """The body is whole (or too large): the call may go."""
        if self.done:
            return
        self.done = True
        if self.ready is not None:
            self.ready(None if self.too_large else bytes(self.received))


def _timed_heads(head: bytes, deadline: float, rule: Rule) -> Callable[[], bytes] | None:
    """Each try's head with the time it has as its `grpc-timeout`, as a proxied gRPC call
    gets it: what is left of the rule's `timeout`, cut to the try's
    `retries.perTryTimeout`; None when the rule has neither."""
    per_try = rule.retries.per_try_timeout if rule.retries is not None else None
    if deadline == math.inf and not per_try:
        return None
    loop = asyncio.get_running_loop()

    def timed() -> bytes:
        now = loop.time()
        end = min(deadline, now + per_try) if per_try else deadline
        return with_timeout(head, end - now)

    return timed


async def _call(client: AggregateClient, answer: TranscodeAnswer, found: Transcoder,
                binding: Binding, variables: dict[str, str], query: str, body: bytes,
                rule: Rule, upstream: UpstreamRuntime, authority: str, deadline: float) -> None:
    try:
        message = found.request_message(binding, variables, query, body)
    except TranscodeError as exc:
        deliver(client, answer, *error_json(3, str(exc)))
        return
    payload = frame(message)
    head = (f"POST {binding.path} HTTP/1.1\r\nHost: {authority}\r\n"
            "Content-Type: application/grpc\r\nTE: trailers\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode("latin-1")
    result, fields = await exchange(binding.path, "POST", head, payload, rule, upstream,
                                    try_head=_timed_heads(head, deadline, rule))
    if result.error is not None:
        deliver(client, answer, *error_json(14, result.error))
        return
    named = {name.lower(): value for name, value in fields}
    status = named.get(b"grpc-status")
    if result.status != 200 or status is None:
        deliver(client, answer, *error_json(14, f"upstream answered HTTP {result.status} "
                                                "without a gRPC status"))
        return
    if status != b"0":
        text = unquote(named.get(b"grpc-message", b"").decode("utf-8", "replace"))
        deliver(client, answer, *error_json(int(status) if status.isdigit() else 2, text))
        return
    data = result.body
    if len(data) < 5 or data[0] != 0:
        deliver(client, answer, *error_json(13, "the answer is not one uncompressed message"))
        return
    length = int.from_bytes(data[1:5], "big")
    try:
        deliver(client, answer, 200, found.response_json(binding, data[5:5 + length]))
    except (ValueError, TypeError) as exc:  # a message that does not decode as declared
        deliver(client, answer, *error_json(13, f"the answer does not decode: {exc}"))

