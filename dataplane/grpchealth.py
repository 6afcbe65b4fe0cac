"""Active health checks with the standard gRPC health protocol (grpc.health.v1).

One short HTTP/2 connection per check, as the HTTP checks open one per check: a
`Check` call for the configured service name, passed when it answers SERVING with
`grpc-status: 0` within the timeout. The messages are made and read by
`kanal.dataplane.grpc`; framing is the h2 library's.
"""

from __future__ import annotations

import asyncio
import ssl

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from kanal.contract.snapshot import HealthCheck
from kanal.dataplane import grpc


async def check_grpc(
    address: str,
    port: int,
    settings: HealthCheck,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[bool, str]:
    """One grpc.health.v1 check; (passed, what happened)."""
    writer = None
    try:
        async with asyncio.timeout(settings.timeout):
            if ssl_context is not None:
                reader, writer = await asyncio.open_connection(
                    address, port, ssl=ssl_context, server_hostname=server_hostname or address)
            else:
                reader, writer = await asyncio.open_connection(address, port)
            return await _call(reader, writer, settings.grpc_service or "",
                               b"https" if ssl_context is not None else b"http",
                               f"{address}:{port}".encode())
    except TimeoutError:
        return False, f"no answer within {settings.timeout:g}s"
    except (OSError, ssl.SSLError) as exc:
        return False, str(exc) or type(exc).__name__
    except h2.exceptions.ProtocolError as exc:
        return False, f"HTTP/2 protocol error: {exc}"
    finally:
        if writer is not None:
            writer.close()


async def _call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, service: str,
                scheme: bytes, authority: bytes) -> tuple[bool, str]:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, [
        (b":method", b"POST"), (b":scheme", scheme), (b":path", grpc.HEALTH_PATH),
        (b":authority", authority), (b"content-type", b"application/grpc"),
        (b"te", b"trailers"), (b"user-agent", b"kanal-health-check"),
    ])
    conn.send_data(stream_id, grpc.health_request(service), end_stream=True)
    writer.write(conn.data_to_send())
    body = b""
    fields: dict[bytes, bytes] = {}
    while True:
        data = await reader.read(65536)
        if not data:
            return False, "connection closed before the answer"
        for event in conn.receive_data(data):
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                fields.update((bytes(n), bytes(v)) for n, v in event.headers or ())
            elif isinstance(event, h2.events.DataReceived):
                body += event.data or b""
                conn.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
            elif isinstance(event, h2.events.StreamReset):
                return False, "stream reset"
            elif isinstance(event, h2.events.StreamEnded):
                return _verdict(fields, body)
        writer.write(conn.data_to_send())


def _verdict(fields: dict[bytes, bytes], body: bytes) -> tuple[bool, str]:
    if fields.get(b":status") != b"200":
        return False, f"status {fields.get(b':status', b'-').decode('latin-1')}"
    code = fields.get(b"grpc-status", b"")
    if code != b"0":
        return False, f"grpc-status {code.decode('latin-1') or '-'}"
    status = grpc.health_status(body)
    if status != grpc.SERVING:
        return False, f"health status {status}"
    return True, "SERVING"
