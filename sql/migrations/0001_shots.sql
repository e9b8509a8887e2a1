-- shotsd schema, version 1: the queue, each shot's audience with outcomes, the attempt log.
-- Applied by `shotsd migrate` inside one transaction. Never edit an applied migration:
-- `shotsd migrate` refuses a database whose recorded checksums differ from these files.

CREATE TYPE shots_target AS ENUM ('started', 'pix_created');
CREATE TYPE shots_media_type AS ENUM ('photo', 'video', 'audio', 'none');
CREATE TYPE shots_status AS ENUM ('pending', 'running', 'sent', 'skipped', 'error', 'cancelled');
-- 'sending' is the in-flight state: written before a request goes out, so a recipient
-- found 'sending' after a crash has an unknown outcome and is never sent again.
CREATE TYPE shots_recipient_status AS ENUM ('pending', 'sending', 'sent', 'skipped', 'error');
CREATE TYPE shots_attempt_outcome AS ENUM (
    'sent', 'skipped', 'error', 'cancelled', 'released', 'reset'
);

CREATE TABLE shots_queue (
    id              bigserial PRIMARY KEY,
    bot_slug        text NOT NULL,
    target          shots_target NOT NULL,
    copy            text NOT NULL,
    media_url       text NULL,
    media_type      shots_media_type NOT NULL DEFAULT 'none',
    scheduled_at    timestamptz NOT NULL DEFAULT now(),
    status          shots_status NOT NULL DEFAULT 'pending',
    attempt_count   int NOT NULL DEFAULT 0,
    last_error      text NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    recency_days    int NULL,
    audience_total  int NOT NULL DEFAULT 0,
    sent_count      int NOT NULL DEFAULT 0,
    skipped_count   int NOT NULL DEFAULT 0,
    error_count     int NOT NULL DEFAULT 0,
    started_at      timestamptz NULL,
    finished_at     timestamptz NULL,
    worker_id       text NULL,
    heartbeat_at    timestamptz NULL,
    -- Set once, in the transaction that materialises the audience: an empty audience
    -- leaves no shots_sent rows, so this is how a resumed shot knows not to select again.
    audience_selected_at timestamptz NULL,

    CONSTRAINT shots_queue_bot_slug_not_blank CHECK (bot_slug ~ '[^[:space:]]'),
    CONSTRAINT shots_queue_copy_not_blank CHECK (copy ~ '[^[:space:]]'),
    CONSTRAINT shots_queue_media_url_without_media_type
        CHECK (media_type <> 'none' OR media_url IS NULL),
    CONSTRAINT shots_queue_media_type_without_media_url
        CHECK (media_type = 'none' OR media_url IS NOT NULL),
    CONSTRAINT shots_queue_media_url_not_http
        CHECK (media_url IS NULL OR media_url ~* '^https?://[^[:space:]/]+[^[:space:]]*$'),
    CONSTRAINT shots_queue_recency_days_not_positive CHECK (recency_days IS NULL OR recency_days > 0),
    CONSTRAINT shots_queue_counts_negative CHECK (
        attempt_count >= 0 AND audience_total >= 0 AND sent_count >= 0
        AND skipped_count >= 0 AND error_count >= 0
    ),
    -- A running shot always names its holder; an operator cannot hand-set 'running'.
    CONSTRAINT shots_queue_running_without_worker
        CHECK (status <> 'running' OR (worker_id IS NOT NULL AND heartbeat_at IS NOT NULL))
);

CREATE INDEX shots_queue_status_scheduled_idx ON shots_queue (status, scheduled_at);
CREATE INDEX shots_queue_bot_status_scheduled_idx ON shots_queue (bot_slug, status, scheduled_at);
-- At most one running shot per bot across every daemon: the database, not the daemons'
-- good manners, guarantees two shots never share (and double) a bot's rate budget.
CREATE UNIQUE INDEX shots_queue_one_running_per_bot ON shots_queue (bot_slug)
    WHERE status = 'running';

CREATE TABLE shots_sent (
    shot_id     bigint NOT NULL REFERENCES shots_queue (id) ON DELETE CASCADE,
    telegram_id bigint NOT NULL,
    bot_slug    text NOT NULL,
    position    int NOT NULL,
    status      shots_recipient_status NOT NULL DEFAULT 'pending',
    error       text NULL,
    message_id  bigint NULL,
    sent_at     timestamptz NULL,
    PRIMARY KEY (shot_id, telegram_id)
);

CREATE INDEX shots_sent_shot_status_idx ON shots_sent (shot_id, status);
CREATE INDEX shots_sent_bot_sent_at_idx ON shots_sent (bot_slug, sent_at DESC);
-- The sender walks a shot's pending recipients in send order.
CREATE INDEX shots_sent_shot_pending_position_idx ON shots_sent (shot_id, position)
    WHERE status = 'pending';

CREATE TABLE shots_attempts (
    shot_id       bigint NOT NULL REFERENCES shots_queue (id) ON DELETE CASCADE,
    attempt       int NOT NULL,
    worker_id     text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz NULL,
    outcome       shots_attempt_outcome NULL,  -- NULL while the attempt runs
    sent_count    int NOT NULL DEFAULT 0,
    skipped_count int NOT NULL DEFAULT 0,
    error_count   int NOT NULL DEFAULT 0,
    error         text NULL,
    PRIMARY KEY (shot_id, attempt)
);

-- updated_at follows every UPDATE, operators' hand edits included.
CREATE FUNCTION shots_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER shots_queue_touch_updated_at
    BEFORE UPDATE ON shots_queue
    FOR EACH ROW EXECUTE FUNCTION shots_touch_updated_at();

-- Wakes every listening daemon when a shot becomes pending (insert, requeue, reschedule):
-- the payload is the shot id; daemons re-run their claim, which judges due-ness itself.
CREATE FUNCTION shots_notify_pending() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('shots_queue', NEW.id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER shots_queue_notify_insert
    AFTER INSERT ON shots_queue
    FOR EACH ROW WHEN (NEW.status = 'pending')
    EXECUTE FUNCTION shots_notify_pending();

CREATE TRIGGER shots_queue_notify_update
    AFTER UPDATE OF status, scheduled_at ON shots_queue
    FOR EACH ROW WHEN (NEW.status = 'pending'
                       AND (OLD.status IS DISTINCT FROM NEW.status
                            OR OLD.scheduled_at IS DISTINCT FROM NEW.scheduled_at))
    EXECUTE FUNCTION shots_notify_pending();
