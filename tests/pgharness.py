"""Find a PostgreSQL server for tests and demos, or start a private throwaway one.

Discovery order used by :func:`find_or_start`:

1. ``SHOTS_TEST_DSN`` if set. It must connect; we never silently fall back,
   because a typo there would otherwise quietly test against another server.
2. TCP 127.0.0.1:5432 as user ``postgres``, then as the current OS user.
3. Unix sockets in /var/run/postgresql and /tmp, same users.
4. A private cluster (initdb + pg_ctl) in a temp dir on a free port.

Set ``SHOTS_TEST_FORCE_PRIVATE_PG=1`` to skip steps 1-3 and always start a
private cluster (useful to exercise that path on a machine with a server).

There is deliberately no atexit hook: the caller owns the returned
:class:`PgServer` and must call :meth:`PgServer.stop`.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import asyncpg

ENV_DSN = "SHOTS_TEST_DSN"
ENV_FORCE_PRIVATE = "SHOTS_TEST_FORCE_PRIVATE_PG"
SOCKET_DIRS = ("/var/run/postgresql", "/tmp")
NO_INITDB = (
    "no PostgreSQL server reachable and no initdb found; install postgresql or set SHOTS_TEST_DSN"
)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _redact(dsn: str) -> str:
    """Hide a password before a DSN goes into a log line or exception."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class PgServer:
    dsn: str  # superuser on the maintenance database
    private_dir: Path | None = None  # set when we started our own cluster
    _pg_ctl: str = field(default="", repr=False)  # binary that started it, to stop it

    def dsn_for(self, dbname: str) -> str:
        """Same server and user, other database (query such as host= is kept)."""
        parts = urlsplit(self.dsn)
        return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))

    async def stop(self) -> None:
        """Stop and delete the private cluster; a no-op for a found server."""
        if self.private_dir is None:
            return
        top, self.private_dir = self.private_dir, None  # make stop() idempotent
        data, pidfile = top / "data", top / "data" / "postmaster.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().split()[0])
            # Immediate mode: the data is thrown away, so a clean shutdown is waste.
            cmd = [self._pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]
            rc, out = await _run_as_owner(cmd, top)
            if rc != 0:
                _stderr(f"postgres: pg_ctl stop failed (rc={rc}): {out.strip()}")
            # pg_ctl returns once the pid file is gone, a moment before the postmaster
            # has fully exited; wait so callers can rely on the process being gone.
            for _ in range(100):
                if not _alive(pid):
                    break
                await asyncio.sleep(0.05)
        shutil.rmtree(top, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists but owned by someone else (non-root caller)
        pass
    return True


async def _probe(dsn: str) -> Exception | None:
    """Return None if `dsn` accepts a connection and runs SELECT 1, else the error."""
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
        try:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), 3)
        finally:
            await conn.close(timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return exc
    return None


def _candidates() -> list[tuple[str, str]]:
    """(description, dsn) pairs for steps 2 and 3, in the order to try them."""
    try:
        me = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry / login name, e.g. in containers
        me = "postgres"
    users = list(dict.fromkeys(["postgres", me]))
    out = [
        (f"127.0.0.1:5432 as {u}", f"postgresql://{quote(u)}@127.0.0.1:5432/postgres")
        for u in users
    ]
    for d in SOCKET_DIRS:
        # Only probe ports that actually have a socket, so absent dirs cost nothing.
        socks = Path(d).glob(".s.PGSQL.*")
        ports = sorted(p.name.rsplit(".", 1)[1] for p in socks if not p.name.endswith(".lock"))
        for port in ports:
            for u in users:
                query = urlencode({"host": d, "port": port})
                dsn = f"postgresql://{quote(u)}@/postgres?{query}"
                out.append((f"{d} port {port} as {u}", dsn))
    return out


def _find_binaries() -> tuple[str, str]:
    """Locate initdb and pg_ctl: PATH first, else the newest /usr/lib/postgresql/N/bin."""
    initdb = shutil.which("initdb")
    if initdb:
        sibling = Path(initdb).parent / "pg_ctl"  # keep both from the same install
        pg_ctl = str(sibling) if sibling.exists() else shutil.which("pg_ctl")
        if pg_ctl:
            return initdb, pg_ctl

    def version(p: Path) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in p.parent.name.split("."))  # /usr/lib/postgresql/N/bin
        except ValueError:
            return (-1,)

    bindirs = (p / "bin" for p in Path("/usr/lib/postgresql").glob("*"))
    for bindir in sorted(bindirs, key=version, reverse=True):
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return str(bindir / "initdb"), str(bindir / "pg_ctl")
    raise RuntimeError(NO_INITDB)


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb/postgres refuse to run as root, so drop to the postgres user then."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    return ["su", "-s", "/bin/sh", "postgres", "-c", shlex.join(cmd)]


async def _run_as_owner(cmd: list[str], cwd: Path) -> tuple[int, str]:
    # cwd inside our dir: the postgres user may not be able to enter the caller's cwd.
    # PG* variables (PGDATA, PGPORT, ...) are dropped so they cannot redirect the tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # Output goes to a file, not a pipe: the postmaster that `pg_ctl start` leaves behind
    # would otherwise hold the pipe open, and under uvloop reading it never ends.
    with tempfile.TemporaryFile() as out:
        proc = await asyncio.create_subprocess_exec(
            *_as_postgres(cmd),
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
        await proc.wait()
        out.seek(0)
        return proc.returncode or 0, out.read().decode(errors="replace")


def _free_port() -> int:
    # Small race until postgres binds it, acceptable for a test helper.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


async def _start_private(log: Callable[[str], None]) -> PgServer:
    initdb, pg_ctl = _find_binaries()
    root = os.geteuid() == 0
    # As root, $TMPDIR may sit under an unreadable home; /tmp is traversable by postgres.
    top = Path(tempfile.mkdtemp(prefix="shotsd-pg-", dir="/tmp" if root else None))
    data, sock, logfile = top / "data", top / "sock", top / "log"
    sock.mkdir()
    if root:
        for p in (top, sock):
            shutil.chown(p, "postgres", "postgres")
    server = PgServer(dsn="", private_dir=top, _pg_ctl=pg_ctl)
    try:
        cmd = [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        rc, out = await _run_as_owner(cmd, top)
        if rc != 0:
            raise RuntimeError(f"initdb failed (rc={rc}):\n{out}")
        port = _free_port()
        opts = (
            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        cmd = [pg_ctl, "-D", str(data), "-l", str(logfile), "-w", "-o", opts, "start"]
        rc, out = await _run_as_owner(cmd, top)
        if rc != 0:
            raise RuntimeError(
                f"pg_ctl start failed (rc={rc}):\n{out}\n--- server log tail ---\n{_tail(logfile)}"
            )
        server.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        if err := await _probe(server.dsn):
            raise RuntimeError(f"private cluster up but not reachable: {err!r}\n{_tail(logfile)}")
    except BaseException:
        await server.stop()  # best effort: never leave a half-started cluster behind
        raise
    log(f"postgres: started private cluster on port {port} in {top}")
    return server


async def find_or_start(*, log: Callable[[str], None] = _stderr) -> PgServer:
    """Return a reachable server (see module docstring for the order tried)."""
    if os.environ.get(ENV_FORCE_PRIVATE, "") not in ("", "0"):
        return await _start_private(log)
    if dsn := os.environ.get(ENV_DSN):
        if err := await _probe(dsn):
            raise RuntimeError(f"{ENV_DSN}={_redact(dsn)} is set but cannot connect: {err!r}")
        log(f"postgres: using {ENV_DSN} {_redact(dsn)}")
        return PgServer(dsn=dsn)
    for desc, dsn in _candidates():
        if await _probe(dsn) is None:
            log(f"postgres: using {desc}")
            return PgServer(dsn=dsn)
    return await _start_private(log)
