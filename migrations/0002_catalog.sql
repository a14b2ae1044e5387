-- The plugin catalog mirrored from an upstream /api/packages URL by the janitor, one row per
-- source URL. API processes read it; the conditional-request fields keep refreshes cheap.

CREATE TABLE kiln_catalog (
    source          text PRIMARY KEY,
    packages        jsonb NOT NULL DEFAULT '[]'::jsonb,
    etag            text,
    last_modified   text,
    fetched_at      timestamptz,
    checked_at      timestamptz NOT NULL DEFAULT now(),
    error           text
);
