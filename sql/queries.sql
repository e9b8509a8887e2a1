-- Every statement the daemon runs at run time, by name (parsed once by daemon/sqlfiles.py).
-- Each block starts with `-- name: <name>`; the comments under it name its $n parameters.
-- Fencing: every write for a running shot checks, in the same statement or under the same
-- row lock, that the writer's claim still holds the shot (status + worker_id + the claim's
-- attempt_count), so a reset, a cancel or a later claim is serialised against it.

-- name: claim_shot
-- Claims the oldest due pending shot whose bot has no running shot, in one statement.
-- $1 worker_id (text), $2 ids of shots this daemon is still winding down (bigint[])
WITH candidate AS (
    -- SKIP LOCKED: concurrent daemons each take a different row instead of queueing.
    -- The NOT EXISTS is only a fast path; the unique index shots_queue_one_running_per_bot
    -- is what makes one-running-per-bot true under races (the loser gets a unique violation).
    SELECT q.id, q.finished_at
    FROM shots_queue q
    WHERE q.status = 'pending'
      AND q.scheduled_at <= now()
      AND q.id <> ALL($2::bigint[])
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

-- name: lock_claim
-- Opens an attempt: locks the shot if this claim still holds it. $1 shot_id, $2 worker_id,
-- $3 attempt (the claim's attempt_count: a later claim, even by the same daemon, wins)
SELECT status::text AS status FROM shots_queue
WHERE id = $1::bigint AND worker_id = $2::text AND attempt_count = $3::int
  AND status IN ('running', 'cancelled')
FOR UPDATE;

-- name: insert_attempt
-- Every claim has its own attempt number (attempt_count), so this never meets an older row.
-- $1 shot_id, $2 attempt number, $3 worker_id
INSERT INTO shots_attempts (shot_id, attempt, worker_id)
VALUES ($1::bigint, $2::int, $3::text);

-- name: mark_unknown_outcomes
-- Recipients left 'sending' by a previous holder may have received the message: never
-- resend them. $1 shot_id, $2 error text (starts with "outcome unknown")
UPDATE shots_sent
SET status = 'error', error = $2::text
WHERE shot_id = $1::bigint AND status = 'sending';

-- name: retry_failed_recipients
-- On an operator's requeue, recipients that failed with a known outcome are tried again;
-- 'outcome unknown' and 'partially delivered' ones are not (they may have it already).
-- $1 shot_id
UPDATE shots_sent
SET status = 'pending', error = NULL
WHERE shot_id = $1::bigint AND status = 'error'
  AND error NOT LIKE 'outcome unknown%' AND error NOT LIKE 'partially delivered%';

-- name: recount_shot
-- Recomputes the live counters from the recipients (inside lock_claim's transaction).
-- $1 shot_id
UPDATE shots_queue q
SET sent_count = c.sent, skipped_count = c.skipped, error_count = c.error
FROM (SELECT count(*) FILTER (WHERE status = 'sent') AS sent,
             count(*) FILTER (WHERE status = 'skipped') AS skipped,
             count(*) FILTER (WHERE status = 'error') AS error
      FROM shots_sent WHERE shot_id = $1::bigint) AS c
WHERE q.id = $1::bigint;

-- name: mark_audience_selected
-- Records that the audience was materialised, in the same transaction as the INSERT … SELECT.
-- $1 shot_id, $2 worker_id, $3 attempt
UPDATE shots_queue
SET audience_selected_at = now(),
    audience_total = (SELECT count(*) FROM shots_sent WHERE shot_id = $1::bigint)
WHERE id = $1::bigint AND worker_id = $2::text AND attempt_count = $3::int
  AND status IN ('running', 'cancelled')
RETURNING audience_total;

-- name: shot_cycle
-- The running shot's one periodic round trip: writes a batch of outcomes, the contacts' new
-- chat_state and the live counters, renews the lease, and reserves the next recipients
-- ('pending' -> 'sending', before any request for them goes out, so a crash can never lead
-- to a resend). Nothing is written unless the caller still holds the shot; a cancelled
-- shot's in-flight outcomes are still written, but nothing new is reserved for it.
-- An operator who sets a running shot back to 'pending' takes it away: its outcomes are
-- still written (nobody else can hold it yet), then the runner stops.
-- Always returns one row: status NULL means the shot is no longer ours.
-- $1 shot_id, $2 worker_id, $3 attempt, $4 telegram_ids bigint[], $5 statuses text[],
-- $6 errors text[], $7 message_ids bigint[], $8 chat_states text[] (NULL = leave the
-- contact alone), $9 how many recipients to reserve, $10 the runner's in-flight recipients
-- (bigint[]) when an earlier cycle failed, else NULL: a cycle that committed but whose
-- answer was lost reserved rows the runner never heard of; they go back to 'pending'.
WITH fence AS (
    SELECT id, bot_slug, status FROM shots_queue
    WHERE id = $1::bigint AND worker_id = $2::text AND attempt_count = $3::int
      AND status IN ('running', 'cancelled', 'pending')
    FOR UPDATE
), input AS (
    SELECT * FROM unnest($4::bigint[], $5::text[], $6::text[], $7::bigint[], $8::text[])
        AS i(telegram_id, status, error, message_id, chat_state)
), written AS (
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
), orphans AS (
    -- Only this claim can have 'sending' rows here: lock_claim turned older ones unknown.
    UPDATE shots_sent s
    SET status = 'pending'
    FROM fence
    WHERE $10::bigint[] IS NOT NULL AND s.shot_id = fence.id AND s.status = 'sending'
      AND s.telegram_id <> ALL($10::bigint[])
    RETURNING 1
), next_batch AS (
    -- Reads the statement's snapshot, so rows `written` turns back to 'pending' (a halted
    -- shot's unsent recipients) are still 'sending' here and never reserved twice.
    SELECT s.telegram_id
    FROM shots_sent s, fence
    WHERE fence.status = 'running' AND s.shot_id = fence.id AND s.status = 'pending'
    ORDER BY s.position
    LIMIT $9::int
    FOR UPDATE OF s
), reserved AS (
    UPDATE shots_sent s
    SET status = 'sending'
    FROM next_batch
    WHERE s.shot_id = $1::bigint AND s.telegram_id = next_batch.telegram_id
    RETURNING s.telegram_id, s.position
), shot AS (
    UPDATE shots_queue q
    SET sent_count = q.sent_count + (SELECT count(*) FROM written WHERE status = 'sent'),
        skipped_count = q.skipped_count + (SELECT count(*) FROM written WHERE status = 'skipped'),
        error_count = q.error_count + (SELECT count(*) FROM written WHERE status = 'error'),
        heartbeat_at = CASE WHEN q.status = 'pending' THEN q.heartbeat_at ELSE now() END
    FROM fence
    WHERE q.id = fence.id
    RETURNING q.status
)
SELECT (SELECT status::text FROM shot) AS status,
       (SELECT coalesce(array_agg(telegram_id ORDER BY position), '{}') FROM reserved)
           AS reserved,
       (SELECT count(*) FROM written WHERE status = 'sent') AS sent,
       (SELECT count(*) FROM written WHERE status = 'skipped') AS skipped,
       (SELECT count(*) FROM written WHERE status = 'error') AS error,
       (SELECT count(*) FROM orphans) AS orphans;

-- name: reset_stale_shots
-- Any daemon hands back shots whose holder stopped renewing its lease: to 'pending' to be
-- resumed, or to 'error' once they have used max_attempts (attempts released by a graceful
-- shutdown do not count). Recipients left in flight by a shot given up on become
-- 'outcome unknown' errors now, since nobody will resume it.
-- $1 stale_after in seconds (float), $2 max_attempts (int), $3 error text for unknowns
WITH stale AS (
    SELECT q.id, q.worker_id, q.attempt_count,
           (SELECT count(*) FROM shots_attempts a
            WHERE a.shot_id = q.id AND a.outcome IS DISTINCT FROM 'released') AS used
    FROM shots_queue q
    WHERE q.status = 'running' AND q.heartbeat_at < now() - make_interval(secs => $1::float8)
    FOR UPDATE OF q SKIP LOCKED
), reset AS (
    UPDATE shots_queue q
    SET status = CASE WHEN stale.used >= $2::int THEN 'error' ELSE 'pending' END::shots_status,
        last_error = CASE WHEN stale.used >= $2::int
            THEN format('gave up after %s attempts: its daemon (%s) stopped renewing the lease',
                        stale.used, stale.worker_id)
            ELSE q.last_error END,
        finished_at = CASE WHEN stale.used >= $2::int THEN now() ELSE q.finished_at END
    FROM stale
    WHERE q.id = stale.id
    RETURNING q.id, q.bot_slug, q.status, q.attempt_count, stale.worker_id AS previous_worker
), unknown AS (
    UPDATE shots_sent s
    SET status = 'error', error = $3::text
    FROM reset
    WHERE reset.status = 'error' AND s.shot_id = reset.id AND s.status = 'sending'
    RETURNING s.shot_id
), attempts AS (
    UPDATE shots_attempts a
    SET finished_at = now(), outcome = 'reset',
        error = format('lease expired: no heartbeat for %s s', $1::float8)
    FROM reset
    WHERE a.shot_id = reset.id AND a.attempt = reset.attempt_count AND a.finished_at IS NULL
    RETURNING 1
)
SELECT id, bot_slug, status::text AS status, previous_worker,
       (SELECT count(*) FROM unknown u WHERE u.shot_id = reset.id) AS unknown
FROM reset ORDER BY id;

-- name: lock_for_finish
-- Locks a shot the writer holds and returns its recipients' tally and most frequent error.
-- $1 shot_id, $2 worker_id, $3 attempt
WITH fence AS (
    SELECT id, status FROM shots_queue
    WHERE id = $1::bigint AND worker_id = $2::text AND attempt_count = $3::int
      AND status IN ('running', 'cancelled')
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
-- (inside lock_for_finish's transaction) $1 shot_id, $2 final status, $3 last_error,
-- $4 sent, $5 skipped, $6 error
UPDATE shots_queue
SET status = $2::text::shots_status,
    last_error = $3::text,
    sent_count = $4::int, skipped_count = $5::int, error_count = $6::int,
    finished_at = now()
WHERE id = $1::bigint;

-- name: release_shot
-- Graceful shutdown hands a running shot back to the queue. $1 shot_id, $2 worker_id,
-- $3 attempt
UPDATE shots_queue
SET status = 'pending'
WHERE id = $1::bigint AND worker_id = $2::text AND attempt_count = $3::int
  AND status = 'running'
RETURNING id;

-- name: finish_attempt
-- Closes the claim's attempt row, writing it if the attempt never got to open one (a shot
-- refused at claim time): one row per claim either way.
-- $1 shot_id, $2 attempt, $3 outcome, $4 sent, $5 skipped, $6 error count, $7 error text,
-- $8 worker_id
INSERT INTO shots_attempts AS a (shot_id, attempt, worker_id, finished_at, outcome,
                                 sent_count, skipped_count, error_count, error)
VALUES ($1::bigint, $2::int, $8::text, now(), $3::text::shots_attempt_outcome,
        $4::int, $5::int, $6::int, $7::text)
ON CONFLICT (shot_id, attempt) DO UPDATE
SET finished_at = EXCLUDED.finished_at, outcome = EXCLUDED.outcome,
    sent_count = EXCLUDED.sent_count, skipped_count = EXCLUDED.skipped_count,
    error_count = EXCLUDED.error_count, error = EXCLUDED.error;

-- name: queue_state
-- The picker's one look at the queue per pass, on the database's clock:
-- due / oldest_age: pending shots past their scheduled_at, for the shots_jobs_due and
--   shots_oldest_due_job_age_seconds gauges. A shot waiting for its bot's running shot is
--   queued by design, not late: it is left out, or a second shot behind a 67-minute
--   broadcast would look like a stuck daemon.
-- next_due_in: seconds until the next pending shot becomes due (NULL when none), so the
--   picker can wake for it; shots waiting for their bot are woken when its shot ends.
-- busy: a shot runs (here or elsewhere) or is due: `run --exit-when-idle` keeps waiting.
WITH due AS (
    SELECT q.scheduled_at
    FROM shots_queue q
    WHERE q.status = 'pending' AND q.scheduled_at <= now()
      AND NOT EXISTS (SELECT 1 FROM shots_queue r
                      WHERE r.bot_slug = q.bot_slug AND r.status = 'running')
)
SELECT (SELECT count(*) FROM due) AS due,
       coalesce((SELECT extract(epoch FROM now() - min(scheduled_at)) FROM due), 0)::float8
           AS oldest_age,
       (SELECT extract(epoch FROM min(scheduled_at) - now()) FROM shots_queue
        WHERE status = 'pending' AND scheduled_at > now())::float8 AS next_due_in,
       EXISTS (SELECT 1 FROM shots_queue WHERE status = 'running')
           OR EXISTS (SELECT 1 FROM due) AS busy;

-- name: ping
SELECT 1;

-- name: shots_by_status
SELECT status::text AS status, count(*) AS n FROM shots_queue GROUP BY status ORDER BY status;

-- name: running_shots
-- Progress of running shots for `shotsd status`. The rate is the current attempt's: messages
-- sent in the last minute (the bot_slug + sent_at index finds them), over the attempt's age
-- when it is younger than that.
SELECT q.id, q.bot_slug, q.audience_total, q.sent_count, q.skipped_count, q.error_count,
       (SELECT count(*) FROM shots_sent s
        WHERE s.bot_slug = q.bot_slug AND s.shot_id = q.id
          AND s.sent_at > greatest(now() - interval '60 seconds', a.started_at))
           AS recent_sent,
       coalesce(extract(epoch FROM now() - a.started_at), 0)::float8 AS attempt_seconds
FROM shots_queue q
LEFT JOIN shots_attempts a ON a.shot_id = q.id AND a.attempt = q.attempt_count
WHERE q.status = 'running' ORDER BY q.id;
