-- Webhook subscriptions belong to whoever asked, and each is signed with its own secret.
--
-- requester: kiln_builds.requested_by's form (a key id, or addr:<client address>). Several
-- requesters of one build may name the same URL; each gets its own delivery. Rows made
-- before this migration have ''.
-- secret: the HMAC-SHA256 key of X-Kiln-Signature, returned once to the requester when the
-- subscription was made. NULL on rows made before this migration: they are sent unsigned,
-- since no requester was ever given a secret for them.
ALTER TABLE kiln_webhooks ADD COLUMN requester text NOT NULL DEFAULT '';
ALTER TABLE kiln_webhooks ADD COLUMN secret text;

-- One waiting subscription per build, URL and requester (it was one per build and URL, so a
-- second requester's callback was dropped).
DROP INDEX kiln_webhooks_waiting_idx;
CREATE UNIQUE INDEX kiln_webhooks_waiting_idx ON kiln_webhooks (build_key, url, requester)
    WHERE state = 'waiting';
