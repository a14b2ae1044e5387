"""The ``kiln`` command: run the service's parts, and (kiln.client.builds) talk to a server."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from kiln.config import Config, ConfigError, load_config
from kiln.logconfig import setup_logging

#: exit code for a usage or configuration error
EXIT_USAGE = 2


def _config(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending database migrations."""
    import psycopg

    from kiln.db.pool import migrate
    from kiln.readiness import where
    from kiln.wiring import database_url

    config = _config(args)
    setup_logging(config.logging, process="migrate")
    url = database_url(config)
    try:
        applied = migrate(url, config.database)
    except psycopg.OperationalError as exc:
        print(f"kiln: cannot migrate: the database at {where(url)} is unreachable: "
              f"{str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print("applied: " + ", ".join(applied) if applied else "the database is up to date")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check once what a role needs (database and schema, store, build engine); exit 1 if not."""
    from kiln.readiness import dependencies, probe
    from kiln.wiring import database_url

    config = _config(args)
    results = probe(dependencies(config, args.role, url=database_url(config)))
    for name, why in results.items():
        print(f"{name}: {why or 'ok'}")
    return 1 if any(results.values()) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run API, worker and janitor together (embedded PostgreSQL if no database.url)."""
    from kiln.standalone import serve

    config = _config(args)
    setup_logging(config.logging, process="serve")
    return serve(config)


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a build worker."""
    from functions.worker.__main__ import main

    return main(args.rest)


def cmd_janitor(args: argparse.Namespace) -> int:
    """Run the janitor."""
    from functions.janitor.__main__ import main

    return main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every kiln subcommand."""
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln: custom Caddy builds.")
    parser.add_argument("--config", default=None,
                        help="config file (default: $CONFIG_PATH or ./config.yml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "migrate": cmd_migrate,
        "serve": cmd_serve,
    }
    for name, handler in handlers.items():
        p = sub.add_parser(name, help=(handler.__doc__ or "").strip())
        p.set_defaults(func=handler)
    check = sub.add_parser("check", help=(cmd_check.__doc__ or "").strip())
    check.add_argument("--role", choices=("worker", "api", "janitor"), default="worker",
                       help="whose needs to check (default: worker)")
    check.set_defaults(func=cmd_check)
    for name, handler in {"worker": cmd_worker, "janitor": cmd_janitor}.items():
        p = sub.add_parser(name, help=(handler.__doc__ or "").strip())
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=handler)
    from kiln.db.api_keys import add_commands as add_key_commands

    add_key_commands(sub, load_config=_config)
    from kiln.client.verify import add_command as add_verify_command

    add_verify_command(sub)
    from kiln.client.caddyproxy import add_command as add_caddy_proxy_command

    add_caddy_proxy_command(sub)
    try:
        client = importlib.import_module("kiln.client.builds")
    except ModuleNotFoundError:
        pass
    else:
        client.add_commands(sub)
        from kiln.client.upgrade import add_commands as add_upgrade_commands

        add_upgrade_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the kiln command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
