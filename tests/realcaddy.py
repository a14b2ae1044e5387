"""Real Caddy and real plugins from the Go module proxy, and xcaddy as the reference build.

The real proxy serves Caddy's version list but not every plugin's, so plugins are pinned to
versions it serves. xcaddy is installed with ``go install`` into the shared test cache (never
vendored) and runs with Kiln's pinned Go (``XCADDY_WHICH_GO``) and the same module and build
caches as the process sandbox.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

from kiln.worker.sandbox.process import find_go

#: Kiln's production defaults, which this machine reaches (the checksum database through
#: the proxy's /sumdb/ endpoint)
GOPROXY = "https://proxy.golang.org"
GOSUMDB = "sum.golang.org"
CADDY = "github.com/caddyserver/caddy/v2"
XCADDY = "github.com/caddyserver/xcaddy/cmd/xcaddy"
XCADDY_VERSION = "v0.4.5"

#: (package, module, version, a Caddy module id the package registers)
CLOUDFLARE = ("github.com/caddy-dns/cloudflare", "github.com/caddy-dns/cloudflare", "v0.2.1",
              "dns.providers.cloudflare")
RATELIMIT = ("github.com/mholt/caddy-ratelimit", "github.com/mholt/caddy-ratelimit", "v0.1.0",
             "http.handlers.rate_limit")
#: asked by a package path inside its module
L4TLS = ("github.com/mholt/caddy-l4/modules/l4tls", "github.com/mholt/caddy-l4", "v0.1.2",
         "layer4.handlers.tls")
#: caddy-l4 v0.1.2's go.mod requires this Caddy: older ones cannot take it
L4_NEEDS_CADDY = "v2.11.4"
#: a pinned older Caddy the proxy serves
CADDY_PINNED = "v2.10.2"

#: seconds a real build may take on a cold 2-core machine (fetch ~2 min, compile ~1 min)
BUILD_TIMEOUT_SECONDS = 900.0


def pin(plugin: tuple[str, str, str, str]) -> str:
    """Return ``package@version`` for a request."""
    return f"{plugin[0]}@{plugin[2]}"


def newest_caddy(minor: str = "v2.11.") -> str:
    """Ask the proxy for Caddy's versions; return the newest release starting with ``minor``."""
    with urllib.request.urlopen(f"{GOPROXY}/{CADDY}/@v/list", timeout=30) as resp:
        listed = resp.read().decode().split()
    found = [v for v in listed if v.startswith(minor) and re.fullmatch(r"v\d+\.\d+\.\d+", v)]
    assert found, f"the proxy lists no {minor}x release of Caddy: {listed}"
    return max(found, key=lambda v: tuple(int(n) for n in v[1:].split(".")))


def go_env(cache_dir: Path, home: Path) -> dict[str, str]:
    """Return a clean environment for the go command with the process sandbox's caches."""
    go = find_go().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": f"{go.parent}:/usr/bin:/bin",
        "HOME": str(home),
        "GOENV": "off",
        "GOTOOLCHAIN": "local",
        "GOTELEMETRY": "off",
        "GOMODCACHE": str(cache_dir / "mod"),
        "GOCACHE": str(cache_dir / "build"),
        "GOPROXY": GOPROXY,
        "GOSUMDB": GOSUMDB,
        "SSL_CERT_FILE": os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
    }


@functools.cache
def xcaddy(cache_dir: Path) -> Path:
    """Install xcaddy v0.4.5 with ``go install`` into ``cache_dir/bin``; return its path."""
    bindir = cache_dir / "bin" / f"xcaddy-{XCADDY_VERSION}"
    binary = bindir / "xcaddy"
    if not binary.exists():
        env = {**go_env(cache_dir, cache_dir / "home"), "GOBIN": str(bindir),
               "CGO_ENABLED": "0"}
        subprocess.run([str(find_go()), "install", f"{XCADDY}@{XCADDY_VERSION}"], env=env,
                       check=True, capture_output=True, timeout=600)
    return binary


def xcaddy_build(cache_dir: Path, workdir: Path, *, caddy_version: str,
                 packages: Iterable[str], goos: str = "linux", goarch: str = "amd64",
                 extra_env: Mapping[str, str] | None = None) -> Path:
    """Run ``xcaddy build VERSION --with PKG@VER…`` as a user would; return the binary."""
    workdir.mkdir(parents=True, exist_ok=True)
    output = workdir / f"caddy-xcaddy-{goos}-{goarch}"
    args = [str(xcaddy(cache_dir)), "build", caddy_version, "--output", str(output)]
    for package in packages:
        args += ["--with", package]
    env = {**go_env(cache_dir, workdir / "home"), "XCADDY_WHICH_GO": str(find_go().resolve()),
           "GOOS": goos, "GOARCH": goarch, **(extra_env or {})}
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_SECONDS, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return output


def go_version_m(binary: Path) -> str:
    """Return what ``go version -m`` prints of a binary (its build info)."""
    out = subprocess.run([str(find_go()), "version", "-m", str(binary)], capture_output=True,
                         text=True, check=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "GOENV": "off", "HOME": "/nonexistent",
                              "GOTOOLCHAIN": "local"}).stdout
    return out.split("\n", 1)[1]
