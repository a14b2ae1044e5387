"""API keys and who is asking: created and revoked server-side with ``kiln keys``.

A token is ``kiln_`` plus 32 random bytes (URL-safe base64). It is shown once, when the
key is created; the database keeps only its sha256, which is enough because a token has
far too much entropy to be guessed from its hash. Clients send it as
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import argparse
import contextvars
import datetime as dt
import hashlib
import json
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from kiln.db.builds import queries

if TYPE_CHECKING:
    from kiln.config import Config

TOKEN_PREFIX = "kiln_"
TOKEN_BYTES = 32
#: longest Authorization token looked up; anything longer cannot be one of ours
MAX_TOKEN_CHARS = 128
SCOPES = ("build", "admin")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
SQL_FILE = "auth.sql"


class ApiKeyError(Exception):
    """A key cannot be created or found; the message says what to change."""


def new_token() -> str:
    """Return a fresh, high-entropy bearer token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def new_key_id() -> str:
    """Return a fresh public key id (``k_`` and 12 hex digits)."""
    return "k_" + secrets.token_hex(6)


def hash_token(token: str) -> str:
    """Return the hex sha256 a token is stored as."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A key as stored: never its token."""

    id: str
    name: str
    scope: str
    priority: int = 0
    #: new builds per quota window; None: the configured default for keys
    builds_per_window: int | None = None
    created_at: dt.datetime | None = None
    last_used_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (timestamps as ISO 8601)."""
        return {k: v.isoformat() if isinstance(v, dt.datetime) else v
                for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a key, or nobody in particular from a client address."""

    address: str
    key: ApiKey | None = None

    @property
    def is_admin(self) -> bool:
        return self.key is not None and self.key.is_admin

    @property
    def priority(self) -> int:
        return self.key.priority if self.key else 0

    @property
    def requester(self) -> str:
        """Return what is recorded as kiln_builds.requested_by: a key id or ``addr:<ip>``."""
        return self.key.id if self.key else f"addr:{self.address}"

    def describe(self) -> str:
        """Return a short human description for messages and logs."""
        return f"key {self.key.name} ({self.key.id})" if self.key else f"client {self.address}"


#: who sent the HTTP request this thread is serving: set by the API's auth middleware and
#: read by BuildService.submit, so that every endpoint that submits builds is covered by
#: priorities and quotas without passing the principal along
_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "kiln_principal", default=None)


def current_principal() -> Principal | None:
    """Return who sent the request being served, or None outside a request."""
    return _current.get()


def bind_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Make ``principal`` the current one; pass the token to unbind_principal afterwards."""
    return _current.set(principal)


def unbind_principal(token: contextvars.Token[Principal | None]) -> None:
    """Restore the principal that was current before bind_principal."""
    _current.reset(token)


def _key(row: dict[str, Any]) -> ApiKey:
    return ApiKey(id=row["id"], name=row["name"], scope=row["scope"], priority=row["priority"],
                  builds_per_window=row["builds_per_window"], created_at=row.get("created_at"),
                  last_used_at=row.get("last_used_at"), revoked_at=row.get("revoked_at"))


class KeyManager:
    """Create, revoke, list and authenticate API keys (table kiln_api_keys)."""

    def __init__(self, pool: ConnectionPool, *, token_factory: Callable[[], str] = new_token,
                 id_factory: Callable[[], str] = new_key_id) -> None:
        self.pool = pool
        self.token_factory = token_factory
        self.id_factory = id_factory

    @contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            yield cur

    def create(self, name: str, *, scope: str = "build", priority: int = 0,
               builds_per_window: int | None = None) -> tuple[ApiKey, str]:
        """Create a key; return it and its token (which is not stored and cannot be shown again)."""
        if not NAME_PATTERN.match(name):
            raise ApiKeyError(f"{name!r} is not a key name: use up to 64 letters, digits and "
                              "._@- starting with a letter or digit")
        if scope not in SCOPES:
            raise ApiKeyError(f"scope {scope!r} is not one of: {', '.join(SCOPES)}")
        if builds_per_window is not None and builds_per_window < 0:
            raise ApiKeyError("builds per window must be 0 (no limit) or more")
        token = self.token_factory()
        try:
            with self._cursor() as cur:
                cur.execute(queries(SQL_FILE)["create_key"], {
                    "id": self.id_factory(), "name": name, "scope": scope,
                    "token_sha256": hash_token(token), "priority": priority,
                    "builds_per_window": builds_per_window,
                })
                row = cur.fetchone()
        except psycopg.errors.UniqueViolation:
            raise ApiKeyError(f"a live key named {name!r} exists: revoke it first, or choose "
                              "another name") from None
        assert row is not None
        return _key(row), token

    def authenticate(self, token: str) -> ApiKey | None:
        """Return the live key a bearer token belongs to, or None."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_CHARS:
            return None
        with self._cursor() as cur:
            cur.execute(queries(SQL_FILE)["authenticate"], {"token_sha256": hash_token(token)})
            row = cur.fetchone()
        return _key(row) if row else None

    def revoke(self, which: str) -> ApiKey | None:
        """Revoke the live key with this id or name; return it, or None if there is none."""
        with self._cursor() as cur:
            cur.execute(queries(SQL_FILE)["revoke_key"], {"which": which})
            row = cur.fetchone()
        return _key(row) if row else None

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        """Return the keys, oldest first; revoked ones only if asked."""
        with self._cursor() as cur:
            cur.execute(queries(SQL_FILE)["list_keys"], {"all": include_revoked})
            return [_key(row) for row in cur.fetchall()]


# -- kiln keys ----------------------------------------------------------------------------


@contextmanager
def _manager(config: Config) -> Iterator[KeyManager]:
    """Yield a KeyManager on database.url, or on `kiln serve`'s embedded PostgreSQL."""
    from kiln.db.pool import make_pool

    url, server = config.database.url, None
    if not url:
        from kiln.standalone import start_embedded_postgres

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


def add_commands(sub: Any, *, load_config: Callable[[argparse.Namespace], Config]) -> None:
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
