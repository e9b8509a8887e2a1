"""Throughput and pacing of one shot through the Bot API emulator, at a given Telegram latency.

    .venv/bin/python bench/throughput.py --recipients 1500 --rate 25 --latency 1.0

Prints the achieved steady-state rate (requests/s between the 10th and the last request),
the largest number of requests in any 1-second window, the time from INSERT to the first
request, and the database round trips per message the daemon reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
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


async def bench(args: argparse.Namespace) -> dict[str, float]:
    server = await find_or_start(log=lambda _m: None)
    name = f"shotsd_bench_{os.getpid()}"
    admin = await asyncpg.connect(server.dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        dsn = server.dsn_for(name)
        conn = await asyncpg.connect(dsn)
        await conn.execute((ROOT / "sql" / "host_tables.sql").read_text())
        await migrate.migrate(conn)
        await conn.execute(
            "INSERT INTO telegram_contacts (bot_slug, telegram_id, last_interaction_at) "
            "SELECT 'bench', n, now() - make_interval(secs => n) "
            "FROM generate_series(1, $1::int) n", args.recipients)
        async with BotApiEmulator([TOKEN], latency=args.latency) as emu:
            work = Path(tempfile.mkdtemp())
            cfg = work / "c.toml"
            cfg.write_text(
                f'[database]\ndsn = "{dsn}"\n[telegram]\napi_base = "{emu.base_url}"\n'
                f"rate_per_second = {args.rate}\nrequest_timeout = {args.latency + 10}\n"
                f"[worker]\nconcurrency = {args.concurrency}\nbatch_size = {args.batch_size}\n"
                '[bots.bench]\ntoken_env = "BENCH_TOKEN"\n[logging]\nformat = "json"\n')
            env = dict(os.environ, BENCH_TOKEN=TOKEN)
            env.pop("SHOTS_DATABASE_URL", None)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daemon", "run", "--exit-when-idle", "--config", str(cfg),
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            # The daemon exits when idle: insert the shot right away, before it looks.
            inserted = time.monotonic()
            await conn.execute("INSERT INTO shots_queue (bot_slug, target, copy) "
                               "VALUES ('bench', 'started', 'benchmark copy')")
            out, err = await proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"shotsd failed:\n{err.decode()}")
        await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
        await server.stop()
    arrivals = [r.at for r in emu.requests]
    steady = (len(arrivals) - 10) / (arrivals[-1] - arrivals[9])
    stats = [json.loads(line) for line in out.decode().splitlines()
             if '"database_round_trips"' in line]
    trips = stats[0]["db_round_trips"] if stats else None
    flushes = out.decode().count('"batch_sent"')
    return {
        "recipients": args.recipients,
        "latency_s": args.latency,
        "rate_limit": args.rate,
        "concurrency": args.concurrency,
        "achieved_per_s": round(steady, 2),
        "max_in_1s_window": emu.max_in_window(),
        "insert_to_first_request_s": round(arrivals[0] - inserted, 3),
        "db_round_trips_per_message": round(trips / len(arrivals), 4) if trips else -1,
        "outcome_writes": flushes,
        # the largest child of this process: the daemon (the emulator runs in-process)
        "daemon_max_rss_mib": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=1500)
    parser.add_argument("--rate", type=float, default=25.0)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=50)
    result = uvloop.run(bench(parser.parse_args()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
