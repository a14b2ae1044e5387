"""API keys and who is asking: created and revoked server-side with ``kiln keys``.

A token is ``kiln_`` plus 32 random bytes (URL-safe base64). It is shown once, when the
key is created; the database keeps only its sha256, which is enough because a token has
far too much entropy to be guessed from its hash. Clients send it as
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from kiln.db.cursors import dict_cursor
from kiln.db.sql import queries
from kiln.errors import KilnError

TOKEN_PREFIX = "kiln_"
TOKEN_BYTES = 32
#: longest Authorization token looked up; anything longer cannot be one of ours
MAX_TOKEN_CHARS = 128
SCOPES = ("build", "admin")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
SQL_FILE = "api_keys.sql"


class ApiKeyError(KilnError):
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
            with dict_cursor(self.pool) as cur:
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
        with dict_cursor(self.pool) as cur:
            cur.execute(queries(SQL_FILE)["authenticate"], {"token_sha256": hash_token(token)})
            row = cur.fetchone()
        return _key(row) if row else None

    def revoke(self, which: str) -> ApiKey | None:
        """Revoke the live key with this id or name; return it, or None if there is none."""
        with dict_cursor(self.pool) as cur:
            cur.execute(queries(SQL_FILE)["revoke_key"], {"which": which})
            row = cur.fetchone()
        return _key(row) if row else None

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        """Return the keys, oldest first; revoked ones only if asked."""
        with dict_cursor(self.pool) as cur:
            cur.execute(queries(SQL_FILE)["list_keys"], {"all": include_revoked})
            return [_key(row) for row in cur.fetchall()]


# -- kiln keys ----------------------------------------------------------------------------
