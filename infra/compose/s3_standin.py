#!/usr/local/bin/python3
"""MinIO's command line over moto's S3 server: the S3 of infra/compose without a registry.

The compose file runs ``minio server /data ...`` (service minio), ``mc ready local`` (its
health check) and a few ``mc`` commands (service minio-setup). This image answers the same
command lines, so that only the image names change (KILN_MINIO_IMAGE, KILN_MC_IMAGE):

    minio server DIR [--address [HOST]:PORT] [--console-address ...]
        moto's S3 on PORT (9000), every request taken as S3 with the bucket in the path,
        whatever the Host header. The buckets and objects are kept in DIR/moto-s3.pickle:
        loaded at start, rewritten after every write that changes them and before the
        response is sent, so what a client was told is stored survives a restart (a
        volume on DIR keeps it across ``docker compose down``/``up``). Rewriting the
        whole state on each write suits tests and evaluation, not a production store.
    mc alias set NAME URL [ACCESS_KEY SECRET_KEY]
    mc ready ALIAS
    mc mb [--ignore-existing] ALIAS/BUCKET
    mc ilm rule ls ALIAS/BUCKET
    mc ilm rule add [--prefix PREFIX] --expire-days N ALIAS/BUCKET

``local`` is the alias of http://127.0.0.1:9000, as in MinIO's image. Signatures are not
checked (moto's S3 checks none); any access key is accepted.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: where the server keeps its state, under the data directory
STATE_NAME = "moto-s3.pickle"
DEFAULT_PORT = 9000
#: aliases `mc alias set` records, as MinIO's mc keeps them in ~/.mc
ALIASES = Path(os.environ.get("MC_CONFIG_DIR", Path.home() / ".mc")) / "kiln-aliases.json"
LOCAL_ALIAS = {"url": f"http://127.0.0.1:{DEFAULT_PORT}", "access_key": "local",
               "secret_key": "local"}
#: methods that may change what the store holds
WRITES = frozenset({"PUT", "POST", "DELETE"})


# -- the server ---------------------------------------------------------------------------


def _backends() -> Any:
    from moto.s3.models import s3_backends

    return s3_backends


def save_state(path: Path) -> None:
    """Write every S3 backend (buckets, objects, lifecycle rules) to ``path`` atomically."""
    backends = _backends()
    state = {
        "backends": {(account, region): backend
                     for account, regions in backends.items()
                     for region, backend in regions.items()},
        "bucket_accounts": dict(backends.bucket_accounts),
    }
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> int:
    """Restore what ``save_state`` wrote; return the number of buckets."""
    if not path.exists():
        return 0
    with path.open("rb") as f:
        state = pickle.load(f)  # noqa: S301 - our own file, in our own volume
    backends = _backends()
    for (account, region), backend in state["backends"].items():
        backends[account][region] = backend
    backends.bucket_accounts.update(state["bucket_accounts"])
    return sum(len(b.buckets) for b in state["backends"].values())


class Persisting:
    """WSGI middleware: serialize writes and save the state before answering them."""

    def __init__(self, app: Callable[..., Iterable[bytes]], path: Path) -> None:
        self.app = app
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") not in WRITES:
            return self.app(environ, start_response)
        captured: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured[:] = [status, headers, exc_info]
            return lambda data: None

        with self.lock:
            body = b"".join(self.app(environ, capture))
            if captured and captured[0][:1] == "2":
                save_state(self.path)
        start_response(*captured)
        return [body]


def _address(args: list[str]) -> tuple[str, int]:
    host, port = "0.0.0.0", DEFAULT_PORT
    if "--address" in args:
        value = args[args.index("--address") + 1]
        given_host, _, given_port = value.rpartition(":")
        host, port = given_host or host, int(given_port)
    return host, port


def server(args: list[str]) -> int:
    """Run moto's S3 with its state kept in the data directory (``minio server DIR``)."""
    os.environ.setdefault("S3_IGNORE_SUBDOMAIN_BUCKETNAME", "true")
    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    directories = [a for a in args if not a.startswith("-")]
    # values of --options are not directories
    for option in ("--address", "--console-address"):
        if option in args:
            directories.remove(args[args.index(option) + 1])
    if not directories:
        print("usage: minio server DIR [--address [HOST]:PORT]", file=sys.stderr)
        return 2
    data = Path(directories[0])
    data.mkdir(parents=True, exist_ok=True)
    state = data / STATE_NAME
    try:
        buckets = load_state(state)
    except Exception as exc:  # a damaged file, or one another moto version wrote
        print(f"minio: cannot restore {state}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    host, port = _address(args)
    os.environ.setdefault("MOTO_PORT", str(port))
    print(f"S3 (moto) on {host}:{port}, {buckets} bucket(s) from {state}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # S3's application alone: every request is S3's, whatever its host or signature
    app = Persisting(create_backend_app("s3"), state)
    run_simple(host, port, app, threaded=True, request_handler=MotoRequestHandler)
    return 0


# -- mc -----------------------------------------------------------------------------------


def _aliases() -> dict[str, dict[str, str]]:
    try:
        known: dict[str, dict[str, str]] = json.loads(ALIASES.read_text())
    except (OSError, ValueError):
        known = {}
    return {"local": LOCAL_ALIAS, **known}


def _client(alias: str) -> Any:
    import boto3
    from botocore.config import Config

    found = _aliases().get(alias)
    if found is None:
        raise SystemExit(f"mc: no alias {alias!r} (mc alias set {alias} URL KEY SECRET)")
    return boto3.client("s3", endpoint_url=found["url"], region_name="us-east-1",
                        aws_access_key_id=found["access_key"] or "kiln",
                        aws_secret_access_key=found["secret_key"] or "kiln",
                        config=Config(s3={"addressing_style": "path"},
                                      retries={"max_attempts": 1}, connect_timeout=3,
                                      read_timeout=10))


def _target(value: str) -> tuple[str, str]:
    alias, _, bucket = value.partition("/")
    if not bucket:
        raise SystemExit(f"mc: {value!r} names no bucket (ALIAS/BUCKET)")
    return alias, bucket.strip("/")


def _option(args: list[str], name: str) -> str | None:
    if name in args:
        index = args.index(name)
        value = args[index + 1]
        del args[index:index + 2]
        return value
    return None


def _rules(client: Any, bucket: str) -> list[dict[str, Any]]:
    from botocore.exceptions import ClientError

    try:
        rules: list[dict[str, Any]] = client.get_bucket_lifecycle_configuration(
            Bucket=bucket)["Rules"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchLifecycleConfiguration":
            return []
        raise
    return rules


def mc(args: list[str]) -> int:
    """The subset of MinIO's mc that infra/compose uses."""
    from botocore.exceptions import BotoCoreError, ClientError

    args = list(args)
    try:
        match args:
            case ["alias", "set", name, url, *keys]:
                known = {k: v for k, v in _aliases().items() if k != "local"}
                access, secret = (keys + ["", ""])[:2]
                known[name] = {"url": url, "access_key": access, "secret_key": secret}
                ALIASES.parent.mkdir(parents=True, exist_ok=True)
                ALIASES.write_text(json.dumps(known))
                print(f"Added `{name}` successfully.")
            case ["ready", alias]:
                _client(alias).list_buckets()
                print(f"The cluster '{alias}' is ready")
            case ["mb", *rest]:
                ignore = "--ignore-existing" in rest or "-p" in rest
                (target,) = [a for a in rest if not a.startswith("-")]
                alias, bucket = _target(target)
                client = _client(alias)
                try:
                    client.create_bucket(Bucket=bucket)
                    print(f"Bucket created successfully `{target}`.")
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code")
                    if not ignore or code not in ("BucketAlreadyOwnedByYou",
                                                  "BucketAlreadyExists"):
                        raise
            case ["ilm", "rule", "ls", target]:
                alias, bucket = _target(target)
                for existing in _rules(_client(alias), bucket):
                    where = existing.get("Filter", {}).get("Prefix", existing.get("Prefix", ""))
                    expires = existing.get("Expiration", {}).get("Days", "")
                    print(f"{existing.get('ID', '')} {existing.get('Status', '')} {where} "
                          f"expire-days={expires}")
            case ["ilm", "rule", "add", *rest]:
                prefix = _option(rest, "--prefix") or ""
                days = _option(rest, "--expire-days")
                (target,) = rest
                alias, bucket = _target(target)
                client = _client(alias)
                rules = _rules(client, bucket)
                rule: dict[str, Any] = {"ID": f"rule-{len(rules) + 1}", "Status": "Enabled",
                                        "Filter": {"Prefix": prefix}}
                if days:
                    rule["Expiration"] = {"Days": int(days)}
                client.put_bucket_lifecycle_configuration(
                    Bucket=bucket, LifecycleConfiguration={"Rules": [*rules, rule]})
                print(f"Lifecycle configuration rule added with ID `{rule['ID']}` "
                      f"to {target}.")
            case _:
                print(f"mc: not supported here: {' '.join(args)}", file=sys.stderr)
                return 2
    except (ClientError, BotoCoreError, OSError) as exc:
        print(f"mc: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    """Dispatch on the name the program was called by: minio or mc."""
    name = Path(argv[0]).name
    args = argv[1:]
    if name == "mc":
        return mc(args)
    if args[:1] == ["server"]:
        return server(args[1:])
    print("usage: minio server DIR [--address [HOST]:PORT] | mc ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
