-- Quota counters, by name. Loaded by kiln/api/quota.py. A subject is "key:<id>" or
-- "addr:<address>" (with "req:" in front for the limit on all requests); windows are fixed
-- (window_start is a multiple of the window length since the epoch, in the database's clock).

-- name: consume
-- Count one use in the subject's current window unless it is full. The upsert takes the
-- counter's row lock, so concurrent requests of one subject, on any API process, count one
-- after another. No row returned: the window is full.
INSERT INTO kiln_quota_usage AS u (subject, window_start, used)
VALUES (%(subject)s,
        to_timestamp(floor(extract(epoch FROM now()) / %(window)s) * %(window)s), 1)
ON CONFLICT (subject, window_start) DO UPDATE
   SET used = u.used + 1
 WHERE u.used < %(limit)s
RETURNING used;

-- name: window_left
-- Seconds until the current window ends.
SELECT %(window)s - mod(extract(epoch FROM now())::numeric, %(window)s) AS seconds;

-- name: usage
SELECT used
  FROM kiln_quota_usage
 WHERE subject = %(subject)s
   AND window_start = to_timestamp(floor(extract(epoch FROM now()) / %(window)s) * %(window)s);

-- name: prune
-- Delete up to `limit` counters of windows that have ended, skipping rows another
-- transaction holds.
DELETE FROM kiln_quota_usage
 WHERE ctid = ANY(ARRAY(
       SELECT ctid
         FROM kiln_quota_usage
        WHERE window_start < now() - make_interval(secs => %(window)s)
        LIMIT %(limit)s
          FOR UPDATE SKIP LOCKED));
