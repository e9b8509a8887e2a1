"""Claims due shots and decides when to look again.

The picker looks for due shots every `worker.poll_interval`, when a NOTIFY says a shot was
inserted or made pending, when a running shot ends (its bot may have another one waiting),
and at the next known `scheduled_at`, so a due shot starts promptly, not a poll later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection

import asyncpg

from daemon import logs
from daemon.aio import wait_any
from daemon.config import WorkerConfig
from daemon.db import DB_ERRORS, ClaimedShot, Db, QueueState
from daemon.metrics import Metrics

CHANNEL = "shots_queue"
# Never wake more often than this for a scheduled_at (clock skew between hosts, rounding).
_MIN_WAIT = 0.05

log = logs.get()


class Picker:
    def __init__(self, db: Db, worker_id: str, worker: WorkerConfig,
                 metrics: Metrics | None = None) -> None:
        self.db = db
        self.metrics = metrics or Metrics()
        self.worker_id = worker_id
        self.worker = worker
        self.wake = asyncio.Event()

    async def reset_stale(self) -> None:
        """Hands back shots of daemons that stopped renewing their lease (any daemon's)."""
        for reset in await self.db.reset_stale(self.worker.stale_after,
                                               self.worker.max_attempts):
            self.metrics.stale_reset.inc()
            if reset.status == "error":
                self.metrics.jobs_finished.labels("error").inc()
                self.metrics.messages.labels(reset.bot_slug, "error").inc(reset.unknown)
            log.warning("stale_shot_reset", shot_id=reset.shot_id, bot_slug=reset.bot_slug,
                        status=reset.status, outcome_unknown=reset.unknown)

    async def observe_queue(self) -> QueueState:
        """Reads the queue's state and updates the gauges and the picker's heartbeat."""
        state = await self.db.queue_state()
        self.metrics.jobs_due.set(state.due)
        self.metrics.oldest_due_age.set(state.oldest_age)
        self.metrics.picker_last_tick.set(time.time())
        return state

    async def claim_due(self, running: Collection[int]) -> list[ClaimedShot]:
        """Claims due shots until `max_running_shots` would be exceeded or none is due.
        Shots in `running` (still winding down here) are never claimed twice."""
        claimed: list[ClaimedShot] = []
        while len(running) + len(claimed) < self.worker.max_running_shots:
            busy = [*running, *(c.id for c in claimed)]
            shot = await self.db.claim_shot(self.worker_id, busy)
            if shot is None:
                break
            log.info("shot_claimed", shot_id=shot.id, bot_slug=shot.bot_slug,
                     attempt=shot.attempt, requeued=shot.requeued)
            claimed.append(shot)
        return claimed

    def next_wait(self, state: QueueState) -> float:
        """Seconds until the picker should look again: the poll, or sooner for a due time."""
        if state.next_due_in is None:
            return self.worker.poll_interval
        return min(self.worker.poll_interval, max(_MIN_WAIT, state.next_due_in))

    async def sleep(self, stop: asyncio.Event, seconds: float) -> None:
        """Sleeps until the timeout, a wake-up or shutdown, whichever comes first."""
        await wait_any([self.wake, stop], seconds)
        self.wake.clear()

    async def listen(self, connect: Callable[[], Awaitable[asyncpg.Connection]],
                     stop: asyncio.Event) -> None:
        """Holds a dedicated LISTEN connection (a pooled one would lose its LISTEN when
        recycled); reconnects after a poll interval when it drops. Polling goes on meanwhile."""
        while not stop.is_set():
            try:
                conn = await connect()
            except DB_ERRORS as exc:
                log.warning("listen_connect_failed", error=str(exc))
                await self.sleep_or_stop(stop, self.worker.poll_interval)
                continue
            await self._listen_on(conn, stop)
            if not stop.is_set():
                log.warning("listen_connection_lost")
                await self.sleep_or_stop(stop, min(1.0, self.worker.poll_interval))

    async def _listen_on(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        """Returns on shutdown or when the connection dies."""
        closed = asyncio.Event()
        conn.add_termination_listener(lambda _conn: closed.set())
        try:
            await conn.add_listener(CHANNEL, lambda *_args: self.wake.set())
            self.wake.set()  # anything inserted while we were not listening
            await wait_any([stop, closed], None)
        except DB_ERRORS as exc:
            log.warning("listen_failed", error=str(exc))
        finally:
            with contextlib.suppress(*DB_ERRORS):
                await conn.close(timeout=2)

    async def sleep_or_stop(self, stop: asyncio.Event, seconds: float) -> None:
        await wait_any([stop], seconds)
