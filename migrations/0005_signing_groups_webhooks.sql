-- Signed artifacts and their attestations, multi-platform build groups, and webhooks.

-- The public keys workers sign with (private keys never leave the workers). A worker
-- records its key when it starts and each time it signs, so the API can serve it.
CREATE TABLE kiln_signing_keys (
    key_id          text PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{64}$'),
    algorithm       text NOT NULL DEFAULT 'ed25519' CHECK (algorithm IN ('ed25519')),
    -- base64 of the raw 32-byte public key
    public_key      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz NOT NULL DEFAULT now()
);

-- What a worker published next to a build's artifact (checksum, signature, provenance,
-- SBOM) before marking it succeeded. key_id is NULL when the worker had no signing key.
CREATE TABLE kiln_attestations (
    build_key       text PRIMARY KEY REFERENCES kiln_builds (key) ON DELETE CASCADE,
    artifact_sha256 text NOT NULL CHECK (artifact_sha256 ~ '^[0-9a-f]{64}$'),
    key_id          text,
    -- store paths: {"checksum", "signature", "provenance", "sbom"}
    files           jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- `kiln verify FILE` finds a build by the sha256 of the file it holds.
CREATE INDEX kiln_attestations_sha256_idx ON kiln_attestations (artifact_sha256);

-- One request for several platforms: its builds, in the order asked. The id is derived
-- from the keys, so the same request names the same group.
CREATE TABLE kiln_groups (
    id              text PRIMARY KEY CHECK (id ~ '^g_[0-9a-f]{32}$'),
    keys            text[] NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- A callback per (build, URL): 'waiting' until the build reaches a final state, then
-- 'pending' with the payload snapshot until delivered (or failed after max attempts).
CREATE TABLE kiln_webhooks (
    id              bigserial PRIMARY KEY,
    build_key       text NOT NULL REFERENCES kiln_builds (key) ON DELETE CASCADE,
    url             text NOT NULL,
    -- the URL the requester reached Kiln at: links in the payload are made absolute with it
    base_url        text NOT NULL DEFAULT '',
    state           text NOT NULL DEFAULT 'waiting'
                    CHECK (state IN ('waiting', 'pending', 'delivered', 'failed')),
    payload         jsonb,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    fired_at        timestamptz,
    finished_at     timestamptz
);
-- The same callback asked twice for one build waits once.
CREATE UNIQUE INDEX kiln_webhooks_waiting_idx ON kiln_webhooks (build_key, url)
    WHERE state = 'waiting';
-- The delivery sweep takes due pending callbacks in this order.
CREATE INDEX kiln_webhooks_due_idx ON kiln_webhooks (next_attempt_at) WHERE state = 'pending';
