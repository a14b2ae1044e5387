-- Builds, their attempts, and the workers that run them.

CREATE TABLE kiln_builds (
    key                 text PRIMARY KEY CHECK (key ~ '^[0-9a-f]{64}$'),
    spec                jsonb NOT NULL,
    state               text NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    priority            integer NOT NULL DEFAULT 0,
    attempts            integer NOT NULL DEFAULT 0,
    max_attempts        integer NOT NULL DEFAULT 3,
    worker_id           text,
    lease_expires_at    timestamptz,
    run_after           timestamptz NOT NULL DEFAULT now(),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    queued_at           timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    error               text,
    error_kind          text CHECK (error_kind IN ('permanent', 'retryable')),
    artifact_path       text,
    artifact_size       bigint,
    artifact_sha256     text,
    downloads           bigint NOT NULL DEFAULT 0,
    last_downloaded_at  timestamptz,
    requested_by        text
);

-- The claim query orders queued builds by priority, then age: this index matches it.
CREATE INDEX kiln_builds_claim_idx ON kiln_builds (priority DESC, queued_at, key)
    WHERE state = 'queued';
CREATE INDEX kiln_builds_lease_idx ON kiln_builds (lease_expires_at) WHERE state = 'running';
CREATE INDEX kiln_builds_created_idx ON kiln_builds (created_at DESC);

CREATE TABLE kiln_workers (
    id              text PRIMARY KEY,
    hostname        text NOT NULL,
    pid             integer NOT NULL,
    state           text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'gone')),
    concurrency     integer NOT NULL,
    sandbox         text NOT NULL,
    go_version      text NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    stopped_at      timestamptz
);

CREATE TABLE kiln_attempts (
    id              bigserial PRIMARY KEY,
    build_key       text NOT NULL REFERENCES kiln_builds (key) ON DELETE CASCADE,
    number          integer NOT NULL,
    worker_id       text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    outcome         text NOT NULL DEFAULT 'running'
                    CHECK (outcome IN ('running', 'succeeded', 'failed', 'lost', 'preempted', 'cancelled')),
    error           text
);
CREATE INDEX kiln_attempts_running_idx ON kiln_attempts (build_key) WHERE outcome = 'running';

-- Version resolutions shared by every API process: absolute versions for good,
-- queries such as "latest" until expires_at.
CREATE TABLE kiln_resolutions (
    module          text NOT NULL,
    query           text NOT NULL,
    version         text NOT NULL,
    resolved_at     timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    PRIMARY KEY (module, query)
);
