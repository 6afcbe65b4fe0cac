"""How `kanal run --workers 2` scales over `--workers 1` on the same machine.

    python bench/workers.py [--rounds 3] [--duration 10] [--kanal-cmd "python -m kanal"]

Reported apart from bench/run.py's table, which pins one proxy worker to one CPU: here
the dataplane may use every CPU, and so do the backend (nginx, one process per CPU)
and wrk (one thread per CPU). Both dataplanes run side by side and are measured in
interleaved rounds (100 B answers, 128 connections); the figure is the ratio of their
median requests per second. On a machine with as many CPUs as workers, the load
generator and the backend compete with the workers, so the ratio there is a floor of
what the workers give on a machine where the load comes from elsewhere. It also prints
what that floor hides: requests per CPU second of the dataplane with one worker and
with two (whether a second worker costs anything per request), how the kernel spread
the work over the workers, and from both a projection for a core per worker, marked as
such. A tool for people, never a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (bench/run.py: processes, wrk, readiness)


def worker_cpu(supervisor: int) -> dict[int, float]:
    """CPU seconds of each worker of a `--workers N` supervisor (its children, with
    their own descendants); the supervisor itself when it serves alone."""
    try:
        children = [int(pid) for pid in Path(
            f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]
    except OSError:
        children = []
    return {pid: bench.tree_cpu_seconds(pid) for pid in children or [supervisor]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kanal-cmd", default=f"{sys.executable} -m kanal")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=128)
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args()
    bench.ensure_tools(args.no_install)
    nproc = os.cpu_count() or 1
    procs = bench.Procs()
    tmp = Path(tempfile.mkdtemp(prefix="kanal-workers-"))
    try:
        nginx = bench.which("nginx") or "nginx"
        bport = bench.free_port()
        conf = bench.backend_conf(tmp, bport)
        text = conf.read_text().replace("master_process off;", "").replace(
            "worker_processes 1;", f"worker_processes {nproc};")
        if os.geteuid() == 0:  # workers of a root master would drop to `nobody`
            text = "user root;\n" + text
        conf.write_text(text)
        backend = bench.Target("backend", "backend", bport, is_proxy=False,
                               logfile=tmp / "backend.log")
        backend.proc = procs.start("backend", [nginx, "-p", str(tmp / "backend"), "-e",
                                               str(tmp / "backend" / "error.log"), "-c",
                                               str(conf)], backend.logfile)
        bench.wait_ready(backend, 30)
        targets = []
        for workers in (1, 2):
            port, admin = bench.free_port(), bench.free_port()
            t = bench.Target(f"w{workers}", f"Kanal --workers {workers}", port, admin=admin,
                             logfile=tmp / f"kanal-{workers}.log")
            cmd = bench.kanal_command(args.kanal_cmd, bench.kanal_manifests(tmp, bport), port,
                                      admin, bport, workers)
            t.proc = procs.start(t.name, cmd, t.logfile)
            targets.append(t)
        for t in targets:
            bench.wait_ready(t, 30)
        rps: dict[str, list[float]] = {t.name: [] for t in targets}
        per_cpu: dict[str, list[float]] = {t.name: [] for t in targets}
        busiest: dict[str, list[float]] = {t.name: [] for t in targets}
        wrk = bench.which("wrk") or "wrk"
        for rnd in range(args.rounds):
            for t in targets[rnd % 2:] + targets[:rnd % 2]:
                assert t.proc is not None
                before = worker_cpu(t.proc.pid)
                out = procs.run("wrk", [wrk, f"-t{nproc}", f"-c{args.connections}",
                                        f"-d{args.duration}s", "--timeout", "5s",
                                        f"http://127.0.0.1:{t.port}/"], timeout=args.duration + 30)
                after = worker_cpu(t.proc.pid)
                value = next(float(line.split()[1]) for line in out.splitlines()
                             if line.startswith("Requests/sec:"))
                used = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
                total = sum(used.values())
                rps[t.name].append(value)
                per_cpu[t.name].append(value * args.duration / total if total else 0.0)
                busiest[t.name].append(max(used.values()) / total if total else 1.0)
                shares = " / ".join(f"{100 * u / total:.0f}%" for u in sorted(used.values())
                                    ) if total else "-"
                bench.log(f"round {rnd + 1}/{args.rounds} {t.label}: {value:,.0f} rps, "
                          f"{total / args.duration:.2f} CPUs busy (shares {shares})")
        one, two = statistics.median(rps["w1"]), statistics.median(rps["w2"])
        eff1, eff2 = statistics.median(per_cpu["w1"]), statistics.median(per_cpu["w2"])
        top = statistics.median(busiest["w2"])
        print(f"\nmachine: nproc {nproc}, {bench.cpu_model()}; wrk -t{nproc} "
              f"-c{args.connections} -d{args.duration}s, backend nginx {nproc} workers, "
              f"nothing pinned; median of {args.rounds} interleaved rounds")
        print(f"| Kanal --workers 1 | {one:,.0f} rps | {eff1:,.0f} requests per CPU second |")
        print(f"| Kanal --workers 2 | {two:,.0f} rps | {eff2:,.0f} requests per CPU second |")
        print(f"workers 2 / workers 1: {two / one:.2f} (measured)")
        # With a core each and the load coming from elsewhere, the busiest worker
        # saturates first: the two serve 1/top of its share, at their own efficiency.
        # (A per-request cost below one worker's alone is noise or cache luck: not counted.)
        print(f"per CPU second, workers 2 / workers 1: {eff2 / eff1:.2f}; the busiest worker "
              f"did {100 * top:.0f}% of the work; with a core per worker: "
              f"{min(eff2 / eff1, 1.0) / top:.2f} (projected, not measured)")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
