"""Wires the parts into the daemon, supervises its tasks and shuts it down gracefully.

Signals only set the stop event. On stop the picker stops claiming, every running shot stops
sending new requests, drains those in flight, writes their outcomes and releases the shot.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import asyncpg

from daemon import logs, metrics, migrate
from daemon.config import Config, effective_rate
from daemon.db import DB_ERRORS, ClaimedShot, Db, Lease, RoundTrips, create_pool
from daemon.metrics import Metrics
from daemon.picker import Picker
from daemon.shot import Delivery, ShotRunner
from daemon.systemd import Notifier
from daemon.telegram import BotApi, BotPacer, redact

log = logs.get()


def new_worker_id() -> str:
    """Unique per process run, so a restarted daemon never mistakes an old lease for its own."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Service:
    def __init__(self, config: Config, db: Db, api: BotApi, *, exit_when_idle: bool,
                 notifier: Notifier) -> None:
        self.config = config
        self.db = db
        self.api = api
        self.exit_when_idle = exit_when_idle
        self.notifier = notifier
        self.worker_id = new_worker_id()
        self.stop = asyncio.Event()
        self.finished = asyncio.Event()  # every shot drained: metrics and watchdog may end
        self.metrics = Metrics(config.bots)
        self.pacers = {slug: BotPacer(effective_rate(config, slug)) for slug in config.bots}
        self.picker = Picker(db, self.worker_id, config.worker, self.metrics)
        self.running: dict[int, asyncio.Task[None]] = {}
        self._status = ""

    async def serve(self, connect_listener: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        host, port = self.config.metrics.host_port
        server = await metrics.start_server(self.metrics, self.db.ping, host, port)
        try:
            log.info("daemon_started", worker_id=self.worker_id, bots=sorted(self.config.bots),
                     metrics=self.config.metrics.listen)
            self.notifier.ready(f"serving {len(self.config.bots)} bot(s)")
            async with asyncio.TaskGroup() as outer:
                outer.create_task(self.notifier.watchdog(self.finished))
                async with asyncio.TaskGroup() as tg:
                    listener = tg.create_task(self.picker.listen(connect_listener, self.stop))
                    await self._pick_loop(tg)
                    self.stop.set()  # idle exit: let the listener end too
                    await listener
                self.finished.set()
        finally:
            self.finished.set()
            await server.cleanup()
        log.info("daemon_stopped", worker_id=self.worker_id)

    def _report(self, due: int) -> None:
        self.metrics.jobs_running.set(len(self.running))
        status = f"{len(self.running)} shot(s) running, {due} due"
        if status != self._status:
            self._status = status
            self.notifier.status(status)

    async def _pick_loop(self, tg: asyncio.TaskGroup) -> None:
        while not self.stop.is_set():
            try:
                await self.picker.reset_stale()
                claimed = await self.picker.claim_due(self.running.keys())
                state = await self.picker.observe_queue()
                wait, due = self.picker.next_wait(state), state.due
                if self.exit_when_idle and not self.running and not claimed:
                    if not state.busy:
                        log.info("daemon_idle")
                        return
                    wait = min(wait, 0.2)  # a shot runs elsewhere or waits for its bot
            except DB_ERRORS as exc:
                # Running shots carry on (their own cycles retry); claiming resumes later.
                log.error("picker_failed", error=str(exc))
                claimed, wait, due = [], self.config.worker.poll_interval, 0
            for shot in claimed:
                self.running[shot.id] = tg.create_task(self._run_shot(shot))
            self._report(due)
            await self.picker.sleep(self.stop, wait)

    async def _run_shot(self, shot: ClaimedShot) -> None:
        """Runs one shot; a failure of one shot is logged and never takes the others down."""
        try:
            bot = self.config.bots.get(shot.bot_slug)
            if bot is None:
                await self._refuse(shot, f"no bot '{shot.bot_slug}' is configured in shotsd "
                                         f"(add a [bots.{shot.bot_slug}] table to the config)")
                return
            delivery = Delivery(self.db, self.api, self.pacers[shot.bot_slug], bot,
                                self.config.worker, self.config.telegram, self.worker_id,
                                self.metrics)
            await ShotRunner(shot, delivery, self.stop).run()
        except DB_ERRORS as exc:
            # The lease lapses and the shot is reset and resumed (no recipient is resent).
            log.error("shot_interrupted", shot_id=shot.id, bot_slug=shot.bot_slug,
                      error=str(exc))
        except Exception as exc:  # one shot's bug must not stop the others
            # redacted here because it goes to last_error; the log masker covers the traceback
            detail = redact(f"{type(exc).__name__}: {exc}", self.config.secrets())
            log.error("shot_crashed", shot_id=shot.id, bot_slug=shot.bot_slug, error=detail,
                      exc_info=True)
            await self._refuse(shot, f"internal error while running the shot: {detail}")
        finally:
            self.running.pop(shot.id, None)
            self.metrics.jobs_running.set(len(self.running))
            self.picker.wake.set()  # a slot is free; the bot may have another shot due

    async def _refuse(self, shot: ClaimedShot, reason: str) -> None:
        try:
            if await self.db.fail_unclaimable(Lease(shot.id, self.worker_id, shot.attempt),
                                              reason):
                self.metrics.jobs_finished.labels("error").inc()
            log.error("shot_failed", shot_id=shot.id, bot_slug=shot.bot_slug, reason=reason)
        except DB_ERRORS as exc:
            # The lease will expire and another attempt will be made.
            log.error("shot_fail_not_recorded", shot_id=shot.id, error=str(exc))


async def run(config: Config, *, exit_when_idle: bool = False) -> int:
    """The daemon's main: connect, check the schema, serve until a signal or idle."""
    trips = RoundTrips()
    pool = await create_pool(config.database.dsn, config.database.pool_size, trips)
    try:
        async with pool.acquire() as conn:
            await migrate.check(conn)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with aiohttp.ClientSession(connector=connector) as session:
            api = BotApi(session, config.telegram.api_base, config.telegram.request_timeout)
            notifier = Notifier()
            service = Service(config, Db(pool), api, exit_when_idle=exit_when_idle,
                              notifier=notifier)
            _install_signal_handlers(service.stop, notifier)
            await service.serve(lambda: asyncpg.connect(
                config.database.dsn, server_settings={"application_name": "shotsd-listen"}))
    finally:
        await pool.close()
        log.info("database_round_trips", db_round_trips=trips.count)
    return 0


def _install_signal_handlers(stop: asyncio.Event, notifier: Notifier) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, notifier, sig)


def _on_signal(stop: asyncio.Event, notifier: Notifier, sig: signal.Signals) -> None:
    if not stop.is_set():
        log.info("shutdown_requested", signal=sig.name)
        notifier.stopping("draining in-flight requests, releasing running shots")
    stop.set()
