"""`kanal dataplane --control-plane URL`: a dataplane fed by the control plane.

The same process as `kanal run` (listeners, admin, graceful stop: see
`kanal.dataplane.process`), with a `Subscriber` as its feed instead of files. The
Snapshot kept in `--state-dir` is applied before any listener opens, so a dataplane
restarted while the control plane is away serves (and is ready) at once.

This module imports only the dataplane: a sidecar never loads pydantic or kopf.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from kanal.commands.options import (
    add_listener_flags,
    host_port,
    limit_flags,
    observability_flags,
    port,
    positive_seconds,
)

log = logging.getLogger("kanal.dataplane")

GATEWAYS = {"ingress": "ingress", "sidecar": "mesh"}
"""The Route gateway each mode serves: a sidecar serves the Routes of the mesh."""


def dataplane_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.control_plane.startswith(("http://", "https://")):
        print(f"kanal dataplane: --control-plane must be an http:// or https:// URL, "
              f"got {args.control_plane!r}", file=sys.stderr)
        return 2
    if args.workers != 1:
        print("kanal dataplane: only --workers 1 is supported", file=sys.stderr)
        return 2
    if (args.inbound_listen is None) != (args.app_port is None):
        print("kanal dataplane: --inbound-listen and --app-port go together", file=sys.stderr)
        return 2
    if args.inbound_listen is not None and args.mode != "sidecar":
        print("kanal dataplane: --inbound-listen is for --mode sidecar", file=sys.stderr)
        return 2
    if args.token_file is not None and not Path(args.token_file).is_file():
        print(f"kanal dataplane: --token-file {args.token_file}: no such file", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


async def serve(args: argparse.Namespace) -> int:
    from kanal.dataplane.process import DataplaneOptions, run_dataplane
    from kanal.dataplane.runtime import Runtime
    from kanal.dataplane.subscriber import Subscriber, SubscriberOptions

    gateway = GATEWAYS[args.mode]
    namespace = pod_namespace(args.namespace)
    options = DataplaneOptions(
        listen=args.listen,
        tls_listen=args.tls_listen,
        forward_listen=args.forward_listen,
        admin=args.admin,
        **limit_flags(args),
        **observability_flags(args),
        trusted_hops=args.trusted_hops,
        gateway=gateway,
        namespace=namespace,
        inbound_listen=args.inbound_listen,
        app_port=args.app_port,
    )
    if getattr(args, "default_certificate", None) and hasattr(options, "default_certificate"):
        options.default_certificate = args.default_certificate
    subscriber = Subscriber(SubscriberOptions(
        control_plane=args.control_plane,
        mode=args.mode,
        dataplane_id=args.dataplane_id,
        namespace=args.namespace,
        token_file=Path(args.token_file) if args.token_file else None,
        state_dir=Path(args.state_dir) if args.state_dir else None,
    ))
    # A sidecar's mesh routes answer to every spelling of a Service's name, relative
    # to its namespace (kanal.dataplane.mesh); so does its forward listener.
    runtime = Runtime(gateway=gateway, namespace=namespace if args.mode == "sidecar" else None)
    runtime.compress_all = options.compression
    # The kept configuration is in place before any listener opens.
    subscriber.load_state(runtime)
    from kanal.dataplane.splitreport import SplitReporter

    # Weighted splits are reported for the Routes' SplitObserved condition.
    reporter = SplitReporter(subscriber, interval=args.split_report_interval)
    return await run_dataplane(options, reporter.feed(subscriber.run), runtime)


def pod_namespace(flag: str | None) -> str:
    """--namespace, else $POD_NAMESPACE, else the service account's namespace, else default."""
    if flag:
        return flag
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or "default"
    except OSError:
        return "default"


SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")



def add_dataplane_parser(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> argparse.ArgumentParser:
    """The `dataplane` sub-command's arguments (listener flags as for `kanal run`)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "dataplane", help="a dataplane fed by the control plane (kanal operator)")
    parser.add_argument("--control-plane", required=True, metavar="URL",
                        help="where the control plane serves configuration, "
                             "e.g. http://kanal-operator.kanal:9000")
    parser.add_argument("--mode", choices=sorted(GATEWAYS), default="ingress",
                        help="ingress serves Routes of gateway `ingress`; sidecar those of "
                             "`mesh` (default ingress)")
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help="bearer token presented to the control plane, re-read on every "
                             "request (default: the pod's service-account token)")
    parser.add_argument("--state-dir", default=None, metavar="DIR",
                        help="where the last good configuration is kept, and served from at "
                             "start while the control plane is unreachable")
    parser.add_argument("--dataplane-id", default=None, metavar="ID",
                        help="how the control plane knows this dataplane "
                             "(default $POD_NAME, else host name and process id)")
    parser.add_argument("--namespace", default=None, metavar="NS",
                        help="the namespace this dataplane runs in (default $POD_NAMESPACE): "
                             "the forward listener applies its EgressPolicies, and a sidecar "
                             "resolves short service names (`orders`) in it")
    add_listener_flags(parser)
    parser.add_argument("--inbound-listen", type=host_port, default=None, metavar="HOST:PORT",
                        help="sidecar: the inbound listener, proxying every request to the "
                             "app on 127.0.0.1:--app-port with timeouts, limits and circuit "
                             "breaking (off by default; needs --app-port)")
    parser.add_argument("--app-port", type=port, default=None, metavar="N",
                        help="sidecar: the port the app listens on, on 127.0.0.1")
    parser.add_argument("--split-report-interval", type=positive_seconds, default=10.0,
                        metavar="SECONDS",
                        help="how often the observed shares of weighted rules are reported "
                             "to the control plane, for the Routes' SplitObserved condition "
                             "(default 10; only when they changed)")
    return parser
