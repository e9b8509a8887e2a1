"""Command line: parse arguments, load the config, call into the rest. No logic here."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

from daemon import __version__, logs, migrate, service, status
from daemon.config import DEFAULT_PATH, Config, ConfigError, describe, load
from daemon.db import DB_ERRORS
from daemon.metrics import ListenError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=DEFAULT_PATH,
                        help=f"config file (default {DEFAULT_PATH})")
    parser = argparse.ArgumentParser(prog="shotsd", description="Telegram shot broadcaster")
    parser.add_argument("--version", action="version", version=f"shotsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run the daemon")
    run.add_argument("--exit-when-idle", action="store_true",
                     help="exit 0 once no shot is running and none is due (tests, one-off runs)")
    sub.add_parser("migrate", parents=[common], help="apply pending schema migrations")
    sub.add_parser("check-config", parents=[common], help="validate and print the config")
    st = sub.add_parser("status", parents=[common], help="shots by status, running progress")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load(args.config, resolve_tokens=args.command in ("run", "check-config"))
    except ConfigError as exc:
        print(f"shotsd: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        for warning in config.warnings:
            print(f"shotsd: warning: {warning}", file=sys.stderr)
        print(json.dumps(describe(config), indent=2))
        return EXIT_OK
    logs.configure(config.logging.level, config.logging.format, config.secrets())
    for warning in config.warnings:
        logs.get().warning("config_warning", detail=warning)
    commands = {
        "run": lambda: service.run(config, exit_when_idle=args.exit_when_idle),
        "migrate": lambda: _migrate(config),
        "status": lambda: status.show(config, as_json=args.json),
    }
    return _run_async(commands[args.command](), config)


def _run_async(coro: Coroutine[Any, Any, int], config: Config) -> int:
    try:
        return uvloop.run(coro)
    except ListenError as exc:
        logs.get().error("metrics_listen_failed", error=str(exc))
        print(f"shotsd: {exc}", file=sys.stderr)
    except (migrate.MigrationError, migrate.SchemaBehind) as exc:
        logs.get().error("schema_mismatch", error=str(exc))
        print(f"shotsd: {exc}", file=sys.stderr)
    except DB_ERRORS as exc:
        logs.get().error("database_unavailable", error=str(exc))
        print(f"shotsd: cannot use the database: {exc}", file=sys.stderr)
    return EXIT_RUNTIME


async def _migrate(config: Config) -> int:
    conn = await asyncpg.connect(config.database.dsn)
    try:
        applied = await migrate.migrate(conn)
    finally:
        await conn.close()
    names = [f"{m.version:04d}_{m.name}" for m in applied]
    logs.get().info("migrated", applied=names)
    print(f"applied {len(names)} migration(s){': ' + ', '.join(names) if names else ''}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
