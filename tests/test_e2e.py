"""`shotsd run` as a real subprocess against the Bot API emulator and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from tests.botapi import Blocked, BotApiEmulator, ChatNotFound, Deactivated, Ok, ServerError
from tests.conftest import (
    TOKEN,
    add_contacts,
    add_shot,
    recipients_of,
    run_idle,
    shot_row,
    start_shotsd,
    wait_until,
    write_config,
)


@pytest.mark.asyncio
async def test_one_shot_end_to_end(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    audience = list(range(1000, 1120))
    await add_contacts(pool, "shop", audience)
    await add_contacts(pool, "shop", [5, 6], state="blocked")  # never selected
    emulator.script(1003, Blocked())
    emulator.script(1004, Deactivated())
    emulator.script(1005, ChatNotFound())
    emulator.script(1006, ServerError(400, "Bad Request: user not found"))
    shot = await add_shot(pool, copy="Promo <b>today</b> &amp; only today")
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 40.0})

    done = await run_idle(cfg)

    row = await shot_row(pool, shot)
    assert row["status"] == "error"  # one recipient failed for good
    assert row["last_error"] == (
        "1 of 120 recipients failed; most frequent: Bad Request: user not found (1)")
    assert (row["audience_total"], row["sent_count"], row["skipped_count"],
            row["error_count"]) == (120, 116, 3, 1)
    assert row["finished_at"] is not None
    assert row["attempt_count"] == 1

    recipients = await recipients_of(pool, shot)
    assert list(recipients) == audience  # hot leads first, each once
    delivered = {r.chat_id: r for r in emulator.delivered()}
    for telegram_id, rec in recipients.items():
        if telegram_id in (1003, 1004, 1005):
            assert rec["status"] == "skipped"
            assert rec["message_id"] is None
        elif telegram_id == 1006:
            assert (rec["status"], rec["error"]) == ("error", "Bad Request: user not found")
        else:
            assert rec["status"] == "sent"
            assert rec["sent_at"] is not None
            assert rec["message_id"] == delivered[telegram_id].response["result"]["message_id"]
    assert recipients[1003]["error"] == "Forbidden: bot was blocked by the user"

    states = dict(await pool.fetch(
        "SELECT telegram_id, chat_state FROM telegram_contacts WHERE telegram_id IN (1003, 1004)"))
    assert states == {1003: "blocked", 1004: "deactivated"}

    per_chat = Counter(r.chat_id for r in emulator.requests)
    assert set(per_chat) == set(audience)
    assert max(per_chat.values()) == 1
    first = emulator.requests[0]
    assert first.method == "sendMessage"
    assert first.payload == {
        "chat_id": first.chat_id, "parse_mode": "HTML",
        "text": "Promo <b>today</b> &amp; only today",
        "link_preview_options": {"is_disabled": True}}
    assert emulator.max_in_window(TOKEN) <= 40

    attempt = await pool.fetchrow("SELECT *, outcome::text FROM shots_attempts WHERE shot_id = $1",
                                  shot)
    assert (attempt["attempt"], attempt["outcome"], attempt["sent_count"],
            attempt["skipped_count"], attempt["error_count"]) == (1, "error", 116, 3, 1)
    events = done.events()
    for event in ("daemon_started", "shot_claimed", "audience_selected", "batch_sent",
                  "shot_finished", "daemon_stopped"):
        assert event in events
    # outcomes are written in batches, not one statement per recipient
    assert events.count("batch_sent") <= 20


@pytest.mark.asyncio
async def test_pacing_has_no_start_up_burst(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 61))
    await add_shot(pool)
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 20.0})
    await run_idle(cfg)
    arrivals = [r.at for r in emulator.requests]
    assert len(arrivals) == 60
    assert emulator.max_in_window(TOKEN) <= 20
    assert sum(1 for t in arrivals if t < arrivals[0] + 1.0) <= 20
    # and the limiter, not the concurrency cap, set the pace: ~3 s for 60 at 20/s
    assert arrivals[-1] - arrivals[0] >= 59 / 20 - 0.1


@pytest.mark.asyncio
async def test_unknown_bot_and_bad_copy_fail_alone_while_other_shots_are_served(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 11))
    await add_contacts(pool, "ghost", range(1, 11))
    ghost = await add_shot(pool, "ghost")
    too_long = await add_shot(pool, "shop", copy="x" * 5000)
    broken_html = await add_shot(pool, "shop", copy="<blink>hi</blink>")
    good = await add_shot(pool, "shop", scheduled_at=await pool.fetchval(
        "SELECT now() - interval '3 days'"))  # in the past: sent now
    future = await add_shot(pool, "shop", scheduled_at=await pool.fetchval(
        "SELECT now() + interval '30 days'"))  # far future: waits
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 200.0})

    await run_idle(cfg)

    ghost_row = await shot_row(pool, ghost)
    assert ghost_row["status"] == "error"
    assert "no bot 'ghost' is configured" in ghost_row["last_error"]
    # one shots_attempts row per claim, even for a claim refused on the spot
    attempts = await pool.fetch("SELECT shot_id, outcome::text FROM shots_attempts "
                                "WHERE shot_id = ANY($1::bigint[]) ORDER BY shot_id",
                                [ghost, too_long])
    assert [(a["shot_id"], a["outcome"]) for a in attempts] == [(ghost, "error"),
                                                                (too_long, "error")]
    long_row = await shot_row(pool, too_long)
    assert long_row["status"] == "error"
    assert "5000 characters" in long_row["last_error"]
    assert await recipients_of(pool, too_long) == {}  # refused before anything was selected
    html_row = await shot_row(pool, broken_html)
    assert html_row["status"] == "error"
    assert html_row["last_error"] == ('copy is not valid Telegram HTML: Unsupported start tag '
                                      '"blink" at byte offset 0')
    assert await recipients_of(pool, broken_html) == {}  # refused before anything was sent
    assert (await shot_row(pool, good))["status"] == "sent"
    assert len(emulator.delivered()) == 10
    future_row = await shot_row(pool, future)
    assert (future_row["status"], future_row["attempt_count"]) == ("pending", 0)


@pytest.mark.asyncio
async def test_empty_audience_is_skipped(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", [1], state="blocked")
    shot = await add_shot(pool, "shop")
    await run_idle(write_config(tmp_path / "c.toml", dsn, emulator.base_url))
    row = await shot_row(pool, shot)
    assert (row["status"], row["audience_total"]) == ("skipped", 0)
    assert emulator.requests == []


@pytest.mark.asyncio
async def test_sigterm_drains_releases_and_the_next_run_resumes(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 201))
    shot = await add_shot(pool)
    emulator.latency = 0.2  # requests are in flight when the signal arrives
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 50.0})
    proc = await start_shotsd("run", "--config", str(cfg))
    try:
        await wait_until(pool, "SELECT sent_count >= 20 FROM shots_queue WHERE id = $1", shot)
        proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        out, _err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0
        assert time.monotonic() - stopped_at < 10
    finally:
        if proc.returncode is None:
            proc.kill()
    assert b"shot_released" in out
    row = await shot_row(pool, shot)
    assert row["status"] == "pending"
    assert row["sent_count"] < 200
    statuses = Counter(r["status"] for r in (await recipients_of(pool, shot)).values())
    assert statuses["sending"] == 0  # every in-flight request was drained and written
    assert statuses["sent"] == len(emulator.delivered())
    attempt = await pool.fetchval("SELECT outcome::text FROM shots_attempts WHERE shot_id = $1",
                                  shot)
    assert attempt == "released"

    emulator.latency = 0.0
    await run_idle(cfg)
    row = await shot_row(pool, shot)
    assert (row["status"], row["sent_count"], row["attempt_count"]) == ("sent", 200, 2)
    per_chat = Counter(r.chat_id for r in emulator.requests)
    assert len(per_chat) == 200
    assert max(per_chat.values()) == 1


@pytest.mark.asyncio
async def test_repeated_sigkill_never_sends_anyone_the_shot_twice(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    kills, concurrency, audience = 3, 20, 400
    await add_contacts(pool, "shop", range(1, audience + 1))
    shot = await add_shot(pool)
    emulator.latency = 0.3  # requests are in flight at every kill
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 80.0},
                       worker={"concurrency": concurrency, "heartbeat_interval": 0.3,
                               "stale_after": 1.5, "max_attempts": kills + 2})
    for kill in range(1, kills + 1):
        proc = await start_shotsd("run", "--config", str(cfg))
        try:
            # each run makes progress first (a killed holder's lease must lapse: stale_after)
            await wait_until(
                pool, "SELECT sent_count >= $2 FROM shots_queue WHERE id = $1", shot, 60 * kill)
        finally:
            proc.kill()
            await proc.wait()
    emulator.latency = 0.0
    await run_idle(cfg)

    recipients = await recipients_of(pool, shot)
    assert len(recipients) == audience
    assert {r["status"] for r in recipients.values()} <= {"sent", "error"}  # all terminal
    unknown = [r for r in recipients.values() if r["status"] == "error"]
    assert all(r["error"].startswith("outcome unknown") for r in unknown)
    assert 0 < len(unknown) <= concurrency * kills
    per_chat = Counter(r.chat_id for r in emulator.requests)
    assert max(per_chat.values()) == 1  # nobody got the shot twice
    row = await shot_row(pool, shot)
    assert (row["status"], row["attempt_count"]) == ("error", kills + 1)
    assert row["sent_count"] == audience - len(unknown)
    outcomes = [r["outcome"] for r in await pool.fetch(
        "SELECT outcome::text FROM shots_attempts WHERE shot_id = $1 ORDER BY attempt", shot)]
    assert outcomes == ["reset"] * kills + ["error"]


@pytest.mark.asyncio
async def test_cancel_stops_a_running_shot_and_requeue_resumes_it(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 301))
    shot = await add_shot(pool)
    emulator.script(7, ServerError(400, "Bad Request: user not found"), Ok())
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 50.0})
    proc = await start_shotsd("run", "--config", str(cfg))
    try:
        await wait_until(pool, "SELECT sent_count >= 20 FROM shots_queue WHERE id = $1", shot)
        await pool.execute("UPDATE shots_queue SET status = 'cancelled' WHERE id = $1", shot)
        cancelled_at = time.monotonic()
        await wait_until(pool, "SELECT finished_at IS NOT NULL FROM shots_queue WHERE id = $1",
                          shot)
        # SPEC §3: a cancelled running shot stops sending within 2 s
        assert [r for r in emulator.requests if r.at > cancelled_at + 2.0] == []
        row = await shot_row(pool, shot)
        assert row["status"] == "cancelled"
        assert "cancelled by an operator" in row["last_error"]
        statuses = Counter(r["status"] for r in (await recipients_of(pool, shot)).values())
        assert statuses["pending"] > 0
        assert statuses["sending"] == 0

        await pool.execute("UPDATE shots_queue SET status = 'pending' WHERE id = $1", shot)
        await wait_until(pool, "SELECT status = 'sent' FROM shots_queue WHERE id = $1", shot)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 10)
    row = await shot_row(pool, shot)
    assert (row["sent_count"], row["error_count"], row["attempt_count"]) == (300, 0, 2)
    per_chat = Counter(r.chat_id for r in emulator.delivered())
    assert len(per_chat) == 300
    assert max(per_chat.values()) == 1
    assert [r.status for r in emulator.requests if r.chat_id == 7] == [400, 200]  # retried
