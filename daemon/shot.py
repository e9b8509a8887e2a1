"""Runs one claimed shot: audience, paced delivery, batched outcomes, finish or release.

One loop, the *cycle*, owns the shot's database state: about once a second (sooner when a
batch is full or the senders run dry) it writes the buffered outcomes, renews the lease,
learns whether an operator cancelled the shot, and reserves the next recipients — all in one
round trip. A recipient is reserved ('sending') before any request for it goes out and moves
on only when its outcome is written, so a crash leaves at most `worker.concurrency`
recipients in 'sending', which the next holder turns into 'outcome unknown' errors instead of
resending. Requests already on the wire are drained, never cancelled.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon import logs
from daemon.aio import sleep_unless, wait_any
from daemon.config import BotConfig, TelegramConfig, WorkerConfig
from daemon.db import DB_ERRORS, AttemptCounts, ClaimedShot, Db, Lease, RecipientOutcome, Tally
from daemon.metrics import JOB_RESULTS, Metrics
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

# The cycle runs at least this often (and at least every worker.heartbeat_interval).
CYCLE_INTERVAL = 1.0
# On shutdown, outcomes are written for at most this long if the database does not answer.
STOP_GRACE = 3.0
# On shutdown, requests in flight get this long to answer (SPEC: exit within 10 s, though
# request_timeout may be longer); then they are abandoned and recorded 'outcome unknown'.
DRAIN_LIMIT = 6.0
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0
# This many transient failures in a row, with no answer in between, mean Telegram is
# unreachable: the shot pauses and probes instead of burning through its audience.
OUTAGE_AFTER = 5
PARTIAL = "partially delivered"


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
    metrics: Metrics
    clock: Callable[[], float] = time.monotonic


def decide_finish(tally: Tally, fatal: str | None) -> tuple[str, str | None]:
    """Final status and last_error from the recipients' tally (SPEC §3 Finish/Cancel)."""
    if tally.status == "cancelled":
        return "cancelled", f"cancelled by an operator; {_summary(tally)}"
    if fatal is not None:
        return "error", f"{fatal}; {_summary(tally)}"
    if tally.total == 0:
        return "skipped", "empty audience: no contact matched the shot's target"
    if tally.unsent:
        # Only reachable if rows changed under the runner; never call such a shot 'sent'.
        return "error", f"{tally.unsent} recipients were left unsent; {_summary(tally)}"
    if tally.error:
        top = f"; most frequent: {tally.top_error} ({tally.top_error_count})"
        return "error", f"{tally.error} of {tally.total} recipients failed{top}"
    return "sent", None


def _summary(tally: Tally) -> str:
    return (f"{tally.sent} sent, {tally.skipped} skipped, {tally.error} failed, "
            f"{tally.unsent} not sent of {tally.total}")


@dataclass
class _State:
    outcomes: list[RecipientOutcome] = field(default_factory=list)  # not yet written
    counts: Counter[str] = field(default_factory=Counter)  # written by this attempt
    in_flight: set[int] = field(default_factory=set)  # reserved, outcome not yet written
    cycle_failed: bool = False  # the last cycle's answer was lost: reconcile next time
    waiting: int = 0  # reserved recipients whose first request has not started
    exhausted: bool = False  # no pending recipient left to reserve
    fatal: str | None = None  # the shot itself was refused
    lost: bool = False  # the shot is no longer (safely) ours
    cancelled: bool = False


class ShotRunner:
    def __init__(self, shot: ClaimedShot, delivery: Delivery, stop: asyncio.Event) -> None:
        self.shot = shot
        self.d = delivery
        self.lease = Lease(shot.id, delivery.worker_id, shot.attempt)
        self.stop = stop
        self.content = Content(shot.copy, shot.media_type, shot.media_url)
        self.log = logs.get().bind(shot_id=shot.id, bot_slug=shot.bot_slug)
        self.state = _State()
        self.halt = asyncio.Event()  # set with fatal / lost / cancelled / stop
        self.wake = asyncio.Event()  # run the cycle now
        self.telegram_up = asyncio.Event()
        self.telegram_up.set()
        self.drain_over = asyncio.Event()  # stopping, and in-flight requests had their time
        self._failures_in_a_row = 0
        self._stop_seen_at: float | None = None
        w = delivery.worker
        self.interval = min(CYCLE_INTERVAL, w.heartbeat_interval)
        # Renewed leases are trusted for stale_after minus a heartbeat: sending stops before
        # any other daemon may reset the shot.
        self.lease_valid_for = w.stale_after - w.heartbeat_interval
        self.lease_renewed_at = delivery.clock()
        self.low_water = max(1, min(w.batch_size, w.concurrency) // 4)

    @property
    def halted(self) -> bool:
        s = self.state
        return self.stop.is_set() or s.fatal is not None or s.lost or s.cancelled

    async def run(self) -> str:
        """Runs the shot to its end; returns the final status, 'released' or 'lost'."""
        d, shot = self.d, self.shot
        unknown = await d.db.begin_attempt(shot, self.lease)
        if unknown is None:
            return "lost"
        if unknown:
            d.metrics.messages.labels(shot.bot_slug, "error").inc(unknown)
            self.log.warning("outcome_unknown", recipients=unknown)
        problem = content_problem(self.content)
        if problem is not None:
            if await d.db.fail_unclaimable(self.lease, problem):
                d.metrics.jobs_finished.labels("error").inc()
            self.log.warning("shot_refused", reason=problem)
            return "error"
        if self.stop.is_set():  # claimed as shutdown began: hand it straight back
            released = await d.db.release_shot(self.lease, AttemptCounts())
            self.log.info("shot_released", released=released, sent=0, skipped=0, error=0)
            return "released" if released else "lost"
        if not shot.audience_selected:
            total = await d.db.select_audience(shot, self.lease)
            if total is None:
                return "lost"
            self.log.info("audience_selected", target=shot.target, audience_total=total)
        self.lease_renewed_at = d.clock()
        async with asyncio.TaskGroup() as tg:
            await self._cycles(tg)
        return await self._conclude()

    # --- the cycle ---------------------------------------------------------------------

    async def _cycles(self, tg: asyncio.TaskGroup) -> None:
        while True:
            await self._cycle(tg)
            self._lease_ok()
            s = self.state
            if not s.in_flight and (s.exhausted or self.halted):
                return
            events = [self.wake] if self.stop.is_set() else [self.wake, self.stop]
            await wait_any(events, self.interval)
            self.wake.clear()
            if self.stop.is_set():
                self._stopping()

    def _stopping(self) -> None:
        self.halt.set()  # backoffs and probes end too, so shutdown stays prompt
        if self._stop_seen_at is None:
            self._stop_seen_at = self.d.clock()
            asyncio.get_running_loop().call_later(DRAIN_LIMIT, self.drain_over.set)

    def _lease_ok(self) -> bool:
        """False once the lease may have expired: then nothing more may be sent."""
        if not self.state.lost and self.d.clock() - self.lease_renewed_at > self.lease_valid_for:
            self._lose("lease not renewed in time (database unreachable?); stopped sending")
        return not self.state.lost

    async def _cycle(self, tg: asyncio.TaskGroup) -> None:
        s = self.state
        batch = s.outcomes
        free = self.d.worker.concurrency - (len(s.in_flight) - len(batch))
        want = 0 if self.halted or s.exhausted else min(self.d.worker.batch_size, free)
        reconcile = sorted(s.in_flight) if s.cycle_failed else None
        started = self.d.clock()
        try:
            s.outcomes = []
            result = await self.d.db.cycle(self.lease, batch, want, reconcile)
        except DB_ERRORS as exc:
            s.outcomes = batch + s.outcomes  # kept for the next cycle
            s.cycle_failed = True
            self._cycle_failed(exc)
            return
        s.cycle_failed = False
        s.in_flight.difference_update(o.telegram_id for o in batch)
        if result.status is None:
            self._lose("another daemon holds the shot now")
            return
        self.lease_renewed_at = started
        self._account(batch, result.written)
        if result.orphans:
            self.log.warning("orphans_released", count=result.orphans)
        if result.status == "cancelled":
            s.cancelled = True
            self.halt.set()
        elif result.status != "running":
            self._lose(f"an operator set the shot to {result.status} while it ran")
        if len(result.reserved) < want:
            s.exhausted = True
        s.in_flight.update(result.reserved)
        s.waiting += len(result.reserved)
        for telegram_id in result.reserved:
            tg.create_task(self._deliver(tg, telegram_id))

    def _cycle_failed(self, exc: BaseException) -> None:
        """Outcomes stay buffered for the next cycle. Once the lease has lapsed, or the
        daemon is stopping and the database has not answered for STOP_GRACE, they are
        dropped: the next holder reports those recipients as 'outcome unknown'."""
        s = self.state
        if self.stop.is_set():
            self._stopping()
        stopping_too_long = (self._stop_seen_at is not None
                             and self.d.clock() - self._stop_seen_at > STOP_GRACE)
        if stopping_too_long:
            self._lose("database unreachable while stopping")
        if s.lost:
            dropped = list(s.outcomes)
            s.outcomes = []
            s.in_flight.difference_update(o.telegram_id for o in dropped)
            self.log.error("outcomes_dropped", error=str(exc), dropped=len(dropped))
            return
        self.log.warning("shot_cycle_failed", error=str(exc), unwritten=len(s.outcomes))

    def _account(self, batch: list[RecipientOutcome], written: AttemptCounts) -> None:
        """Counts what the database says it wrote (a batch re-sent after a lost answer is
        not counted twice)."""
        if not batch:
            return
        self.state.counts.update(vars(written))
        for result, count in vars(written).items():
            self.d.metrics.messages.labels(self.shot.bot_slug, result).inc(count)
        self.log.info("batch_sent", sent=written.sent, skipped=written.skipped,
                      error=written.error,
                      not_sent=sum(1 for o in batch if o.status == "pending"))

    def _lose(self, reason: str) -> None:
        if not self.state.lost:
            self.state.lost = True
            self.halt.set()
            self.log.error("shot_lost", reason=reason)

    def _halt_shot(self, reason: str) -> None:
        if self.state.fatal is None:
            self.state.fatal = reason
            self.halt.set()
            self.log.error("shot_halted", reason=reason)

    def _buffer(self, outcome: RecipientOutcome) -> None:
        self.state.outcomes.append(outcome)
        self._maybe_wake()

    def _maybe_wake(self) -> None:
        """Runs the cycle early when a batch is full, every reserved recipient is back, or
        the senders are about to run dry and a cycle could reserve a worthwhile batch."""
        s = self.state
        all_back = bool(s.outcomes) and len(s.in_flight) == len(s.outcomes)
        room = self.d.worker.concurrency - (len(s.in_flight) - len(s.outcomes))
        refill = (not s.exhausted and not self.halted and s.waiting <= self.low_water
                  and room >= self.low_water)
        if all_back or refill or len(s.outcomes) >= self.d.worker.batch_size:
            self.wake.set()

    # --- one recipient ---------------------------------------------------------------------

    async def _deliver(self, tg: asyncio.TaskGroup, telegram_id: int) -> None:
        """Delivers to one recipient and buffers its outcome; never raises for Telegram."""
        message_id: int | None = None
        outcome: RecipientOutcome | None = None
        committed = False  # a part already reached the chat: never retried as a whole
        for call in calls_for(self.content, telegram_id):
            result = await self._call(tg, call, first=not committed)
            if result is None:
                outcome = RecipientOutcome(telegram_id, "pending")  # this part never went out
            elif result.kind is not Kind.SENT:
                outcome = self._failure(telegram_id, result, call.method)
            else:
                committed = True
                message_id = result.message_id
                continue
            break
        if committed and outcome is not None:
            # Part of the shot reached the chat: an error that a requeue will not retry.
            why = outcome.error or "the shot stopped before the rest was sent"
            outcome = RecipientOutcome(telegram_id, "error", f"{PARTIAL}: {why}",
                                       chat_state=outcome.chat_state)
        self._buffer(outcome or RecipientOutcome(telegram_id, "sent", message_id=message_id))

    async def _call(self, tg: asyncio.TaskGroup, call: ApiCall, first: bool) -> Result | None:
        """One request with pacing, 429 pauses, outage probing and transient retries.
        Returns None when the shot halted before the request went out."""
        retries = 0
        while True:
            go = await self._paced()
            self._started(first)
            first = False
            if not go:
                return None
            result = await self._request(call)
            if result.kind is Kind.RETRY_AFTER:
                self.d.pacer.pause(result.retry_after)
                self.log.warning("bot_rate_limited", retry_after=result.retry_after)
                continue
            if result.kind not in (Kind.TRANSIENT, Kind.UNKNOWN):
                self._failures_in_a_row = 0
                return result
            down = self._note_transient(tg)
            if result.kind is Kind.UNKNOWN:
                return result  # it may have been delivered: never sent again
            if down:
                continue  # Telegram is down: this failure is the outage's, not the recipient's
            retries += 1
            if retries > self.d.telegram.max_retries:
                return result
            delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (retries - 1))
            if await sleep_unless(self.halt, delay * random.uniform(0.5, 1.0)):  # noqa: S311
                return None

    async def _request(self, call: ApiCall) -> Result:
        started = time.monotonic()
        request = asyncio.ensure_future(self.d.api.call(self.d.bot.token, call))
        try:
            await wait_any([request, self.drain_over], None)
        finally:
            answered = request.done()
            if not answered:
                request.cancel()  # also when this task itself is torn down
        if answered:
            result = request.result()
        else:  # shutting down and Telegram is slow: give up on the answer, never resend
            result = Result(Kind.UNKNOWN, "no answer before the daemon had to stop",
                            code="timeout")
        self.d.metrics.observe_request(self.shot.bot_slug, call.method, result.code,
                                       time.monotonic() - started)
        return result

    def _started(self, first: bool) -> None:
        if first:
            self.state.waiting -= 1
            self._maybe_wake()

    async def _paced(self) -> bool:
        """Waits until Telegram is reachable and the bot's next slot; False if the shot halts
        (or its lease lapses) meanwhile, so a stopping shot sends nothing more."""
        while True:
            if self.halted or not self._lease_ok():
                return False
            if not self.telegram_up.is_set():
                await wait_any([self.telegram_up, self.halt, self.stop], None)
                continue
            if await self._slot() and self.telegram_up.is_set():
                # a long 429 pause may have outlived the lease: check once more
                return not self.halted and self._lease_ok()

    async def _slot(self) -> bool:
        """The bot's next request slot; False if the shot halts first."""
        acquire = asyncio.ensure_future(self.d.pacer.acquire())
        await wait_any([acquire, self.halt, self.stop], None)
        if acquire.done() and not self.halted:
            return True
        acquire.cancel()  # a slot it may have taken is simply not used
        return False

    def _note_transient(self, tg: asyncio.TaskGroup) -> bool:
        """Counts a transient failure; True when Telegram is (now) considered unreachable."""
        self._failures_in_a_row += 1
        if self.telegram_up.is_set() and self._failures_in_a_row >= OUTAGE_AFTER:
            self.telegram_up.clear()
            self.log.warning("telegram_unreachable", failures_in_a_row=self._failures_in_a_row)
            tg.create_task(self._probe())
        return not self.telegram_up.is_set()

    async def _probe(self) -> None:
        """While Telegram is unreachable, asks getMe with backoff until it answers."""
        delay = BACKOFF_BASE
        while not self.halt.is_set():
            if await sleep_unless(self.halt, delay):
                break
            if not await self._slot():
                break
            result = await self._request(ApiCall("getMe", {}))
            if result.kind is not Kind.TRANSIENT:
                self.log.info("telegram_reachable", answer=result.code)
                break
            delay = min(BACKOFF_CAP, delay * 2)
        self._failures_in_a_row = 0
        self.telegram_up.set()

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
        if result.kind is Kind.UNKNOWN:
            return RecipientOutcome(telegram_id, "error", f"outcome unknown: {result.description}"
                                    "; not resent so it cannot arrive twice")
        return RecipientOutcome(telegram_id, "error", result.description)

    # --- the end -----------------------------------------------------------------------

    async def _conclude(self) -> str:
        d, state = self.d, self.state
        counts = AttemptCounts(state.counts["sent"], state.counts["skipped"],
                               state.counts["error"])
        if state.lost:
            return "lost"
        if self.stop.is_set() and state.fatal is None and not state.cancelled:
            released = await d.db.release_shot(self.lease, counts)
            self.log.info("shot_released", released=released, **vars(counts))
            return "released" if released else "lost"
        status = await d.db.finish_shot(
            self.lease, counts, lambda tally: decide_finish(tally, state.fatal))
        if status in JOB_RESULTS:
            d.metrics.jobs_finished.labels(status).inc()
        self.log.info("shot_finished", status=status, **vars(counts))
        return status or "lost"
