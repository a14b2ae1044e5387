-- Prebuilds, by name. Loaded by kiln/db/prebuilds.py: the latest versions the janitor last
-- saw (kiln_prebuild_versions, migrations/0010) and the popular configurations (a read of
-- kiln_builds).

-- name: popular
-- Configurations (platform × plugin packages × replacements) downloaded within `window`
-- seconds, most downloaded first: every build of a configuration counts, whichever Caddy or
-- plugin versions it was on. With the Caddy versions and the plugin module@version pairs
-- its builds were on, to tell the configurations that follow "latest" from pinned ones.
WITH recent AS (
    SELECT b.spec, b.downloads, b.spec->>'os' AS os, b.spec->>'arch' AS arch,
           coalesce(b.spec->>'arm', '') AS arm,
           coalesce(b.spec->'replacements', '[]'::jsonb) AS replacements,
           coalesce((SELECT jsonb_agg(p->>'package' ORDER BY p->>'package')
                       FROM jsonb_array_elements(b.spec->'plugins') p), '[]'::jsonb) AS packages,
           coalesce((SELECT jsonb_agg((p->>'module') || '@' || (p->>'version'))
                       FROM jsonb_array_elements(b.spec->'plugins') p), '[]'::jsonb) AS modules
      FROM kiln_builds b
     WHERE b.last_downloaded_at > now() - make_interval(secs => %(window)s)
       AND b.downloads > 0
)
SELECT os, arch, arm, packages, replacements,
       sum(downloads)::bigint AS downloads,
       array_agg(DISTINCT spec->>'caddy_version') AS caddy_versions,
       jsonb_agg(modules) AS module_versions
  FROM recent
 GROUP BY os, arch, arm, packages, replacements
 ORDER BY downloads DESC, os, arch, arm, packages::text, replacements::text
 LIMIT %(limit)s;

-- name: seen_versions
SELECT module, version FROM kiln_prebuild_versions WHERE module = ANY(%(modules)s);

-- name: record_version
-- Remember `version` as the latest of `module`; a changed version keeps the one before it.
INSERT INTO kiln_prebuild_versions AS v (module, version)
VALUES (%(module)s, %(version)s)
ON CONFLICT (module) DO UPDATE
   SET version = EXCLUDED.version, previous = v.version, seen_at = now()
 WHERE v.version <> EXCLUDED.version;
