-- A worker claims only builds keyed with its sandbox identity and Go version (the claim
-- query in kiln/db/sql/builds.sql). With kiln_builds_claim_idx alone it walks every queued
-- build of the other toolchains first (a rollout, a mixed fleet); this index starts at its
-- own toolchain's builds, in the claim's ORDER BY. Claims that name no toolchain (tools)
-- keep using kiln_builds_claim_idx.
CREATE INDEX kiln_builds_claim_toolchain_idx
    ON kiln_builds ((spec->>'sandbox'), (spec->>'go_version'), priority DESC, queued_at, key)
    WHERE state = 'queued';
