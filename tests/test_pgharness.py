"""The harness can start its own PostgreSQL when none is reachable (as on a bare machine)."""

from __future__ import annotations

import asyncpg
import pytest

from tests.pgharness import ENV_FORCE_PRIVATE, find_or_start


@pytest.mark.asyncio
async def test_private_cluster_starts_serves_and_is_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_FORCE_PRIVATE, "1")
    server = await find_or_start(log=lambda _msg: None)
    directory = server.private_dir
    try:
        assert server.private_dir is not None
        assert server.private_dir.exists()
        conn = await asyncpg.connect(server.dsn)
        try:
            await conn.execute("CREATE DATABASE shotsd_private_check")
            assert await conn.fetchval("SELECT count(*) FROM pg_database "
                                       "WHERE datname = 'shotsd_private_check'") == 1
        finally:
            await conn.close()
    finally:
        await server.stop()
    assert directory is not None
    assert not directory.exists()
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(server.dsn, timeout=2)
