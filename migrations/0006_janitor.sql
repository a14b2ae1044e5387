-- The janitor's bookkeeping, and indexes for storage GC and pruning.

-- One row per janitor job: when it last started and how it went. Any number of janitors
-- (long-running or one-shot) take a job's turn from this row, so each job runs about once
-- per interval between all of them.
CREATE TABLE kiln_janitor_runs (
    job             text PRIMARY KEY,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz,
    ok              boolean,
    result          text
);

-- Storage GC takes succeeded builds least recently used first (downloaded, else built).
CREATE INDEX kiln_builds_last_use_idx
    ON kiln_builds ((coalesce(last_downloaded_at, finished_at)), key)
    WHERE state = 'succeeded' AND artifact_path IS NOT NULL;

-- Pruning finds finished attempts by age.
CREATE INDEX kiln_attempts_finished_idx ON kiln_attempts (finished_at)
    WHERE outcome <> 'running';
