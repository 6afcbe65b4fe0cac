"""Argument types and the listener flags shared by `kanal run` and `kanal dataplane`."""

from __future__ import annotations

import argparse

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
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])


def port(text: str) -> int:
    """A TCP port number, 1 to 65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}")
    return int(text)
