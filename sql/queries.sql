-- Every statement the daemon runs at run time, by name (parsed once by daemon/sqlfiles.py).
-- Each block starts with `-- name: <name>`; the comments under it name its $n parameters.
-- Fencing: every write for a running shot checks, in the same statement, that the writer
-- still holds the shot (status + worker_id), locking the shot row so a concurrent reset
-- or cancel is serialised against it.

-- name: claim_shot
-- Claims the oldest due pending shot whose bot has no running shot, in one statement.
-- $1 worker_id (text)
WITH candidate AS (
    -- SKIP LOCKED: concurrent daemons each take a different row instead of queueing.
    -- The NOT EXISTS is only a fast path; the unique index shots_queue_one_running_per_bot
    -- is what makes one-running-per-bot true under races (the loser gets a unique violation).
    SELECT q.id, q.finished_at
    FROM shots_queue q
    WHERE q.status = 'pending'
      AND q.scheduled_at <= now()
      AND NOT EXISTS (SELECT 1 FROM shots_queue r
                      WHERE r.bot_slug = q.bot_slug AND r.status = 'running')
    ORDER BY q.scheduled_at, q.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE shots_queue s
SET status = 'running',
    worker_id = $1::text,
    heartbeat_at = now(),
    started_at = coalesce(s.started_at, now()),
    finished_at = NULL,
    attempt_count = s.attempt_count + 1
FROM candidate
WHERE s.id = candidate.id
RETURNING s.id, s.bot_slug, s.target::text AS target, s.copy, s.media_url,
          s.media_type::text AS media_type, s.recency_days, s.attempt_count,
          s.audience_selected_at IS NOT NULL AS audience_selected,
          -- a claim of a shot that had finished is an operator's requeue
          candidate.finished_at IS NOT NULL AS requeued;

-- name: insert_attempt
-- $1 shot_id, $2 attempt number, $3 worker_id
INSERT INTO shots_attempts (shot_id, attempt, worker_id)
VALUES ($1::bigint, $2::int, $3::text)
ON CONFLICT (shot_id, attempt) DO UPDATE
SET worker_id = EXCLUDED.worker_id, started_at = now(), finished_at = NULL, outcome = NULL;

-- name: mark_unknown_outcomes
-- Recipients left 'sending' by a previous holder may have received the message: never
-- resend them. $1 shot_id, $2 error text (starts with "outcome unknown")
UPDATE shots_sent
SET status = 'error', error = $2::text
WHERE shot_id = $1::bigint AND status = 'sending';

-- name: retry_failed_recipients
-- On an operator's requeue, recipients that failed with a known outcome are tried again;
-- 'outcome unknown' ones are not (they may have received it). $1 shot_id
UPDATE shots_sent
SET status = 'pending', error = NULL
WHERE shot_id = $1::bigint AND status = 'error' AND error NOT LIKE 'outcome unknown%';

-- name: recount_shot
-- Recomputes the live counters from the recipients, fenced. $1 shot_id, $2 worker_id
WITH fence AS (
    SELECT id FROM shots_queue
    WHERE id = $1::bigint AND worker_id = $2::text AND status = 'running'
    FOR UPDATE
), counts AS (
    SELECT count(*) FILTER (WHERE status = 'sent') AS sent,
           count(*) FILTER (WHERE status = 'skipped') AS skipped,
           count(*) FILTER (WHERE status = 'error') AS error
    FROM shots_sent WHERE shot_id = $1::bigint
)
UPDATE shots_queue q
SET sent_count = counts.sent, skipped_count = counts.skipped, error_count = counts.error
FROM fence, counts
WHERE q.id = fence.id
RETURNING q.id;

-- name: mark_audience_selected
-- Records that the audience was materialised, in the same transaction as the INSERT … SELECT.
-- $1 shot_id, $2 worker_id
UPDATE shots_queue
SET audience_selected_at = now(),
    audience_total = (SELECT count(*) FROM shots_sent WHERE shot_id = $1::bigint)
WHERE id = $1::bigint AND worker_id = $2::text AND status = 'running'
RETURNING audience_total;

-- name: reserve_recipients
-- Marks the next pending recipients 'sending' before any request for them goes out, so a
-- crash can never lead to a resend. Returns nothing when the shot is no longer ours to run.
-- $1 shot_id, $2 worker_id, $3 how many
WITH fence AS (
    SELECT id FROM shots_queue
    WHERE id = $1::bigint AND worker_id = $2::text AND status = 'running'
    FOR SHARE
), batch AS (
    SELECT s.telegram_id
    FROM shots_sent s, fence
    WHERE s.shot_id = fence.id AND s.status = 'pending'
    ORDER BY s.position
    LIMIT $3::int
    FOR UPDATE OF s
)
UPDATE shots_sent s
SET status = 'sending'
FROM batch
WHERE s.shot_id = $1::bigint AND s.telegram_id = batch.telegram_id
RETURNING s.telegram_id, s.position;

-- name: record_outcomes
-- Writes a batch of outcomes, the contacts' new chat_state, the live counters and the lease
-- in one statement. Nothing is written unless the writer still holds the shot (a cancelled
-- shot's in-flight outcomes are still recorded). Returns one row when written.
-- $1 shot_id, $2 worker_id, $3 telegram_ids bigint[], $4 statuses text[], $5 errors text[],
-- $6 message_ids bigint[], $7 chat_states text[] (NULL = leave the contact alone)
WITH fence AS (
    SELECT id, bot_slug FROM shots_queue
    WHERE id = $1::bigint AND worker_id = $2::text AND status IN ('running', 'cancelled')
    FOR UPDATE
), input AS (
    SELECT * FROM unnest($3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::text[])
        AS i(telegram_id, status, error, message_id, chat_state)
), recipients AS (
    UPDATE shots_sent s
    SET status = input.status::shots_recipient_status,
        error = input.error,
        message_id = input.message_id,
        sent_at = CASE WHEN input.status = 'sent' THEN now() ELSE s.sent_at END
    FROM input, fence
    WHERE s.shot_id = fence.id AND s.telegram_id = input.telegram_id
      AND s.status = 'sending'
    RETURNING s.status
), contacts AS (
    UPDATE telegram_contacts c
    SET chat_state = input.chat_state
    FROM input, fence
    WHERE input.chat_state IS NOT NULL
      AND c.bot_slug = fence.bot_slug AND c.telegram_id = input.telegram_id
    RETURNING 1
)
UPDATE shots_queue q
SET sent_count = q.sent_count + (SELECT count(*) FROM recipients WHERE status = 'sent'),
    skipped_count = q.skipped_count + (SELECT count(*) FROM recipients WHERE status = 'skipped'),
    error_count = q.error_count + (SELECT count(*) FROM recipients WHERE status = 'error'),
    heartbeat_at = now()
FROM fence
WHERE q.id = fence.id
RETURNING q.status::text AS status, (SELECT count(*) FROM contacts) AS contacts_updated;

-- name: lock_for_finish
-- Locks a shot the writer holds and returns its recipients' tally and most frequent error.
-- $1 shot_id, $2 worker_id
WITH fence AS (
    SELECT id, status FROM shots_queue
    WHERE id = $1::bigint AND worker_id = $2::text AND status IN ('running', 'cancelled')
    FOR UPDATE
), top_error AS (
    SELECT error, count(*) AS n FROM shots_sent
    WHERE shot_id = $1::bigint AND status = 'error'
    GROUP BY error ORDER BY n DESC, error LIMIT 1
)
SELECT fence.status::text AS status,
       count(s.*) AS total,
       count(*) FILTER (WHERE s.status = 'sent') AS sent,
       count(*) FILTER (WHERE s.status = 'skipped') AS skipped,
       count(*) FILTER (WHERE s.status = 'error') AS error,
       count(*) FILTER (WHERE s.status IN ('pending', 'sending')) AS unsent,
       (SELECT error FROM top_error) AS top_error,
       (SELECT n FROM top_error) AS top_error_count
FROM fence LEFT JOIN shots_sent s ON s.shot_id = fence.id
GROUP BY fence.status;

-- name: finish_shot
-- $1 shot_id, $2 worker_id, $3 final status, $4 last_error, $5 sent, $6 skipped, $7 error
UPDATE shots_queue
SET status = $3::text::shots_status,
    last_error = $4::text,
    sent_count = $5::int, skipped_count = $6::int, error_count = $7::int,
    finished_at = now()
WHERE id = $1::bigint AND worker_id = $2::text AND status IN ('running', 'cancelled')
RETURNING id;

-- name: release_shot
-- Graceful shutdown hands a running shot back to the queue. $1 shot_id, $2 worker_id
UPDATE shots_queue
SET status = 'pending'
WHERE id = $1::bigint AND worker_id = $2::text AND status = 'running'
RETURNING id;

-- name: finish_attempt
-- $1 shot_id, $2 attempt, $3 outcome, $4 sent, $5 skipped, $6 error count, $7 error text
UPDATE shots_attempts
SET finished_at = now(), outcome = $3::text::shots_attempt_outcome,
    sent_count = $4::int, skipped_count = $5::int, error_count = $6::int, error = $7::text
WHERE shot_id = $1::bigint AND attempt = $2::int;

-- name: shot_holder
-- $1 shot_id, $2 worker_id
SELECT status::text AS status, worker_id IS NOT DISTINCT FROM $2::text AS ours
FROM shots_queue WHERE id = $1::bigint;

-- name: next_scheduled_at
-- When the next pending shot becomes due (NULL when none), so the picker can wake for it.
-- Shots already due but waiting for their bot are woken when that bot's running shot ends.
SELECT min(scheduled_at) AS next_at FROM shots_queue
WHERE status = 'pending' AND scheduled_at > now();

-- name: shots_by_status
SELECT status::text AS status, count(*) AS n FROM shots_queue GROUP BY status ORDER BY status;

-- name: running_shots
SELECT id, bot_slug, audience_total, sent_count, skipped_count, error_count, started_at,
       heartbeat_at, worker_id
FROM shots_queue WHERE status = 'running' ORDER BY id;
