"""``desa2va services``: start, stop or check a team's PostgreSQL and MLflow tracking server on this machine
(:mod:`lightning_desa2va.services`; ``make services`` installs PostgreSQL first)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_desa2va.cli.help import HelpFormatter

ACTIONS = ("start", "stop", "status")


def register(commands: argparse._SubParsersAction) -> None:
    services = commands.add_parser(
        "services",
        help="start, stop or check a local PostgreSQL and MLflow server for shared sweeps",
        description="PostgreSQL (Optuna studies, MLflow runs) and an MLflow tracking server with proxied "
        "artifacts, everything under one folder, bound to 127.0.0.1 unless --host says otherwise.",
        epilog="example:\n  desa2va services start --folder .services   (then: docs/scale.md)",
        formatter_class=HelpFormatter,
    )
    services.add_argument("action", choices=ACTIONS)
    services.add_argument("--folder", type=Path, default=Path(".services"), help="where their data lives")
    services.add_argument("--host", default="127.0.0.1", help="address both listen on")
    services.add_argument("--postgres-port", type=int, default=5433)
    services.add_argument("--mlflow-port", type=int, default=5001)
    services.set_defaults(run=_services)


def _services(args: argparse.Namespace) -> None:
    from lightning_desa2va.services import Services

    services = Services(args.folder.resolve(), args.host, args.postgres_port, args.mlflow_port)
    if args.action == "start":
        services.start()
    elif args.action == "stop":
        services.stop()
    for name, up in services.running().items():
        print(f"{name}: {'running' if up else 'stopped'}")
    if args.action != "stop":
        print(f"sweep storage: {services.postgres_url('optuna')}")
        print(f"MLFLOW_TRACKING_URI={services.mlflow_url}")
