"""Claiming and audience selection against a real PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from daemon.config import WorkerConfig
from daemon.db import UNKNOWN_OUTCOME, AttemptCounts, Db, Lease, RecipientOutcome
from daemon.picker import Picker
from tests.conftest import add_contacts, add_shot

WORKER_A, WORKER_B = "host-a:1:aaaa", "host-b:2:bbbb"


@pytest.mark.asyncio
async def test_two_claimers_racing_for_one_shot_one_wins(dsn: str, pool: asyncpg.Pool) -> None:
    shot = await add_shot(pool)
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=1) for _ in range(8)]
    try:
        results = await asyncio.gather(*(Db(p).claim_shot(f"w{i}") for i, p in enumerate(pools)))
    finally:
        for p in pools:
            await p.close()
    winners = [r for r in results if r is not None]
    assert [w.id for w in winners] == [shot]
    row = await pool.fetchrow("SELECT * FROM shots_queue WHERE id = $1", shot)
    assert row["status"] == "running"
    assert row["attempt_count"] == 1
    assert row["worker_id"] in {f"w{i}" for i in range(8)}
    assert row["started_at"] is not None
    assert row["heartbeat_at"] is not None


@pytest.mark.asyncio
async def test_at_most_one_running_shot_per_bot(pool: asyncpg.Pool) -> None:
    db = Db(pool)
    first = await add_shot(pool, "shop")
    await add_shot(pool, "shop")
    other = await add_shot(pool, "other")
    a = await db.claim_shot(WORKER_A)
    b = await db.claim_shot(WORKER_B)
    c = await db.claim_shot(WORKER_B)
    assert a is not None
    assert b is not None
    assert c is None
    assert (a.id, b.id) == (first, other)  # oldest first; shop's second shot waits
    with pytest.raises(asyncpg.UniqueViolationError, match="shots_queue_one_running_per_bot"):
        await pool.execute("UPDATE shots_queue SET status = 'running', worker_id = 'x', "
                           "heartbeat_at = now() WHERE bot_slug = 'shop' AND status = 'pending'")


@pytest.mark.asyncio
async def test_concurrent_claims_of_one_bots_shots_never_run_two(
    dsn: str, pool: asyncpg.Pool
) -> None:
    for _ in range(5):
        await add_shot(pool, "shop")
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=1) for _ in range(5)]
    try:
        results = await asyncio.gather(*(Db(p).claim_shot(f"w{i}") for i, p in enumerate(pools)))
    finally:
        for p in pools:
            await p.close()
    assert len([r for r in results if r is not None]) == 1
    assert await pool.fetchval("SELECT count(*) FROM shots_queue WHERE status = 'running'") == 1


@pytest.mark.asyncio
async def test_future_and_non_pending_shots_are_not_claimed(pool: asyncpg.Pool) -> None:
    await add_shot(pool, scheduled_at=await pool.fetchval("SELECT now() + interval '1 hour'"))
    for status in ("sent", "error", "cancelled", "skipped"):
        await add_shot(pool, status=status)
    assert await Db(pool).claim_shot(WORKER_A) is None
    state = await Db(pool).queue_state()
    assert state.next_due_in is not None
    assert 3500 < state.next_due_in <= 3600
    assert (state.due, state.busy) == (0, False)


async def _audience(pool: asyncpg.Pool, shot_id: int) -> list[int]:
    db = Db(pool)
    claimed = await db.claim_shot(WORKER_A)
    assert claimed is not None
    assert claimed.id == shot_id
    lease = Lease(claimed.id, WORKER_A, claimed.attempt)
    assert await db.select_audience(claimed, lease) is not None
    rows = await pool.fetch(
        "SELECT telegram_id, position, status::text FROM shots_sent WHERE shot_id = $1 "
        "ORDER BY position", shot_id)
    assert [r["position"] for r in rows] == list(range(1, len(rows) + 1))
    assert {r["status"] for r in rows} <= {"pending"}
    total = await pool.fetchval("SELECT audience_total FROM shots_queue WHERE id = $1", shot_id)
    assert total == len(rows)
    return [r["telegram_id"] for r in rows]


@pytest.mark.asyncio
async def test_started_audience_excludes_blocked_deactivated_other_bots(
    pool: asyncpg.Pool,
) -> None:
    await add_contacts(pool, "shop", [1, 2, 3])
    await add_contacts(pool, "shop", [4], state="blocked")
    await add_contacts(pool, "shop", [5], state="deactivated")
    await add_contacts(pool, "shop", [6], state="left_funnel")  # other host states are sent
    await add_contacts(pool, "other", [7, 8])
    shot = await add_shot(pool, "shop")
    assert sorted(await _audience(pool, shot)) == [1, 2, 3, 6]


@pytest.mark.asyncio
async def test_started_audience_recency_and_hot_leads_first(pool: asyncpg.Pool) -> None:
    await add_contacts(pool, "shop", [10], days_ago=40)
    await add_contacts(pool, "shop", [11, 12], days_ago=2)
    await add_contacts(pool, "shop", [13], days_ago=0.5)
    await add_contacts(pool, "shop", [14], days_ago=29)
    await pool.execute("INSERT INTO telegram_contacts (bot_slug, telegram_id) VALUES ('shop', 9)")
    everyone = await add_shot(pool, "shop")
    assert await _audience(pool, everyone) == [13, 11, 12, 14, 10, 9]  # NULLS LAST, id ties
    await pool.execute("UPDATE shots_queue SET status = 'sent' WHERE id = $1", everyone)
    recent = await add_shot(pool, "shop", recency_days=30)
    assert await _audience(pool, recent) == [13, 11, 12, 14]


@pytest.mark.asyncio
async def test_audience_is_selected_once(pool: asyncpg.Pool) -> None:
    await add_contacts(pool, "shop", [1, 2])
    shot = await add_shot(pool, "shop")
    assert await _audience(pool, shot) == [1, 2]
    claimed = await Db(pool).claim_shot(WORKER_B)
    assert claimed is None  # still running: nobody else can claim it
    await pool.execute("UPDATE shots_queue SET status = 'pending' WHERE id = $1", shot)
    again = await Db(pool).claim_shot(WORKER_B)
    assert again is not None
    assert again.audience_selected


@pytest.mark.asyncio
async def test_audience_selection_is_fenced(pool: asyncpg.Pool) -> None:
    await add_contacts(pool, "shop", [1, 2])
    await add_shot(pool, "shop")
    db = Db(pool)
    claimed = await db.claim_shot(WORKER_A)
    assert claimed is not None
    assert await db.select_audience(claimed, Lease(claimed.id, WORKER_B, 1)) is None
    assert await db.select_audience(claimed, Lease(claimed.id, WORKER_A, 2)) is None
    assert await pool.fetchval("SELECT count(*) FROM shots_sent") == 0  # nothing written


@pytest.mark.asyncio
async def test_pix_created_audience(pool: asyncpg.Pool) -> None:
    await add_contacts(pool, "shop", range(1, 9))
    await add_contacts(pool, "shop", [9], state="blocked")
    await add_contacts(pool, "shop", [10], days_ago=60)
    await pool.executemany(
        "INSERT INTO funnel_events (bot_slug, telegram_id, event_name) VALUES ($1, $2, $3)",
        [("shop", 1, "pix_created"), ("shop", 2, "checkout_pix_created"), ("shop", 3, "start"),
         ("other", 4, "pix_created"), ("shop", 9, "pix_created"), ("shop", 10, "pix_created"),
         ("shop", 1, "checkout_pix_created")])  # a second event: still one recipient
    await pool.executemany(
        "INSERT INTO payment_transactions (bot_slug, telegram_id, status) VALUES ($1, $2, $3)",
        [("shop", 5, "created"), ("shop", 6, "paid"), ("shop", 7, "refused"),
         ("other", 8, "paid")])
    everyone = await add_shot(pool, "shop", target="pix_created")
    assert sorted(await _audience(pool, everyone)) == [1, 2, 5, 6, 10]
    await pool.execute("UPDATE shots_queue SET status = 'sent' WHERE id = $1", everyone)
    recent = await add_shot(pool, "shop", target="pix_created", recency_days=30)
    assert sorted(await _audience(pool, recent)) == [1, 2, 5, 6]


async def _stale(pool: asyncpg.Pool, shot_id: int) -> None:
    await pool.execute("UPDATE shots_queue SET heartbeat_at = now() - interval '2 minutes' "
                       "WHERE id = $1", shot_id)


@pytest.mark.asyncio
async def test_stale_shots_are_reset_then_given_up_after_max_attempts(pool: asyncpg.Pool) -> None:
    await add_contacts(pool, "shop", [1, 2, 3])
    shot = await add_shot(pool, "shop")
    db = Db(pool)
    for attempt in (1, 2):
        claimed = await db.claim_shot(WORKER_A)
        assert claimed is not None
        assert claimed.attempt == attempt
        lease = Lease(shot, WORKER_A, attempt)
        assert await db.begin_attempt(claimed, lease) == (0 if attempt == 1 else 1)
        if attempt == 1:
            await db.select_audience(claimed, lease)
            first_started = await pool.fetchval(
                "SELECT started_at FROM shots_queue WHERE id = $1", shot)
        assert (await db.cycle(lease, [], 1)).reserved == [1 if attempt == 1 else 2]
        assert await db.reset_stale(60, 3) == []  # the lease is fresh
        await _stale(pool, shot)
        [reset] = await db.reset_stale(60, 2)
        assert (reset.shot_id, reset.bot_slug) == (shot, "shop")
        # given up at the second reset: recipient 2, in flight, is reported unknown
        assert (reset.status, reset.unknown) == (("pending", 0) if attempt == 1 else ("error", 1))
    row = await pool.fetchrow("SELECT status::text, last_error, finished_at, started_at "
                              "FROM shots_queue WHERE id = $1", shot)
    assert row["started_at"] == first_started  # set by the first claim only
    assert row["status"] == "error"
    assert row["last_error"].startswith(f"gave up after 2 attempts: its daemon ({WORKER_A})")
    assert row["finished_at"] is not None
    sent = dict(await pool.fetch("SELECT telegram_id, status::text FROM shots_sent "
                                 "WHERE shot_id = $1", shot))
    # recipient 1 was in flight at the first reset and 2 at the second: unknown, never pending
    assert sent == {1: "error", 2: "error", 3: "pending"}
    outcomes = await pool.fetch("SELECT outcome::text FROM shots_attempts WHERE shot_id = $1 "
                                "ORDER BY attempt", shot)
    assert [r["outcome"] for r in outcomes] == ["reset", "reset"]


@pytest.mark.asyncio
async def test_released_attempts_do_not_count_against_max_attempts(pool: asyncpg.Pool) -> None:
    shot = await add_shot(pool, "shop")
    db = Db(pool)
    for attempt in (1, 2, 3):
        claimed = await db.claim_shot(WORKER_A)
        assert claimed is not None
        lease = Lease(shot, WORKER_A, attempt)
        assert await db.begin_attempt(claimed, lease) == 0
        if attempt < 3:
            assert await db.release_shot(lease, AttemptCounts())
    await _stale(pool, shot)
    [reset] = await db.reset_stale(60, 2)
    assert reset.status == "pending"  # 1 counted attempt of 2


@pytest.mark.asyncio
async def test_a_stale_claim_cannot_write_after_a_newer_claim(pool: asyncpg.Pool) -> None:
    await add_contacts(pool, "shop", [1, 2])
    shot = await add_shot(pool, "shop")
    db = Db(pool)
    first = await db.claim_shot(WORKER_A)
    assert first is not None
    old = Lease(shot, WORKER_A, 1)
    assert await db.begin_attempt(first, old) == 0
    await db.select_audience(first, old)
    assert (await db.cycle(old, [], 1)).reserved == [1]
    await pool.execute("UPDATE shots_queue SET status = 'pending' WHERE id = $1", shot)
    second = await db.claim_shot(WORKER_A)  # the same daemon claims it again
    assert second is not None
    assert second.attempt == 2

    outcome = RecipientOutcome(1, "sent", message_id=7)
    stale = await db.cycle(old, [outcome], 5)
    assert stale.status is None
    assert stale.reserved == []
    assert await db.begin_attempt(first, old) is None
    assert not await db.release_shot(old, AttemptCounts())
    assert await db.finish_shot(old, AttemptCounts(), lambda _t: ("sent", None)) is None
    assert await pool.fetchval("SELECT status::text FROM shots_sent WHERE telegram_id = 1 "
                               "AND shot_id = $1", shot) == "sending"  # untouched
    new = Lease(shot, WORKER_A, 2)
    assert await db.begin_attempt(second, new) == 1  # the live claim turns it into unknown
    assert await pool.fetchval("SELECT error FROM shots_sent WHERE telegram_id = 1 "
                               "AND shot_id = $1", shot) == UNKNOWN_OUTCOME


@pytest.mark.asyncio
async def test_the_picker_claims_up_to_max_running_shots_one_per_bot(pool: asyncpg.Pool) -> None:
    for bot in ("a", "b", "c", "a"):
        await add_shot(pool, bot)
    picker = Picker(Db(pool), WORKER_A, WorkerConfig(max_running_shots=2))
    first = await picker.claim_due(running=[])
    assert [s.bot_slug for s in first] == ["a", "b"]
    assert await picker.claim_due(running=[s.id for s in first]) == []  # at the cap
    third = await picker.claim_due(running=[first[0].id])  # one slot free: bot c, not a again
    assert [s.bot_slug for s in third] == ["c"]


@pytest.mark.asyncio
async def test_due_gauges_leave_out_shots_queued_behind_their_bots_running_shot(
    pool: asyncpg.Pool,
) -> None:
    db = Db(pool)
    hour_ago = await pool.fetchval("SELECT now() - interval '1 hour'")
    await add_shot(pool, "shop", scheduled_at=hour_ago)
    assert await db.claim_shot(WORKER_A) is not None  # shop is busy now
    await add_shot(pool, "shop", scheduled_at=hour_ago)  # waits for shop, by design
    state = await db.queue_state()
    assert (state.due, state.oldest_age, state.busy) == (0, 0.0, True)  # busy: shop runs
    await add_shot(pool, "other", scheduled_at=await pool.fetchval(
        "SELECT now() - interval '10 minutes'"))
    state = await db.queue_state()
    assert state.due == 1
    assert 590 < state.oldest_age < 700
