"""Argument types and the listener flags shared by `kanal run` and `kanal dataplane`."""

from __future__ import annotations

import argparse
from typing import Any

from kanal.dataplane.http1 import BODY_IDLE_TIMEOUT, HEAD_TIMEOUT

EXIT_CANNOT_BIND = 3
"""`kanal run` (and each of its workers) exits with this when an address it was told to
listen on cannot be bound; a supervisor that sees it from a worker stops, with it."""


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    number = int(port)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host, number


def add_listener_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", type=host_port, default=("127.0.0.1", 8080),
                        metavar="HOST:PORT", help="plain HTTP listener (default 127.0.0.1:8080)")
    parser.add_argument("--tls-listen", type=host_port, default=None, metavar="HOST:PORT",
                        help="HTTPS listener for Routes with spec.tls (off by default)")
    parser.add_argument("--default-certificate", default=None, metavar="NAMESPACE/NAME",
                        help="TLS Secret (one a Route's spec.tls names) presented to clients "
                             "whose server name no Route claims; without it their handshake fails")
    parser.add_argument("--forward-listen", type=host_port, default=None, metavar="HOST:PORT",
                        help="forward (egress) proxy listener (off by default)")
    parser.add_argument("--admin", type=host_port, default=("127.0.0.1", 9901),
                        metavar="HOST:PORT", help="admin endpoints (default 127.0.0.1:9901)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="proxy processes sharing the listening ports (default 1)")
    parser.add_argument("--trusted-hops", type=int, default=0, metavar="N",
                        help="how many proxies in front of Kanal are trusted to set "
                             "X-Forwarded-* and Forwarded (default 0: client values are replaced)")
    parser.add_argument("--request-head-timeout", type=positive_seconds, default=HEAD_TIMEOUT,
                        metavar="SECONDS",
                        help="time a client has to send a whole request head, counted from "
                             f"its first byte; 408 after (default {HEAD_TIMEOUT:g})")
    parser.add_argument("--request-body-timeout", type=positive_seconds,
                        default=BODY_IDLE_TIMEOUT, metavar="SECONDS",
                        help="time a request body may go without a byte; 408 after "
                             f"(default {BODY_IDLE_TIMEOUT:g})")
    parser.add_argument("--max-connections", type=positive_int, default=None, metavar="N",
                        help="client connections each listener holds at most; at the cap the "
                             "listener stops accepting (more wait in the kernel's backlog) "
                             "until one closes (default: no cap)")
    parser.add_argument("--max-total-connections", type=positive_int, default=None, metavar="N",
                        help="client connections the process holds at most over all its "
                             "listeners (each worker with --workers); at the cap every "
                             "listener stops accepting until one closes (default: no cap)")
    parser.add_argument("--overload-memory", type=byte_size, default=None, metavar="SIZE",
                        help="resident memory (e.g. 512Mi) above which the process answers "
                             "new requests 503 with Connection: close, until it is below "
                             "again; sampled every second (default: off)")
    parser.add_argument("--compression", action="store_true",
                        help="compress answers of every Route rule without a Compression "
                             "filter, with its defaults (br, zstd, gzip; text types; 1Ki)")
    parser.add_argument("--cache-size", type=byte_size, default=DEFAULT_CACHE_SIZE, metavar="SIZE",
                        help="memory for cached answers (rules and egress policies with a "
                             "cache section), e.g. 64Mi (the default); LRU beyond it")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="folder cached answers spill to when memory is full (off by default)")
    parser.add_argument("--cache-disk-size", type=byte_size, default=DEFAULT_CACHE_DISK_SIZE,
                        metavar="SIZE", help="bytes --cache-dir may hold (default 1Gi)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    add_observability_flags(parser)


def limit_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The DataplaneOptions fields the limit flags set."""
    return {"head_timeout": args.request_head_timeout,
            "body_idle_timeout": args.request_body_timeout,
            "max_connections": args.max_connections,
            "max_total_connections": args.max_total_connections,
            "overload_memory": args.overload_memory,
            "compression": args.compression,
            "cache_size": args.cache_size, "cache_dir": args.cache_dir,
            "cache_disk_size": args.cache_disk_size}


def limit_argv(args: argparse.Namespace) -> list[str]:
    """The limit flags again, for a worker's command line."""
    argv = ["--request-head-timeout", repr(args.request_head_timeout),
            "--request-body-timeout", repr(args.request_body_timeout)]
    if args.max_connections is not None:
        argv += ["--max-connections", str(args.max_connections)]
    if args.max_total_connections is not None:
        argv += ["--max-total-connections", str(args.max_total_connections)]
    if args.overload_memory is not None:
        argv += ["--overload-memory", str(args.overload_memory)]
    if args.compression:
        argv.append("--compression")
    argv += ["--cache-size", str(args.cache_size), "--cache-disk-size", str(args.cache_disk_size)]
    if args.cache_dir is not None:
        # Each worker keeps its own cache: a folder of its own under the one given.
        argv += ["--cache-dir", args.cache_dir]
    return argv


def positive_seconds(text: str) -> float:
    """Seconds, above 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number, 1 or more."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, got {text!r}")
    return int(text)


def port(text: str) -> int:
    """A TCP port number, 1 to 65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}")
    return int(text)


def add_observability_flags(parser: argparse.ArgumentParser) -> None:
    """Access logs (kanal.dataplane.accesslog), request ids and tracing."""
    from kanal.dataplane.logformat import FIELDS, FORMATS

    parser.add_argument("--tracing-endpoint", default=None, metavar="URL",
                        help="export spans over OTLP/HTTP to this collector URL, e.g. "
                             "http://otel-collector:4318/v1/traces (default: tracing off)")
    parser.add_argument("--tracing-sample-ratio", type=ratio, default=1.0, metavar="R",
                        help="share of new traces recorded, 0 to 1 (default 1); a caller's "
                             "sampled flag in traceparent is followed")
    parser.add_argument("--tracing-service-name", default="kanal", metavar="NAME",
                        help="service.name of the spans (default kanal)")

    parser.add_argument("--access-log", type=access_log_target, action="append", default=None,
                        metavar="[LISTENER=]stdout|PATH|off",
                        help="one line per request, to standard output or appended to a file "
                             "(default off); repeat with a listener prefix (reverse=, inbound=, "
                             "forward=) to give that listener a place of its own")
    parser.add_argument("--access-log-format", default="json", choices=FORMATS,
                        help="json (one object a line, the default) or text (logfmt: "
                             "name=value pairs)")
    parser.add_argument("--request-id", choices=("auto", "on", "off"), default="auto",
                        help="X-Request-Id on every request, passed to the backend and "
                             "returned to the client (auto, the default: on when the access "
                             "log or tracing is)")
    parser.add_argument("--access-log-listeners", type=listener_names, default=LISTENERS,
                        metavar="NAME,...",
                        help="the listeners the --access-log without a prefix serves: reverse "
                             "(--listen, --tls-listen), inbound, forward (default all three)")
    parser.add_argument("--access-log-fields", type=field_names, default=FIELDS,
                        metavar="NAME,...",
                        help=f"the fields to write, in this order (default all: {','.join(FIELDS)})")


def access_log_target(text: str) -> tuple[str | None, str]:
    """`[LISTENER=]stdout|off|PATH`: (listener or None for every one, destination). A
    file must be one that can be appended to (checked now, not at the first line). A
    path whose start looks like a prefix (`name=...`) is written `./name=...`."""
    from kanal.dataplane.accesslog import LISTENERS

    listener: str | None = None
    prefix, sep, rest = text.partition("=")
    if sep and prefix.isidentifier():
        if prefix not in LISTENERS:
            raise argparse.ArgumentTypeError(
                f"unknown listener {prefix!r} in {text!r} (known: {', '.join(LISTENERS)}; "
                f"a path is written ./{text})")
        listener, text = prefix, rest
    if text in ("stdout", "off"):
        return listener, text
    if not text:
        raise argparse.ArgumentTypeError("expected stdout, off or a file path after "
                                         f"{listener}=")
    try:
        with open(text, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write the access log {text}: "
                                         f"{exc.strerror or exc}") from None
    return listener, text


def ratio(text: str) -> float:
    """A number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a ratio from 0 to 1, got {text!r}")
    return value


LISTENERS = ("reverse", "inbound", "forward")


def listener_names(text: str) -> tuple[str, ...]:
    """Comma-separated listener names: reverse, inbound, forward."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in LISTENERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected listener names from {', '.join(LISTENERS)}, got {text!r}")
    return names


def field_names(text: str) -> tuple[str, ...]:
    """Comma-separated access log field names, each known."""
    from kanal.dataplane.logformat import select

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    try:
        select(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not names:
        raise argparse.ArgumentTypeError("expected at least one access log field name")
    return names


def observability_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The DataplaneOptions fields the observability flags set (the access log is opened
    here, so a path that cannot be written is refused before anything starts)."""
    from kanal.dataplane.accesslog import destinations, open_access_logs
    from kanal.dataplane.requestid import RequestIds

    found: dict[str, Any] = {}
    plan = destinations(getattr(args, "access_log", None) or (),
                        getattr(args, "access_log_listeners", LISTENERS))
    if plan:
        found["access_logs"] = open_access_logs(plan, form=args.access_log_format,
                                                fields=args.access_log_fields)
    endpoint = getattr(args, "tracing_endpoint", None)
    if endpoint:
        from kanal.dataplane.tracing import Tracing

        found["tracing"] = Tracing(endpoint, ratio=args.tracing_sample_ratio,
                                   service_name=args.tracing_service_name)
    wanted = getattr(args, "request_id", "auto")
    if wanted == "on" or (wanted == "auto" and found):
        found["request_ids"] = RequestIds()
    return found


def observability_argv(args: argparse.Namespace) -> list[str]:
    """The observability flags again, for a worker's command line."""
    logs = [part for listener, target in args.access_log or ()
            for part in ("--access-log", target if listener is None else f"{listener}={target}")]
    return [*logs, "--access-log-format", args.access_log_format,
            "--access-log-fields", ",".join(args.access_log_fields),
            "--access-log-listeners", ",".join(args.access_log_listeners),
            "--request-id", args.request_id,
            *(["--tracing-endpoint", args.tracing_endpoint] if args.tracing_endpoint else []),
            "--tracing-sample-ratio", repr(args.tracing_sample_ratio),
            "--tracing-service-name", args.tracing_service_name]
DEFAULT_CACHE_SIZE = 64 * 1024 * 1024
DEFAULT_CACHE_DISK_SIZE = 1024 * 1024 * 1024
_BYTE_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2,
               "Gi": 1024**3}


def byte_size(text: str) -> int:
    """Bytes as the resources write them: `1048576`, `500k`, `64Mi`, `2G`."""
    digits = text.rstrip("kKMGi")
    unit = text[len(digits):]
    if not digits.isdigit() or unit not in _BYTE_UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 64Mi (digits with k, Ki, M, Mi, G or Gi), got {text!r}")
    return int(digits) * _BYTE_UNITS[unit]
