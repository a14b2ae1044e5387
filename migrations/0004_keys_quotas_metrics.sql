-- API keys, build quotas, and metrics shared by every API and worker process.

-- A key is shown once, at creation; only the sha256 of its token is kept.
CREATE TABLE kiln_api_keys (
    id                  text PRIMARY KEY CHECK (id ~ '^k_[0-9a-f]{12}$'),
    name                text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$'),
    scope               text NOT NULL CHECK (scope IN ('build', 'admin')),
    token_sha256        text NOT NULL UNIQUE CHECK (token_sha256 ~ '^[0-9a-f]{64}$'),
    -- passed to the queue as the priority of the builds this key starts
    priority            integer NOT NULL DEFAULT 0,
    -- new builds per quota window; NULL: the configured default for keys
    builds_per_window   integer CHECK (builds_per_window >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    last_used_at        timestamptz,
    revoked_at          timestamptz
);
-- A name names one live key; revoked keys keep theirs for the record.
CREATE UNIQUE INDEX kiln_api_keys_live_name_idx ON kiln_api_keys (name) WHERE revoked_at IS NULL;

-- One counter per subject ("key:<id>", "addr:<address>", with a "req:" prefix for the
-- all-requests limit) and fixed window; the row lock of the upsert serializes a subject's
-- requests across every API process.
CREATE TABLE kiln_quota_usage (
    subject         text NOT NULL,
    window_start    timestamptz NOT NULL,
    used            integer NOT NULL,
    PRIMARY KEY (subject, window_start)
);
CREATE INDEX kiln_quota_usage_window_idx ON kiln_quota_usage (window_start);

-- Counters and histograms recorded in process memory and added here in batches, so that
-- /metrics answers the same totals whichever API process serves the scrape.
-- For a counter only `count` is used; a histogram's `buckets` holds non-cumulative counts
-- for the upper bounds in `bounds` (the last bucket is +Inf).
CREATE TABLE kiln_metrics (
    name        text NOT NULL,
    labels      jsonb NOT NULL,
    count       double precision NOT NULL DEFAULT 0,
    sum         double precision NOT NULL DEFAULT 0,
    bounds      double precision[] NOT NULL DEFAULT '{}',
    buckets     double precision[] NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, labels)
);

-- Who asked for a build: the admin listing filters on it.
CREATE INDEX kiln_builds_requested_by_idx ON kiln_builds (requested_by, created_at DESC)
    WHERE requested_by IS NOT NULL;
