-- Rolling deploys across 0007. The API before 0007 subscribes a callback with
--   INSERT ... ON CONFLICT (build_key, url) WHERE state = 'waiting' DO NOTHING
-- which needs a unique index on (build_key, url) over waiting rows. 0007 replaced that
-- index with (build_key, url, requester), so once 0007 had run, every callback that API
-- took failed. The old index cannot come back as it was: it would allow one requester per
-- build and URL again. So per-requester subscriptions (requester and secret, 0007) now
-- wait in a state of their own, 'subscribed', with their own unique index, and 'waiting'
-- is again one row per build and URL, the rows the API before 0007 writes (no requester,
-- no secret: delivered unsigned, as 0007 says of them). The janitor fires both.

ALTER TABLE kiln_webhooks DROP CONSTRAINT kiln_webhooks_state_check;
ALTER TABLE kiln_webhooks ADD CONSTRAINT kiln_webhooks_state_check
    CHECK (state IN ('waiting', 'subscribed', 'pending', 'delivered', 'failed'));

UPDATE kiln_webhooks SET state = 'subscribed' WHERE state = 'waiting' AND requester <> '';

-- The conflict target of kiln/db/sql/webhooks.sql's subscribe.
CREATE UNIQUE INDEX kiln_webhooks_subscribed_idx ON kiln_webhooks (build_key, url, requester)
    WHERE state = 'subscribed';
-- The conflict target of the API before 0007 (unique: requester-less waiting rows were
-- already one per build and URL under 0007's index).
CREATE UNIQUE INDEX kiln_webhooks_waiting_url_idx ON kiln_webhooks (build_key, url)
    WHERE state = 'waiting';

-- The API of 0007 still subscribes with ON CONFLICT (build_key, url, requester)
-- WHERE state = 'waiting': kiln_webhooks_waiting_idx stays as its conflict target, and this
-- trigger turns its rows into 'subscribed' ones (asking again renews the secret, as that
-- API meant), so two requesters of one build and URL do not collide on the index above.
-- A later migration drops both once no API older than 0009 can run.
CREATE FUNCTION kiln_webhooks_subscribe_0007() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'waiting' AND NEW.requester <> '' THEN
        UPDATE kiln_webhooks
           SET secret = NEW.secret, base_url = NEW.base_url
         WHERE build_key = NEW.build_key AND url = NEW.url AND requester = NEW.requester
           AND state = 'subscribed';
        IF FOUND THEN
            RETURN NULL;
        END IF;
        NEW.state := 'subscribed';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER kiln_webhooks_subscribe_0007 BEFORE INSERT ON kiln_webhooks
    FOR EACH ROW EXECUTE FUNCTION kiln_webhooks_subscribe_0007();
