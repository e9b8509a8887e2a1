"""The query repository: every statement the daemon runs, by name, with typed results.

Knows nothing about Telegram. Writes for a running shot are fenced in SQL (see
sql/queries.sql): a method returns None/False when the caller no longer holds the shot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from daemon.sqlfiles import audience_query, query

# What a database that is down, restarting or unreachable raises: callers that can wait it
# out catch exactly this, and let anything else (a bug) surface.
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

# Statements take milliseconds; one that hangs (a black-holed connection) is abandoned and
# retried rather than left to freeze a runner or the daemon's shutdown.
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 15.0
CYCLE_TIMEOUT = 10.0
AUDIENCE_TIMEOUT = 3600.0  # one INSERT … SELECT of a whole (maybe huge) audience
UNKNOWN_OUTCOME = ("outcome unknown: the daemon stopped while this request was in flight; "
                   "not resent so the recipient cannot get the shot twice")


@dataclass(frozen=True)
class ClaimedShot:
    id: int
    bot_slug: str
    target: str
    copy: str
    media_type: str
    media_url: str | None
    recency_days: int | None
    attempt: int
    audience_selected: bool
    requeued: bool


@dataclass(frozen=True)
class RecipientOutcome:
    telegram_id: int
    status: str  # 'sent' | 'skipped' | 'error' | 'pending' (not sent after all)
    error: str | None = None
    message_id: int | None = None
    chat_state: str | None = None


@dataclass(frozen=True)
class Tally:
    """A shot's recipients by outcome, read under the shot's row lock at finish."""

    status: str  # the shot's status when locked: 'running' or 'cancelled'
    total: int
    sent: int
    skipped: int
    error: int
    unsent: int
    top_error: str | None
    top_error_count: int


@dataclass(frozen=True)
class AttemptCounts:
    sent: int = 0
    skipped: int = 0
    error: int = 0


@dataclass(frozen=True)
class QueueState:
    due: int  # pending, past scheduled_at, bot not busy
    oldest_age: float  # seconds the oldest of those has waited (0 when none)
    next_due_in: float | None  # seconds until the next pending shot is due
    busy: bool  # a shot runs somewhere, or one is due


@dataclass(frozen=True)
class StaleReset:
    shot_id: int
    bot_slug: str
    status: str  # 'pending' (to be resumed) or 'error' (given up)
    unknown: int  # recipients it left in flight, now 'outcome unknown' errors (given up only)


@dataclass(frozen=True)
class Cycle:
    status: str | None  # the shot's status; None when the caller no longer holds it
    reserved: list[int]  # recipients now 'sending', in send order
    written: AttemptCounts  # outcomes this cycle wrote (rows it actually moved)
    orphans: int = 0  # rows a lost answer had reserved, put back to 'pending'


@dataclass(eq=False)  # hashable: asyncpg keeps query loggers in a set
class RoundTrips:
    """Statements sent to PostgreSQL by a pool's connections (BEGIN/COMMIT included)."""

    count: int = 0

    def __call__(self, _record: object) -> None:
        self.count += 1


async def create_pool(dsn: str, size: int, trips: RoundTrips | None = None) -> asyncpg.Pool:
    async def init(conn: asyncpg.Connection) -> None:
        if trips is not None:
            conn.add_query_logger(trips)

    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=size, init=init, reset=_keep_session,
        timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT,
        server_settings={"application_name": "shotsd"})
    assert pool is not None
    return pool


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Replaces asyncpg's per-release RESET ALL/UNLISTEN round trip: pooled connections never
    change session state (LISTEN and advisory locks use dedicated connections), and asyncpg
    still rolls back any transaction left open before this runs."""


@dataclass(frozen=True)
class Lease:
    """One claim of one shot: every write for the shot is fenced on all three, so neither
    another daemon nor a later claim by this daemon can be overwritten by a stale runner."""

    shot_id: int
    worker_id: str
    attempt: int

    @property
    def args(self) -> tuple[int, str, int]:
        return self.shot_id, self.worker_id, self.attempt


class Db:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def claim_shot(self, worker_id: str, busy: Sequence[int] = ()) -> ClaimedShot | None:
        """Atomically claims one due shot (not one of `busy`); None when nothing is due or
        every due shot's bot is busy. A lost race on the one-running-per-bot index is
        retried."""
        for _ in range(5):
            try:
                row = await self.pool.fetchrow(query("claim_shot"), worker_id, list(busy))
            except asyncpg.UniqueViolationError:
                continue  # another daemon started a shot of the same bot first
            return None if row is None else ClaimedShot(
                id=row["id"], bot_slug=row["bot_slug"], target=row["target"], copy=row["copy"],
                media_type=row["media_type"], media_url=row["media_url"],
                recency_days=row["recency_days"], attempt=row["attempt_count"],
                audience_selected=row["audience_selected"], requeued=row["requeued"])
        return None

    async def begin_attempt(self, shot: ClaimedShot, lease: Lease) -> int | None:
        """Opens the attempt under the shot's row lock: records it, turns recipients left in
        flight by an earlier holder into 'outcome unknown' errors (never resent), and on a
        requeue puts recipients that failed with a known outcome back to 'pending'.
        Returns how many became 'outcome unknown'; None (and nothing written) when the
        claim no longer holds the shot."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if await conn.fetchval(query("lock_claim"), *lease.args) is None:
                    raise _FencedOut
                await conn.execute(query("insert_attempt"), shot.id, shot.attempt,
                                   lease.worker_id)
                marked = await conn.execute(query("mark_unknown_outcomes"), shot.id,
                                             UNKNOWN_OUTCOME)
                if shot.requeued:
                    await conn.execute(query("retry_failed_recipients"), shot.id)
                await conn.execute(query("recount_shot"), shot.id)
                return int(marked.split()[-1])  # "UPDATE <n>"
        except _FencedOut:
            return None

    async def select_audience(self, shot: ClaimedShot, lease: Lease) -> int | None:
        """Materialises the audience once, set-based (INSERT … SELECT); returns its size, or
        None if the shot is no longer ours (then nothing is written)."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    audience_query(shot.target), shot.id, shot.bot_slug, shot.recency_days,
                    timeout=AUDIENCE_TIMEOUT)
                total = await conn.fetchval(query("mark_audience_selected"), *lease.args)
                if total is None:
                    raise _FencedOut  # roll the INSERT back
                return int(total)
        except _FencedOut:
            return None

    async def cycle(self, lease: Lease, outcomes: Sequence[RecipientOutcome], reserve: int,
                    reconcile: Sequence[int] | None = None) -> Cycle:
        """Writes outcomes, contact states, counters and the lease, and reserves up to
        `reserve` more recipients, in one round trip (sql: shot_cycle). After a failed
        cycle, `reconcile` (the runner's in-flight recipients) frees rows it never saw."""
        row = await self.pool.fetchrow(
            query("shot_cycle"), *lease.args,
            [o.telegram_id for o in outcomes], [o.status for o in outcomes],
            [o.error for o in outcomes], [o.message_id for o in outcomes],
            [o.chat_state for o in outcomes], reserve,
            None if reconcile is None else list(reconcile), timeout=CYCLE_TIMEOUT)
        assert row is not None  # the statement always returns one row
        written = AttemptCounts(row["sent"], row["skipped"], row["error"])
        return Cycle(row["status"], list(row["reserved"]), written, row["orphans"])

    async def reset_stale(self, stale_after: float, max_attempts: int) -> list[StaleReset]:
        """Hands back shots whose lease expired."""
        rows = await self.pool.fetch(
            query("reset_stale_shots"), stale_after, max_attempts, UNKNOWN_OUTCOME)
        return [StaleReset(r["id"], r["bot_slug"], r["status"], r["unknown"]) for r in rows]

    async def finish_shot(
        self, lease: Lease, counts: AttemptCounts,
        decide: Callable[[Tally], tuple[str, str | None]],
    ) -> str | None:
        """Sets the final status, counters, last_error and the attempt's outcome in one
        transaction, under the shot's row lock. Returns the status, None if not ours."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(query("lock_for_finish"), *lease.args)
            if row is None:
                return None
            tally = Tally(**dict(row))
            status, last_error = decide(tally)
            await conn.execute(query("finish_shot"), lease.shot_id, status, last_error,
                               tally.sent, tally.skipped, tally.error)
            await conn.execute(query("finish_attempt"), lease.shot_id, lease.attempt, status,
                               counts.sent, counts.skipped, counts.error, last_error,
                               lease.worker_id)
            return status

    async def release_shot(self, lease: Lease, counts: AttemptCounts) -> bool:
        """Hands a running shot back to the queue ('released': not a failed attempt)."""
        async with self.pool.acquire() as conn, conn.transaction():
            released = await conn.fetchval(query("release_shot"), *lease.args)
            if released is not None:
                await conn.execute(query("finish_attempt"), lease.shot_id, lease.attempt,
                                   "released", counts.sent, counts.skipped, counts.error, None,
                                   lease.worker_id)
            return released is not None

    async def fail_unclaimable(self, lease: Lease, reason: str) -> bool:
        """Ends a claimed shot with `error` before any recipient is touched."""
        status = await self.finish_shot(
            lease, AttemptCounts(), lambda _tally: ("error", reason))
        return status is not None

    async def queue_state(self) -> QueueState:
        row = await self.pool.fetchrow(query("queue_state"))
        assert row is not None
        return QueueState(row["due"], row["oldest_age"], row["next_due_in"], row["busy"])

    async def ping(self) -> bool:
        """True when the database answers (for /healthz)."""
        try:
            return bool(await self.pool.fetchval(query("ping"), timeout=2.0) == 1)
        except DB_ERRORS:
            return False

    async def shots_by_status(self) -> dict[str, int]:
        rows = await self.pool.fetch(query("shots_by_status"))
        return {row["status"]: row["n"] for row in rows}

    async def running_shots(self) -> list[dict[str, Any]]:
        return [dict(row) for row in await self.pool.fetch(query("running_shots"))]


class _FencedOut(Exception):
    """Rolls back a transaction whose fenced write found the shot no longer ours."""

