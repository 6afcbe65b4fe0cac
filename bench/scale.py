"""Control-plane scale: compile time, Snapshot size and change propagation to a dataplane.

    python bench/scale.py [--routes 1000] [--endpoints 10000] [--changes 100] [--json PATH]

Builds N Routes and M endpoints (spread over N Upstreams) as the operator's pydantic
model objects, compiles them with `kanal.operator.compiler.compile_snapshot`, and
serves the Snapshot from a real Publisher on 127.0.0.1 to a real `kanal dataplane`
subprocess. Then it changes one Route at a time (its path prefix) and measures, for
each change, the time from `publish` to the dataplane's ACK of that version as the
Publisher records it (`on_ack`), which includes the transfer, the dataplane's checks,
the build of its route table and pools, and the ACK's trip back.

A tool for people, like `bench/run.py`: nothing here runs in CI and no figure is a
pass/fail threshold. The targets it is read against (docs/performance.md): compile
under 1 s; propagation p99 at most 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kanal.operator.compiler import compile_snapshot
from kanal.operator.models import Route, Upstream
from kanal.operator.publisher import Publisher, serve_publisher, shared_token_authenticator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_objects(routes: int, endpoints: int) -> tuple[list[Upstream], list[Route]]:
    """`routes` Routes, each to its own Upstream; `endpoints` spread evenly over them."""
    upstreams = []
    for i in range(routes):
        count = endpoints // routes + (1 if i < endpoints % routes else 0)
        upstreams.append(Upstream.model_validate({
            "apiVersion": "kanal.dev/v1alpha1", "kind": "Upstream",
            "metadata": {"name": f"svc-{i}", "namespace": f"ns-{i % 20}"},
            "spec": {"endpoints": [
                {"address": f"10.{(i >> 8) & 255}.{i & 255}.{j + 1}", "port": 8080}
                for j in range(count)
            ]},
        }))
    route_objects = [route_object(i, "/api") for i in range(routes)]
    return upstreams, route_objects


def route_object(i: int, prefix: str) -> Route:
    return Route.model_validate({
        "apiVersion": "kanal.dev/v1alpha1", "kind": "Route",
        "metadata": {"name": f"route-{i}", "namespace": f"ns-{i % 20}",
                     "creationTimestamp": f"2026-01-01T00:{(i // 60) % 60:02d}:{i % 60:02d}Z"},
        "spec": {
            "hostnames": [f"app-{i}.example.com"],
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
                 "backends": [{"upstream": f"svc-{i}"}]},
                {"matches": [{"path": {"type": "Exact", "value": "/healthz"}, "method": "GET"}],
                 "backends": [{"upstream": f"svc-{i}"}]},
            ],
        },
    })


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


async def propagation(objects: list[Any], routes: int, changes: int, workdir: Path,
                      timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    token = "bench-token"
    token_file = workdir / "token"
    token_file.write_text(token)
    publisher = Publisher(shared_token_authenticator(token))
    acked: dict[str, asyncio.Future[tuple[bool, str | None, float | None]]] = {}

    def on_ack(dataplane: str, version: str, ok: bool, error: str | None,
               elapsed: float | None) -> None:
        future = acked.get(version)
        if future is not None and not future.done():
            future.set_result((ok, error, elapsed))

    publisher.on_ack.append(on_ack)
    result = compile_snapshot(objects)
    first = result.snapshot
    acked[first.version] = loop.create_future()
    publisher.publish(first)
    port = free_port()
    runner = await serve_publisher(publisher, "127.0.0.1", port)
    process = start_dataplane(f"http://127.0.0.1:{port}", token_file, workdir)
    try:
        ok, error, first_elapsed = await asyncio.wait_for(acked[first.version], timeout)
        if not ok:
            raise SystemExit(f"the dataplane refused the first snapshot: {error}")
        samples: list[float] = []
        compile_times: list[float] = []
        for n in range(changes):
            index = n % routes
            changed = [o for o in objects
                       if not (isinstance(o, Route) and o.metadata.name == f"route-{index}")]
            changed.append(route_object(index, f"/api/v{n + 2}"))
            started = time.perf_counter()
            snapshot = compile_snapshot(changed).snapshot
            compile_times.append(time.perf_counter() - started)
            future = acked[snapshot.version] = loop.create_future()
            publisher.publish(snapshot)
            ok, error, elapsed = await asyncio.wait_for(future, timeout)
            if not ok or elapsed is None:
                raise SystemExit(f"change {n} was not applied: {error}")
            samples.append(elapsed)
            del acked[snapshot.version]
        return {
            "first_ack_after_start_s": first_elapsed,
            "changes": changes,
            "propagation_p50_ms": percentile(samples, 50) * 1000,
            "propagation_p99_ms": percentile(samples, 99) * 1000,
            "propagation_max_ms": max(samples) * 1000,
            "propagation_mean_ms": statistics.fmean(samples) * 1000,
            "recompile_median_ms": statistics.median(compile_times) * 1000,
            "dataplane_rss_mib": _rss(process.pid) / 2**20,
        }
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        await runner.cleanup()


def start_dataplane(url: str, token_file: Path, workdir: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "kanal", "dataplane",
            "--control-plane", url, "--token-file", str(token_file),
            "--state-dir", str(workdir / "state"), "--listen", f"127.0.0.1:{free_port()}",
            "--admin", f"127.0.0.1:{free_port()}", "--dataplane-id", "bench", "--log-level", "warning"]
    with open(workdir / "dataplane.log", "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def stages(objects: list[Any], routes: int, rounds: int = 10) -> dict[str, float]:
    """Medians of the parts of one change, in this process: where propagation time goes."""
    from kanal.contract.codec import SnapshotDecoder
    from kanal.dataplane.runtime import Runtime
    from kanal.operator.publisher import snapshot_body

    decoder, runtime, fragments = SnapshotDecoder(), Runtime(), {}  # as Publisher and Subscriber
    runtime.apply(decoder.parse(snapshot_body(compile_snapshot(objects).snapshot, fragments)))
    times: dict[str, list[float]] = {"stage_publish_serialise_ms": [], "stage_dataplane_decode_ms": [],
                                     "stage_dataplane_apply_ms": []}
    for n in range(rounds):
        index = n % routes
        changed = [o for o in objects
                   if not (isinstance(o, Route) and o.metadata.name == f"route-{index}")]
        changed.append(route_object(index, f"/stage/{n}"))
        snapshot = compile_snapshot(changed).snapshot
        t0 = time.perf_counter()
        body = snapshot_body(snapshot, fragments)
        t1 = time.perf_counter()
        decoded = decoder.parse(body)
        t2 = time.perf_counter()
        runtime.apply(decoded)
        t3 = time.perf_counter()
        times["stage_publish_serialise_ms"].append((t1 - t0) * 1000)
        times["stage_dataplane_decode_ms"].append((t2 - t1) * 1000)
        times["stage_dataplane_apply_ms"].append((t3 - t2) * 1000)
    runtime.close()
    return {key: statistics.median(values) for key, values in times.items()}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--compile-rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60.0, help="per ACK, seconds")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    started = time.perf_counter()
    upstreams, routes = build_objects(args.routes, args.endpoints)
    build_s = time.perf_counter() - started
    objects: list[Any] = [*upstreams, *routes]

    compile_times = []
    for _ in range(args.compile_rounds):
        started = time.perf_counter()
        result = compile_snapshot(objects)
        compile_times.append(time.perf_counter() - started)
    snapshot = result.snapshot
    started = time.perf_counter()
    body = snapshot.to_json().encode()
    serialise_s = time.perf_counter() - started  # from scratch; the Publisher reuses fragments
    import gzip

    figures: dict[str, Any] = {
        "routes": len(snapshot.routes),
        "upstreams": len(snapshot.upstreams),
        "endpoints": sum(len(u.endpoints) for u in snapshot.upstreams),
        "build_models_s": build_s,
        "compile_median_s": statistics.median(compile_times),
        "compile_max_s": max(compile_times),
        "snapshot_json_bytes": len(body),
        "snapshot_json_gzip_bytes": len(gzip.compress(body, 6, mtime=0)),
        "serialise_full_s": serialise_s,
    }
    figures.update(stages(objects, args.routes))
    with tempfile.TemporaryDirectory(prefix="kanal-scale-") as tmp:
        figures.update(asyncio.run(
            propagation(objects, args.routes, args.changes, Path(tmp), args.timeout)))

    width = max(len(key) for key in figures)
    for key, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    print(f"targets: compile < 1 s: {'met' if figures['compile_median_s'] < 1 else 'MISSED'}; "
          f"propagation p99 <= 250 ms: {'met' if figures['propagation_p99_ms'] <= 250 else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
