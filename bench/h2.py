"""HTTP/2 clients through Kanal and through nginx (`listen ... http2`), in the same run.

    python bench/h2.py                       # 3 interleaved rounds of 5 s
    python bench/h2.py --duration 2 --rounds 1 --kanal-cmd "python -m kanal"

h2load (Debian's nghttp2-client) speaks h2c with prior knowledge to each proxy, which
relays to the same single-process nginx backend over HTTP/1.1 (100 B answers). Pinning,
the backend and the CPU accounting are `bench/run.py`'s: each proxy has CPU 0, the
backend and h2load share CPU 1, and proxy CPU per request is read from /proc. Quote
the ratios (Kanal / nginx), never the absolute figures. A tool for people, not a test.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # bench/run.py, a script beside this one
    backend_conf,
    free_port,
    kanal_manifests,
    nginx_common,
    nginx_temp_paths,
    port_open,
    tree_cpu_seconds,
)


def nginx_h2_conf(tmp: Path, port: int, backend: int) -> Path:
    conf = nginx_common(tmp, "nginx") + f"""
http {{
    access_log off;
    {nginx_temp_paths(tmp, "nginx")}
    server_tokens off;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    http2_max_concurrent_streams 100;
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    path = tmp / "nginx" / "nginx.conf"
    path.write_text(conf)
    return path


def start(cmd: list[str], cpu: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(["taskset", "-c", str(cpu), *cmd], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_port(port: int, process: subprocess.Popen[bytes], deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise SystemExit(f"a process exited early: {process.args}")
        if port_open(port):
            return
        time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def h2load(port: int, seconds: float, clients: int, streams: int) -> tuple[float, int, int]:
    """(requests per second, succeeded, failed)."""
    out = subprocess.run(
        ["taskset", "-c", "1", "h2load", "-D", f"{seconds:g}", "-c", str(clients),
         "-m", str(streams), f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed",
                     out)
    assert done is not None, out
    return rps, int(done.group(1)), int(done.group(2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kanal-cmd", default="kanal")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams per client")
    args = parser.parse_args()
    for tool in ("nginx", "h2load", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (apt-get install -y nginx nghttp2-client)")
    tmp = Path(tempfile.mkdtemp(prefix="kanal-h2-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        backend = free_port()
        procs.append(start(["nginx", "-c", str(backend_conf(tmp, backend))], 1, tmp / "b.log"))
        wait_port(backend, procs[-1])
        targets: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
        port = free_port()
        procs.append(start(["nginx", "-c", str(nginx_h2_conf(tmp, port, backend))], 0,
                           tmp / "n.log"))
        wait_port(port, procs[-1])
        targets["nginx"] = (port, procs[-1])
        port, admin = free_port(), free_port()
        procs.append(start([*shlex.split(args.kanal_cmd), "run", str(kanal_manifests(tmp, backend)),
                            "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                            "--workers", "1"], 0, tmp / "k.log"))
        wait_port(port, procs[-1])
        targets["kanal"] = (port, procs[-1])
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, (port, process) in targets.items():
                h2load(port, 1.0, args.clients, args.streams)  # warm-up, not measured
                before = tree_cpu_seconds(process.pid)
                rps, ok, failed = h2load(port, args.duration, args.clients, args.streams)
                cpu = tree_cpu_seconds(process.pid) - before
                if failed:
                    print(f"{name}: {failed} requests failed", file=sys.stderr)
                results[name].append((rps, cpu / max(ok, 1) * 1e6))
        print(f"h2load -c {args.clients} -m {args.streams}, {args.rounds} x {args.duration:g}s")
        print(f"{'target':8} {'req/s':>10} {'CPU us/req':>11}")
        medians = {}
        for name, rows in results.items():
            rps = sorted(r for r, _ in rows)[len(rows) // 2]
            cpu = sorted(c for _, c in rows)[len(rows) // 2]
            medians[name] = (rps, cpu)
            print(f"{name:8} {rps:10.0f} {cpu:11.1f}")
        (k_rps, k_cpu), (n_rps, n_cpu) = medians["kanal"], medians["nginx"]
        print(f"kanal / nginx: req/s {k_rps / n_rps:.2f}, CPU per request {k_cpu / n_cpu:.2f}")
    finally:
        for process in procs:
            process.terminate()
        for process in procs:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
