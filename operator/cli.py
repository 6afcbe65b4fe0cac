"""The `kanal` command line: parses arguments and hands over to the module that does the job.

Every sub-command imports its machinery lazily, so `kanal validate` never pays for
the proxy and `kanal run` never imports kopf.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    number = int(port)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host, number


def _add_listener_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", type=_host_port, default=("127.0.0.1", 8080),
                        metavar="HOST:PORT", help="plain HTTP listener (default 127.0.0.1:8080)")
    parser.add_argument("--tls-listen", type=_host_port, default=None, metavar="HOST:PORT",
                        help="HTTPS listener for Routes with spec.tls (off by default)")
    parser.add_argument("--default-certificate", default=None, metavar="NAMESPACE/NAME",
                        help="TLS Secret (one a Route's spec.tls names) presented to clients "
                             "whose server name no Route claims; without it their handshake fails")
    parser.add_argument("--forward-listen", type=_host_port, default=None, metavar="HOST:PORT",
                        help="forward (egress) proxy listener (off by default)")
    parser.add_argument("--admin", type=_host_port, default=("127.0.0.1", 9901),
                        metavar="HOST:PORT", help="admin endpoints (default 127.0.0.1:9901)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="proxy processes sharing the listening ports (default 1)")
    parser.add_argument("--trusted-hops", type=int, default=0, metavar="N",
                        help="how many proxies in front of Kanal are trusted to set "
                             "X-Forwarded-* and Forwarded (default 0: client values are replaced)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kanal", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="standalone: serve Route/Upstream manifests from files")
    run.add_argument("paths", nargs="+", metavar="PATH", help="YAML files or folders of them")
    _add_listener_flags(run)
    # Used by `--workers N` to start its worker processes; not for users.
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--worker-admin", type=int, default=None, help=argparse.SUPPRESS)

    validate = commands.add_parser("validate", help="check manifests offline")
    validate.add_argument("paths", nargs="+", metavar="PATH")

    commands.add_parser("crds", help="print the CRD manifests")

    operator = commands.add_parser("operator", help="the control plane in a cluster (kopf)")
    operator.add_argument("--config-listen", type=_host_port, default=("0.0.0.0", 9000),
                          metavar="HOST:PORT",
                          help="where dataplanes subscribe (default 0.0.0.0:9000)")
    operator.add_argument("--admin", type=_host_port, default=("0.0.0.0", 9901),
                          metavar="HOST:PORT",
                          help="/live, /ready and /metrics (default 0.0.0.0:9901)")
    operator.add_argument("--namespaces", default="", metavar="A,B",
                          help="namespaces to watch (default: all)")
    operator.add_argument("--token-file", default=None, metavar="PATH",
                          help="shared secret dataplanes must present (default: their "
                               "service-account tokens, checked with a TokenReview)")
    operator.add_argument("--allow-loopback-endpoints", action="store_true",
                          help="accept static endpoints on loopback, link-local or node "
                               "addresses (refused by default)")
    operator.add_argument("--webhook-listen", type=_host_port, default=None, metavar="HOST:PORT",
                          help="serve the admission webhooks (sidecar injection on /inject, "
                               "validation on /validate) over HTTPS here (off by default)")
    operator.add_argument("--webhook-cert-dir", default=None, metavar="DIR",
                          help="the webhook server's certificate: tls.crt and tls.key (ca.crt "
                               "is the webhook configurations' caBundle)")
    operator.add_argument("--sidecar-template", default=None, metavar="PATH",
                          help="YAML of what injection adds to a pod: initContainers or "
                               "containers, volumes, appEnv, inbound (the chart's sidecar.yaml)")
    operator.add_argument("--log-level", default="info",
                          choices=["debug", "info", "warning", "error"])

    from kanal.operator.dataplane_cmd import add_dataplane_parser

    add_dataplane_parser(commands, _add_listener_flags)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        from kanal.operator.manifests import validate_command

        return validate_command(args.paths)
    if args.command == "crds":
        from kanal.operator.crdgen import crds_yaml

        sys.stdout.write(crds_yaml())
        return 0
    if args.command == "dataplane":
        from kanal.operator.dataplane_cmd import dataplane_command

        return dataplane_command(args)
    if args.command == "operator":
        from kanal.operator.kube.main import operator_command

        return operator_command(args)
    if args.command == "run":
        from kanal.operator.standalone import run_command

        return run_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
