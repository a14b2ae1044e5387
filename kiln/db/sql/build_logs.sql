-- Build log queries, by name. Loaded by kiln/worker/buildlog.py.
-- Channel: kiln_logs (payload: {"key","attempt","seq"}; wakes live-log watchers).

-- name: append
-- Insert one batch of an attempt's lines and announce it in the same statement (NOTIFY is
-- sent at commit). ON CONFLICT makes retrying a batch whose commit was not seen harmless.
WITH ins AS (
    INSERT INTO kiln_build_logs (build_key, attempt, seq, step, line, at)
    SELECT %(key)s, %(attempt)s, u.seq, u.step, u.line, to_timestamp(u.at)
      FROM unnest(%(seqs)s::integer[], %(steps)s::text[], %(lines)s::text[],
                  %(ats)s::float8[]) AS u(seq, step, line, at)
    ON CONFLICT DO NOTHING
    RETURNING seq
)
SELECT count(*) AS inserted,
       pg_notify('kiln_logs', json_build_object('key', %(key)s::text,
                                                'attempt', %(attempt)s::integer,
                                                'seq', max(seq))::text)
  FROM ins
HAVING count(*) > 0;

-- name: lines_after
-- The lines after a cursor, in order (the primary key serves the row comparison and order).
SELECT attempt, seq, step, line, at
  FROM kiln_build_logs
 WHERE build_key = %(key)s AND (attempt, seq) > (%(attempt)s, %(seq)s)
 ORDER BY attempt, seq
 LIMIT %(limit)s;

-- name: line_step
-- The step of one line (to resume a watcher whose cursor names it).
SELECT step FROM kiln_build_logs
 WHERE build_key = %(key)s AND attempt = %(attempt)s AND seq = %(seq)s;

-- name: latest_attempt
SELECT coalesce(max(number), 0) AS number FROM kiln_attempts WHERE build_key = %(key)s;

-- name: prune
-- Delete the lines older than a number of seconds (log retention).
DELETE FROM kiln_build_logs WHERE at < now() - make_interval(secs => %(seconds)s);
