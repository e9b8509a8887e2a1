"""Prometheus metrics (SPEC §8) and the HTTP server for /metrics and /healthz.

Labels are bot slugs, results, methods and status codes: never a telegram_id or a token.
Known label values are created at start, so every series exists (at 0) from the first scrape
and `rate()`/`increase()` see the first event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

MESSAGE_RESULTS = ("sent", "skipped", "error")
JOB_RESULTS = ("sent", "skipped", "error", "cancelled")
SEND_METHODS = ("sendMessage", "sendPhoto", "sendVideo", "sendAudio")
# Telegram answers in tens to hundreds of ms; the top buckets catch a struggling API.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)


class Metrics:
    def __init__(self, bots: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, open fds, CPU …
        PlatformCollector(registry=r)
        self.messages = Counter("shots_messages", "Recipients whose outcome was written, "
                                "by result.", ["bot_slug", "result"], registry=r)
        self.requests = Counter("shots_telegram_requests", "Bot API requests by HTTP status "
                                "(or timeout/network).", ["bot_slug", "method", "code"],
                                registry=r)
        self.request_duration = Histogram(
            "shots_telegram_request_duration_seconds", "Bot API request duration.",
            ["bot_slug", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.rate_limited = Counter("shots_rate_limited", "429 answers from Telegram.",
                                    ["bot_slug"], registry=r)
        self.jobs_finished = Counter("shots_jobs_finished", "Shots finished, by final status.",
                                     ["result"], registry=r)
        self.jobs_running = Gauge("shots_jobs_running", "Shots this daemon is running.",
                                  registry=r)
        self.jobs_due = Gauge("shots_jobs_due", "Pending shots whose scheduled_at has passed "
                              "and whose bot is not busy with another shot.", registry=r)
        self.oldest_due_age = Gauge("shots_oldest_due_job_age_seconds", "How long the oldest "
                                    "such due shot has waited (0 when none).", registry=r)
        self.stale_reset = Counter("shots_stale_jobs_reset", "Running shots reset after their "
                                   "lease expired.", registry=r)
        self.picker_last_tick = Gauge("shots_picker_last_tick_timestamp_seconds", "Unix time "
                                      "of the picker's last pass over the queue.", registry=r)
        for result in JOB_RESULTS:
            self.jobs_finished.labels(result)
        for bot in bots:
            self.rate_limited.labels(bot)
            for result in MESSAGE_RESULTS:
                self.messages.labels(bot, result)
            for method in SEND_METHODS:
                self.request_duration.labels(bot, method)

    def observe_request(self, bot: str, method: str, code: str, seconds: float) -> None:
        self.requests.labels(bot, method, code).inc()
        self.request_duration.labels(bot, method).observe(seconds)
        if code == "429":
            self.rate_limited.labels(bot).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


HealthCheck = Callable[[], Awaitable[bool]]


def app(metrics: Metrics, database_ok: HealthCheck) -> web.Application:
    """/metrics in Prometheus text format; /healthz 200 while the loop runs and the database
    answers, else 503 (an unanswered request means the loop itself is stuck)."""

    async def scrape(_request: web.Request) -> web.Response:
        body = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(_request: web.Request) -> web.Response:
        try:
            ok = await asyncio.wait_for(database_ok(), 2.0)
        except TimeoutError:
            ok = False
        body = {"status": "ok" if ok else "unavailable", "database": "ok" if ok else "down"}
        return web.Response(status=200 if ok else 503, text=json.dumps(body),
                            content_type="application/json")

    application = web.Application()
    application.router.add_get("/metrics", scrape)
    application.router.add_get("/healthz", health)
    return application


async def start_server(metrics: Metrics, database_ok: HealthCheck, host: str, port: int
                       ) -> web.AppRunner:
    """Binds and serves in the background (a taken port fails here, before READY=1);
    `await runner.cleanup()` stops it."""
    runner = web.AppRunner(app(metrics, database_ok), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"metrics.listen: cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}") from None
    return runner


class ListenError(Exception):
    """The metrics address cannot be bound (taken, or not an address of this host)."""
