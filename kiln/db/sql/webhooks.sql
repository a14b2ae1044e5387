-- Webhook callbacks and their deliveries, by name. Loaded by kiln/db/webhooks.py (WebhookManager).

-- name: subscribe
-- One subscription per build, URL and requester, 'subscribed' until the build finishes;
-- asking again gives it the newest secret (the one the latest answer returned). 'waiting'
-- rows are the API before 0007's, one per build and URL (migrations/0009).
INSERT INTO kiln_webhooks (build_key, url, base_url, requester, secret, state)
VALUES (%(build_key)s, %(url)s, %(base_url)s, %(requester)s, %(secret)s, 'subscribed')
ON CONFLICT (build_key, url, requester) WHERE state = 'subscribed'
DO UPDATE SET secret = EXCLUDED.secret, base_url = EXCLUDED.base_url;

-- name: fire
-- Callbacks of builds now in a final state become deliveries, with a snapshot of the
-- outcome (the build may be rebuilt later; the callback reports this finish).
WITH due AS (
    SELECT w.id, b.key, b.state, b.error, b.artifact_sha256, b.artifact_size,
           b.finished_at, b.spec
      FROM kiln_webhooks w
      JOIN kiln_builds b ON b.key = w.build_key
     WHERE w.state IN ('waiting', 'subscribed')
       AND b.state IN ('succeeded', 'failed', 'cancelled')
       FOR UPDATE OF w SKIP LOCKED
)
UPDATE kiln_webhooks w
   SET state = 'pending', fired_at = now(), next_attempt_at = now(),
       payload = jsonb_build_object(
           'key', due.key, 'state', due.state, 'error', due.error,
           'sha256', due.artifact_sha256, 'size', due.artifact_size,
           'finished_at', due.finished_at, 'spec', due.spec)
  FROM due
 WHERE w.id = due.id
RETURNING w.id;

-- name: claim
-- Take due deliveries, count the attempt and push next_attempt_at past the attempt's
-- longest duration, so a concurrent sweep (another janitor) skips them.
WITH due AS (
    SELECT id
      FROM kiln_webhooks
     WHERE state = 'pending' AND next_attempt_at <= now()
     ORDER BY next_attempt_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE kiln_webhooks w
   SET attempts = w.attempts + 1,
       next_attempt_at = now() + make_interval(secs => %(lease_seconds)s)
  FROM due
 WHERE w.id = due.id
RETURNING w.id, w.build_key, w.url, w.base_url, w.requester, w.secret, w.payload,
          w.attempts;

-- name: delivered
UPDATE kiln_webhooks
   SET state = 'delivered', last_status = %(status)s, last_error = NULL,
       finished_at = now(), next_attempt_at = NULL
 WHERE id = %(id)s;

-- name: retry
UPDATE kiln_webhooks
   SET state = CASE WHEN %(final)s THEN 'failed' ELSE 'pending' END,
       last_status = %(status)s, last_error = %(error)s,
       next_attempt_at = CASE WHEN %(final)s THEN NULL
                              ELSE now() + make_interval(secs => %(delay)s) END,
       finished_at = CASE WHEN %(final)s THEN now() END
 WHERE id = %(id)s;

-- name: for_build
SELECT id, url, state, attempts, last_status, last_error, created_at, fired_at, finished_at
  FROM kiln_webhooks
 WHERE build_key = %(build_key)s
 ORDER BY id;
