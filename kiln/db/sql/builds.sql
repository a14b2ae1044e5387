-- Every query Kiln runs against its queue, by name. Loaded by kiln/db/builds.py.
-- Channels: kiln_queue (payload: build key; wakes workers),
--           kiln_events (payload: {"key","state"}; wakes API waiters).

-- name: enqueue
-- Insert a build, or requeue one whose earlier outcome can change (cancelled, failed for a
-- retryable reason, or succeeded but its artifact was collected). Returns a row only when
-- the build was (re)queued.
INSERT INTO kiln_builds AS b (key, spec, priority, max_attempts, requested_by)
VALUES (%(key)s, %(spec)s, %(priority)s, %(max_attempts)s, %(requested_by)s)
ON CONFLICT (key) DO UPDATE
   SET state = 'queued', attempts = 0, error = NULL, error_kind = NULL,
       worker_id = NULL, lease_expires_at = NULL, started_at = NULL, finished_at = NULL,
       queued_at = now(), run_after = now(), updated_at = now(),
       priority = GREATEST(b.priority, EXCLUDED.priority),
       requested_by = COALESCE(EXCLUDED.requested_by, b.requested_by)
 WHERE b.state = 'cancelled'
    OR (b.state = 'failed' AND b.error_kind = 'retryable')
    OR (b.state = 'succeeded' AND b.artifact_path IS NULL)
RETURNING b.key;

-- name: raise_priority
-- A queued build asked for again at a higher priority takes it (its place in the queue
-- otherwise stays). Returns the row when it was raised.
UPDATE kiln_builds
   SET priority = %(priority)s, updated_at = now()
 WHERE key = %(key)s AND state = 'queued' AND priority < %(priority)s
RETURNING key, spec, state, priority, attempts, max_attempts, worker_id, lease_expires_at,
          run_after, created_at, updated_at, queued_at, started_at, finished_at, error,
          error_kind, artifact_path, artifact_size, artifact_sha256, downloads,
          last_downloaded_at, requested_by;

-- name: notify_queued
SELECT pg_notify('kiln_queue', %(key)s), pg_notify('kiln_events', json_build_object('key', %(key)s::text, 'state', 'queued')::text);

-- name: get_build
SELECT key, spec, state, priority, attempts, max_attempts, worker_id, lease_expires_at,
       run_after, created_at, updated_at, queued_at, started_at, finished_at, error, error_kind,
       artifact_path, artifact_size, artifact_sha256, downloads, last_downloaded_at,
       requested_by
  FROM kiln_builds
 WHERE key = %(key)s;

-- name: queue_position
-- Builds that a worker would claim before this one (0: next): those of its sandbox and Go
-- (see claim).
SELECT count(*)
  FROM kiln_builds q, kiln_builds b
 WHERE b.key = %(key)s AND b.state = 'queued' AND q.state = 'queued'
   AND q.spec->>'sandbox' IS NOT DISTINCT FROM b.spec->>'sandbox'
   AND q.spec->>'go_version' IS NOT DISTINCT FROM b.spec->>'go_version'
   AND (q.priority > b.priority
        OR (q.priority = b.priority AND (q.queued_at, q.key) < (b.queued_at, b.key)));

-- name: list_builds
SELECT key, spec, state, attempts, created_at, finished_at, error, artifact_size
  FROM kiln_builds
 ORDER BY created_at DESC
 LIMIT %(limit)s;

-- name: claim
-- Claim up to `limit` builds in priority then age order; SKIP LOCKED lets any number of
-- workers claim at once without waiting. Only builds keyed with the worker's sandbox
-- identity and Go version: the key and the provenance name them, so a build waits for a
-- worker that has them. kiln_builds_claim_toolchain_idx (migrations/0008) serves both the
-- filter and the ORDER BY; plain equalities keep it usable by a prepared (generic) plan.
-- Tools and tests that build nothing claim builds of any toolchain, in the same order
-- (kiln_builds_claim_idx matches it), with this statement less its lines marked
-- "toolchain" (kiln/db/builds.py).
WITH next AS (
    SELECT key
      FROM kiln_builds
     WHERE state = 'queued' AND run_after <= now()
       AND spec->>'sandbox' = %(sandbox)s::text  -- toolchain
       AND spec->>'go_version' = %(go_version)s::text  -- toolchain
     ORDER BY priority DESC, queued_at, key
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE kiln_builds b
       SET state = 'running', attempts = b.attempts + 1, worker_id = %(worker_id)s,
           lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
           started_at = now(), updated_at = now()
      FROM next
     WHERE b.key = next.key
 RETURNING b.key, b.spec, b.attempts, b.max_attempts
), attempt AS (
    INSERT INTO kiln_attempts (build_key, number, worker_id)
    SELECT c.key,
           (SELECT count(*) + 1 FROM kiln_attempts a WHERE a.build_key = c.key),
           %(worker_id)s
      FROM claimed c
    RETURNING build_key, number
)
SELECT c.key, c.spec, c.attempts, c.max_attempts, a.number,
       pg_notify('kiln_events', json_build_object('key', c.key, 'state', 'running')::text)
  FROM claimed c JOIN attempt a ON a.build_key = c.key;

-- name: extend_leases
-- Returns the keys still held; a key missing from the result was taken away (cancelled,
-- or requeued after the lease expired) and its build must stop.
UPDATE kiln_builds
   SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
 WHERE key = ANY(%(keys)s) AND worker_id = %(worker_id)s AND state = 'running'
RETURNING key;

-- name: complete
WITH done AS (
    UPDATE kiln_builds
       SET state = 'succeeded', finished_at = now(), updated_at = now(),
           lease_expires_at = NULL, error = NULL, error_kind = NULL,
           artifact_path = %(artifact_path)s, artifact_size = %(artifact_size)s,
           artifact_sha256 = %(artifact_sha256)s
     WHERE key = %(key)s AND worker_id = %(worker_id)s AND state = 'running'
       AND (%(attempt)s::int IS NULL OR EXISTS (
            SELECT 1 FROM kiln_attempts a
             WHERE a.build_key = %(key)s AND a.number = %(attempt)s AND a.outcome = 'running'))
 RETURNING key
), attempt AS (
    UPDATE kiln_attempts a
       SET outcome = 'succeeded', finished_at = now()
      FROM done
     WHERE a.build_key = done.key AND a.outcome = 'running'
)
SELECT key, pg_notify('kiln_events', json_build_object('key', key, 'state', 'succeeded')::text)
  FROM done;

-- name: fail
-- A retryable failure with attempts left goes back to the queue after a backoff;
-- anything else fails for good.
WITH done AS (
    UPDATE kiln_builds
       SET state = CASE WHEN %(retryable)s AND attempts < max_attempts
                        THEN 'queued' ELSE 'failed' END,
           run_after = now() + make_interval(secs => %(retry_after)s),
           queued_at = CASE WHEN %(retryable)s AND attempts < max_attempts
                            THEN now() ELSE queued_at END,
           finished_at = CASE WHEN %(retryable)s AND attempts < max_attempts
                              THEN NULL ELSE now() END,
           worker_id = NULL, lease_expires_at = NULL, updated_at = now(),
           error = %(error)s,
           error_kind = CASE WHEN %(retryable)s THEN 'retryable' ELSE 'permanent' END
     WHERE key = %(key)s AND worker_id = %(worker_id)s AND state = 'running'
       AND (%(attempt)s::int IS NULL OR EXISTS (
            SELECT 1 FROM kiln_attempts a
             WHERE a.build_key = %(key)s AND a.number = %(attempt)s AND a.outcome = 'running'))
 RETURNING key, state
), attempt AS (
    UPDATE kiln_attempts a
       SET outcome = 'failed', finished_at = now(), error = %(error)s
      FROM done
     WHERE a.build_key = done.key AND a.outcome = 'running'
)
SELECT key, state,
       pg_notify('kiln_events', json_build_object('key', key, 'state', state)::text)
  FROM done;

-- name: release
-- Hand a running build back to the queue at once (preemption, shutdown). The attempt is
-- recorded with `outcome` and, unless `spend` is true, not counted against max_attempts.
WITH done AS (
    UPDATE kiln_builds
       SET state = 'queued', worker_id = NULL, lease_expires_at = NULL,
           attempts = CASE WHEN %(spend)s THEN attempts ELSE greatest(attempts - 1, 0) END,
           run_after = now(), updated_at = now()
     WHERE key = %(key)s AND worker_id = %(worker_id)s AND state = 'running'
       AND (%(attempt)s::int IS NULL OR EXISTS (
            SELECT 1 FROM kiln_attempts a
             WHERE a.build_key = %(key)s AND a.number = %(attempt)s AND a.outcome = 'running'))
 RETURNING key
), attempt AS (
    UPDATE kiln_attempts a
       SET outcome = %(outcome)s, finished_at = now()
      FROM done
     WHERE a.build_key = done.key AND a.outcome = 'running'
)
SELECT key, pg_notify('kiln_queue', key),
       pg_notify('kiln_events', json_build_object('key', key, 'state', 'queued')::text)
  FROM done;

-- name: requeue_expired
-- Running builds whose lease ran out (worker killed or cut off) go back to the queue at
-- once, their attempt recorded as lost; past max_attempts they fail.
WITH expired AS (
    SELECT key
      FROM kiln_builds
     WHERE state = 'running' AND lease_expires_at < now()
       FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE kiln_builds b
       SET state = CASE WHEN b.attempts < b.max_attempts THEN 'queued' ELSE 'failed' END,
           error = CASE WHEN b.attempts < b.max_attempts THEN b.error
                        ELSE 'the build was lost ' || b.attempts || ' times (worker stopped or unreachable)' END,
           error_kind = CASE WHEN b.attempts < b.max_attempts THEN b.error_kind ELSE 'retryable' END,
           finished_at = CASE WHEN b.attempts < b.max_attempts THEN NULL ELSE now() END,
           worker_id = NULL, lease_expires_at = NULL, run_after = now(), queued_at = now(),
           updated_at = now()
      FROM expired
     WHERE b.key = expired.key
 RETURNING b.key, b.state
), attempt AS (
    UPDATE kiln_attempts a
       SET outcome = 'lost', finished_at = now(), error = 'lease expired'
      FROM moved
     WHERE a.build_key = moved.key AND a.outcome = 'running'
)
SELECT key, state,
       CASE WHEN state = 'queued' THEN pg_notify('kiln_queue', key) END,
       pg_notify('kiln_events', json_build_object('key', key, 'state', state)::text)
  FROM moved;

-- name: fail_unclaimable
-- Queued builds keyed with a toolchain (sandbox identity, Go version) that no worker has
-- offered within `seconds`, and waiting longer than that, fail with what they need and what
-- the workers offer, instead of waiting forever (a rollout replaced the fleet's image or Go).
-- The toolchain new builds are keyed with (the newest worker's, see toolchain) counts as
-- offered even when no worker runs: a fleet scaled to zero comes back with it. A retryable
-- error: asking again keys the build with the toolchain the workers have.
WITH offered AS (
    SELECT DISTINCT sandbox, go_version
      FROM kiln_workers
     WHERE heartbeat_at > now() - make_interval(secs => %(seconds)s)
        OR id = (SELECT id FROM kiln_workers ORDER BY started_at DESC LIMIT 1)
), fleet AS (
    SELECT coalesce(string_agg(format('sandbox %%s with %%s', sandbox, go_version), '; '
                               ORDER BY sandbox, go_version),
                    'nothing (no worker has registered)') AS offers
      FROM offered
), stranded AS (
    SELECT b.key
      FROM kiln_builds b
     WHERE b.state = 'queued' AND b.queued_at < now() - make_interval(secs => %(seconds)s)
       AND NOT EXISTS (SELECT 1 FROM offered o
                        WHERE o.sandbox = b.spec->>'sandbox'
                          AND o.go_version = b.spec->>'go_version')
     ORDER BY b.queued_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), failed AS (
    UPDATE kiln_builds b
       SET state = 'failed', finished_at = now(), updated_at = now(), error_kind = 'retryable',
           error = format('no build worker has offered the toolchain this build is keyed with '
                          '(sandbox %%s with %%s) within the last %%s; the workers offer %%s. '
                          'Ask for the build again: it is then keyed with their toolchain',
                          coalesce(b.spec->>'sandbox', '(none recorded)'),
                          coalesce(b.spec->>'go_version', '(none recorded)'),
                          %(after)s::text, fleet.offers)
      FROM stranded, fleet
     WHERE b.key = stranded.key
 RETURNING b.key, b.error
)
SELECT key, error,
       pg_notify('kiln_events', json_build_object('key', key, 'state', 'failed')::text)
  FROM failed;

-- name: next_run_after
-- When the earliest delayed build becomes claimable (for a worker's poll timer).
SELECT min(run_after) - now() FROM kiln_builds WHERE state = 'queued';

-- name: attempts
SELECT number, worker_id, started_at, finished_at, outcome, error
  FROM kiln_attempts
 WHERE build_key = %(key)s
 ORDER BY id;

-- name: popular_builds
-- The most downloaded succeeded builds of the last `window` seconds keyed with a worker's
-- toolchain: what a starting worker warms its caches with (worker.warm_up).
SELECT key, spec
  FROM kiln_builds
 WHERE state = 'succeeded' AND downloads > 0
   AND last_downloaded_at > now() - make_interval(secs => %(window)s)
   AND spec->>'sandbox' = %(sandbox)s::text AND spec->>'go_version' = %(go_version)s::text
 ORDER BY downloads DESC, last_downloaded_at DESC, key
 LIMIT %(limit)s;

-- name: record_download
UPDATE kiln_builds
   SET downloads = downloads + 1, last_downloaded_at = now()
 WHERE key = %(key)s;

-- name: register_worker
INSERT INTO kiln_workers (id, hostname, pid, concurrency, sandbox, go_version)
VALUES (%(id)s, %(hostname)s, %(pid)s, %(concurrency)s, %(sandbox)s, %(go_version)s)
ON CONFLICT (id) DO UPDATE
   SET hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, state = 'active',
       concurrency = EXCLUDED.concurrency, sandbox = EXCLUDED.sandbox,
       go_version = EXCLUDED.go_version,
       started_at = now(), heartbeat_at = now(), stopped_at = NULL;

-- name: worker_heartbeat
UPDATE kiln_workers SET heartbeat_at = now() WHERE id = %(id)s AND state <> 'gone';

-- name: set_worker_state
UPDATE kiln_workers
   SET state = %(state)s,
       stopped_at = CASE WHEN %(state)s = 'gone' THEN now() ELSE stopped_at END
 WHERE id = %(id)s;

-- name: mark_gone_workers
UPDATE kiln_workers
   SET state = 'gone', stopped_at = now()
 WHERE state <> 'gone' AND heartbeat_at < now() - make_interval(secs => %(seconds)s)
RETURNING id;

-- name: list_workers
SELECT id, hostname, pid, state, concurrency, sandbox, started_at, heartbeat_at, stopped_at,
       (SELECT count(*) FROM kiln_builds b WHERE b.worker_id = w.id AND b.state = 'running') AS running
  FROM kiln_workers w
 ORDER BY started_at DESC;

-- name: toolchain
-- The sandbox identity and Go version new build keys are made with: those of the most
-- recently started live worker, else of the most recent worker at all.
SELECT sandbox, go_version
  FROM kiln_workers
 ORDER BY (state = 'active' AND heartbeat_at > now() - make_interval(secs => %(seconds)s)) DESC,
          started_at DESC
 LIMIT 1;

-- name: live_workers
-- Workers that sent a heartbeat lately; with a sandbox identity and a Go version, only those
-- that have them (the ones that would claim a build keyed with them).
SELECT count(*) FROM kiln_workers
 WHERE state = 'active' AND heartbeat_at > now() - make_interval(secs => %(seconds)s)
   AND (%(sandbox)s::text IS NULL OR sandbox = %(sandbox)s::text)
   AND (%(go_version)s::text IS NULL OR go_version = %(go_version)s::text);

-- name: get_resolution
SELECT version, extract(epoch FROM resolved_at)::float8 AS stored_at
  FROM kiln_resolutions
 WHERE module = %(module)s AND query = %(query)s
   AND (expires_at IS NULL OR expires_at > now());

-- name: put_resolution
INSERT INTO kiln_resolutions (module, query, version, resolved_at, expires_at)
VALUES (%(module)s, %(query)s, %(version)s, to_timestamp(%(stored_at)s),
        CASE WHEN %(ttl)s::float8 IS NULL THEN NULL
             ELSE to_timestamp(%(stored_at)s) + make_interval(secs => %(ttl)s::float8) END)
ON CONFLICT (module, query) DO UPDATE
   SET version = EXCLUDED.version, resolved_at = EXCLUDED.resolved_at,
       expires_at = EXCLUDED.expires_at;

-- name: expire_resolutions
DELETE FROM kiln_resolutions WHERE expires_at IS NOT NULL AND expires_at <= now();

-- name: admin_list_builds
-- Every build, newest first, with who asked for it (a key id, or addr:<client address>)
-- and the name of that key; filters are optional.
-- Every column, so that build documents made from these rows see what get_build gives.
SELECT b.*, k.name AS key_name
  FROM kiln_builds b
  LEFT JOIN kiln_api_keys k ON k.id = b.requested_by
 WHERE (%(state)s::text IS NULL OR b.state = %(state)s::text)
   AND (%(requested_by)s::text IS NULL OR b.requested_by = %(requested_by)s::text)
   AND (%(before)s::timestamptz IS NULL OR b.created_at < %(before)s::timestamptz)
 ORDER BY b.created_at DESC
 LIMIT %(limit)s;

-- name: cancel
-- Cancel a queued or running build at once. A running one's worker hears kiln_cancel and
-- kills its sandbox; should it miss that, its next heartbeat finds the lease gone.
WITH target AS (
    SELECT key, state
      FROM kiln_builds
     WHERE key = %(key)s AND state IN ('queued', 'running')
       FOR UPDATE
), done AS (
    UPDATE kiln_builds b
       SET state = 'cancelled', finished_at = now(), updated_at = now(),
           lease_expires_at = NULL, error = %(reason)s, error_kind = NULL
      FROM target
     WHERE b.key = target.key
 RETURNING b.key, target.state AS was, b.worker_id
), attempt AS (
    UPDATE kiln_attempts a
       SET outcome = 'cancelled', finished_at = now(), error = %(reason)s
      FROM done
     WHERE a.build_key = done.key AND a.outcome = 'running'
)
SELECT key, was, worker_id,
       CASE WHEN was = 'running' THEN pg_notify('kiln_cancel', key) END,
       pg_notify('kiln_events', json_build_object('key', key, 'state', 'cancelled')::text)
  FROM done;

-- name: force_rebuild
-- Queue a finished build again (an operator's decision); its artifact stays attached until
-- the new one replaces it.
UPDATE kiln_builds
   SET state = 'queued', attempts = 0, error = NULL, error_kind = NULL, worker_id = NULL,
       lease_expires_at = NULL, started_at = NULL, finished_at = NULL,
       queued_at = now(), run_after = now(), updated_at = now()
 WHERE key = %(key)s AND state IN ('succeeded', 'failed', 'cancelled')
RETURNING key, pg_notify('kiln_queue', key),
          pg_notify('kiln_events', json_build_object('key', key, 'state', 'queued')::text);

-- name: forget_artifact
-- Detach a succeeded build from its stored files; asking for it again rebuilds it (see
-- enqueue).
UPDATE kiln_builds
   SET artifact_path = NULL, artifact_size = NULL, artifact_sha256 = NULL, updated_at = now()
 WHERE key = %(key)s AND state = 'succeeded' AND artifact_path IS NOT NULL
RETURNING key;
