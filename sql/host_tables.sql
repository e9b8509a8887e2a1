-- Reference schema of the host bot application's tables that shotsd reads.
-- shotsd never creates or alters these in production (`shotsd migrate` does not touch them);
-- tests, benchmarks and the demo load this file into their own databases.
-- A deployment whose schema differs adapts sql/audience.sql, not Python.

CREATE TABLE IF NOT EXISTS telegram_contacts (
    bot_slug            text NOT NULL,
    telegram_id         bigint NOT NULL,
    chat_state          text NOT NULL DEFAULT 'active',  -- 'active' | 'blocked' | 'deactivated' | ...
    first_name          text,
    username            text,
    last_interaction_at timestamptz,
    created_at          timestamptz DEFAULT now(),
    PRIMARY KEY (bot_slug, telegram_id)
);

CREATE TABLE IF NOT EXISTS funnel_events (
    id          bigserial PRIMARY KEY,
    bot_slug    text,
    telegram_id bigint,
    event_name  text,
    created_at  timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS payment_transactions (
    id          bigserial PRIMARY KEY,
    bot_slug    text,
    telegram_id bigint,
    status      text,
    created_at  timestamptz DEFAULT now()
);
