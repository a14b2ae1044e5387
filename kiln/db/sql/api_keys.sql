-- API keys, by name. Loaded by kiln/db/api_keys.py. Only the sha256 of a token is stored.

-- name: create_key
INSERT INTO kiln_api_keys (id, name, scope, token_sha256, priority, builds_per_window)
VALUES (%(id)s, %(name)s, %(scope)s, %(token_sha256)s, %(priority)s, %(builds_per_window)s)
RETURNING id, name, scope, priority, builds_per_window, created_at, last_used_at, revoked_at;

-- name: authenticate
-- The live key with this token hash; last_used_at is refreshed at most once a minute, so
-- that busy keys do not write on every request.
WITH found AS (
    SELECT id, name, scope, priority, builds_per_window
      FROM kiln_api_keys
     WHERE token_sha256 = %(token_sha256)s AND revoked_at IS NULL
), touched AS (
    UPDATE kiln_api_keys k
       SET last_used_at = now()
      FROM found
     WHERE k.id = found.id
       AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute')
)
SELECT id, name, scope, priority, builds_per_window FROM found;

-- name: revoke_key
-- By id, or by the name of a live key.
UPDATE kiln_api_keys
   SET revoked_at = now()
 WHERE revoked_at IS NULL AND (id = %(which)s OR name = %(which)s)
RETURNING id, name, scope, priority, builds_per_window, created_at, last_used_at, revoked_at;

-- name: list_keys
SELECT id, name, scope, priority, builds_per_window, created_at, last_used_at, revoked_at
  FROM kiln_api_keys
 WHERE %(all)s OR revoked_at IS NULL
 ORDER BY created_at, id;
