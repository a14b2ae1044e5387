"""The janitor job that mirrors an upstream plugin catalog."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

from kiln.db.catalog import CatalogStore
from kiln.request.catalog import (
    MIRROR_MAX_BYTES,
    MIRROR_TIMEOUT_SECONDS,
    USER_AGENT,
    CatalogError,
    parse_packages,
)

log = logging.getLogger(__name__)


class CatalogMirror:
    """Copy an upstream /api/packages into the database (a janitor job)."""

    def __init__(self, *, store: CatalogStore, url: str,
                 timeout: float = MIRROR_TIMEOUT_SECONDS,
                 max_bytes: int = MIRROR_MAX_BYTES) -> None:
        self.store = store
        self.url = url
        self.timeout = timeout
        self.max_bytes = max_bytes
        # one opener: it honours HTTPS_PROXY/NO_PROXY from the environment
        self._opener = urllib.request.build_opener()

    def refresh(self) -> str:
        """Fetch the upstream catalog (conditionally) and store it; return what happened."""
        row = self.store.get_mirror(self.url)
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if row and row["fetched_at"] is not None:
            if row["etag"]:
                headers["If-None-Match"] = row["etag"]
            if row["last_modified"]:
                headers["If-Modified-Since"] = row["last_modified"]
        request = urllib.request.Request(self.url, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                body = resp.read(self.max_bytes + 1)
                etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 304:
                self.store.touch_mirror(self.url, error=None)
                return "unchanged"
            return self._failed(f"{self.url} answered {exc.code}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return self._failed(f"{self.url} is unreachable: {getattr(exc, 'reason', exc)}")
        if len(body) > self.max_bytes:
            return self._failed(f"{self.url} sent more than {self.max_bytes} bytes")
        try:
            packages = parse_packages(json.loads(body), source=self.url, strict=False)
        except (ValueError, CatalogError) as exc:
            return self._failed(f"{self.url} did not send a catalog: {exc}")
        if not packages:
            return self._failed(f"{self.url} listed no valid package; the last copy is kept")
        self.store.put_mirror(self.url, [p.to_dict() for p in packages], etag=etag,
                              last_modified=modified)
        return f"mirrored {len(packages)} packages from {self.url}"

    def _failed(self, message: str) -> str:
        log.warning("catalog mirror: %s", message)
        self.store.touch_mirror(self.url, error=message)
        return ""
