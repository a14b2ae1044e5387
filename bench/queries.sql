-- The benchmarks' own queries, by name (loaded by bench/infra.py: bench_queries()).
-- Kiln's queries come from kiln/db/sql/builds.sql through kiln.db.builds; these only observe.

-- name: kiln_progress
-- How many of the given builds succeeded, and when the last one finished (epoch seconds).
SELECT count(*) FILTER (WHERE state = 'succeeded') AS done,
       extract(epoch FROM max(finished_at))::float8 AS last
  FROM kiln_builds
 WHERE key = ANY(%(keys)s);

-- name: procrastinate_progress
SELECT count(*) AS done, extract(epoch FROM max(e.at))::float8 AS last
  FROM procrastinate_events e
 WHERE e.type = 'succeeded' AND e.job_id = ANY(%(ids)s);

-- name: kiln_attempts_of
SELECT count(*) FROM kiln_attempts WHERE build_key = %(key)s;

-- name: kiln_insert_succeeded
-- A build that already succeeded, for the serving benchmarks (no compile needed).
INSERT INTO kiln_builds (key, spec, state, attempts, started_at, finished_at,
                         artifact_path, artifact_size, artifact_sha256)
VALUES (%(key)s, %(spec)s, 'succeeded', 1, now(), now(),
        %(artifact_path)s, %(artifact_size)s, %(artifact_sha256)s)
ON CONFLICT (key) DO UPDATE
   SET state = 'succeeded', spec = EXCLUDED.spec, artifact_path = EXCLUDED.artifact_path,
       artifact_size = EXCLUDED.artifact_size, artifact_sha256 = EXCLUDED.artifact_sha256;

-- name: kiln_builds_count
SELECT count(*) FROM kiln_builds;

-- name: floor_notify
SELECT pg_notify('kiln_bench_floor', %(payload)s);
