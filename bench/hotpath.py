"""The dataplane's own work per request, without sockets: the request path's Python cost.

`bench/run.py` measures a proxy the way users see it, and on a shared machine its
figures move by 10-20% from run to run, more than most single changes to the request
path are worth. This drives the real `ClientConnection` and `UpstreamConnection` of
the benchmark's Route with in-memory transports instead: a request's bytes in, the
upstream request out, the backend's answer in, the client's answer out. What it times
is everything the dataplane does in user space for one keep-alive request (parsing,
routing, rendering both heads, pooling, breaker, metrics), which is what a change to
the request path changes; kernel time (the write and read calls, about half of a real
request's CPU) is not in it.

    python bench/hotpath.py [--requests N] [--rounds R] [--observe]

It prints the median time per request over the rounds, and the build it ran
(compiled or pure). Compare two trees by running it in each; the figures are
steady to about 1%.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# This directory holds h2.py (the HTTP/2 benchmark), which would shadow the h2 library;
# the checkout this file is in is the one measured (not whichever one is installed).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from kanal import dataplane  # noqa: E402
from kanal.dataplane.pool import UpstreamConnection  # noqa: E402
from kanal.dataplane.proxy import ClientConnection  # noqa: E402
from kanal.dataplane.runtime import Runtime  # noqa: E402
from kanal.operator.compiler import compile_snapshot  # noqa: E402
from kanal.operator.manifests import load_manifests  # noqa: E402

# What wrk sends, and what the benchmark's nginx backend answers (100 B body).
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 06 Dec 2026 05:00:00 GMT\r\n"
          b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
          b"Connection: keep-alive\r\n\r\n" + b"k" * 100)


class MemoryTransport(asyncio.Transport):
    """Keeps what is written; the one reader of it is the benchmark."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.peer = peer
        self.written: list[bytes] = []
        self.closing = False
        # A C call, as a real transport's write is: the benchmark measures the
        # dataplane, not a Python stand-in. (Writes are bytes on this path.)
        self.write = self.written.append  # type: ignore[method-assign,assignment]

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def measure(requests: int, rounds: int, observe: bool, tmp: Path) -> list[float]:
    # bench/run.py's Route and Upstream (the endpoint is never dialled: one pooled
    # connection with an in-memory transport is put in its pool below).
    spec = importlib.util.spec_from_file_location("bench_run", _HERE / "run.py")
    assert spec is not None and spec.loader is not None
    bench_run = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench_run  # (its dataclasses look their module up)
    spec.loader.exec_module(bench_run)
    manifests, errors = load_manifests([str(bench_run.kanal_manifests(tmp, 9))])
    if errors:
        raise SystemExit(f"manifests: {errors}")
    snapshot = compile_snapshot([m.resource for m in manifests]).snapshot
    runtime = Runtime()
    context = runtime.context()
    config = runtime.apply(snapshot)
    if observe:
        from kanal.dataplane.accesslog import AccessLog
        context.access_log = AccessLog.open(str(tmp / "access.log"))  # type: ignore[attr-defined]
        context.observing = True

    client = ClientConnection(context)
    client_side = MemoryTransport(("127.0.0.1", 50000))
    client.connection_made(client_side)
    upstream = next(iter(config.upstreams.values()))
    pool = next(iter(upstream.pools.values()))
    conn = UpstreamConnection(pool)
    upstream_side = MemoryTransport(("127.0.0.1", 9))
    conn.connection_made(upstream_side)
    pool.put_back(conn)  # one warm pooled connection, as under keep-alive load

    def one() -> None:
        client.data_received(REQUEST)
        conn.data_received(ANSWER)

    for _ in range(2000):  # warm up, and check the exchange really went through
        one()
    answer = b"".join(client_side.written[-2:])
    if not client_side.written or b" 200 " not in client_side.written[-1][:16] + answer[:16]:
        raise SystemExit(f"the exchange did not complete: {client_side.written[-2:]!r}")
    results = []
    for _ in range(rounds):
        client_side.written.clear()
        upstream_side.written.clear()
        gc.collect()
        start = time.perf_counter()
        for _ in range(requests):
            one()
        elapsed = time.perf_counter() - start
        if len(upstream_side.written) < requests:
            raise SystemExit("requests were not sent upstream")
        results.append(elapsed / requests * 1e6)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--observe", action="store_true",
                        help="access log on (JSON to a file), as bench/run.py --observe")
    args = parser.parse_args(argv)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(measure(args.requests, args.rounds, args.observe, Path(tmp)))
    print(f"build {dataplane.BUILD}: {statistics.median(results):.2f} µs per request "
          f"(median of {args.rounds} rounds of {args.requests}; min {min(results):.2f}, "
          f"max {max(results):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
