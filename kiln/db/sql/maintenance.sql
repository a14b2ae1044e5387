-- The janitor's queries, by name: job turns and locks, storage GC, pruning.
-- Loaded by kiln/janitor/scheduler.py. Queue jobs (lease expiry, gone workers, resolutions) use
-- kiln/db/sql/builds.sql through QueueManager.

-- name: try_lock
-- A session advisory lock per job: a second janitor skips the job while one runs it.
SELECT pg_try_advisory_lock(%(class)s, %(id)s) AS locked;

-- name: unlock
SELECT pg_advisory_unlock(%(class)s, %(id)s) AS unlocked;

-- name: take_turn
-- Take the job's turn unless some janitor started it within `min_gap` seconds; the row
-- lock of the upsert lets exactly one of several concurrent callers win.
INSERT INTO kiln_janitor_runs AS r (job, started_at)
VALUES (%(job)s, now())
ON CONFLICT (job) DO UPDATE
   SET started_at = now(), finished_at = NULL, ok = NULL, result = NULL
 WHERE r.started_at <= now() - make_interval(secs => %(min_gap)s)
RETURNING job;

-- name: finish_turn
UPDATE kiln_janitor_runs
   SET finished_at = now(), ok = %(ok)s, result = %(result)s
 WHERE job = %(job)s;

-- name: runs
SELECT job, started_at, finished_at, ok, result FROM kiln_janitor_runs ORDER BY job;

-- name: db_now
SELECT now() AS now;

-- name: expired_artifacts
-- Succeeded builds whose artifact was not downloaded (or, never downloaded, not built)
-- within `seconds`; kiln_builds_last_use_idx serves it.
SELECT key
  FROM kiln_builds
 WHERE state = 'succeeded' AND artifact_path IS NOT NULL
   AND coalesce(last_downloaded_at, finished_at) < now() - make_interval(secs => %(seconds)s)
 ORDER BY coalesce(last_downloaded_at, finished_at), key
 LIMIT %(limit)s;

-- name: artifacts_by_last_use
-- Succeeded builds holding an artifact, least recently used first, a page after a cursor.
SELECT key, coalesce(last_downloaded_at, finished_at) AS last_used
  FROM kiln_builds
 WHERE state = 'succeeded' AND artifact_path IS NOT NULL
   AND (coalesce(last_downloaded_at, finished_at), key)
       > (%(after_used)s::timestamptz, %(after_key)s::text)
 ORDER BY coalesce(last_downloaded_at, finished_at), key
 LIMIT %(limit)s;

-- name: lock_artifact
-- Lock a build whose artifact is to be collected, re-checking under the lock that it still
-- qualifies (not downloaded meanwhile, not already collected or being rebuilt). A request
-- that would queue it again waits for this transaction, so a rebuild never races the delete.
SELECT key
  FROM kiln_builds
 WHERE key = %(key)s AND state = 'succeeded' AND artifact_path IS NOT NULL
   AND (%(older_than)s::float8 IS NULL
        OR coalesce(last_downloaded_at, finished_at)
           < now() - make_interval(secs => %(older_than)s::float8))
   FOR UPDATE;

-- name: lock_build
-- Lock any build row (to decide whether stored objects are orphans or missing).
SELECT key, state, artifact_path, finished_at
  FROM kiln_builds
 WHERE key = %(key)s
   FOR UPDATE;

-- name: detach_artifact
-- The build stays succeeded but without an artifact; asking for it again rebuilds it.
UPDATE kiln_builds
   SET artifact_path = NULL, artifact_size = NULL, artifact_sha256 = NULL, updated_at = now()
 WHERE key = %(key)s;

-- name: published
-- Every succeeded build holding an artifact, and when it finished.
SELECT key, artifact_path, finished_at
  FROM kiln_builds
 WHERE state = 'succeeded' AND artifact_path IS NOT NULL;

-- name: prune_attempts
-- Finished attempts older than `seconds`, in batches (each its own short statement).
WITH doomed AS (
    SELECT id
      FROM kiln_attempts
     WHERE outcome <> 'running' AND finished_at < now() - make_interval(secs => %(seconds)s)
     LIMIT %(batch)s
)
DELETE FROM kiln_attempts a USING doomed WHERE a.id = doomed.id;

-- name: prune_workers
-- Gone workers older than `seconds`; the newest worker stays (new build keys take the
-- toolchain of the most recent worker, even a gone one).
DELETE FROM kiln_workers
 WHERE state = 'gone' AND stopped_at < now() - make_interval(secs => %(seconds)s)
   AND id <> (SELECT id FROM kiln_workers ORDER BY started_at DESC LIMIT 1);

-- name: table_exists
SELECT to_regclass(%(name)s) IS NOT NULL AS present;

-- name: prune_logs
-- Build log lines older than `seconds` (kiln_build_logs, migration 0003), in batches.
WITH doomed AS (
    SELECT build_key, attempt, seq
      FROM kiln_build_logs
     WHERE at < now() - make_interval(secs => %(seconds)s)
     LIMIT %(batch)s
)
DELETE FROM kiln_build_logs l USING doomed
 WHERE (l.build_key, l.attempt, l.seq) = (doomed.build_key, doomed.attempt, doomed.seq);
