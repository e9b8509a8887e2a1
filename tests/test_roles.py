"""sql/roles.sql: the daemon's least-privilege role can do what `shotsd run` does (the real
daemon delivers shots connected as it) and nothing else: no CREATE, DROP, DELETE, TRUNCATE,
no INSERT of shots, no reading or writing the contacts' other columns. Roles are
cluster-wide, so each test makes its own (shotsd_test_<pid>_<n>) and drops it."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from daemon import migrate
from daemon.sqlfiles import audience_query, query
from tests.botapi import Blocked, BotApiEmulator
from tests.conftest import ROOT, add_contacts, add_shot, run_idle, shot_row, write_config

ROLES_SQL = ROOT / "sql" / "roles.sql"
_numbers = itertools.count()


@dataclass
class Role:
    name: str
    admin_dsn: str  # superuser, on the test database
    dsn: str  # the same database, as the role
    notices: list[str] = field(default_factory=list)

    async def apply(self) -> list[str]:
        """Runs sql/roles.sql for this role (as psql would: one simple-protocol script);
        returns the WARNINGs it raised."""
        conn = await asyncpg.connect(self.admin_dsn)
        warnings: list[str] = []
        conn.add_log_listener(lambda _c, msg: warnings.append(f"{msg.severity}: {msg.message}"))
        try:
            await conn.execute("SELECT set_config('shotsd.role', $1, false)", self.name)
            await conn.execute(ROLES_SQL.read_text())
        finally:
            await conn.close()
        self.notices += warnings
        return [w for w in warnings if w.startswith("WARNING")]

    async def connect(self) -> asyncpg.Connection:
        try:
            return await asyncpg.connect(self.dsn)
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError
                ) as exc:
            pytest.skip(f"the test server does not let a new role in without a password "
                        f"(SHOTS_TEST_DSN with password authentication?): {exc}")


def _as_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user)}@{host}"))


@pytest_asyncio.fixture
async def role(dsn: str) -> AsyncIterator[Role]:
    name = f"shotsd_test_{os.getpid()}_{next(_numbers)}"
    admin = await asyncpg.connect(dsn)
    try:
        if admin.get_server_version().major < 15:
            # PostgreSQL < 15 lets PUBLIC create in schema public; roles.sql warns and says
            # to do this, which an operator of such a server does once.
            await admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    finally:
        await admin.close()
    yield Role(name, dsn, _as_user(dsn, name))
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE usename = $1", name)
        if await admin.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", name):
            await admin.execute(f'DROP OWNED BY "{name}"')  # also its CONNECT on the database
            await admin.execute(f'DROP ROLE "{name}"')
    finally:
        await admin.close()


@pytest.mark.asyncio
async def test_the_role_is_a_plain_login_role_and_the_script_warns_about_nothing(
    pool: asyncpg.Pool, role: Role,
) -> None:
    assert await role.apply() == []
    attrs = await pool.fetchrow(
        "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
        "rolbypassrls, rolpassword IS NULL AS no_password FROM pg_authid WHERE rolname = $1",
        role.name)
    assert attrs is not None
    assert dict(attrs) == {"rolcanlogin": True, "rolsuper": False, "rolcreatedb": False,
                           "rolcreaterole": False, "rolreplication": False,
                           "rolbypassrls": False, "no_password": True}
    conn = await role.connect()
    try:
        member_of = await conn.fetchval(
            "SELECT count(*) FROM pg_auth_members WHERE member = "
            "(SELECT oid FROM pg_roles WHERE rolname = current_user)")
    finally:
        await conn.close()
    assert member_of == 0


@pytest.mark.asyncio
async def test_the_role_can_run_what_the_daemon_runs(pool: asyncpg.Pool, role: Role) -> None:
    await add_contacts(pool, "shop", range(1, 6))
    await pool.execute("INSERT INTO funnel_events (bot_slug, telegram_id, event_name) "
                       "VALUES ('shop', 2, 'pix_created')")
    await pool.execute("INSERT INTO payment_transactions (bot_slug, telegram_id, status) "
                       "VALUES ('shop', 4, 'created')")
    shot = await add_shot(pool, target="pix_created")
    assert await role.apply() == []
    conn = await role.connect()
    try:
        await migrate.check(conn)  # the startup schema check
        await conn.execute("LISTEN shots_queue")
        claimed = await conn.fetchrow(query("claim_shot"), "w1", [])  # UPDATE ... RETURNING
        assert claimed is not None
        assert claimed["id"] == shot
        async with conn.transaction():
            assert await conn.fetchval(query("lock_claim"), shot, "w1", 1) == "running"
            await conn.execute(query("insert_attempt"), shot, 1, "w1")
            # The audience: INSERT ... SELECT over the contacts, funnel events and payments.
            await conn.execute(audience_query("pix_created"), shot, "shop", None)
            assert await conn.fetchval(query("mark_audience_selected"), shot, "w1", 1) == 2
        assert await conn.fetch(
            "SELECT bot_slug, telegram_id, chat_state, last_interaction_at "
            "FROM telegram_contacts WHERE bot_slug = 'shop'")
        # shot_cycle's contacts update, alone: chat_state is the one writable column.
        assert await conn.execute(
            "UPDATE telegram_contacts SET chat_state = 'blocked' "
            "WHERE bot_slug = 'shop' AND telegram_id = 2") == "UPDATE 1"
        assert await conn.execute(
            "UPDATE shots_sent SET status = 'sent', message_id = 7, sent_at = now() "
            "WHERE shot_id = $1", shot) == "UPDATE 2"
        assert await conn.execute(
            "UPDATE shots_attempts SET finished_at = now(), outcome = 'sent' "
            "WHERE shot_id = $1", shot) == "UPDATE 1"
    finally:
        await conn.close()
    assert await pool.fetchval("SELECT chat_state FROM telegram_contacts "
                               "WHERE telegram_id = 2") == "blocked"


FORBIDDEN = [
    "CREATE TABLE shots_evil (id int)",
    "CREATE FUNCTION shots_evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE SCHEMA evil",
    "CREATE ROLE evil",
    "CREATE DATABASE evil",
    "CREATE INDEX ON shots_queue (copy)",
    "ALTER TABLE shots_queue ADD COLUMN evil int",
    "ALTER TABLE telegram_contacts DROP COLUMN first_name",
    "DROP TABLE shots_queue",
    "DROP TABLE shots_sent",
    "DROP TABLE telegram_contacts",
    "DROP TYPE shots_status CASCADE",
    "DELETE FROM shots_queue",
    "DELETE FROM shots_sent",
    "DELETE FROM shots_attempts",
    "DELETE FROM shots_schema_migrations",
    "DELETE FROM telegram_contacts",
    "DELETE FROM funnel_events",
    "TRUNCATE shots_queue CASCADE",
    "TRUNCATE shots_sent",
    "TRUNCATE telegram_contacts",
    "INSERT INTO shots_queue (bot_slug, target, copy) VALUES ('shop', 'started', 'x')",
    "INSERT INTO shots_schema_migrations (version, name, checksum) VALUES (99, 'x', 'x')",
    "UPDATE shots_schema_migrations SET checksum = 'x'",
    "INSERT INTO telegram_contacts (bot_slug, telegram_id) VALUES ('shop', 99)",
    "UPDATE telegram_contacts SET first_name = 'x'",
    "UPDATE telegram_contacts SET telegram_id = telegram_id + 1",
    "SELECT first_name FROM telegram_contacts",
    "SELECT username FROM telegram_contacts",
    "SELECT * FROM telegram_contacts",
    "SELECT * FROM payment_transactions",
    "UPDATE funnel_events SET event_name = 'x'",
    "INSERT INTO payment_transactions (bot_slug, telegram_id, status) VALUES ('s', 1, 'paid')",
    "SELECT nextval('shots_queue_id_seq')",
    "ALTER ROLE CURRENT_USER CREATEDB",
]
NO_TRANSACTION = {"CREATE DATABASE evil"}


@pytest.mark.asyncio
async def test_the_role_cannot_create_drop_delete_or_touch_other_columns(
    pool: asyncpg.Pool, role: Role,
) -> None:
    await add_contacts(pool, "shop", range(1, 4))
    await add_shot(pool)
    assert await role.apply() == []
    conn = await role.connect()
    allowed: list[str] = []
    other_errors: list[str] = []
    try:
        for sql in FORBIDDEN:
            try:
                if sql in NO_TRANSACTION:
                    await conn.execute(sql)
                else:
                    async with conn.transaction():  # nothing sticks, even if it got through
                        await conn.execute(sql)
                allowed.append(sql)
            except asyncpg.InsufficientPrivilegeError:
                pass
            except asyncpg.PostgresError as exc:
                other_errors.append(f"{sql}: {type(exc).__name__}: {exc}")
    finally:
        await conn.close()
    assert allowed == [], "the daemon's role may do these"
    assert other_errors == [], "these failed, but not for lack of privilege"
    # Nothing was changed behind the failures.
    assert await pool.fetchval("SELECT count(*) FROM telegram_contacts") == 3
    assert await pool.fetchval("SELECT count(*) FROM shots_queue") == 1


@pytest.mark.asyncio
async def test_rerunning_the_script_takes_back_what_was_granted_by_hand(
    pool: asyncpg.Pool, role: Role,
) -> None:
    assert await role.apply() == []
    assert await role.apply() == []  # idempotent
    q = role.name.replace('"', '""')
    await pool.execute(f'GRANT DELETE, TRUNCATE ON shots_queue TO "{q}"')
    await pool.execute(f'GRANT UPDATE (first_name), SELECT (username) '
                       f'ON telegram_contacts TO "{q}"')
    await pool.execute(f'GRANT USAGE ON SEQUENCE shots_queue_id_seq TO "{q}"')
    await pool.execute(f'ALTER ROLE "{q}" CREATEDB CREATEROLE')
    assert await role.apply() == []
    checks = await pool.fetchrow(
        """SELECT has_table_privilege($1, 'shots_queue', 'DELETE') AS del,
                  has_table_privilege($1, 'shots_queue', 'TRUNCATE') AS trunc,
                  has_column_privilege($1, 'telegram_contacts', 'first_name', 'UPDATE') AS upd,
                  has_column_privilege($1, 'telegram_contacts', 'username', 'SELECT') AS sel,
                  has_sequence_privilege($1, 'shots_queue_id_seq', 'USAGE') AS seq,
                  has_column_privilege($1, 'telegram_contacts', 'chat_state', 'UPDATE') AS ok,
                  (SELECT rolcreatedb OR rolcreaterole FROM pg_roles WHERE rolname = $1) AS cr
        """, role.name)
    assert dict(checks) == {"del": False, "trunc": False, "upd": False, "sel": False,
                            "seq": False, "ok": True, "cr": False}


@pytest.mark.asyncio
async def test_the_script_warns_about_privileges_the_role_gets_through_public(
    pool: asyncpg.Pool, role: Role,
) -> None:
    await pool.execute("GRANT DELETE ON shots_sent TO PUBLIC")
    warnings = await role.apply()
    assert len(warnings) == 1, warnings
    assert "DELETE on shots_sent" in warnings[0]


@pytest.mark.asyncio
async def test_the_script_refuses_a_database_that_was_not_migrated(
    pool: asyncpg.Pool, role: Role,
) -> None:
    await pool.execute("DROP TABLE shots_attempts")
    with pytest.raises(asyncpg.RaiseError, match="run `shotsd migrate` first"):
        await role.apply()
    # One transaction: the role was not left half made.
    assert await pool.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1",
                               role.name) == 0


@pytest.mark.asyncio
async def test_psql_runs_the_script_as_the_readme_says(pool: asyncpg.Pool, role: Role) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql not installed (Debian: postgresql-client)")
    done = subprocess.run(
        [psql, role.admin_dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1",
         "-c", f"SET shotsd.role = '{role.name}'", "-f", str(ROLES_SQL)],
        capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    assert await pool.fetchval(
        "SELECT has_table_privilege($1, 'shots_sent', 'INSERT')", role.name)


@pytest.mark.asyncio
async def test_the_daemon_delivers_shots_connected_as_the_role(
    pool: asyncpg.Pool, role: Role, emulator: BotApiEmulator, tmp_path: Path,
) -> None:
    """The grants suffice for the real daemon: schema check, LISTEN, claims, audiences of both
    targets, cycles writing outcomes and a blocked contact's chat_state, finishing."""
    await add_contacts(pool, "shop", range(1, 21))
    await pool.execute("INSERT INTO funnel_events (bot_slug, telegram_id, event_name) "
                       "SELECT 'shop', id, 'pix_created' FROM generate_series(1, 5) AS id")
    await pool.execute("INSERT INTO payment_transactions (bot_slug, telegram_id, status) "
                       "VALUES ('shop', 6, 'paid')")
    emulator.script(3, Blocked())
    started = await add_shot(pool, target="started")
    pix = await add_shot(pool, target="pix_created", copy="Your PIX is waiting")
    assert await role.apply() == []
    (await role.connect()).terminate()  # skips here if the server wants a password

    cfg = write_config(tmp_path / "c.toml", role.dsn, emulator.base_url)
    done = await run_idle(cfg)

    assert "permission denied" not in done.stdout + done.stderr
    first, second = await shot_row(pool, started), await shot_row(pool, pix)
    assert (first["status"], first["sent_count"], first["skipped_count"]) == ("sent", 19, 1)
    # pix_created: contacts 1-5 (funnel) and 6 (payment), less 3, blocked by the first shot.
    assert (second["status"], second["audience_total"], second["sent_count"]) == ("sent", 5, 5)
    assert await pool.fetchval("SELECT chat_state FROM telegram_contacts "
                               "WHERE telegram_id = 3") == "blocked"
    assert await pool.fetchval("SELECT count(*) FROM shots_attempts") == 2
