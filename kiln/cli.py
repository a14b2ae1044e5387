"""The ``kiln`` command: run the service's parts, and (kiln.client.builds) talk to a server."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import psycopg

from kiln.config import Config, ConfigError, load_config
from kiln.db.api_keys import SCOPES, ApiKeyError, KeyManager
from kiln.logconfig import setup_logging

if TYPE_CHECKING:
    from kiln.config import Config

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

    from kiln.db.migrate import migrate
    from kiln.readiness import first_line, where
    from kiln.wiring import database_url

    config = _config(args)
    setup_logging(config.logging, process="migrate")
    url = database_url(config)
    try:
        applied = migrate(url, config.database)
    except psycopg.OperationalError as exc:
        print(f"kiln: cannot migrate: the database at {where(url)} is unreachable: "
              f"{first_line(exc)}", file=sys.stderr)
        return 1
    print("applied: " + ", ".join(applied) if applied else "the database is up to date")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check once what a role needs (database and schema, store, build engine); exit 1 if not."""
    from kiln.readiness import probe
    from kiln.wiring import database_url, make_dependencies

    config = _config(args)
    results = probe(make_dependencies(config, args.role, url=database_url(config)))
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
    from kiln.programs import worker_main

    return worker_main(args.rest)


def cmd_janitor(args: argparse.Namespace) -> int:
    """Run the janitor."""
    from kiln.programs import janitor_main

    return janitor_main(args.rest)


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


@contextmanager
def _manager(config: Config) -> Iterator[KeyManager]:
    """Yield a KeyManager on database.url, or on `kiln serve`'s embedded PostgreSQL."""
    from kiln.db.pool import make_pool

    url, server = config.database.url, None
    if not url:
        from kiln.db.embedded import start_embedded_postgres

        # the server is shared: it stops only when its last user (kiln serve) lets go
        server, url = start_embedded_postgres(config.database.embedded_dir)
    pool = make_pool(url, config.database, application="kiln-keys", min_size=1, max_size=1)
    try:
        pool.wait(timeout=config.database.connect_timeout * 2)
        yield KeyManager(pool)
    finally:
        pool.close()
        if server is not None:
            server.cleanup()


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


def cmd_keys(args: argparse.Namespace, config: Config) -> int:
    """Run one ``kiln keys`` action against the database."""
    try:
        with _manager(config) as manager:
            return _run_keys(args, manager)
    except psycopg.errors.UndefinedTable:
        print("kiln keys: the database has no kiln_api_keys table yet: run `kiln migrate` "
              "(or start kiln serve or the janitor, which migrate)", file=sys.stderr)
        return 1


def _run_keys(args: argparse.Namespace, manager: KeyManager) -> int:
    if args.action == "create":
        try:
            key, token = manager.create(args.name, scope=args.scope,
                                        priority=args.priority,
                                        builds_per_window=args.builds_per_window)
        except ApiKeyError as exc:
            print(f"kiln keys: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({**key.to_json(), "token": token}))
        else:
            print(f"created key {key.name} ({key.id}), scope {key.scope}, "
                  f"priority {key.priority}")
            print("token (shown only now; send it as 'Authorization: Bearer <token>'):")
            print(token)
        return 0
    if args.action == "revoke":
        revoked = manager.revoke(args.which)
        if revoked is None:
            print(f"kiln keys: no live key has the id or name {args.which!r} "
                  "(`kiln keys list` shows them)", file=sys.stderr)
            return 1
        print(json.dumps(revoked.to_json()) if args.json
              else f"revoked key {revoked.name} ({revoked.id})")
        return 0
    keys = manager.list(include_revoked=args.all)
    if args.json:
        print(json.dumps([k.to_json() for k in keys]))
        return 0
    rows = [("ID", "NAME", "SCOPE", "PRIORITY", "BUILDS/WINDOW", "CREATED", "LAST USED",
             "REVOKED")]
    for k in keys:
        quota = "default" if k.builds_per_window is None else str(k.builds_per_window)
        rows.append((k.id, k.name, k.scope, str(k.priority), quota, _when(k.created_at),
                     _when(k.last_used_at), _when(k.revoked_at)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def add_key_commands(sub: Any, *, load_config: Callable[[argparse.Namespace], Config]) -> None:
    """Register ``kiln keys create|revoke|list`` on the kiln command's subparsers."""
    keys = sub.add_parser("keys", help="create, revoke and list API keys (in the database)")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key and print its token once")
    create.add_argument("name", help="a name for the key (who or what uses it)")
    create.add_argument("--scope", choices=SCOPES, default="build",
                        help="build: start and cancel own builds; admin: everything")
    create.add_argument("--priority", type=int, default=0,
                        help="queue priority of the builds this key starts (higher first)")
    create.add_argument("--builds-per-window", type=int, default=None, metavar="N",
                        help="new builds per quota window (0: no limit; default: quota.key_builds)")
    revoke = actions.add_parser("revoke", help="revoke a key by id or name")
    revoke.add_argument("which", metavar="NAME_OR_ID")
    listing = actions.add_parser("list", help="list the keys")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    for parser in (create, revoke, listing):
        parser.add_argument("--json", action="store_true", help="print JSON")
    keys.set_defaults(func=lambda args: cmd_keys(args, load_config(args)))


if __name__ == "__main__":
    sys.exit(main())
