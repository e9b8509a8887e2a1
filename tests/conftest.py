"""Test harness: a real PostgreSQL (found or started), one fresh database per test cloned
from a migrated template, the Bot API emulator, and `shotsd` run as a real subprocess."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import uvloop

from daemon import migrate
from tests.botapi import BotApiEmulator
from tests.pgharness import PgServer, find_or_start

ROOT = Path(__file__).resolve().parent.parent
HOST_TABLES = (ROOT / "sql" / "host_tables.sql").read_text()
TOKEN = "123456:TEST-shop-token-aaaaaaaaaaaaaaaaaaaaaaaaaaa"
OTHER_TOKEN = "654321:TEST-other-token-bbbbbbbbbbbbbbbbbbbbbbbbbb"
_names = itertools.count()


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Any]:
    """Every async test runs on uvloop, as production does."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = uvloop.run(find_or_start())
    yield server
    uvloop.run(server.stop())


async def _admin(server: PgServer) -> asyncpg.Connection:
    return await asyncpg.connect(server.dsn)


@pytest.fixture(scope="session")
def template_db(pg_server: PgServer) -> Iterator[str]:
    """A database migrated once per session, with the reference host tables; tests clone it."""
    name = f"shotsd_tpl_{os.getpid()}"

    async def build() -> None:
        admin = await _admin(pg_server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await admin.close()
        conn = await asyncpg.connect(pg_server.dsn_for(name))
        try:
            await conn.execute(HOST_TABLES)
            await migrate.migrate(conn)
        finally:
            await conn.close()

    uvloop.run(build())
    yield name
    uvloop.run(_drop(pg_server, name))


async def _drop(server: PgServer, name: str) -> None:
    admin = await _admin(server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _fresh_database(server: PgServer, template: str) -> str:
    name = f"shotsd_t_{os.getpid()}_{next(_names)}"
    admin = await _admin(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return name


@pytest_asyncio.fixture
async def dsn(pg_server: PgServer, template_db: str) -> AsyncIterator[str]:
    """DSN of a fresh, migrated database with the host tables, dropped after the test."""
    name = await _fresh_database(pg_server, template_db)
    yield pg_server.dsn_for(name)
    await _drop(pg_server, name)


@pytest_asyncio.fixture
async def empty_dsn(pg_server: PgServer) -> AsyncIterator[str]:
    """DSN of a fresh database with nothing in it (for migration tests)."""
    name = await _fresh_database(pg_server, "template0")
    yield pg_server.dsn_for(name)
    await _drop(pg_server, name)


@pytest_asyncio.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10)
    assert pool is not None
    yield pool
    await pool.close()


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[BotApiEmulator]:
    async with BotApiEmulator([TOKEN, OTHER_TOKEN]) as emu:
        yield emu


def write_config(path: Path, dsn: str, api_base: str = "http://127.0.0.1:9",
                 bots: Mapping[str, str] | None = None, **sections: Mapping[str, Any]) -> Path:
    """Writes a config file; bots map slug -> env var name holding the token."""
    bots = {"shop": "SHOP_TOKEN"} if bots is None else bots
    tables: dict[str, Mapping[str, Any]] = {
        "database": {"dsn": dsn},
        "telegram": {"api_base": api_base, "request_timeout": 5.0},
        "worker": {"poll_interval": 0.5},
        "logging": {"format": "json", "level": "info"},
        "metrics": {"listen": "127.0.0.1:0"},  # several daemons at once: any free port
    }
    for name, values in sections.items():
        tables[name] = {**tables.get(name, {}), **values}
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    for slug, env_name in bots.items():
        lines += [f"[bots.{slug}]", f"token_env = {_toml(env_name)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def shotsd_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOTS_DATABASE")}
    env.update({"SHOP_TOKEN": TOKEN, "OTHER_TOKEN": OTHER_TOKEN}, **extra)
    return env


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    def events(self) -> list[str]:
        return [entry["event"] for entry in self.logs()]


async def start_shotsd(*args: str, env: Mapping[str, str] | None = None
                       ) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *args, cwd=ROOT,
        env=dict(env or shotsd_env()), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def run_shotsd(*args: str, env: Mapping[str, str] | None = None,
                     timeout: float = 60.0) -> Finished:
    """Runs `shotsd ARGS` to completion as a subprocess (the real CLI, real process)."""
    proc = await start_shotsd(*args, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"shotsd {' '.join(args)} did not finish in {timeout}s:\n"
                             f"{out.decode()}\n{err.decode()}") from None
    assert proc.returncode is not None
    return Finished(proc.returncode, out.decode(), err.decode())


async def add_contacts(pool: asyncpg.Pool, bot_slug: str, ids: range | list[int],
                       state: str = "active", days_ago: float = 1.0) -> None:
    await pool.execute(
        """INSERT INTO telegram_contacts (bot_slug, telegram_id, chat_state, last_interaction_at)
           SELECT $1, id, $2, now() - make_interval(secs => $3 * 86400)
           FROM unnest($4::bigint[]) AS id""",
        bot_slug, state, days_ago, list(ids))


async def add_shot(pool: asyncpg.Pool, bot_slug: str = "shop", copy: str = "Hello <b>there</b>",
                   target: str = "started", **columns: Any) -> int:
    """Inserts a shot the way an operator would (plain INSERT); returns its id."""
    values = {"bot_slug": bot_slug, "copy": copy, "target": target, **columns}
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    shot_id: int = await pool.fetchval(
        f"INSERT INTO shots_queue ({', '.join(values)}) VALUES ({params}) RETURNING id",
        *values.values())
    return shot_id


async def shot_row(pool: asyncpg.Pool, shot_id: int) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT *, status::text AS status FROM shots_queue WHERE id = $1",
                              shot_id)
    assert row is not None
    return row


async def recipients_of(pool: asyncpg.Pool, shot_id: int) -> dict[int, asyncpg.Record]:
    rows = await pool.fetch("SELECT *, status::text AS status FROM shots_sent "
                            "WHERE shot_id = $1 ORDER BY position", shot_id)
    return {r["telegram_id"]: r for r in rows}


def assert_no_secret(done: Finished) -> None:
    assert TOKEN not in done.stdout
    assert TOKEN not in done.stderr


async def run_idle(cfg: Path) -> Finished:
    done = await run_shotsd("run", "--exit-when-idle", "--config", str(cfg))
    assert done.returncode == 0, done.stderr + done.stdout[-2000:]
    assert_no_secret(done)
    return done


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     timeout: float = 20) -> None:
    """Polls `check` until it is true; fails the test (saying `what`) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.05)


async def wait_until(pool: asyncpg.Pool, sql: str, *args: object, timeout: float = 20) -> None:
    """Waits until the query returns true."""

    async def holds() -> bool:
        return bool(await pool.fetchval(sql, *args))

    await eventually(holds, sql, timeout)
