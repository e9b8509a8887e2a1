"""SPEC §3 with real daemons: prompt wake-up, the LISTEN connection coming back, leases
that keep long shots alive and hand dead daemons' shots over, and fencing of a stale holder."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from tests.botapi import BotApiEmulator
from tests.conftest import (
    add_contacts,
    add_shot,
    recipients_of,
    run_idle,
    shot_row,
    start_shotsd,
    wait_until,
    write_config,
)
from tests.tcpproxy import TcpProxy

LEASE = {"heartbeat_interval": 0.3, "stale_after": 1.5}


async def _stop(proc: asyncio.subprocess.Process) -> bytes:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    return out


async def _listening(pool: asyncpg.Pool, previous: int | None = None) -> int:
    """Waits for the daemon's LISTEN connection (a new one if `previous` is given)."""
    sql = ("SELECT pid FROM pg_stat_activity WHERE application_name = 'shotsd-listen' "
           "AND datname = current_database() AND pid IS DISTINCT FROM $1")
    await wait_until(pool, f"SELECT EXISTS ({sql})", previous)
    pid: int = await pool.fetchval(sql, previous)
    return pid


@pytest.mark.asyncio
async def test_a_due_shot_starts_within_a_second_of_its_insert_and_of_its_time(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", [1])
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       worker={"poll_interval": 60.0})  # polling alone would take a minute
    proc = await start_shotsd("run", "--config", str(cfg))
    try:
        listener = await _listening(pool)
        inserted = time.monotonic()
        await add_shot(pool, copy="now")
        await emulator.wait_for(lambda e: len(e.requests) == 1)
        assert emulator.requests[0].at - inserted < 1.0

        await add_shot(pool, copy="later",
                       scheduled_at=await pool.fetchval("SELECT now() + interval '2 s'"))
        scheduled = time.monotonic() + 2.0
        await emulator.wait_for(lambda e: len(e.requests) == 2, timeout=10)
        assert 0 <= emulator.requests[1].at - scheduled < 1.0

        # Postgres drops the LISTEN connection: the daemon reconnects and NOTIFY works again.
        await pool.execute("SELECT pg_terminate_backend($1)", listener)
        await _listening(pool, previous=listener)
        inserted = time.monotonic()
        await add_shot(pool, copy="after reconnect")
        await emulator.wait_for(lambda e: len(e.requests) == 3)
        assert emulator.requests[2].at - inserted < 1.0
    finally:
        out = await _stop(proc)
    assert proc.returncode == 0
    assert b"listen_connection_lost" in out
    assert [r.payload["text"] for r in emulator.requests] == ["now", "later", "after reconnect"]


@pytest.mark.asyncio
async def test_a_long_shot_is_never_reset_while_its_daemon_is_alive(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 121))
    shot = await add_shot(pool)
    emulator.latency = 0.05
    done = await run_idle(write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                                       telegram={"rate_per_second": 30.0}, worker=LEASE))
    row = await shot_row(pool, shot)
    # 4 s of sending against a 1.5 s lease: renewed all along, never reset
    assert (row["finished_at"] - row["started_at"]).total_seconds() > 2 * LEASE["stale_after"]
    assert (row["status"], row["attempt_count"]) == ("sent", 1)
    assert "stale_shot_reset" not in done.events()


@pytest.mark.asyncio
async def test_a_frozen_daemons_shot_is_taken_over_and_the_stale_holder_is_fenced_out(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 301))
    shot = await add_shot(pool)
    emulator.latency = 0.2
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 50.0},
                       worker={**LEASE, "poll_interval": 0.5})
    first = await start_shotsd("run", "--config", str(cfg))
    second: asyncio.subprocess.Process | None = None
    try:
        await wait_until(pool, "SELECT sent_count >= 30 FROM shots_queue WHERE id = $1", shot)
        first.send_signal(signal.SIGSTOP)  # alive but frozen: no heartbeat, requests hang
        frozen_at = time.monotonic()
        second = await start_shotsd("run", "--config", str(cfg))
        await wait_until(pool, "SELECT attempt_count = 2 FROM shots_queue WHERE id = $1",
                         shot, timeout=LEASE["stale_after"] + 0.5 + 5)
        taken_over_in = time.monotonic() - frozen_at
        first.send_signal(signal.SIGCONT)  # it wakes up believing it still holds the shot
        await wait_until(pool, "SELECT finished_at IS NOT NULL FROM shots_queue WHERE id = $1",
                         shot, timeout=30)
    finally:
        first.send_signal(signal.SIGCONT)
        first_out = await _stop(first)
        if second is not None:
            await _stop(second)
    assert taken_over_in < LEASE["stale_after"] + 0.5 + 2  # stale_after + poll, roughly
    assert b"shot_lost" in first_out  # the stale holder noticed and stopped
    per_chat = Counter(r.chat_id for r in emulator.requests)
    assert max(per_chat.values()) == 1  # nobody received the shot twice
    recipients = await recipients_of(pool, shot)
    assert {r["status"] for r in recipients.values()} <= {"sent", "error"}
    unknown = [r for r in recipients.values() if r["status"] == "error"]
    assert all(r["error"].startswith("outcome unknown") for r in unknown)
    assert len(unknown) <= 50  # the frozen holder's in-flight window at most
    attempts = await pool.fetch("SELECT outcome::text FROM shots_attempts WHERE shot_id = $1 "
                                "ORDER BY attempt", shot)
    final = "error" if unknown else "sent"
    assert [a["outcome"] for a in attempts] == ["reset", final]
    assert (await shot_row(pool, shot))["status"] == final


@pytest.mark.asyncio
async def test_a_database_outage_stops_sending_before_the_lease_expires_then_resumes(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 301))
    shot = await add_shot(pool)
    emulator.latency = 0.05
    lease = {"heartbeat_interval": 0.5, "stale_after": 3.0, "poll_interval": 0.5}
    async with TcpProxy(dsn) as proxy:
        cfg = write_config(tmp_path / "c.toml", proxy.dsn, emulator.base_url,
                           telegram={"rate_per_second": 50.0}, worker=lease)
        proc = await start_shotsd("run", "--exit-when-idle", "--config", str(cfg))
        try:
            await emulator.wait_for(lambda e: len(e.delivered()) >= 40)
            proxy.cut()
            cut_at = time.monotonic()
            await asyncio.sleep(lease["stale_after"] + 1.0)  # the outage lasts past the lease
            sent_in_outage = [r.at - cut_at for r in emulator.requests if r.at > cut_at]
            proxy.restore()
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
    assert proc.returncode == 0  # the daemon rode the outage out
    # it stopped sending before its lease could expire and another daemon take over
    assert max(sent_in_outage, default=0.0) < lease["stale_after"]
    assert b"shot_cycle_failed" in out
    assert b"stale_shot_reset" in out
    recipients = await recipients_of(pool, shot)
    assert {r["status"] for r in recipients.values()} <= {"sent", "error"}
    unknown = [r for r in recipients.values() if r["status"] == "error"]
    assert all(r["error"].startswith("outcome unknown") for r in unknown)
    assert len(unknown) <= 50  # at most the in-flight window
    per_chat = Counter(r.chat_id for r in emulator.requests)
    assert max(per_chat.values()) == 1  # nobody received the shot twice
    assert set(per_chat) | {r["telegram_id"] for r in unknown} == set(range(1, 301))
