"""Runs one claimed shot: audience, paced delivery, batched outcomes, finish or release.

The guarantee: a recipient is written 'sending' (in a batch) before any request for it goes
out, and only moves on when its outcome is written. A crash therefore leaves at most the
in-flight window in 'sending', which the next holder turns into 'outcome unknown' errors
instead of resending. Requests already on the wire are drained, never cancelled.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

from daemon import logs
from daemon.config import BotConfig, TelegramConfig, WorkerConfig
from daemon.db import AttemptCounts, ClaimedShot, Db, RecipientOutcome, Tally
from daemon.telegram import (
    ApiCall,
    BotApi,
    BotPacer,
    Content,
    Kind,
    Result,
    calls_for,
    content_problem,
)

# Outcomes are written at least this often even when fewer than batch_size are buffered,
# so progress is live and the lease is renewed while a slow shot runs.
FLUSH_INTERVAL = 1.0
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0


@dataclass
class Delivery:
    """What a runner needs from the service: clients, pacing and settings for one bot."""

    db: Db
    api: BotApi
    pacer: BotPacer
    bot: BotConfig
    worker: WorkerConfig
    telegram: TelegramConfig
    worker_id: str


def decide_finish(tally: Tally, fatal: str | None) -> tuple[str, str | None]:
    """Final status and last_error from the recipients' tally (SPEC §3 Finish/Cancel)."""
    if tally.status == "cancelled":
        return "cancelled", f"cancelled by an operator; {_summary(tally)}"
    if fatal is not None:
        return "error", f"{fatal}; {_summary(tally)}"
    if tally.total == 0:
        return "skipped", "empty audience: no contact matched the shot's target"
    if tally.error:
        top = f"; most frequent: {tally.top_error} ({tally.top_error_count})"
        return "error", f"{tally.error} of {tally.total} recipients failed{top}"
    return "sent", None


def _summary(tally: Tally) -> str:
    return (f"{tally.sent} sent, {tally.skipped} skipped, {tally.error} failed, "
            f"{tally.unsent} not sent of {tally.total}")


class _Window:
    """Counts recipients between 'sending' and their written outcome; caps it at `size`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self.wanted = 0  # room the producer is waiting for (0: not waiting)
        self._changed = asyncio.Condition()

    @property
    def free(self) -> int:
        return self.size - self.used

    async def take(self, at_least: int, at_most: int) -> int:
        async with self._changed:
            while self.free < at_least:
                self.wanted = at_least
                await self._changed.wait()
            self.wanted = 0
            n = min(at_most, self.free)
            self.used += n
            return n

    async def give_back(self, n: int) -> None:
        async with self._changed:
            self.used -= n
            self._changed.notify_all()


@dataclass
class _State:
    outcomes: list[RecipientOutcome] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    fatal: str | None = None
    lost: bool = False  # the shot is no longer ours (lease lost or row gone)
    cancelled: bool = False


class ShotRunner:
    def __init__(self, shot: ClaimedShot, delivery: Delivery, stop: asyncio.Event) -> None:
        self.shot = shot
        self.d = delivery
        self.stop = stop
        self.content = Content(shot.copy, shot.media_type, shot.media_url)
        self.log = logs.get().bind(shot_id=shot.id, bot_slug=shot.bot_slug)
        self.state = _State()
        self.window = _Window(delivery.worker.concurrency)
        self._flush_now = asyncio.Event()
        self._producing_done = asyncio.Event()
        self._halt = asyncio.Event()  # set with fatal / lost / cancelled

    @property
    def halted(self) -> bool:
        s = self.state
        return self.stop.is_set() or s.fatal is not None or s.lost or s.cancelled

    async def run(self) -> str:
        """Runs the shot to its end; returns the final status, 'released' or 'lost'."""
        d, shot = self.d, self.shot
        if not await d.db.begin_attempt(shot, d.worker_id):
            return "lost"
        problem = content_problem(self.content)
        if problem is not None:
            await d.db.fail_unclaimable(shot.id, d.worker_id, shot.attempt, problem)
            self.log.warning("shot_refused", reason=problem)
            return "error"
        if not shot.audience_selected:
            total = await d.db.select_audience(shot, d.worker_id)
            if total is None:
                return "lost"
            self.log.info("audience_selected", target=shot.target, audience_total=total)
        await self._deliver_all()
        return await self._conclude()

    async def _deliver_all(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._write_outcomes())
            try:
                await self._produce(tg)
            finally:
                self._producing_done.set()

    async def _produce(self, tg: asyncio.TaskGroup) -> None:
        d = self.d
        low = max(1, min(d.worker.batch_size, d.worker.concurrency) // 2)
        while not self.halted:
            n = await self.window.take(low, d.worker.batch_size)
            if self.halted:
                await self.window.give_back(n)
                return
            ids = await d.db.reserve_recipients(self.shot.id, d.worker_id, n)
            if len(ids) < n:
                await self.window.give_back(n - len(ids))
            for telegram_id in ids:
                tg.create_task(self._deliver(telegram_id))
            if not ids:
                await self._why_nothing_reserved()
                return

    async def _why_nothing_reserved(self) -> None:
        status, ours = await self.d.db.shot_status(self.shot.id, self.d.worker_id)
        if status == "cancelled" and ours:
            self.state.cancelled = True
            self._halt.set()
        elif status != "running" or not ours:
            self.state.lost = True
            self._halt.set()
            self.log.warning("shot_lost", status=status)

    async def _deliver(self, telegram_id: int) -> None:
        """Delivers to one recipient and buffers the outcome; never raises for Telegram."""
        message_id: int | None = None
        outcome: RecipientOutcome | None = None
        for call in calls_for(self.content, telegram_id):
            result = await self._call(call)
            if result is None:  # halted before the request went out: still pending
                outcome = RecipientOutcome(telegram_id, "pending")
                break
            if result.kind is not Kind.SENT:
                outcome = self._failure(telegram_id, result, call.method)
                break
            message_id = result.message_id
        self._buffer(outcome or RecipientOutcome(telegram_id, "sent", message_id=message_id))

    async def _call(self, call: ApiCall) -> Result | None:
        """One request with the bot's pacing, 429 pauses and transient retries.
        Returns None when the shot halted before the request was sent."""
        retries = 0
        while True:
            if not await self._paced():
                return None
            result = await self.d.api.call(self.d.bot.token, call)
            if result.kind is Kind.RETRY_AFTER:
                self.d.pacer.pause(result.retry_after)
                self.log.warning("bot_rate_limited", retry_after=result.retry_after)
                continue
            if result.kind is not Kind.TRANSIENT or retries >= self.d.telegram.max_retries:
                return result
            retries += 1
            delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (retries - 1)) * random.uniform(0.5, 1)  # noqa: S311
            if await _wait(self.stop, delay):
                return None

    async def _paced(self) -> bool:
        """Waits for the bot's next request slot; False if the shot halts meanwhile, so a
        stopping shot does not trickle out queued requests at the paced rate."""
        if self.halted:
            return False
        acquire = asyncio.ensure_future(self.d.pacer.acquire())
        halts = [asyncio.ensure_future(self.stop.wait()),
                 asyncio.ensure_future(self._halt.wait())]
        try:
            await asyncio.wait([acquire, *halts], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in halts:
                waiter.cancel()
        if acquire.done() and not self.halted:
            return True
        acquire.cancel()  # a slot it may have taken is simply not used
        return False

    def _failure(self, telegram_id: int, result: Result, method: str) -> RecipientOutcome:
        if result.kind is Kind.SKIPPED:
            return RecipientOutcome(telegram_id, "skipped", result.description,
                                    chat_state=result.chat_state)
        if result.kind is Kind.SHOT_FATAL:
            self._halt_shot(f"Telegram refused the shot's {method}: {result.description}")
            return RecipientOutcome(telegram_id, "pending")
        if result.kind is Kind.TOKEN_REJECTED:
            self._halt_shot(f"bot token for '{self.shot.bot_slug}' rejected by Telegram "
                            f"({result.description})")
            return RecipientOutcome(telegram_id, "pending")
        return RecipientOutcome(telegram_id, "error", result.description)

    def _halt_shot(self, reason: str) -> None:
        if self.state.fatal is None:
            self.state.fatal = reason
            self._halt.set()
            self.log.error("shot_halted", reason=reason)

    def _buffer(self, outcome: RecipientOutcome) -> None:
        buffered = len(self.state.outcomes) + 1
        self.state.outcomes.append(outcome)
        window = self.window
        last = self._producing_done.is_set() and window.used == buffered
        # The producer waits for room that writing these outcomes would give back: write now.
        unblocks = 0 < window.wanted <= window.free + buffered
        if last or unblocks or buffered >= self.d.worker.batch_size:
            self._flush_now.set()

    async def _write_outcomes(self) -> None:
        """Flushes buffered outcomes in batches until production ended and all are written."""
        while True:
            producing = not self._producing_done.is_set()
            if not producing and self.window.used == len(self.state.outcomes):
                await self._flush()  # the last outcomes; nothing is in flight any more
                return
            events = [self._flush_now, self._producing_done] if producing else [self._flush_now]
            await _wait_any(events, FLUSH_INTERVAL)
            self._flush_now.clear()
            await self._flush()

    async def _flush(self) -> None:
        batch, self.state.outcomes = self.state.outcomes, []
        if not batch:
            return
        status = await self.d.db.record_outcomes(self.shot.id, self.d.worker_id, batch)
        await self.window.give_back(len(batch))
        if status is None:
            self.state.lost = True
            self._halt.set()
            self.log.error("shot_lost", reason="outcomes not written: shot no longer held")
            return
        written = Counter(o.status for o in batch)
        self.state.counts.update(written)
        if status == "cancelled":
            self.state.cancelled = True
            self._halt.set()
        self.log.info("batch_sent", sent=written["sent"], skipped=written["skipped"],
                      error=written["error"], not_sent=written["pending"])

    async def _conclude(self) -> str:
        d, shot, state = self.d, self.shot, self.state
        counts = AttemptCounts(state.counts["sent"], state.counts["skipped"],
                               state.counts["error"])
        if state.lost:
            return "lost"
        if self.stop.is_set() and state.fatal is None and not state.cancelled:
            released = await d.db.release_shot(shot.id, d.worker_id, shot.attempt, counts)
            self.log.info("shot_released", released=released, **vars(counts))
            return "released" if released else "lost"
        status = await d.db.finish_shot(
            shot.id, d.worker_id, shot.attempt, counts,
            lambda tally: decide_finish(tally, state.fatal))
        self.log.info("shot_finished", status=status, **vars(counts))
        return status or "lost"


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """Waits up to `timeout` s; True when `event` was set (an interruptible sleep)."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def _wait_any(events: list[asyncio.Event], timeout: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
