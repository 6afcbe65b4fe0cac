"""The `kanal` command line: parses arguments and hands over to the module that does the job.

Every sub-command imports its machinery lazily, so `kanal validate` never pays for
the proxy and `kanal run` never imports kopf.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import kanal
from kanal.commands.options import add_listener_flags, host_port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kanal", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kanal {kanal.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="standalone: serve Route/Upstream manifests from files")
    run.add_argument("paths", nargs="+", metavar="PATH", help="YAML files or folders of them")
    add_listener_flags(run)
    # Used by `--workers N` to start its worker processes; not for users.
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--worker-admin", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--worker-parent", type=int, default=None, help=argparse.SUPPRESS)

    validate = commands.add_parser("validate", help="check manifests offline")
    validate.add_argument("paths", nargs="+", metavar="PATH")

    commands.add_parser("crds", help="print the CRD manifests")

    operator = commands.add_parser("operator", help="the control plane in a cluster (kopf)")
    operator.add_argument("--config-listen", type=host_port, default=("0.0.0.0", 9000),
                          metavar="HOST:PORT",
                          help="where dataplanes subscribe (default 0.0.0.0:9000)")
    operator.add_argument("--admin", type=host_port, default=("0.0.0.0", 9901),
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
    operator.add_argument("--webhook-listen", type=host_port, default=None, metavar="HOST:PORT",
                          help="serve the admission webhooks (sidecar injection on /inject, "
                               "validation on /validate) over HTTPS here (off by default)")
    operator.add_argument("--webhook-cert-dir", default=None, metavar="DIR",
                          help="the webhook server's certificate: tls.crt and tls.key (ca.crt "
                               "is the webhook configurations' caBundle)")
    operator.add_argument("--sidecar-template", default=None, metavar="PATH",
                          help="YAML of what injection adds to a pod: initContainers or "
                               "containers, volumes, appEnv, inbound (the chart's sidecar.yaml)")
    operator.add_argument("--leader-election", action="store_true",
                          help="elect one replica (a Lease) to write statuses, and count every "
                               "replica's dataplanes in Programmed; also KANAL_LEADER_ELECTION=true")
    operator.add_argument("--log-level", default="info",
                          choices=["debug", "info", "warning", "error"])

    from kanal.commands.dataplane import add_dataplane_parser

    add_dataplane_parser(commands)
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
        from kanal.commands.dataplane import dataplane_command

        return dataplane_command(args)
    if args.command == "operator":
        from kanal.operator.kube.main import operator_command

        return operator_command(args)
    if args.command == "run":
        from kanal.commands.run import run_command

        return run_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
