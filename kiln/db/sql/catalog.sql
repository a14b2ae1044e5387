-- The plugin catalog's queries, by name. Loaded by kiln/request/catalog.py.

-- name: get_mirror
SELECT source, packages, etag, last_modified, fetched_at, checked_at, error
  FROM kiln_catalog
 WHERE source = %(source)s;

-- name: put_mirror
-- A fresh copy of the upstream catalog replaces the old one.
INSERT INTO kiln_catalog (source, packages, etag, last_modified, fetched_at, checked_at, error)
VALUES (%(source)s, %(packages)s, %(etag)s, %(last_modified)s, now(), now(), NULL)
ON CONFLICT (source) DO UPDATE
   SET packages = EXCLUDED.packages, etag = EXCLUDED.etag,
       last_modified = EXCLUDED.last_modified, fetched_at = now(), checked_at = now(),
       error = NULL;

-- name: touch_mirror
-- A refresh that changed nothing (304) or failed keeps the last good copy.
INSERT INTO kiln_catalog (source, checked_at, error)
VALUES (%(source)s, now(), %(error)s)
ON CONFLICT (source) DO UPDATE
   SET checked_at = now(), error = EXCLUDED.error;

-- name: package_downloads
-- Downloads of Kiln's own builds, per plugin package (added to the catalog's counts).
SELECT p->>'package' AS package, sum(b.downloads)::bigint AS downloads
  FROM kiln_builds b, jsonb_array_elements(b.spec->'plugins') p
 WHERE b.downloads > 0
 GROUP BY 1;
