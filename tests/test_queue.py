"""Claiming and audience selection against a real PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from daemon.db import Db, Lease
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
    until = await Db(pool).seconds_to_next_due()
    assert until is not None
    assert 3500 < until <= 3600


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
