"""Schema migrations: apply sql/migrations/*.sql in order, record them, verify them.

Each migration runs in its own transaction together with its row in the version table, so a
failed migration leaves nothing half-applied. A database whose recorded migrations differ
from the shipped files (edited, renamed, or newer than this shotsd) is refused, never patched.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from daemon.sqlfiles import Migration, migrations

VERSION_TABLE = "shots_schema_migrations"
# Serialises concurrent `shotsd migrate` runs (e.g. two hosts deploying at once).
_LOCK_KEY = 0x5B075D


class MigrationError(Exception):
    """The database's recorded migrations do not match this shotsd's files."""


class SchemaBehind(Exception):
    """The database lacks migrations this shotsd needs: run `shotsd migrate`."""


@dataclass(frozen=True)
class Recorded:
    version: int
    name: str
    checksum: str


async def recorded(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
) -> list[Recorded]:
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", VERSION_TABLE)
    if not exists:
        return []
    rows = await conn.fetch(f"SELECT version, name, checksum FROM {VERSION_TABLE} ORDER BY 1")
    return [Recorded(r["version"], r["name"], r["checksum"]) for r in rows]


def pending(applied: list[Recorded], files: tuple[Migration, ...]) -> list[Migration]:
    """The files not yet applied; raises MigrationError when the history disagrees."""
    by_version = {m.version: m for m in files}
    for rec in applied:
        mig = by_version.get(rec.version)
        if mig is None:
            raise MigrationError(
                f"database has migration {rec.version:04d}_{rec.name} which this shotsd does "
                "not ship: it was migrated by a newer shotsd; upgrade this one")
        if mig.name != rec.name or mig.checksum != rec.checksum:
            raise MigrationError(
                f"migration {rec.version:04d}_{rec.name} recorded in the database differs "
                f"from sql/migrations/{mig.version:04d}_{mig.name}.sql; applied migrations "
                "must never be edited")
    done = {rec.version for rec in applied}
    return [m for m in files if m.version not in done]


async def migrate(conn: asyncpg.Connection) -> list[Migration]:
    """Applies every pending migration; idempotent. Returns the ones applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (
                    version int PRIMARY KEY,
                    name text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())""")
        todo = pending(await recorded(conn), migrations())
        for mig in todo:
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    f"INSERT INTO {VERSION_TABLE} (version, name, checksum) VALUES ($1, $2, $3)",
                    mig.version, mig.name, mig.checksum)
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def check(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
    """Raises SchemaBehind or MigrationError unless the schema is exactly what we ship."""
    todo = pending(await recorded(conn), migrations())
    if todo:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in todo)
        raise SchemaBehind(f"database schema is behind (missing {names}): run shotsd migrate")
