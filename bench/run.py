#!/usr/bin/env python3
"""Side-by-side proxy benchmark: nginx, HAProxy and Kanal in front of one nginx backend.

Method (see bench/README.md):

* one backend: nginx, one process, 100 B body on ``/`` and 16 KiB on ``/16k``,
  pinned to the load CPU (1 by default), shared with wrk;
* each proxy runs one worker pinned to the proxy CPU (0 by default);
* wrk, one thread, pinned to the load CPU: ``-c64`` for throughput, ``-c1 --latency``
  for latency;
* interleaved rounds: every round measures every target in turn; the table shows the
  median over rounds, the raw rounds are printed below it;
* proxy CPU per request: utime+stime of the proxy process tree (from /proc) around each
  throughput run, divided by the requests wrk completed.

Standard library only. Every process started here is in a process group of its own and
is ended by PID (its group) on exit, error or Ctrl-C. Never used by the test suite:
speed figures are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BODY_SMALL = 100
BODY_LARGE = 16 * 1024
PATH_SMALL = "/"
PATH_LARGE = "/16k"
ALL_TARGETS = ("backend", "nginx", "haproxy", "kanal")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# wrk script: print machine-readable results (latency in microseconds) in done().
WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "KANAL_BENCH requests=%d duration_us=%d bytes=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d " ..
    "p50_us=%d p90_us=%d p99_us=%d mean_us=%.1f max_us=%d\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


class BenchError(RuntimeError):
    """A failure that ends the run with a clear message."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


class Procs:
    """Every process this script starts, each the leader of its own process group."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], logfile: Path | None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(logfile if logfile else os.devnull, "wb") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.procs.append((name, p))
        return p

    def run(self, name: str, cmd: list[str], timeout: float) -> str:
        """Run a short-lived tool (wrk) to completion; its output as text."""
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p))
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            self.stop(p)
            raise BenchError(f"{name} did not finish within {timeout:.0f} s: {shlex.join(cmd)}") from expired
        finally:
            if p.poll() is not None:
                self.procs = [(n, q) for n, q in self.procs if q is not p]
        if p.returncode != 0:
            raise BenchError(f"{name} exited {p.returncode}: {shlex.join(cmd)}\n"
                             f"{out.decode(errors='replace')}")
        return out.decode(errors="replace")

    @staticmethod
    def stop(p: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while members of its group linger (workers): SIGKILL them.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log(f"process {p.pid} did not exit after SIGKILL")

    def stop_all(self) -> None:
        while self.procs:
            _, p = self.procs.pop()
            self.stop(p)


def _on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- /proc CPU


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime+stime, cutime+cstime) in clock ticks, or None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = data[data.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): ppid=4, utime=14, stime=15, cutime=16, cstime=17.
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used by `root` and all its descendants, alive or reaped."""
    stats: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = _stat(int(entry))
            if s is not None:
                stats[int(entry)] = s
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            _, own, reaped = stats[pid]
            total += own + reaped
        todo.extend(children.get(pid, ()))
    return total / CLK_TCK


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "bench.local"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def log_tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(lines[-n:]) or "(empty log)"


def ensure_tools(no_install: bool) -> None:
    missing = [t for t in ("nginx", "haproxy", "wrk") if not which(t)]
    if not which("taskset"):
        raise BenchError("taskset (util-linux) is required")
    if not missing:
        return
    if no_install:
        raise BenchError(f"missing {', '.join(missing)} (and --no-install given)")
    pkgs = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk"}
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        raise BenchError(f"missing {', '.join(missing)}; not root and no sudo: "
                         f"apt-get install -y {' '.join(pkgs[m] for m in missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing {', '.join(missing)} with apt-get")
    subprocess.run(prefix + ["apt-get", "update"], check=True, env=env, timeout=600)
    subprocess.run(prefix + ["apt-get", "install", "-y", "--no-install-recommends",
                             *(pkgs[m] for m in missing)], check=True, env=env, timeout=900)
    still = [t for t in missing if not which(t)]
    if still:
        raise BenchError(f"still missing after apt-get: {', '.join(still)}")


def which(tool: str) -> str | None:
    # Debian puts nginx and haproxy in /usr/sbin, which a non-root PATH may lack.
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/local/sbin")


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def cpu_busy(cpus: list[int], seconds: float = 1.0) -> dict[int, float]:
    """Percent busy of each CPU over `seconds`, from /proc/stat (other load = noise)."""
    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *vals = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                v = [int(x) for x in vals]
                idle = v[3] + (v[4] if len(v) > 4 else 0)
                out[int(name[3:])] = (sum(v[:8]), idle)
        return out
    a = sample()
    time.sleep(seconds)
    b = sample()
    busy = {}
    for c in cpus:
        if c in a and c in b:
            total, idle = b[c][0] - a[c][0], b[c][1] - a[c][1]
            busy[c] = 100.0 * (total - idle) / total if total else 0.0
    return busy


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# --------------------------------------------------------------------------- configs


def nginx_common(tmp: Path, name: str) -> str:
    d = tmp / name
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
"""


def nginx_temp_paths(tmp: Path, name: str) -> str:
    d = tmp / name
    return f"""
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
"""


# --filters: the same work asked of every proxy. `headers` sets a request header from the
# client address and a response header; `compression` gzips text answers from 1 KiB
# (the backend then serves text/plain and wrk sends Accept-Encoding: gzip).
FILTERS = ("none", "headers", "compression")
NGINX_FILTERS = {
    "none": "",
    "headers": "proxy_set_header X-Client $remote_addr;\n            "
               "add_header X-Served-By bench always;",
    "compression": "gzip on; gzip_proxied any; gzip_types text/plain; "
                   "gzip_min_length 1024; gzip_comp_level 6;",
}
HAPROXY_FILTERS = {
    "none": "",
    "headers": "    http-request set-header X-Client %[src]\n"
               "    http-response set-header X-Served-By bench\n",
    "compression": "    compression algo gzip\n    compression type text/plain\n",
}
KANAL_FILTERS = {
    "none": "",
    "headers": """      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: X-Client, value: "${client_address}"}]}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: X-Served-By, value: bench}]}
""",
    "compression": """      filters:
        - type: Compression
          compression: {algorithms: [gzip], contentTypes: [text/plain], minSize: 1Ki}
""",
}


def backend_conf(tmp: Path, port: int, filters: str = "none") -> Path:
    www = tmp / "backend" / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "16k").write_bytes(body_bytes(BODY_LARGE))
    small = body_bytes(BODY_SMALL).decode()
    conf = nginx_common(tmp, "backend") + f"""
http {{
    access_log off;
    {nginx_temp_paths(tmp, "backend")}
    default_type {"text/plain" if filters == "compression" else "application/octet-stream"};
    sendfile on;
    tcp_nopush off;
    tcp_nodelay on;
    etag off;
    server_tokens off;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = / {{ return 200 "{small}"; }}
        location = /16k {{ root {www}; }}
        location / {{ return 404; }}
    }}
}}
"""
    path = tmp / "backend" / "nginx.conf"
    path.write_text(conf)
    return path


def nginx_proxy_conf(tmp: Path, port: int, backend: int, filters: str = "none",
                     cache: bool = False, access_log: bool = False) -> Path:
    # --cache: nginx's proxy_cache (files, page cache warm) holds both bodies for an hour.
    cache_zone = (f"proxy_cache_path {tmp / 'nginx' / 'cache'} levels=1:2 keys_zone=bench:10m "
                  "max_size=64m inactive=1h use_temp_path=off;") if cache else ""
    cache_use = "proxy_cache bench; proxy_cache_valid 200 1h;" if cache else ""
    log_line = f"access_log {tmp / 'nginx' / 'access.log'};" if access_log else "access_log off;"
    conf = nginx_common(tmp, "nginx") + f"""
http {{
    {log_line}
    {cache_zone}
    {nginx_temp_paths(tmp, "nginx")}
    server_tokens off;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {NGINX_FILTERS[filters]}
            {cache_use}
        }}
    }}
}}
"""
    path = tmp / "nginx" / "nginx.conf"
    path.write_text(conf)
    return path


def haproxy_conf(tmp: Path, port: int, backend: int, filters: str = "none") -> Path:
    d = tmp / "haproxy"
    d.mkdir(parents=True, exist_ok=True)
    conf = f"""
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    option http-keep-alive
    http-reuse always

frontend bench
    bind 127.0.0.1:{port}
    default_backend backend

backend backend
{HAPROXY_FILTERS[filters]}    server b1 127.0.0.1:{backend}
"""
    path = d / "haproxy.cfg"
    path.write_text(conf)
    return path


def kanal_manifests(tmp: Path, backend: int, filters: str = "none",
                    cache: bool = False) -> Path:
    d = tmp / "kanal" / "manifests"
    d.mkdir(parents=True, exist_ok=True)
    (d / "bench.yaml").write_text(f"""\
apiVersion: kanal.dev/v1alpha1
kind: Upstream
metadata:
  name: bench-backend
spec:
  protocol: HTTP
  endpoints:
    - {{address: 127.0.0.1, port: {backend}, weight: 1}}
---
apiVersion: kanal.dev/v1alpha1
kind: Route
metadata:
  name: bench
spec:
  rules:
    - matches:
        - path: {{type: PathPrefix, value: /}}
      backends:
        - {{upstream: bench-backend, weight: 1}}
""" + KANAL_FILTERS[filters] + ("      cache: {defaultTTL: 1h}\n" if cache else ""))
    return d


def body_bytes(n: int) -> bytes:
    # Printable and free of characters nginx's `return` string would interpret.
    pattern = b"kanal-bench-0123456789abcdefghijklmnopqrstuvwxyz-"
    return (pattern * (n // len(pattern) + 1))[:n]


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    label: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    logfile: Path | None = None
    admin: int | None = None
    is_proxy: bool = True
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def log(self) -> str:
        return log_tail(self.logfile) if self.logfile else "(no log)"


def wait_ready(t: Target, deadline_s: float) -> None:
    """Poll the port (bounded), then check GET / and /16k answer 200 with the right body."""
    deadline = time.monotonic() + deadline_s
    assert t.proc is not None
    while not port_open(t.port):
        if t.proc.poll() is not None:
            raise BenchError(f"{t.name} exited with {t.proc.returncode} before listening on "
                             f"{t.port}; log:\n{t.log()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{t.name} not listening on 127.0.0.1:{t.port} after "
                             f"{deadline_s:.0f} s; log:\n{t.log()}")
        time.sleep(0.05)
    if t.admin is not None:
        # Best effort: a dataplane is ready once its configuration is applied. A stand-in
        # without an admin port is given 2 s to open one, then checked by GET alone.
        admin_deadline = time.monotonic() + 2.0
        while time.monotonic() < min(deadline, admin_deadline):
            if port_open(t.admin):
                admin_deadline = deadline
                try:
                    if http_get(t.admin, "/ready")[0] == 200:
                        break
                except (OSError, http.client.HTTPException):
                    pass
            time.sleep(0.05)
    expected = {PATH_SMALL: body_bytes(BODY_SMALL), PATH_LARGE: body_bytes(BODY_LARGE)}
    for path, body in expected.items():
        last: str = ""
        while True:
            try:
                status, got = http_get(t.port, path)
            except (OSError, http.client.HTTPException) as e:
                status, got, last = 0, b"", f"{type(e).__name__}: {e}"
            if status == 200:
                if got != body:
                    raise BenchError(
                        f"{t.name} answered GET {path} with 200 but a wrong body: "
                        f"{len(got)} bytes, expected {len(body)} ({got[:80]!r})")
                break
            if status:
                last = f"status {status}, body {got[:200]!r}"
            if t.proc.poll() is not None:
                raise BenchError(f"{t.name} exited with {t.proc.returncode}; last answer to GET "
                                 f"{path}: {last}; log:\n{t.log()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{t.name} answers GET {path} wrongly ({last}) after "
                                 f"{deadline_s:.0f} s; log:\n{t.log()}")
            time.sleep(0.1)
    log(f"{t.name} ready on 127.0.0.1:{t.port} (pid {t.proc.pid})")


def kanal_command(spec: str, manifests: Path, port: int, admin: int, backend: int,
                  workers: int) -> list[str]:
    """`--kanal-cmd` is a command prefix (`kanal` -> `kanal run DIR --listen ...`), or a
    full command line with {dir} {listen} {port} {admin} {backend} {workers} placeholders
    for a stand-in."""
    values = {"dir": str(manifests), "listen": f"127.0.0.1:{port}", "port": str(port),
              "admin": f"127.0.0.1:{admin}", "backend": f"127.0.0.1:{backend}",
              "workers": str(workers)}
    if any("{" + k + "}" in spec for k in values):
        return [part.format(**values) for part in shlex.split(spec)]
    return [*shlex.split(spec), "run", str(manifests), "--listen", values["listen"],
            "--admin", values["admin"], "--workers", str(workers)]


OTLP_SINK = """
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""
"""--observe: an OTLP/HTTP receiver that keeps nothing (the spans' cost is Kanal's side)."""


# --------------------------------------------------------------------------- wrk


def parse_wrk(out: str) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith("KANAL_BENCH "):
            res: dict[str, Any] = {}
            for kv in line.split()[1:]:
                k, v = kv.split("=", 1)
                res[k] = float(v) if "." in v else int(v)
            res["errors"] = sum(res[k] for k in res if k.startswith("err_"))
            res["rps"] = res["requests"] / (res["duration_us"] / 1e6) if res["duration_us"] else 0.0
            return res
    raise BenchError(f"could not parse wrk output:\n{out}")


class Runner:
    def __init__(self, args: argparse.Namespace, procs: Procs, lua: Path) -> None:
        self.args, self.procs, self.lua = args, procs, lua

    def wrk(self, port: int, path: str, conns: int, duration: float,
            latency: bool) -> dict[str, Any]:
        duration = max(1, round(duration))  # wrk takes whole seconds
        cmd = ["taskset", "-c", str(self.args.load_cpu), which("wrk") or "wrk", "-t1",
               f"-c{conns}", f"-d{duration}s", "--timeout", "5s", "-s", str(self.lua)]
        if latency:
            cmd.append("--latency")
        if self.args.filters == "compression":
            cmd += ["-H", "Accept-Encoding: gzip"]
        cmd.append(f"http://127.0.0.1:{port}{path}")
        res = parse_wrk(self.procs.run("wrk", cmd, timeout=duration + 30))
        if res["errors"]:
            log(f"WARNING: wrk saw errors on :{port}{path}: " + ", ".join(
                f"{k[4:]}={res[k]}" for k in res if k.startswith("err_") and res[k]))
        return res

    def throughput(self, t: Target, path: str, duration: float) -> dict[str, Any]:
        pid = t.proc.pid if t.proc else None
        c0 = tree_cpu_seconds(pid) if pid else 0.0
        res = self.wrk(t.port, path, self.args.connections, duration, latency=False)
        c1 = tree_cpu_seconds(pid) if pid else 0.0
        res["cpu_s"] = c1 - c0
        res["cpu_us_per_req"] = (c1 - c0) / res["requests"] * 1e6 if res["requests"] else None
        return res


# --------------------------------------------------------------------------- report


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(t: Target) -> dict[str, Any]:
    def col(kind: str, key: str) -> list[Any]:
        return [r[kind][key] for r in t.rounds if kind in r]

    return {
        "rps_100": med(col("small", "rps")),
        "rps_16k": med(col("large", "rps")),
        "cpu_100": med(col("small", "cpu_us_per_req")) if t.is_proxy else None,
        "cpu_16k": med(col("large", "cpu_us_per_req")) if t.is_proxy else None,
        "p50": med(col("latency", "p50_us")),
        "p99": med(col("latency", "p99_us")),
        "errors": sum(col("small", "errors") + col("large", "errors") + col("latency", "errors")),
    }


def fmt_int(v: float | None) -> str:
    return "" if v is None else f"{v:,.0f}"


def fmt_us(v: float | None) -> str:
    return "" if v is None else f"{v:.1f} µs"


def fmt_lat(v: float | None) -> str:
    return "" if v is None else f"{v:,.0f} µs"


def added(p50: float | None, backend_p50: float | None) -> float | None:
    """Latency a proxy adds at c1: its p50 minus the backend's own (None unmeasured)."""
    return None if p50 is None or backend_p50 is None else p50 - backend_p50


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def report(targets: list[Target], meta: dict[str, Any]) -> str:
    lines = [
        f"Kanal side-by-side benchmark, {meta['date']}",
        f"machine: nproc {meta['nproc']}, {meta['cpu']}, {meta['kernel']}",
        (f"pinning: proxies on CPU {meta['proxy_cpu']}; backend and wrk (1 thread) on CPU "
         f"{meta['load_cpu']}; throughput wrk -t1 -c{meta['connections']} "
         f"-d{meta['duration']:g}s, latency wrk -t1 -c1 -d{meta['latency_duration']:g}s; "
         f"median of {meta['rounds']} interleaved round(s)"),
        "CPU busy before the run (other load): " + ", ".join(
            f"cpu{c} {v:.0f}%" for c, v in meta["cpu_busy_before_pct"].items()),
        f"command: {meta['command']}",
        "",
        ("| target | rps, 100 B body | rps, 16 KiB body | proxy CPU per request (100 B) "
         "| proxy CPU per request (16 KiB) | p50 at c1 | p99 at c1 |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    sums = {t.name: summarize(t) for t in targets}
    for t in targets:
        s = sums[t.name]
        flag = f" (! {s['errors']} wrk errors)" if s["errors"] else ""
        lines.append(f"| {t.label}{flag} | {fmt_int(s['rps_100'])} | {fmt_int(s['rps_16k'])} | "
                     f"{fmt_us(s['cpu_100'])} | {fmt_us(s['cpu_16k'])} | {fmt_lat(s['p50'])} | "
                     f"{fmt_lat(s['p99'])} |")
    lines.append("")
    backend_p50 = sums["backend"]["p50"] if "backend" in sums else None
    if "nginx" in sums:
        n = sums["nginx"]
        for name in ("kanal", "kanal-b", "haproxy"):
            if name in sums:
                s = sums[name]
                lines.append(
                    f"{name} / nginx: rps 100 B {ratio(s['rps_100'], n['rps_100'])}, "
                    f"rps 16 KiB {ratio(s['rps_16k'], n['rps_16k'])}, "
                    f"CPU per request 100 B {ratio(s['cpu_100'], n['cpu_100'])}, "
                    f"16 KiB {ratio(s['cpu_16k'], n['cpu_16k'])}, "
                    f"p50 at c1 {ratio(s['p50'], n['p50'])}, "
                    f"added p50 at c1 {ratio(added(s['p50'], backend_p50), added(n['p50'], backend_p50))}")
        if "kanal" not in sums:
            lines.append("kanal / nginx: n/a (kanal not measured in this run)")
    else:
        lines.append("kanal / nginx: n/a (nginx not measured in this run)")
    if "kanal" in sums and "kanal-b" in sums:
        a, b = sums["kanal"], sums["kanal-b"]
        lines.append(
            f"kanal-b / kanal: rps 100 B {ratio(b['rps_100'], a['rps_100'])}, "
            f"rps 16 KiB {ratio(b['rps_16k'], a['rps_16k'])}, "
            f"CPU per request 100 B {ratio(b['cpu_100'], a['cpu_100'])}, "
            f"16 KiB {ratio(b['cpu_16k'], a['cpu_16k'])}, p50 at c1 {ratio(b['p50'], a['p50'])}")
    lines += ["", "raw rounds (rps 100 B | rps 16 KiB | CPU µs/req 100 B | p50/p99 µs):"]
    for t in targets:
        per = []
        for r in t.rounds:
            cpu = r.get("small", {}).get("cpu_us_per_req")
            per.append(f"{r['small']['rps']:,.0f} | {r['large']['rps']:,.0f} | "
                       f"{'-' if cpu is None or not t.is_proxy else f'{cpu:.1f}'} | "
                       f"{r['latency']['p50_us']}/{r['latency']['p99_us']}")
        lines.append(f"  {t.name:8s} " + "  ;  ".join(per))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ALL_TARGETS),
                    help="comma-separated targets among backend,nginx,haproxy,kanal "
                         "(default: all)")
    ap.add_argument("--kanal-cmd", default="kanal",
                    help="command prefix for Kanal (default 'kanal': runs `kanal run DIR "
                         "--listen .. --admin .. --workers N`); with {dir} {listen} {port} "
                         "{admin} {backend} {workers} placeholders, the whole command line")
    ap.add_argument("--compare", metavar="KANAL_CMD",
                    help="a second Kanal command (same forms as --kanal-cmd) measured in the "
                         "same run as `kanal-b`, e.g. another checkout or a pure build")
    ap.add_argument("--kanal-workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="throughput run, whole seconds")
    ap.add_argument("--latency-duration", type=int, default=5, help="c1 run, whole seconds")
    ap.add_argument("--connections", type=int, default=64, help="throughput connections")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of load per target "
                    "before the first round (not measured)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: 1 round, 3 s throughput and 3 s latency runs")
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1, help="CPU for the backend and wrk")
    ap.add_argument("--ready-timeout", type=float, default=30.0,
                    help="seconds a target may take to start answering")
    ap.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get install missing nginx/haproxy/wrk")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    ap.add_argument("--filters", choices=FILTERS, default="none",
                    help="the same work for every proxy: none (default), headers (a request "
                         "header from the client address and a response header) or "
                         "compression (gzip of text answers from 1 KiB)")
    ap.add_argument("--observe", action="store_true",
                    help="logs on: nginx writes its access log (combined, to a file) and "
                         "Kanal gets --access-log FILE (JSON) and tracing sampled at 1%% "
                         "to an OTLP/HTTP sink started here (flags appended to both Kanal "
                         "commands)")
    ap.add_argument("--cache", action="store_true",
                    help="cache-hit scenario: nginx proxy_cache and Kanal's cache (a rule "
                         "with cache: {defaultTTL: 1h}) hold / and /16k, so every measured "
                         "request is a hit (HAProxy and the backend unchanged)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.latency_duration = 1, 3, 3
    args.targets = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in args.targets if x not in ALL_TARGETS]
    if bad or not args.targets:
        ap.error(f"--only: unknown target(s) {bad}; choose among {','.join(ALL_TARGETS)}")
    if args.rounds < 1 or args.duration <= 0 or args.latency_duration <= 0:
        ap.error("--rounds, --duration and --latency-duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nproc = os.cpu_count() or 1
    allowed = os.sched_getaffinity(0)
    for cpu in (args.proxy_cpu, args.load_cpu):
        if cpu not in allowed:
            raise BenchError(f"CPU {cpu} is not available (allowed: {sorted(allowed)}); "
                             "use --proxy-cpu/--load-cpu")
    if args.proxy_cpu == args.load_cpu:
        log("WARNING: proxies share a CPU with the backend and wrk; figures are not comparable "
            "with runs that pin them apart")
    ensure_tools(args.no_install)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="kanal-bench-"))
    try:
        return _run(args, procs, tmp, nproc)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        procs.stop_all()
        if args.keep_tmp:
            log(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args: argparse.Namespace, procs: Procs, tmp: Path, nproc: int) -> int:
    lua = tmp / "report.lua"
    lua.write_text(WRK_LUA)
    nginx, haproxy = which("nginx") or "nginx", which("haproxy") or "haproxy"
    pin_load = ["taskset", "-c", str(args.load_cpu)]
    pin_proxy = ["taskset", "-c", str(args.proxy_cpu)]

    # The backend runs whatever --only says: every proxy needs it.
    bport = free_port()
    backend = Target("backend", "backend alone (no proxy), nginx 1 worker", bport, is_proxy=False,
                     logfile=tmp / "backend.log")
    bconf = backend_conf(tmp, bport, args.filters)
    backend.proc = procs.start("backend", [*pin_load, nginx, "-p", str(tmp / "backend"),
                                           "-e", str(tmp / "backend" / "error.log"),
                                           "-c", str(bconf)], backend.logfile)
    wait_ready(backend, args.ready_timeout)

    observe: list[str] = []
    if args.observe:
        # Where Kanal's sampled spans go: a sink that takes every OTLP/HTTP POST.
        sink_port = free_port()
        procs.start("otlp-sink", [*pin_load, sys.executable, "-c", OTLP_SINK, str(sink_port)],
                    tmp / "otlp-sink.log")
        observe = ["--access-log", str(tmp / "kanal-access.log"),
                   "--tracing-endpoint", f"http://127.0.0.1:{sink_port}/v1/traces",
                   "--tracing-sample-ratio", "0.01"]

    targets: list[Target] = []
    if "backend" in args.targets:
        targets.append(backend)
    if "nginx" in args.targets:
        port = free_port()
        t = Target("nginx", "nginx `proxy_pass`, upstream keepalive 64"
                   + (", proxy_cache (hits)" if args.cache else "")
                   + (", access log on" if args.observe else ""), port,
                   logfile=tmp / "nginx.log")
        conf = nginx_proxy_conf(tmp, port, bport, args.filters, cache=args.cache,
                                access_log=args.observe)
        t.proc = procs.start("nginx", [*pin_proxy, nginx, "-p", str(tmp / "nginx"),
                                       "-e", str(tmp / "nginx" / "error.log"),
                                       "-c", str(conf)], t.logfile)
        targets.append(t)
    if "haproxy" in args.targets:
        port = free_port()
        t = Target("haproxy", "HAProxy nbthread 1, http-reuse always", port,
                   logfile=tmp / "haproxy.log")
        conf = haproxy_conf(tmp, port, bport, args.filters)
        t.proc = procs.start("haproxy", [*pin_proxy, haproxy, "-db", "-f", str(conf)], t.logfile)
        targets.append(t)
    if "kanal" in args.targets:
        port, admin = free_port(), free_port()
        t = Target("kanal", f"Kanal, --workers {args.kanal_workers}"
                   + (", cache (hits)" if args.cache else "")
                   + (", access log (JSON, file), tracing 1%" if args.observe else ""),
                   port, admin=admin,
                   logfile=tmp / "kanal.log")
        cmd = kanal_command(args.kanal_cmd,
                            kanal_manifests(tmp, bport, args.filters, cache=args.cache), port,
                            admin, bport, args.kanal_workers) + observe
        log(f"kanal command: {shlex.join(cmd)}")
        t.proc = procs.start("kanal", [*pin_proxy, *cmd], t.logfile)
        targets.append(t)
    if args.compare:
        # A second Kanal (another build, branch or stand-in) measured in the same run,
        # interleaved with the first: what a lever gives, before and after.
        port, admin = free_port(), free_port()
        t = Target("kanal-b", f"Kanal (compare: {args.compare}), --workers {args.kanal_workers}",
                   port, admin=admin, logfile=tmp / "kanal-b.log")
        cmd = kanal_command(args.compare,
                            kanal_manifests(tmp, bport, args.filters, cache=args.cache), port,
                            admin, bport,
                            args.kanal_workers) + observe
        log(f"compare command: {shlex.join(cmd)}")
        t.proc = procs.start("kanal-b", [*pin_proxy, *cmd], t.logfile)
        targets.append(t)
    for t in targets:
        if t is not backend:
            wait_ready(t, args.ready_timeout)

    busy = cpu_busy(sorted({args.proxy_cpu, args.load_cpu}))
    if any(v > 10 for v in busy.values()):
        log("WARNING: CPUs already busy before the run (" + ", ".join(
            f"cpu{c} {v:.0f}%" for c, v in busy.items()) + "): another load will add noise")

    runner = Runner(args, procs, lua)
    if args.warmup > 0:
        for t in targets:
            runner.wrk(t.port, PATH_SMALL, args.connections, args.warmup, latency=False)

    for rnd in range(args.rounds):
        # Rotate the starting target each round so no target always runs first.
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        results: dict[str, dict[str, Any]] = {t.name: {} for t in targets}
        if rnd:  # other load that started since: a noise indicator per round
            b = cpu_busy(sorted({args.proxy_cpu, args.load_cpu}), 0.5)
            if any(v > 10 for v in b.values()):
                log(f"WARNING: before round {rnd + 1}, CPUs busy without us: " + ", ".join(
                    f"cpu{c} {v:.0f}%" for c, v in b.items()))
        for kind, path in (("small", PATH_SMALL), ("large", PATH_LARGE)):
            for t in order:
                r = runner.throughput(t, path, args.duration)
                results[t.name][kind] = r
                log(f"round {rnd + 1}/{args.rounds} {t.name:8s} {kind:5s} {r['rps']:>10,.0f} rps"
                    + (f"  cpu {r['cpu_us_per_req']:.1f} µs/req" if t.is_proxy
                       and r["cpu_us_per_req"] is not None else ""))
        for t in order:
            r = runner.wrk(t.port, PATH_SMALL, 1, args.latency_duration, latency=True)
            results[t.name]["latency"] = r
            log(f"round {rnd + 1}/{args.rounds} {t.name:8s} c1    p50 {r['p50_us']} µs "
                f"p99 {r['p99_us']} µs")
        for t in targets:
            if t.proc is not None and t.proc.poll() is not None:
                raise BenchError(f"{t.name} exited with {t.proc.returncode} during the run; "
                                 f"log:\n{t.log()}")
            t.rounds.append(results[t.name])

    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": nproc,
        "cpu": cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "proxy_cpu": args.proxy_cpu,
        "load_cpu": args.load_cpu,
        "connections": args.connections,
        "duration": args.duration,
        "latency_duration": args.latency_duration,
        "rounds": args.rounds,
        "cpu_busy_before_pct": {str(c): round(v, 1) for c, v in busy.items()},
        "command": shlex.join([sys.executable, *sys.argv]),
        "versions": {
            "nginx": tool_version([nginx, "-v"]),
            "haproxy": tool_version([haproxy, "-v"]),
            "wrk": tool_version([which("wrk") or "wrk", "-v"]),
        },
    }
    text = report(targets, meta)
    print(text)
    print(f"\nversions: {meta['versions']['nginx']}; {meta['versions']['haproxy']}; "
          f"{meta['versions']['wrk']}")
    if args.json:
        data = {"meta": meta, "targets": {
            t.name: {"label": t.label, "summary": summarize(t), "rounds": t.rounds}
            for t in targets}}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench: interrupted; every started process was stopped", file=sys.stderr)
        sys.exit(130)
