-- Audience selection, one named INSERT … SELECT per shots_queue.target.
-- Adapt these (not Python) when the host schema differs. Each statement must insert the
-- shot's audience into shots_sent, each telegram_id once, `position` numbering the send
-- order from 1 (hot leads first), and must not touch any other shot.
-- Parameters: $1 shot id (bigint), $2 bot slug (text), $3 recency_days (int, NULL = no limit).

-- name: audience_started
INSERT INTO shots_sent (shot_id, telegram_id, bot_slug, position)
SELECT $1::bigint, c.telegram_id, c.bot_slug,
       row_number() OVER (ORDER BY c.last_interaction_at DESC NULLS LAST, c.telegram_id)
FROM telegram_contacts c
WHERE c.bot_slug = $2::text
  AND c.chat_state NOT IN ('blocked', 'deactivated')
  AND ($3::int IS NULL OR c.last_interaction_at >= now() - make_interval(days => $3::int));

-- name: audience_pix_created
INSERT INTO shots_sent (shot_id, telegram_id, bot_slug, position)
SELECT $1::bigint, c.telegram_id, c.bot_slug,
       row_number() OVER (ORDER BY c.last_interaction_at DESC NULLS LAST, c.telegram_id)
FROM telegram_contacts c
WHERE c.bot_slug = $2::text
  AND c.chat_state NOT IN ('blocked', 'deactivated')
  AND ($3::int IS NULL OR c.last_interaction_at >= now() - make_interval(days => $3::int))
  AND (
      EXISTS (SELECT 1 FROM funnel_events f
              WHERE f.bot_slug = c.bot_slug AND f.telegram_id = c.telegram_id
                AND f.event_name IN ('pix_created', 'checkout_pix_created'))
      OR EXISTS (SELECT 1 FROM payment_transactions p
                 WHERE p.bot_slug = c.bot_slug AND p.telegram_id = c.telegram_id
                   AND p.status IN ('created', 'paid'))
  );
