"""The access log writer: records in on the event loop, lines out on a thread.

`put` is what a listener pays per request: a length check and a deque append (both
atomic under the GIL, so no lock). A writer thread wakes every `FLUSH_INTERVAL`
seconds, formats what is queued (`kanal.dataplane.logformat`) and writes it in one
go. A slow or stuck sink (a full disk, a pipe nobody reads) never stalls a request:
once `capacity` records wait, new ones are dropped and counted
(`kanal_access_log_dropped_total`).

Each listener may write to a place of its own (`--access-log reverse=PATH`):
`destinations` says which listener writes where, `open_access_logs` opens one writer
per place, so listeners naming one file share its writer (and its order of lines).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, TextIO

from kanal.dataplane import logformat
from kanal.dataplane.logformat import Record

log = logging.getLogger("kanal.accesslog")

if TYPE_CHECKING:
    from kanal.dataplane.metrics import RequestMetrics

LISTENERS = ("reverse", "inbound", "forward")
"""The listeners that write access log lines: reverse (`--listen`, `--tls-listen`),
inbound (a sidecar's `--inbound-listen`), forward (`--forward-listen`)."""
OFF = "off"
STDOUT = "stdout"

CAPACITY = 16384
"""Records waiting for the writer at most; more are dropped."""
FLUSH_INTERVAL = 0.05


class AccessLog:
    """One process's access log: `--access-log` (stdout or a file), format and fields."""

    def __init__(
        self,
        target: str,
        *,
        form: str = "json",
        fields: Sequence[str] = logformat.FIELDS,
        capacity: int = CAPACITY,
        stream: TextIO | None = None,
    ) -> None:
        self.formatter = logformat.Formatter(logformat.select(fields), form)
        self.target = target
        self.capacity = capacity
        self.queue: deque[Record] = deque()
        self.dropped = 0
        self.written = 0
        self.metrics: RequestMetrics | None = None
        self._owned = stream is None and target != "stdout"
        # Opened here, so a bad path is refused at start, not lost in the thread.
        self._stream: TextIO = stream if stream is not None else (
            sys.stdout if target == "stdout" else open(target, "a", encoding="utf-8"))
        self._stop = threading.Event()
        self._reopen = False
        self._thread = threading.Thread(target=self._run, name="kanal-access-log", daemon=True)
        self._thread.start()

    def put(self, record: Record) -> None:
        """Queue one record; drop (and count) it when the writer is this far behind."""
        queue = self.queue
        if len(queue) < self.capacity:
            queue.append(record)
            return
        self.dropped += 1
        metrics = self.metrics
        if metrics is not None:
            metrics.access_log_dropped += 1

    def reopen(self) -> None:
        """Open the file again by its name before the next write (SIGHUP, after a log
        rotation renamed it); standard output is kept."""
        self._reopen = True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to `timeout` seconds), then stop the thread."""
        self._stop.set()
        self._thread.join(timeout)
        if self._owned:
            with contextlib.suppress(OSError):
                self._stream.close()

    def _run(self) -> None:
        stop = self._stop
        while True:
            stopping = stop.wait(FLUSH_INTERVAL)
            self._drain()
            if stopping:
                return

    def _drain(self) -> None:
        if self._reopen:
            self._reopen = False
            if self._owned:
                try:
                    fresh = open(self.target, "a", encoding="utf-8")
                except OSError as exc:
                    log.error("access log %s cannot be opened again: %s", self.target, exc)
                else:
                    with contextlib.suppress(OSError):
                        self._stream.close()
                    self._stream = fresh
        queue = self.queue
        if not queue:
            return
        line = self.formatter.line
        lines = []
        while queue:
            record = queue.popleft()
            try:
                lines.append(line(record))
            except (TypeError, ValueError):  # a bug, not a reason to stop logging
                self.dropped += 1
                log.exception("access log record %r could not be written", record)
        lines.append("")
        try:
            self._stream.write("\n".join(lines))
            self._stream.flush()
        except (OSError, ValueError):
            # The sink is gone (closed, disk full): these lines are lost, and counted.
            # (From this thread; the loop counts only while the queue is full, which a
            # failing sink, emptied at once, does not cause: the two rarely meet.)
            lost = len(lines) - 1
            self.dropped += lost
            if self.metrics is not None:
                self.metrics.access_log_dropped += lost
            return
        self.written += len(lines) - 1


Destination = tuple[str | None, str]
"""One `--access-log`: (listener, stdout | path | off), listener None for every one."""


def destinations(chosen: Iterable[Destination],
                 default_listeners: Iterable[str] = LISTENERS) -> dict[str, str]:
    """Where each listener writes (listeners that write nothing are left out). Pure.

    The last destination without a listener serves `default_listeners`; one with a
    listener (the last given for it) overrides that for its listener, `off` included.
    """
    chosen = list(chosen)
    default = OFF
    for listener, target in chosen:
        if listener is None:
            default = target
    plan = {listener: default for listener in default_listeners}
    for listener, target in chosen:
        if listener is not None:
            if listener not in LISTENERS:
                raise ValueError(f"unknown listener {listener!r} (known: {', '.join(LISTENERS)})")
            plan[listener] = target
    return {listener: target for listener, target in plan.items() if target != OFF}


def open_access_logs(plan: dict[str, str], *, form: str = "json",
                     fields: Sequence[str] = logformat.FIELDS) -> dict[str, AccessLog]:
    """One writer per destination of `plan` (`destinations`), by listener: standard
    output once, and each file once however it is spelled (relative or absolute)."""
    writers: dict[str, AccessLog] = {}
    found: dict[str, AccessLog] = {}
    try:
        for listener, target in sorted(plan.items()):
            place = target if target == STDOUT else os.path.abspath(target)
            writer = writers.get(place)
            if writer is None:
                writer = writers[place] = AccessLog(target, form=form, fields=fields)
            found[listener] = writer
    except (OSError, ValueError):
        for writer in writers.values():
            writer.close()
        raise
    return found


def distinct(logs: Iterable[AccessLog]) -> list[AccessLog]:
    """Each writer once (several listeners may share one)."""
    seen: dict[int, AccessLog] = {}
    for writer in logs:
        seen.setdefault(id(writer), writer)
    return list(seen.values())
