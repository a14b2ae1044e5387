-- Signing keys and attestation records, by name. Loaded by kiln/worker/attest.py (AttestManager).

-- name: register_signing_key
INSERT INTO kiln_signing_keys (key_id, public_key)
VALUES (%(key_id)s, %(public_key)s)
ON CONFLICT (key_id) DO UPDATE SET last_used_at = now();

-- name: signing_keys
SELECT key_id, algorithm, public_key, created_at, last_used_at
  FROM kiln_signing_keys
 ORDER BY last_used_at DESC, key_id;

-- name: put_attestation
INSERT INTO kiln_attestations (build_key, artifact_sha256, key_id, files)
VALUES (%(build_key)s, %(sha256)s, %(key_id)s, %(files)s)
ON CONFLICT (build_key) DO UPDATE
   SET artifact_sha256 = EXCLUDED.artifact_sha256, key_id = EXCLUDED.key_id,
       files = EXCLUDED.files, created_at = now();

-- name: get_attestation
SELECT build_key, artifact_sha256, key_id, files, created_at
  FROM kiln_attestations
 WHERE build_key = %(build_key)s;

-- name: builds_by_sha256
-- Succeeded builds whose current artifact has this sha256 (a rebuild may have replaced it).
SELECT b.key, b.spec, b.finished_at, a.key_id
  FROM kiln_attestations a
  JOIN kiln_builds b ON b.key = a.build_key
 WHERE a.artifact_sha256 = %(sha256)s
   AND b.state = 'succeeded' AND b.artifact_sha256 = a.artifact_sha256
 ORDER BY b.finished_at DESC
 LIMIT %(limit)s;
