"""The read-through module cache: the GOPROXY protocol answered from the shared store.

``ModuleCache.get`` answers one GOPROXY request path:

* ``$module/@v/$version.info``, ``.mod``, ``.zip`` of a canonical version: from the store when
  it holds a file whose size and sha256 match its sidecar (a hit); else from upstream (a miss),
  checked, stored, then served. A ``.mod`` and a ``.zip`` are checked against the checksum
  database first (``checksum.py``): a mismatch is refused with the go command's message and
  nothing is stored; a version the database does not know is served but not stored.
* ``$module/@v/list``, ``$module/@latest`` and version queries (``@v/master.info``): they
  change, so an answer is shared (through the store) for ``list_ttl`` seconds only, and
  nothing is checked in them: the go command checks the files they lead it to.
* ``sumdb/...``: the checksum database, through upstream: lookups and tiles (which never
  change) are stored, ``latest`` and ``supported`` shared for ``list_ttl``; the go command
  checks what the database signed itself.

A store that fails (unreachable, full, misconfigured) never fails a fetch: the request is
served from upstream, not stored, and counted as a bypass.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Protocol

from kiln.errors import KilnError
from kiln.gomod.module import check_module_path, encode_path, encode_version
from kiln.gomod.semver import canonical_version, is_semver
from kiln.modproxy.checksum import (
    ChecksumMismatch,
    Checksums,
    SumDBError,
    Sums,
    Verifier,
    hash_go_mod,
    hash_zip,
    mismatch_message,
    parse_lookup,
)
from kiln.modproxy.store import CacheUnavailable, Corrupt, ModuleStore
from kiln.modproxy.upstream import (
    MAX_SMALL_BYTES,
    MAX_ZIP_BYTES,
    Answer,
    Upstream,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

#: seconds a /list, @latest or version-query answer is reused
LIST_TTL_SECONDS = 60.0
#: a refusal of upstream (the module or version does not exist, or may not be served) is
#: shared under the file's key plus this, for list_ttl; not a 429 or a 5xx, which pass
NOT_FOUND_SUFFIX = ".notfound"
NOT_FOUND_STATUSES = (400, 403, 404, 410)
#: checksum database lookups kept in memory (a .mod and a .zip of one version ask once)
MAX_SUMS = 4096

REQUESTS = "kiln_modcache_requests_total"
BYTES = "kiln_modcache_bytes_total"

_FILE = re.compile(r"(?P<mod>.+)/@v/(?P<ver>[^/]+)\.(?P<ext>info|mod|zip)")
_LIST = re.compile(r"(?P<mod>.+)/(?:@v/list|@latest)")
#: checksum database answers that never change: a record's lookup (its note may be older
#: than the newest tree: the go command proves it a prefix) and tiles, full or partial
_SUMDB_FIXED = re.compile(r"sumdb/[^/]+/(?:lookup/.+|tile/.+)")
_TYPES = {"info": "application/json", "mod": "text/plain; charset=utf-8",
          "zip": "application/zip"}
_LIST_TYPES = {"json": "application/json", "list": "text/plain; charset=utf-8"}


class Counter(Protocol):
    """Where counts go (kiln.metrics.MetricsRecorder)."""

    def inc(self, name: str, labels: Mapping[str, str], amount: float = 1.0) -> None:
        """Add ``amount`` to a counter."""
        ...


class BadRequest(KilnError):
    """The request path is not one of the GOPROXY protocol's."""


@dataclass
class Reply:
    """What to answer: a status, a content type and a body."""

    status: int
    content_type: str
    body: IO[bytes]


def _text(status: int, message: str) -> Reply:
    return Reply(status, "text/plain; charset=utf-8", io.BytesIO(message.encode()))


def unescape(text: str, what: str) -> str:
    """Undo Go's case-encoding ("!" + lowercase for each capital)."""
    out: list[str] = []
    bang = False
    for c in text:
        if bang:
            if not "a" <= c <= "z":
                raise BadRequest(f"{what} {text!r}: '!' must be followed by a lowercase letter")
            out.append(c.upper())
            bang = False
        elif c == "!":
            bang = True
        elif "A" <= c <= "Z":
            raise BadRequest(f"{what} {text!r}: capital letters are written !x (Go's "
                             "case-encoding)")
        else:
            out.append(c)
    if bang:
        raise BadRequest(f"{what} {text!r} ends in '!'")
    return "".join(out)


def _module(escaped: str) -> str:
    module = unescape(escaped, "module path")
    try:
        check_module_path(module)
    except KilnError as exc:
        raise BadRequest(str(exc)) from None
    return module


class SumDB:
    """The checksum database, asked through the upstream proxy's /sumdb/ endpoint."""

    def __init__(self, upstream: Upstream, verifier: Verifier) -> None:
        self.upstream = upstream
        self.verifier = verifier
        self.name = verifier.name
        self._known: OrderedDict[tuple[str, str], Sums] = OrderedDict()
        self._lock = threading.Lock()
        self._asking: dict[tuple[str, str], threading.Lock] = {}

    def sums(self, module: str, version: str) -> Sums | None:
        """Return the database's hashes of a version, None if it does not know it."""
        with self._lock:
            asking = self._asking.setdefault((module, version), threading.Lock())
        # the go command fetches a version's .mod and .zip at once: one lookup for both
        with asking:
            try:
                return self._sums(module, version)
            finally:
                with self._lock:
                    self._asking.pop((module, version), None)

    def _sums(self, module: str, version: str) -> Sums | None:
        with self._lock:
            if (module, version) in self._known:
                return self._known[(module, version)]
        rel = (f"sumdb/{self.name}/lookup/{encode_path(module)}@"
               f"{encode_version(version)}")
        answer = self.upstream.get(rel)
        with answer.body:
            if answer.status in (404, 410):
                return None
            if answer.status != 200:
                raise SumDBError(f"{self.name} answered {answer.status} for {module}@{version}")
            sums = parse_lookup(answer.body.read(), module, version, self.verifier)
        with self._lock:
            self._known[(module, version)] = sums
            while len(self._known) > MAX_SUMS:
                self._known.popitem(last=False)
        return sums


class ModuleCache:
    """Answer GOPROXY requests from the store, reading through to upstream."""

    def __init__(self, *, store: ModuleStore, upstream: Upstream,
                 checksums: Checksums | None, metrics: Counter | None = None,
                 list_ttl: float = LIST_TTL_SECONDS) -> None:
        self.store = store
        self.upstream = upstream
        self.checksums = checksums
        self.metrics = metrics
        self.list_ttl = list_ttl
        self._flights: dict[str, threading.Lock] = {}
        self._flights_lock = threading.Lock()

    def _count(self, result: str, *, source: str = "", size: int = 0) -> None:
        if self.metrics is None:
            return
        self.metrics.inc(REQUESTS, {"result": result})
        if size:
            self.metrics.inc(BYTES, {"source": source}, size)

    def get(self, rel: str) -> Reply:
        """Answer the GOPROXY request for ``rel`` (the path without its leading slash).

        Raises BadRequest for a path the protocol does not have, UpstreamUnavailable when
        upstream is needed and fails.
        """
        if "\\" in rel or any(part in ("", ".", "..") for part in rel.split("/")):
            raise BadRequest(f"{rel!r} is not a module proxy path")
        if rel.startswith("sumdb/"):
            if _SUMDB_FIXED.fullmatch(rel):
                return self._fixed(rel)
            return self._pass(rel, ttl=True)
        match = _FILE.fullmatch(rel)
        if match:
            module = _module(match["mod"])
            version = unescape(match["ver"], "version")
            if is_semver(version) and canonical_version(version) == version:
                return self._file(rel, module, version, match["ext"])
            if match["ext"] != "info":
                raise BadRequest(f"{version!r} is not a canonical version: .mod and .zip are "
                                 "served for canonical versions only (ask .info first)")
            return self._pass(rel, ttl=True)
        match = _LIST.fullmatch(rel)
        if match:
            _module(match["mod"])
            return self._pass(rel, ttl=True)
        raise BadRequest(f"{rel!r} is not a module proxy path: ask for $module/@v/list, "
                         "$module/@latest or $module/@v/$version.info, .mod or .zip")

    # -- the store, and answers that change (shared for list_ttl) -----------------------

    def _stored(self, rel: str, *,
                fresh_for: float | None = None) -> tuple[IO[bytes] | None, bool]:
        """Return a stored entry (None: a miss, or a corrupt entry), and whether the store works."""
        try:
            return self.store.get(rel, fresh_for=fresh_for), True
        except Corrupt as exc:
            log.warning("%s", exc)
            self._count("corrupt")
            return None, True
        except CacheUnavailable as exc:
            log.warning("module cache store unavailable, asking upstream for %s: %s", rel, exc)
            return None, False

    def _keep(self, rel: str, data: IO[bytes]) -> bool:
        """Store an entry; tell whether it was stored."""
        try:
            self.store.put(rel, data)
            return True
        except CacheUnavailable as exc:
            log.warning("module cache store unavailable, not storing %s: %s", rel, exc)
            return False
        finally:
            data.seek(0)

    def _not_found(self, rel: str) -> Reply | None:
        """Return a refusal upstream gave for ``rel`` less than ``list_ttl`` ago."""
        if self.list_ttl <= 0:
            return None
        held, _ = self._stored(rel + NOT_FOUND_SUFFIX, fresh_for=self.list_ttl)
        if held is None:
            return None
        with held:
            try:
                kept = json.loads(held.read())
                status, text = int(kept["status"]), str(kept["body"])
            except (ValueError, KeyError, TypeError):
                return None
        self._count("hit")
        return Reply(status, "text/plain; charset=utf-8", io.BytesIO(text.encode()))

    def _upstream(self, rel: str, *, limit: int = MAX_SMALL_BYTES) -> Answer:
        """Ask upstream; share a refusal (NOT_FOUND_STATUSES) through the store, for list_ttl."""
        answer = self.upstream.get(rel, limit=limit)
        if answer.status in NOT_FOUND_STATUSES and self.list_ttl > 0:
            text = answer.body.read().decode("utf-8", "replace")
            answer.body.seek(0)
            self._keep(rel + NOT_FOUND_SUFFIX, io.BytesIO(json.dumps(
                {"status": answer.status, "body": text}).encode()))
        return answer

    def _pass(self, rel: str, *, ttl: bool) -> Reply:
        """Pass a request through; with ``ttl``, share its answer for ``list_ttl`` seconds.

        Shared through the store, so that a fresh worker of the fleet need not ask
        upstream either.
        """
        usable = ttl and self.list_ttl > 0
        if usable:
            held, usable = self._stored(rel, fresh_for=self.list_ttl)
            if held is not None:
                self._count("hit", source="store", size=_size(held))
                json_answer = rel.endswith((".info", "@latest"))
                return Reply(200, _LIST_TYPES["json" if json_answer else "list"], held)
            gone = self._not_found(rel) if usable else None
            if gone is not None:
                return gone
        answer = self._upstream(rel) if usable else self.upstream.get(rel)
        size = _size(answer.body)
        if usable and answer.status == 200:
            self._keep(rel, answer.body)
        self._count("passthrough", source="upstream", size=size)
        return Reply(answer.status, answer.content_type or "text/plain", answer.body)

    def _fixed(self, rel: str) -> Reply:
        """Answer a checksum database request whose answer never changes, storing it.

        Nothing is checked here: the go command verifies what the database signed.
        """
        held, usable = self._stored(rel)
        if held is not None:
            self._count("hit", source="store", size=_size(held))
            return Reply(200, "application/octet-stream", held)
        answer = self._upstream(rel) if usable else self.upstream.get(rel)
        size = _size(answer.body)
        if usable and answer.status == 200:
            self._keep(rel, answer.body)
        self._count("passthrough", source="upstream", size=size)
        return Reply(answer.status, answer.content_type or "text/plain", answer.body)

    # -- immutable files: stored -------------------------------------------------------

    def _flight(self, rel: str) -> threading.Lock:
        with self._flights_lock:
            return self._flights.setdefault(rel, threading.Lock())

    def _file(self, rel: str, module: str, version: str, ext: str) -> Reply:
        flight = self._flight(rel)
        # one fetch per file at a time in this worker: the others wait and then hit
        with flight:
            reply = self._file_once(rel, module, version, ext)
        with self._flights_lock:
            if self._flights.get(rel) is flight and not flight.locked():
                del self._flights[rel]
        return reply

    def _file_once(self, rel: str, module: str, version: str, ext: str) -> Reply:
        held, usable = self._stored(rel)
        if held is not None:
            self._count("hit", source="store", size=_size(held))
            return Reply(200, _TYPES[ext], held)
        gone = self._not_found(rel) if usable else None
        if gone is not None:
            return gone
        limit = MAX_ZIP_BYTES if ext == "zip" else MAX_SMALL_BYTES
        answer = self._upstream(rel, limit=limit) if usable else self.upstream.get(rel,
                                                                                   limit=limit)
        body = answer.body
        size = _size(body)
        if answer.status != 200:
            self._count("passthrough", source="upstream", size=size)
            return Reply(answer.status, answer.content_type or "text/plain", body)
        verified = self._verify(body, module, version, ext)
        if isinstance(verified, Reply):
            body.close()
            self._count("refused")
            return verified
        stored = usable and verified and self._keep(rel, body)
        self._count("miss" if stored else "bypass", source="upstream", size=size)
        return Reply(200, _TYPES[ext], body)

    def _verify(self, body: IO[bytes], module: str, version: str, ext: str) -> bool | Reply:
        """Check a .mod or .zip against the checksum database.

        Return True (checked, or nothing to check: .info, or no database configured),
        False (not checkable: serve, do not store), or the refusal to answer.
        """
        if ext == "info" or self.checksums is None:
            return True
        try:
            sums = self.checksums.sums(module, version)
        except (SumDBError, UpstreamUnavailable) as exc:
            log.warning("cannot check %s@%s against the checksum database, not storing it: "
                        "%s", module, version, exc)
            return False
        if sums is None:
            log.info("%s does not know %s@%s: served, not stored", self.checksums.name, module,
                     version)
            return False
        try:
            got = hash_zip(body) if ext == "zip" else hash_go_mod(body.read())
        except (zipfile.BadZipFile, ValueError, OSError, ChecksumMismatch) as exc:
            got = f"unreadable ({exc})"
        finally:
            body.seek(0)
        expected = sums.zip if ext == "zip" else sums.mod
        if got == expected:
            return True
        message = mismatch_message(module, version, kind=ext, downloaded=got, expected=expected,
                                   source=self.checksums.name)
        log.error("refused %s@%s (%s): %s", module, version, ext, message.splitlines()[0])
        return _text(403, message)


def _size(body: IO[bytes]) -> int:
    body.seek(0, io.SEEK_END)
    size = body.tell()
    body.seek(0)
    return size
