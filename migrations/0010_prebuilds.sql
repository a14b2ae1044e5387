-- Prebuilds (kiln/janitor/prebuild.py): the "latest" version of Caddy and of the plugins of
-- popular configurations, as the janitor last saw it resolved. A version that differs from
-- the one recorded is a release: the janitor queues the popular configurations on it.
CREATE TABLE kiln_prebuild_versions (
    module          text PRIMARY KEY,
    version         text NOT NULL,
    -- when this version was first seen as the latest
    seen_at         timestamptz NOT NULL DEFAULT now(),
    -- the version recorded before it (NULL: the first one seen)
    previous        text
);

-- The prebuild job ranks configurations downloaded within its window.
CREATE INDEX kiln_builds_last_downloaded_idx ON kiln_builds (last_downloaded_at)
    WHERE last_downloaded_at IS NOT NULL;
