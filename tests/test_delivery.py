"""SPEC §5 through the real daemon: payloads per media type and every row of the outcome
table, asserted on the emulator's request log and the database."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from tests.botapi import BadGateway, BotApiEmulator, Ok, RetryAfter, ServerError, Slow
from tests.conftest import (
    TOKEN,
    add_contacts,
    add_shot,
    recipients_of,
    run_idle,
    run_shotsd,
    shot_row,
    shotsd_env,
    start_shotsd,
    write_config,
)

URL = "https://cdn.example/file"


@pytest.mark.asyncio
async def test_media_types_and_caption_overflow(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", [1, 2])
    long_copy = "<b>" + "x" * 1100 + "</b>"
    photo = await add_shot(pool, copy="A photo", media_type="photo", media_url=URL + ".jpg")
    video = await add_shot(pool, copy=long_copy, media_type="video", media_url=URL + ".mp4")
    audio = await add_shot(pool, copy="Listen", media_type="audio", media_url=URL + ".mp3")
    text = await add_shot(pool, copy="Just text")
    await run_idle(write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                                 telegram={"rate_per_second": 100.0}))

    calls = [(r.method, {k: v for k, v in r.payload.items() if k != "chat_id"})
             for r in emulator.requests if r.chat_id == 1]
    html = {"parse_mode": "HTML"}
    no_preview = {"link_preview_options": {"is_disabled": True}}
    assert calls == [
        ("sendPhoto", html | {"photo": URL + ".jpg", "caption": "A photo"}),
        ("sendVideo", {"video": URL + ".mp4"}),
        ("sendMessage", html | {"text": long_copy} | no_preview),
        ("sendAudio", {"audio": URL + ".mp3"}),
        ("sendMessage", html | {"text": "Listen"} | no_preview),
        ("sendMessage", html | {"text": "Just text"} | no_preview),
    ]
    for shot in (photo, video, audio, text):
        assert (await shot_row(pool, shot))["status"] == "sent"
        recipients = await recipients_of(pool, shot)
        assert {r["status"] for r in recipients.values()} == {"sent"}
    # the stored message_id is the last message's (the copy, after the media)
    last_to_1 = next(r for r in emulator.delivered(1) if r.payload.get("text") == "Listen")
    assert (await recipients_of(pool, audio))[1]["message_id"] == (
        last_to_1.response["result"]["message_id"])


@pytest.mark.asyncio
async def test_429_pauses_every_request_of_the_bot_then_retries(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 41))
    emulator.script(5, RetryAfter(2), Ok())
    shot = await add_shot(pool)
    done = await run_idle(write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                                        telegram={"rate_per_second": 40.0}))

    [limited] = [r for r in emulator.requests if r.status == 429]
    # Requests already on the wire when the 429 came back may land just after it; nothing
    # is sent after that during the pause.
    during = [r for r in emulator.requests if limited.at + 0.1 < r.at < limited.at + 2.0]
    assert during == []
    assert [r.status for r in emulator.requests if r.chat_id == 5] == [429, 200]
    assert (await shot_row(pool, shot))["sent_count"] == 40
    assert "bot_rate_limited" in done.events()


@pytest.mark.asyncio
async def test_transient_errors_are_retried_with_backoff_and_timeouts_never(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 11))
    emulator.script(3, ServerError(500), ServerError(500), Ok())
    emulator.script(4, BadGateway())
    emulator.script(6, Slow(2.0), Ok())  # the first answer comes after request_timeout
    shot = await add_shot(pool)
    await run_idle(write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                                 telegram={"rate_per_second": 50.0, "max_retries": 2,
                                           "request_timeout": 0.5}))

    recipients = await recipients_of(pool, shot)
    assert recipients[3]["status"] == "sent"
    assert [r.status for r in emulator.requests if r.chat_id == 3] == [500, 500, 200]
    assert (recipients[4]["status"], recipients[4]["error"]) == ("error", "Bad Gateway")
    assert len([r for r in emulator.requests if r.chat_id == 4]) == 3  # 1 + max_retries
    chat_4 = [r.at for r in emulator.requests if r.chat_id == 4]
    assert chat_4[1] - chat_4[0] >= 0.5
    assert chat_4[2] - chat_4[1] >= 1.0  # backoff grows
    # A request that got no answer may have been delivered: never sent again (SPEC §5's
    # "never twice" wins over its "retry timeouts"; see README).
    assert recipients[6]["status"] == "error"
    assert recipients[6]["error"].startswith("outcome unknown: no answer within 0.5 s")
    assert len([r for r in emulator.requests if r.chat_id == 6]) == 1
    row = await shot_row(pool, shot)
    assert row["status"] == "error"
    assert row["last_error"] == "2 of 10 recipients failed; most frequent: Bad Gateway (1)"


@pytest.mark.asyncio
async def test_rejected_token_stops_the_shot_and_keeps_recipients_for_a_requeue(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 31))
    shot = await add_shot(pool)
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 20.0})
    wrong = shotsd_env(SHOP_TOKEN="999999:TEST-revoked-token-dddddddddddddddddddd")
    done = await run_shotsd("run", "--exit-when-idle", "--config", str(cfg), env=wrong)
    assert done.returncode == 0
    assert "999999:TEST-revoked" not in done.stdout + done.stderr

    row = await shot_row(pool, shot)
    assert row["status"] == "error"
    assert row["last_error"].startswith("bot token for 'shop' rejected by Telegram")
    assert len(emulator.requests) <= 3  # stopped at the first answer(s), not 30
    statuses = Counter(r["status"] for r in (await recipients_of(pool, shot)).values())
    assert statuses == {"pending": 30}

    await pool.execute("UPDATE shots_queue SET status = 'pending' WHERE id = $1", shot)
    await run_idle(cfg)  # with the right token now
    assert (await shot_row(pool, shot))["sent_count"] == 30
    assert Counter(r.chat_id for r in emulator.delivered()) == dict.fromkeys(range(1, 31), 1)


@pytest.mark.asyncio
async def test_telegram_outage_pauses_and_probes_without_burning_recipients(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 201))
    shot = await add_shot(pool)
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 50.0, "max_retries": 1})
    proc = await start_shotsd("run", "--exit-when-idle", "--config", str(cfg))
    try:
        await emulator.wait_for(lambda e: len(e.delivered()) >= 30)
        emulator.outage = BadGateway()
        down_at = len(emulator.requests)
        await emulator.wait_for(
            lambda e: sum(r.method == "getMe" for r in e.requests[down_at:]) >= 2, timeout=20)
        sends_during_outage = [r for r in emulator.requests[down_at:] if r.method != "getMe"]
        emulator.outage = None
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0
    assert b"telegram_unreachable" in out
    assert b"telegram_reachable" in out
    # the shot paused instead of trying every recipient against a dead API
    assert len(sends_during_outage) <= 60
    row = await shot_row(pool, shot)
    assert (row["status"], row["sent_count"], row["error_count"]) == ("sent", 200, 0)
    assert Counter(r.chat_id for r in emulator.delivered()) == dict.fromkeys(range(1, 201), 1)


@pytest.mark.asyncio
async def test_an_edit_while_running_does_not_change_what_is_sent(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 81))
    shot = await add_shot(pool, copy="original copy")
    emulator.latency = 0.05
    proc = await start_shotsd("run", "--exit-when-idle", "--config", str(
        write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                     telegram={"rate_per_second": 40.0})))
    try:
        await emulator.wait_for(lambda e: len(e.delivered()) >= 10)
        await pool.execute("UPDATE shots_queue SET copy = 'edited copy' WHERE id = $1", shot)
        await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
    assert {r.payload["text"] for r in emulator.requests} == {"original copy"}
    assert (await shot_row(pool, shot))["sent_count"] == 80


@pytest.mark.asyncio
async def test_shots_of_different_bots_run_at_once_each_at_its_own_rate(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 61))
    await add_contacts(pool, "other", range(1, 61))
    shop = await add_shot(pool, "shop")
    other = await add_shot(pool, "other")
    await run_idle(write_config(
        tmp_path / "c.toml", dsn, emulator.base_url, telegram={"rate_per_second": 20.0},
        bots={"shop": "SHOP_TOKEN", "other": "OTHER_TOKEN"}))

    by_token = {t: [r.at for r in emulator.requests if r.token == t]
                for t in {r.token for r in emulator.requests}}
    assert len(by_token) == 2
    first, second = sorted(by_token.values())
    assert second[0] < first[-1]  # they overlapped in time
    for token in by_token:
        assert emulator.max_in_window(token) <= 20
    assert emulator.max_in_window() > 20  # the limit is per bot, not global
    for shot in (shop, other):
        assert (await shot_row(pool, shot))["sent_count"] == 60
    assert TOKEN in by_token


@pytest.mark.asyncio
async def test_shutdown_during_an_outage_is_prompt_and_loses_nobody(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 101))
    shot = await add_shot(pool)
    emulator.outage = BadGateway()
    proc = await start_shotsd("run", "--config", str(write_config(
        tmp_path / "c.toml", dsn, emulator.base_url, telegram={"rate_per_second": 50.0})))
    try:
        await emulator.wait_for(lambda e: any(r.method == "getMe" for r in e.requests))
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        await asyncio.wait_for(proc.communicate(), 10)
        assert time.monotonic() - stopping < 10
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0
    row = await shot_row(pool, shot)
    assert row["status"] == "pending"  # released, to resume when Telegram is back
    statuses = Counter(r["status"] for r in (await recipients_of(pool, shot)).values())
    assert statuses == {"pending": 100}  # nobody burned by the outage


@pytest.mark.asyncio
async def test_a_refused_second_part_halts_the_shot_and_partial_recipients_are_never_retried(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 41))
    shot = await add_shot(pool, copy="Listen", media_type="audio", media_url=URL + ".mp3")
    # the audio goes out, then Telegram refuses the copy's message for everyone
    emulator.method_behaviour["sendmessage"] = ServerError(
        400, "Bad Request: wrong type of the web page content")
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 40.0}, worker={"concurrency": 10})
    await run_idle(cfg)

    row = await shot_row(pool, shot)
    assert row["status"] == "error"
    assert "wrong type of the web page content" in row["last_error"]
    recipients = await recipients_of(pool, shot)
    partial = {t for t, r in recipients.items() if r["status"] == "error"}
    assert all(recipients[t]["error"].startswith("partially delivered") for t in partial)
    assert 1 <= len(partial) <= 10  # at most the in-flight window, not the audience
    assert {r["status"] for t, r in recipients.items() if t not in partial} == {"pending"}

    emulator.method_behaviour.clear()
    await pool.execute("UPDATE shots_queue SET status = 'pending' WHERE id = $1", shot)
    await run_idle(cfg)
    audio_to = Counter(r.chat_id for r in emulator.requests if r.method == "sendAudio")
    assert set(audio_to) == set(range(1, 41))
    assert max(audio_to.values()) == 1  # a partial recipient never gets the audio again
    assert (await shot_row(pool, shot))["sent_count"] == 40 - len(partial)


@pytest.mark.asyncio
async def test_a_media_url_telegram_cannot_fetch_stops_the_shot(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    await add_contacts(pool, "shop", range(1, 21))
    shot = await add_shot(pool, copy="look", media_type="photo",
                          media_url="https://unreachable.example/p.jpg")
    await run_idle(write_config(tmp_path / "c.toml", dsn, emulator.base_url))
    row = await shot_row(pool, shot)
    assert row["status"] == "error"
    assert row["last_error"].startswith(
        "Telegram refused the shot's sendPhoto: Bad Request: failed to get HTTP URL content")
    assert {r["status"] for r in (await recipients_of(pool, shot)).values()} == {"pending"}
    assert len(emulator.requests) <= 3


@pytest.mark.asyncio
async def test_slow_telegram_never_pushes_a_window_over_the_rate(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    """Default settings, 1 s answers: many requests in flight, the limit still holds."""
    await add_contacts(pool, "shop", range(1, 151))
    shot = await add_shot(pool)
    emulator.latency = 1.0
    await run_idle(write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                                telegram={"request_timeout": 15.0}))
    assert emulator.max_in_window(TOKEN) <= 25
    assert (await shot_row(pool, shot))["sent_count"] == 150


@pytest.mark.asyncio
async def test_shutdown_does_not_wait_for_telegram_longer_than_the_drain_limit(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    """request_timeout (15 s) is longer than the 10 s a stop may take: requests still
    unanswered at the drain limit are abandoned as 'outcome unknown', never resent."""
    await add_contacts(pool, "shop", range(1, 301))
    shot = await add_shot(pool)
    proc = await start_shotsd("run", "--config", str(write_config(
        tmp_path / "c.toml", dsn, emulator.base_url,
        telegram={"rate_per_second": 50.0, "request_timeout": 15.0})))
    try:
        await emulator.wait_for(lambda e: len(e.delivered()) >= 10)
        emulator.latency = 30.0  # Telegram stops answering
        answered = len(emulator.requests)
        await emulator.wait_for(lambda e: len(e.requests) >= answered + 5)
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        await asyncio.wait_for(proc.communicate(), 12)
        assert time.monotonic() - stopping < 10
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0
    assert (await shot_row(pool, shot))["status"] == "pending"  # released
    recipients = await recipients_of(pool, shot)
    hanging = {r.chat_id for r in emulator.requests[answered:]}
    assert len(hanging) >= 5
    for chat in hanging:
        assert recipients[chat]["status"] == "error"
        assert recipients[chat]["error"].startswith("outcome unknown: no answer before")
    assert "sending" not in {r["status"] for r in recipients.values()}


@pytest.mark.asyncio
async def test_concurrency_caps_requests_in_flight(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    """SPEC §5: worker.concurrency caps requests in flight; the limiter sets the pace."""
    await add_contacts(pool, "shop", range(1, 61))
    shot = await add_shot(pool)
    emulator.latency = 0.5  # at 100/s, 50 would be in flight without the cap
    await run_idle(write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                                telegram={"rate_per_second": 100.0},
                                worker={"concurrency": 8}))
    assert emulator.max_open <= 8
    assert emulator.max_open >= 6  # the cap, not the rate, was what held it
    assert (await shot_row(pool, shot))["sent_count"] == 60
