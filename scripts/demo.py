"""`make demo`: one shot delivered end to end, on this machine, with nothing to set up.

Finds (or starts) PostgreSQL, creates a demo database with the reference host tables and a few
thousand generated contacts, runs `shotsd migrate`, starts the Bot API emulator and
`shotsd run`, enqueues a shot with plain SQL, shows its progress, prints the outcome and
stops everything it started.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.botapi import Blocked, BotApiEmulator, ChatNotFound, Deactivated  # noqa: E402
from tests.pgharness import PgServer, find_or_start  # noqa: E402

DB_NAME = "shotsd_demo"
TOKEN = "123456:TEST-demo-token-not-a-real-one-xxxxxxx"
CONTACTS = 3000
RATE = 150.0  # the emulator is local; against Telegram keep the default 25/s

CONTACTS_SQL = """
INSERT INTO telegram_contacts (bot_slug, telegram_id, chat_state, first_name, last_interaction_at)
SELECT 'demo', 100000 + n,
       CASE WHEN n % 50 = 0 THEN 'blocked' ELSE 'active' END,
       'Lead ' || n,
       now() - make_interval(mins => (n * 37) % (60 * 24 * 45))
FROM generate_series(1, $1::int) AS n
"""
SHOT_SQL = """INSERT INTO shots_queue (bot_slug, target, copy, recency_days)
VALUES ('demo', 'started', '<b>Black Friday</b>: 50% off today only. Pay with PIX!', 30)
RETURNING id"""


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def rule(chat_id: int) -> Blocked | Deactivated | ChatNotFound | None:
    """Some chats behave like real ones do: blocked the bot, deleted account, unknown."""
    if chat_id % 37 == 0:
        return Blocked()
    if chat_id % 101 == 0:
        return Deactivated()
    if chat_id % 211 == 0:
        return ChatNotFound()
    return None


async def prepare_database(server: PgServer) -> str:
    admin = await asyncpg.connect(server.dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {DB_NAME}")
    finally:
        await admin.close()
    dsn = server.dsn_for(DB_NAME)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute((ROOT / "sql" / "host_tables.sql").read_text())
        await conn.execute(CONTACTS_SQL, CONTACTS)
    finally:
        await conn.close()
    say(f"database {DB_NAME}: host tables loaded with {CONTACTS} contacts of bot 'demo'")
    return dsn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, dsn: str, api_base: str, metrics_port: int) -> Path:
    path = directory / "config.toml"
    path.write_text(f"""[database]
dsn = "{dsn}"
[telegram]
api_base = "{api_base}"
rate_per_second = {RATE}
[worker]
poll_interval = 2.0
[metrics]
listen = "127.0.0.1:{metrics_port}"
[bots.demo]
token_env = "DEMO_BOT_TOKEN"
[logging]
format = "json"
""")
    return path


async def shotsd(*args: str, log: Path | None = None) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if k != "SHOTS_DATABASE_URL"}
    env["DEMO_BOT_TOKEN"] = TOKEN
    out = log.open("ab") if log else None
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *args, cwd=ROOT, env=env, stdout=out, stderr=out)


async def watch(conn: asyncpg.Connection, shot_id: int,
                daemon: asyncio.subprocess.Process) -> asyncpg.Record:
    while True:
        if daemon.returncode is not None:
            raise SystemExit(f"demo: shotsd exited with status {daemon.returncode}; see its log")
        row = await conn.fetchrow(
            "SELECT status::text, audience_total, sent_count, skipped_count, error_count "
            "FROM shots_queue WHERE id = $1", shot_id)
        assert row is not None
        done = row["sent_count"] + row["skipped_count"] + row["error_count"]
        say(f"shot {shot_id}: {row['status']:<8} {done:>5}/{row['audience_total']} "
            f"(sent {row['sent_count']}, skipped {row['skipped_count']}, "
            f"error {row['error_count']})")
        if row["status"] not in ("pending", "running"):
            return row
        await asyncio.sleep(1.0)


async def report(conn: asyncpg.Connection, shot_id: int, emulator: BotApiEmulator) -> None:
    rows = await conn.fetch(
        "SELECT status::text, coalesce(error, '') AS error, count(*) FROM shots_sent "
        "WHERE shot_id = $1 GROUP BY 1, 2 ORDER BY 3 DESC", shot_id)
    say("outcome by recipient:")
    for r in rows:
        print(f"    {r['count']:>6}  {r['status']:<8} {r['error']}")
    states = await conn.fetch("SELECT chat_state, count(*) FROM telegram_contacts "
                              "GROUP BY 1 ORDER BY 1")
    say("contacts by chat_state now: " + ", ".join(f"{s[0]} {s[1]}" for s in states))
    say(f"Telegram saw {len(emulator.requests)} requests, at most "
        f"{emulator.max_in_window()} in any 1-second window (limit {RATE:g}/s)")


async def main() -> int:
    server = await find_or_start(log=say)
    work = Path(tempfile.mkdtemp(prefix="shotsd-demo-"))
    daemon: asyncio.subprocess.Process | None = None
    try:
        dsn = await prepare_database(server)
        async with BotApiEmulator([TOKEN], latency=0.05) as emulator:
            emulator.default_for = rule
            metrics_port = free_port()
            config = write_config(work, dsn, emulator.base_url, metrics_port)
            migrated = await shotsd("migrate", "--config", str(config))
            if await migrated.wait() != 0:
                say("shotsd migrate failed")
                return 1
            log = work / "shotsd.log"
            daemon = await shotsd("run", "--config", str(config), log=log)
            say(f"shotsd run started (pid {daemon.pid}); its JSON log: {log}; metrics: "
                f"http://127.0.0.1:{metrics_port}/metrics")
            conn = await asyncpg.connect(dsn)
            try:
                say("enqueueing a shot, as an operator would:\n" + SHOT_SQL)
                shot_id = await conn.fetchval(SHOT_SQL)
                final = await watch(conn, shot_id, daemon)
                await report(conn, shot_id, emulator)
            finally:
                await conn.close()
            daemon.send_signal(signal.SIGTERM)
            code = await daemon.wait()
            say(f"shotsd stopped (exit {code}); shot {shot_id} ended {final['status']}")
        return 0 if final["status"] in ("sent", "error") else 1
    finally:
        if daemon is not None and daemon.returncode is None:
            daemon.kill()
        await server.stop()


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main()))
