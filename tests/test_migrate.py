"""Migrations: the schema the daemon expects, idempotence, refusal of a diverged history,
named constraints, triggers, and the daemon's refusal to run on a schema that is behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from daemon import migrate
from daemon.sqlfiles import migrations
from tests.conftest import add_shot, run_shotsd, write_config

EXPECTED_COLUMNS = {
    "shots_queue": {
        "id", "bot_slug", "target", "copy", "media_url", "media_type", "scheduled_at", "status",
        "attempt_count", "last_error", "created_at", "updated_at", "recency_days",
        "audience_total", "sent_count", "skipped_count", "error_count", "started_at",
        "finished_at", "worker_id", "heartbeat_at", "audience_selected_at",
    },
    "shots_sent": {"shot_id", "telegram_id", "bot_slug", "position", "status", "error",
                   "message_id", "sent_at"},
    "shots_attempts": {"shot_id", "attempt", "worker_id", "started_at", "finished_at",
                       "outcome", "sent_count", "skipped_count", "error_count", "error"},
}
EXPECTED_ENUMS = {
    "shots_target": ["started", "pix_created"],
    "shots_media_type": ["photo", "video", "audio", "none"],
    "shots_status": ["pending", "running", "sent", "skipped", "error", "cancelled"],
    "shots_recipient_status": ["pending", "sending", "sent", "skipped", "error"],
    "shots_attempt_outcome": ["sent", "skipped", "error", "cancelled", "released", "reset"],
}


@pytest.mark.asyncio
async def test_migrate_builds_the_expected_schema_and_is_idempotent(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        first = await migrate.migrate(conn)
        second = await migrate.migrate(conn)
        assert [m.version for m in first] == [m.version for m in migrations()]
        assert second == []
        for table, columns in EXPECTED_COLUMNS.items():
            rows = await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = $1", table)
            assert {r["column_name"] for r in rows} == columns, table
        for enum, labels in EXPECTED_ENUMS.items():
            got = await conn.fetchval(
                "SELECT array_agg(enumlabel ORDER BY enumsortorder) FROM pg_enum e "
                "JOIN pg_type t ON t.oid = e.enumtypid WHERE t.typname = $1", enum)
            assert got == labels, enum
        indexes = {r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
        assert {"shots_queue_status_scheduled_idx", "shots_queue_bot_status_scheduled_idx",
                "shots_queue_one_running_per_bot", "shots_sent_shot_status_idx",
                "shots_sent_bot_sent_at_idx"} <= indexes
        await migrate.check(conn)  # does not raise
        # migrate never creates host tables
        assert await conn.fetchval("SELECT to_regclass('telegram_contacts')") is None
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_concurrent_migrate_runs_apply_once(empty_dsn: str) -> None:
    conns = [await asyncpg.connect(empty_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate.migrate(c) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, len(migrations())]
    finally:
        for conn in conns:
            await conn.close()


@pytest.mark.asyncio
async def test_migrate_refuses_a_database_whose_history_differs(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        await migrate.migrate(conn)
        await conn.execute(f"UPDATE {migrate.VERSION_TABLE} SET checksum = 'edited'")
        with pytest.raises(migrate.MigrationError, match="must never be edited"):
            await migrate.migrate(conn)
        await conn.execute(
            f"INSERT INTO {migrate.VERSION_TABLE} VALUES (9999, 'future', 'x', now())")
        await conn.execute(f"UPDATE {migrate.VERSION_TABLE} SET checksum = $1 WHERE version = 1",
                           migrations()[0].checksum)
        with pytest.raises(migrate.MigrationError, match="upgrade this one"):
            await migrate.check(conn)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_cli_migrate_then_run_refuses_behind_schema(empty_dsn: str, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", empty_dsn)
    behind = await run_shotsd("run", "--exit-when-idle", "--config", str(cfg))
    assert behind.returncode == 1
    assert "run shotsd migrate" in behind.stderr

    first = await run_shotsd("migrate", "--config", str(cfg))
    again = await run_shotsd("migrate", "--config", str(cfg))
    assert first.returncode == 0
    assert "applied 1 migration(s): 0001_shots" in first.stdout
    assert again.returncode == 0
    assert "applied 0 migration(s)" in again.stdout

    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(f"UPDATE {migrate.VERSION_TABLE} SET checksum = 'edited'")
    finally:
        await conn.close()
    refused = await run_shotsd("migrate", "--config", str(cfg))
    assert refused.returncode == 1
    assert "0001_shots" in refused.stderr


@pytest.mark.parametrize(
    ("columns", "constraint"),
    [
        ({"copy": "   \n"}, "shots_queue_copy_not_blank"),
        ({"bot_slug": " "}, "shots_queue_bot_slug_not_blank"),
        ({"media_url": "https://x.test/a.jpg"}, "shots_queue_media_url_without_media_type"),
        ({"media_type": "photo"}, "shots_queue_media_type_without_media_url"),
        ({"media_type": "photo", "media_url": "ftp://x.test/a.jpg"},
         "shots_queue_media_url_not_http"),
        ({"media_type": "video", "media_url": "https:// spaced"}, "shots_queue_media_url_not_http"),
        ({"recency_days": 0}, "shots_queue_recency_days_not_positive"),
        ({"status": "running"}, "shots_queue_running_without_worker"),
    ],
)
@pytest.mark.asyncio
async def test_bad_rows_are_refused_with_a_named_constraint(
    pool: asyncpg.Pool, columns: dict[str, object], constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as err:
        await add_shot(pool, **columns)
    assert err.value.constraint_name == constraint
    assert await pool.fetchval("SELECT count(*) FROM shots_queue") == 0


@pytest.mark.asyncio
async def test_enum_typos_are_refused(pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.InvalidTextRepresentationError, match="shots_target"):
        await pool.execute("INSERT INTO shots_queue (bot_slug, target, copy) "
                           "VALUES ('shop', 'everyone', 'hi')")


@pytest.mark.asyncio
async def test_updated_at_follows_operator_updates(pool: asyncpg.Pool) -> None:
    shot = await add_shot(pool)
    before = await pool.fetchval("SELECT updated_at FROM shots_queue WHERE id = $1", shot)
    await pool.execute("UPDATE shots_queue SET copy = 'fixed copy' WHERE id = $1", shot)
    after = await pool.fetchval("SELECT updated_at FROM shots_queue WHERE id = $1", shot)
    assert after > before


@pytest.mark.asyncio
async def test_pending_rows_notify_listeners(pool: asyncpg.Pool, dsn: str) -> None:
    listener = await asyncpg.connect(dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener("shots_queue", lambda *args: got.put_nowait(args[3]))
        shot = await add_shot(pool)
        assert await asyncio.wait_for(got.get(), 5) == str(shot)
        await pool.execute("UPDATE shots_queue SET status = 'cancelled' WHERE id = $1", shot)
        await pool.execute("UPDATE shots_queue SET status = 'pending' WHERE id = $1", shot)
        assert await asyncio.wait_for(got.get(), 5) == str(shot)
        await pool.execute("UPDATE shots_queue SET scheduled_at = now() WHERE id = $1", shot)
        assert await asyncio.wait_for(got.get(), 5) == str(shot)  # rescheduled: made due
        await pool.execute("UPDATE shots_queue SET copy = 'edited' WHERE id = $1", shot)
        assert got.empty()  # neither the cancel nor an edit of the copy notified
    finally:
        await listener.close()
