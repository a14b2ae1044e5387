-- Metrics, by name. Loaded by kiln/metrics.py: what /metrics reports, whichever API
-- process serves the scrape.

-- name: add
-- Add one process's counts to the shared totals. A histogram whose bucket bounds changed
-- (a new Kiln version) starts again, which Prometheus reads as a counter reset.
INSERT INTO kiln_metrics AS m (name, labels, count, sum, bounds, buckets)
VALUES (%(name)s, %(labels)s, %(count)s, %(sum)s, %(bounds)s, %(buckets)s)
ON CONFLICT (name, labels) DO UPDATE
   SET count = CASE WHEN m.bounds = EXCLUDED.bounds THEN m.count + EXCLUDED.count
                    ELSE EXCLUDED.count END,
       sum = CASE WHEN m.bounds = EXCLUDED.bounds THEN m.sum + EXCLUDED.sum
                  ELSE EXCLUDED.sum END,
       buckets = CASE WHEN m.bounds = EXCLUDED.bounds
                      THEN ARRAY(SELECT t.a + t.b
                                   FROM unnest(m.buckets, EXCLUDED.buckets)
                                        WITH ORDINALITY AS t(a, b, i)
                                  ORDER BY t.i)
                      ELSE EXCLUDED.buckets END,
       bounds = EXCLUDED.bounds,
       updated_at = now();

-- name: recorded
SELECT name, labels, count, sum, bounds, buckets
  FROM kiln_metrics
 ORDER BY name, labels;

-- name: builds_by_state
SELECT state, count(*) AS count FROM kiln_builds GROUP BY state;

-- name: queue
-- Builds a worker could claim now, those waiting for a retry's backoff, and how long the
-- oldest claimable one has waited (what an autoscaler wants to know).
SELECT count(*) FILTER (WHERE run_after <= now()) AS ready,
       count(*) FILTER (WHERE run_after > now()) AS delayed,
       coalesce(extract(epoch FROM now() - min(queued_at) FILTER (WHERE run_after <= now())),
                0)::float8 AS oldest_seconds
  FROM kiln_builds
 WHERE state = 'queued';

-- name: queue_by_toolchain
-- Per toolchain (sandbox identity, Go version; NULL in builds keyed before toolchains were):
-- builds claimable now, running builds, and the slots of the live workers that have it.
-- offered: a live worker (active, heartbeat within `seconds`) has it, or it is the newest
-- worker's, which new builds are keyed with and a fleet scaled to zero comes back with.
-- Builds of other toolchains no worker will claim: an autoscaler counts only offered ones
-- (infra/k8s/worker.yaml's trigger query counts the same), and the janitor fails the others
-- after janitor.unclaimable_after.
WITH newest AS (
    SELECT sandbox, go_version FROM kiln_workers ORDER BY started_at DESC LIMIT 1
), live AS (
    SELECT sandbox, go_version, sum(concurrency) AS slots
      FROM kiln_workers
     WHERE state = 'active' AND heartbeat_at > now() - make_interval(secs => %(seconds)s)
     GROUP BY sandbox, go_version
), builds AS (
    SELECT spec->>'sandbox' AS sandbox, spec->>'go_version' AS go_version,
           count(*) FILTER (WHERE state = 'queued' AND run_after <= now()) AS queued,
           count(*) FILTER (WHERE state = 'running') AS running
      FROM kiln_builds
     WHERE state IN ('queued', 'running')
     GROUP BY 1, 2
), toolchains AS (
    SELECT sandbox, go_version FROM builds
    UNION SELECT sandbox, go_version FROM live
    UNION SELECT sandbox, go_version FROM newest
)
SELECT t.sandbox, t.go_version,
       coalesce(b.queued, 0)::float8 AS queued, coalesce(b.running, 0)::float8 AS running,
       coalesce(l.slots, 0)::float8 AS slots,
       (l.sandbox IS NOT NULL OR EXISTS (
            SELECT 1 FROM newest n
             WHERE n.sandbox = t.sandbox AND n.go_version = t.go_version)) AS offered
  FROM toolchains t
  LEFT JOIN builds b
         ON b.sandbox IS NOT DISTINCT FROM t.sandbox
        AND b.go_version IS NOT DISTINCT FROM t.go_version
  LEFT JOIN live l ON l.sandbox = t.sandbox AND l.go_version = t.go_version
 ORDER BY t.sandbox, t.go_version;

-- name: workers
-- Workers by state; alive: active with a heartbeat within `seconds`, and their build slots.
SELECT count(*) FILTER (WHERE state = 'active') AS active,
       count(*) FILTER (WHERE state = 'draining') AS draining,
       count(*) FILTER (WHERE state = 'gone') AS gone,
       count(*) FILTER (WHERE state = 'active'
                          AND heartbeat_at > now() - make_interval(secs => %(seconds)s)) AS alive,
       coalesce(sum(concurrency) FILTER (WHERE state = 'active'
                          AND heartbeat_at > now() - make_interval(secs => %(seconds)s)), 0)
           AS alive_slots
  FROM kiln_workers;

-- name: attempt_durations
-- Finished attempts by outcome and duration bucket: bucket i holds durations from
-- bounds[i] up to bounds[i+1] (1-based; 0: below the first bound).
SELECT outcome,
       width_bucket(extract(epoch FROM finished_at - started_at)::float8,
                    %(bounds)s::float8[]) AS bucket,
       count(*) AS count,
       sum(extract(epoch FROM finished_at - started_at))::float8 AS sum
  FROM kiln_attempts
 WHERE finished_at IS NOT NULL
 GROUP BY outcome, bucket;
