-- Build logs: every line the steps of each attempt printed, written by workers in batches.
-- (build_key, attempt, seq) orders a build's log and is the cursor of live watchers: seq
-- counts up from 1 within an attempt, and attempt is kiln_attempts.number.

CREATE TABLE kiln_build_logs (
    build_key   text NOT NULL REFERENCES kiln_builds (key) ON DELETE CASCADE,
    attempt     integer NOT NULL CHECK (attempt > 0),
    seq         integer NOT NULL CHECK (seq > 0),
    step        text NOT NULL,
    line        text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (build_key, attempt, seq)
);

-- Lines arrive in time order, so a BRIN index makes pruning by age cheap to maintain.
CREATE INDEX kiln_build_logs_at_idx ON kiln_build_logs USING brin (at);

-- Watchers ask for a build's latest attempt number; without this it is a scan of every attempt.
CREATE INDEX kiln_attempts_build_key_idx ON kiln_attempts (build_key, number);
