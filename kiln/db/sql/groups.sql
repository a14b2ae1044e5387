-- Build groups (several platforms in one request), by name. Loaded by kiln/db/groups.py.

-- name: create_group
INSERT INTO kiln_groups (id, keys) VALUES (%(id)s, %(keys)s)
ON CONFLICT (id) DO NOTHING;

-- name: group_keys
SELECT keys FROM kiln_groups WHERE id = %(id)s;
