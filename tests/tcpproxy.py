"""A TCP proxy between the daemon and PostgreSQL that a test can cut and restore, to play a
database outage for one process while the test itself keeps its own connection."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit, urlunsplit


class TcpProxy:
    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        socket_dir = parse_qs(parts.query).get("host", [None])[0]
        self._target = parts
        self._unix = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}" if socket_dir else None
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self.down = False

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def dsn(self) -> str:
        """The same database, reached through this proxy."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        user = self._target.username or "postgres"
        return urlunsplit(("postgresql", f"{user}@127.0.0.1:{port}", self._target.path, "", ""))

    def cut(self) -> None:
        """Drops every connection and refuses new ones, as an unreachable database would."""
        self.down = True
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        self.down = False

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
                      ) -> None:
        if self.down:
            client_w.transport.abort()
            return
        try:
            if self._unix:
                server_r, server_w = await asyncio.open_unix_connection(self._unix)
            else:
                server_r, server_w = await asyncio.open_connection(
                    self._target.hostname, self._target.port or 5432)
        except OSError:
            client_w.transport.abort()
            return
        self._links.update((client_w, server_w))
        await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))
        self._links.difference_update((client_w, server_w))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
