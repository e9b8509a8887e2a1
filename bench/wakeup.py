"""Time from INSERT INTO shots_queue to the shot's first Bot API request, daemon already idle.

    .venv/bin/python bench/wakeup.py --shots 20

poll_interval is set to 60 s, so every start measured here comes from LISTEN/NOTIFY.
Prints min / median / p90 / max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import migrate  # noqa: E402
from tests.botapi import BotApiEmulator  # noqa: E402
from tests.pgharness import find_or_start  # noqa: E402

TOKEN = "123456:TEST-bench-token-xxxxxxxxxxxxxxxxxxxxxxx"


async def bench(shots: int) -> dict[str, float]:
    server = await find_or_start(log=lambda _m: None)
    name = f"shotsd_wake_{os.getpid()}"
    admin = await asyncpg.connect(server.dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    latencies: list[float] = []
    try:
        dsn = server.dsn_for(name)
        conn = await asyncpg.connect(dsn)
        await conn.execute((ROOT / "sql" / "host_tables.sql").read_text())
        await migrate.migrate(conn)
        await conn.execute("INSERT INTO telegram_contacts (bot_slug, telegram_id) "
                           "VALUES ('bench', 1)")
        async with BotApiEmulator([TOKEN]) as emu:
            cfg = Path(tempfile.mkdtemp()) / "c.toml"
            cfg.write_text(f'[database]\ndsn = "{dsn}"\n[telegram]\napi_base = "{emu.base_url}"\n'
                           '[worker]\npoll_interval = 60.0\n[bots.bench]\n'
                           'token_env = "BENCH_TOKEN"\n[logging]\nformat = "json"\n')
            env = dict(os.environ, BENCH_TOKEN=TOKEN)
            env.pop("SHOTS_DATABASE_URL", None)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daemon", "run", "--config", str(cfg), env=env,
                stdout=asyncio.subprocess.DEVNULL)
            while not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_stat_activity "
                                          "WHERE application_name = 'shotsd-listen')"):
                await asyncio.sleep(0.05)
            for i in range(shots):
                inserted = time.monotonic()
                await conn.execute("INSERT INTO shots_queue (bot_slug, target, copy) "
                                   "VALUES ('bench', 'started', 'wake')")
                await emu.wait_for(lambda e, n=i + 1: len(e.requests) == n)
                latencies.append(emu.requests[-1].at - inserted)
                # let the shot finish so the next one is not waiting for the bot
                while await conn.fetchval("SELECT count(*) FROM shots_queue "
                                          "WHERE finished_at IS NULL"):
                    await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
        await server.stop()
    ms = sorted(x * 1000 for x in latencies)
    return {"shots": shots, "min_ms": round(ms[0], 1), "median_ms": round(statistics.median(ms), 1),
            "p90_ms": round(ms[int(len(ms) * 0.9) - 1], 1), "max_ms": round(ms[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shots", type=int, default=20)
    print(json.dumps(uvloop.run(bench(parser.parse_args().shots))))


if __name__ == "__main__":
    main()
