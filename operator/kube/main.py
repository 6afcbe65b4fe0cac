"""`kanal operator`: kopf in this process, with the control plane's servers.

The handlers (`kanal.operator.kube.handlers`) start the control plane in kopf's
startup phase, so `kanal operator` and `kopf run -m kanal.operator.kube.handlers`
behave the same; this module only turns flags into options and runs kopf.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kanal.operator.kube.controlplane import OperatorOptions
from kanal.operator.kube.election import ElectionSettings


def options_from_args(args: argparse.Namespace) -> OperatorOptions:
    namespaces = [n.strip() for n in (args.namespaces or "").split(",") if n.strip()]
    return OperatorOptions(
        config_listen=args.config_listen,
        admin=args.admin,
        namespaces=namespaces,
        token_file=Path(args.token_file) if args.token_file else None,
        allow_loopback_endpoints=args.allow_loopback_endpoints,
        webhook_listen=getattr(args, "webhook_listen", None),
        webhook_cert_dir=Path(args.webhook_cert_dir) if getattr(args, "webhook_cert_dir", None)
        else None,
        sidecar_template=Path(args.sidecar_template) if getattr(args, "sidecar_template", None)
        else None,
        leader_election=ElectionSettings.from_env(
            {**os.environ, "KANAL_LEADER_ELECTION": "true"}
            if getattr(args, "leader_election", False) else None),
    )


def operator_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        options = options_from_args(args)
    except ValueError as exc:  # KANAL_LEASE_DURATION
        print(f"kanal operator: {exc}", file=sys.stderr)
        return 2
    if options.token_file is not None:
        if not options.token_file.is_file():
            print(f"kanal operator: --token-file {options.token_file}: no such file",
                  file=sys.stderr)
            return 2
        if not options.token_file.read_text(encoding="utf-8").strip():
            print(f"kanal operator: --token-file {options.token_file} is empty", file=sys.stderr)
            return 2
    if options.webhook_cert_dir is not None:
        missing = [name for name in ("tls.crt", "tls.key")
                   if not (options.webhook_cert_dir / name).is_file()]
        if missing:
            print(f"kanal operator: --webhook-cert-dir {options.webhook_cert_dir}: no "
                  f"{' or '.join(missing)}", file=sys.stderr)
            return 2
    if options.sidecar_template is not None:
        from kanal.operator.kube.webhooks import load_template

        try:
            load_template(options.sidecar_template)
        except (OSError, ValueError) as exc:
            print(f"kanal operator: --sidecar-template: {exc}", file=sys.stderr)
            return 2
    try:
        asyncio.run(run_operator(options))
    except KeyboardInterrupt:
        pass
    return 0


async def run_operator(options: OperatorOptions, *, connection: Any = None,
                       stop_flag: Any = None, ready_flag: Any = None,
                       namespaces: Sequence[str] | None = None, memo: Any = None) -> None:
    """Run kopf with Kanal's handlers until stopped (SIGINT/SIGTERM or `stop_flag`)."""
    import kopf

    # imported for its effect: it registers Kanal's handlers with kopf
    from kanal.operator.kube import handlers  # noqa: F401
    from kanal.operator.kube.controlplane import MEMO_CONNECTION, MEMO_OPTIONS

    chosen = list(namespaces if namespaces is not None else options.namespaces)
    memo = memo if memo is not None else kopf.Memo()
    memo[MEMO_OPTIONS] = options
    if connection is not None:
        memo[MEMO_CONNECTION] = connection
    await kopf.operator(
        clusterwide=not chosen,
        namespaces=chosen,
        standalone=True,
        memo=memo,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
