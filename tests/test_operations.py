"""Operating shotsd: sd_notify/watchdog, /metrics and /healthz, `shotsd status`, and no
token anywhere an operator (or an attacker reading logs) could see it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.systemd import Notifier
from tests.botapi import BadGateway, BotApiEmulator, Disconnect, RetryAfter, ServerError, Slow
from tests.conftest import (
    TOKEN,
    add_contacts,
    add_shot,
    eventually,
    run_shotsd,
    shot_row,
    shotsd_env,
    start_shotsd,
    wait_until,
    write_config,
)
from tests.tcpproxy import TcpProxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    yield sock
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_notifier_speaks_the_sd_notify_protocol(notify_socket: socket.socket) -> None:
    path = notify_socket.getsockname()
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert notifier.ready("serving 2 bot(s)")
    assert notifier.status("1 shot(s) running, 0 due")
    assert notifier.stopping("draining")
    assert _received(notify_socket) == ["READY=1\nSTATUS=serving 2 bot(s)",
                                        "STATUS=1 shot(s) running, 0 due",
                                        "STOPPING=1\nSTATUS=draining"]
    assert notifier.watchdog_interval == 2.0


def test_notifier_reaches_abstract_sockets_and_is_silent_outside_systemd() -> None:
    name = f"shotsd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert sock.recv(64) == b"READY=1"
    outside = Notifier({})
    assert not outside.enabled
    assert not outside.ready("x")
    assert outside.watchdog_interval is None
    other_pid = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000",
                          "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other_pid.watchdog_interval is None  # the watchdog is someone else's


async def _collect(sock: socket.socket, into: list[str]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        into.append((await loop.sock_recv(sock, 4096)).decode())


async def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = await _metrics_text(port)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def _health(port: int) -> int:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/healthz") as resp:
        return resp.status


@pytest.mark.asyncio
async def test_a_supervised_daemon_notifies_systemd_and_exports_metrics(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path,
    notify_socket: socket.socket,
) -> None:
    await add_contacts(pool, "shop", range(1, 31))
    emulator.script(3, RetryAfter(1), Slow(0.0))
    emulator.script(4, ServerError(403, "Forbidden: bot was blocked by the user"))
    shot = await add_shot(pool)
    port = _free_port()
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 40.0}, metrics={"listen": f"127.0.0.1:{port}"})
    env = shotsd_env(NOTIFY_SOCKET=notify_socket.getsockname(), WATCHDOG_USEC="200000")
    messages: list[str] = []
    reader = asyncio.create_task(_collect(notify_socket, messages))  # as systemd reads them
    proc = await start_shotsd("run", "--config", str(cfg), env=env)
    try:
        await wait_until(pool, "SELECT finished_at IS NOT NULL FROM shots_queue WHERE id = $1",
                         shot)
        samples = await _scrape(port)
        assert await _health(port) == 200
        text = await _metrics_text(port)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
        reader.cancel()
    assert proc.returncode == 0

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("shots_messages_total", bot_slug="shop", result="sent") == 29
    assert value("shots_messages_total", bot_slug="shop", result="skipped") == 1
    assert value("shots_messages_total", bot_slug="shop", result="error") == 0
    assert value("shots_telegram_requests_total", bot_slug="shop", method="sendMessage",
                 code="200") == 29
    assert value("shots_telegram_requests_total", bot_slug="shop", method="sendMessage",
                 code="429") == 1
    assert value("shots_rate_limited_total", bot_slug="shop") == 1
    assert value("shots_telegram_request_duration_seconds_count", bot_slug="shop",
                 method="sendMessage") == 31
    assert value("shots_jobs_finished_total", result="sent") == 1
    assert value("shots_jobs_running") == 0
    assert value("shots_picker_last_tick_timestamp_seconds") > 0
    assert not any("telegram_id" in dict(labels) for _, labels in samples)
    assert TOKEN not in text

    messages += _received(notify_socket)
    assert messages[0].startswith("READY=1\nSTATUS=serving 1 bot(s)")
    assert any(m.startswith("STATUS=1 shot(s) running") for m in messages)
    assert messages.count("WATCHDOG=1") >= 2
    assert any(m.startswith("STOPPING=1") for m in messages)

    promtool = _need("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == ""
    assert check.stderr.strip() == ""


async def _metrics_text(port: int) -> str:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


@pytest.mark.asyncio
async def test_healthz_says_503_while_the_database_is_unreachable(
    dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    port = _free_port()
    async with TcpProxy(dsn) as proxy:
        cfg = write_config(tmp_path / "c.toml", proxy.dsn, emulator.base_url,
                           metrics={"listen": f"127.0.0.1:{port}"})
        proc = await start_shotsd("run", "--config", str(cfg))
        try:
            async def healthy() -> bool:
                try:
                    return await _health(port) == 200
                except aiohttp.ClientConnectionError:
                    return False  # not listening yet

            await eventually(healthy, "/healthz 200 after start")
            proxy.cut()
            assert await _health(port) == 503
            proxy.restore()
            await eventually(healthy, "/healthz 200 once the database is back")
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0


@pytest.mark.asyncio
async def test_the_token_never_shows_through_faults(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    """Timeouts, dropped connections, 429, 5xx and a rejected token: grep every log line,
    last_error, shots_sent.error and /metrics for the token."""
    await add_contacts(pool, "shop", range(1, 41))
    emulator.script(2, Slow(2.0))
    emulator.script(3, Disconnect())
    emulator.script(4, RetryAfter(1), Slow(0.0))
    emulator.script(5, BadGateway())
    emulator.script(6, ServerError(500))
    first = await add_shot(pool)
    port = _free_port()
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 40.0, "request_timeout": 0.5,
                                 "max_retries": 1},
                       metrics={"listen": f"127.0.0.1:{port}"})
    proc = await start_shotsd("run", "--config", str(cfg))
    try:
        await wait_until(pool, "SELECT finished_at IS NOT NULL FROM shots_queue WHERE id = $1",
                         first, timeout=30)
        metrics_text = await _metrics_text(port)
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
    # and a token Telegram rejects (401), in a second run
    second = await add_shot(pool)
    wrong = "999999:TEST-revoked-token-eeeeeeeeeeeeeeeeeeee"
    rejected = await run_shotsd("run", "--exit-when-idle", "--config", str(cfg),
                                env=shotsd_env(SHOP_TOKEN=wrong))
    assert (await shot_row(pool, second))["status"] == "error"

    texts = [out.decode(), err.decode(), metrics_text, rejected.stdout, rejected.stderr]
    texts += [r["last_error"] or "" for r in await pool.fetch("SELECT last_error FROM shots_queue")]
    texts += [r["error"] or "" for r in await pool.fetch("SELECT error FROM shots_sent")]
    texts += [r["error"] or "" for r in await pool.fetch("SELECT error FROM shots_attempts")]
    for secret in (TOKEN, wrong, TOKEN.split(":")[1], wrong.split(":")[1]):
        assert not [t for t in texts if secret in t]
    errors = {r["error"] for r in await pool.fetch(
        "SELECT error FROM shots_sent WHERE shot_id = $1 AND status = 'error'", first)}
    assert any(e.startswith("outcome unknown: no answer") for e in errors)  # the timeout
    assert any(e.startswith("outcome unknown: connection lost") for e in errors)  # the drop


@pytest.mark.asyncio
async def test_status_shows_shots_by_status_and_running_progress(
    pool: asyncpg.Pool, dsn: str, tmp_path: Path
) -> None:
    for status in ("pending", "sent", "sent", "error"):
        await add_shot(pool, status=status)
    running = await add_shot(pool, "other")
    await pool.execute(
        "UPDATE shots_queue SET status = 'running', worker_id = 'host:1:x', heartbeat_at = now(),"
        " started_at = now() - interval '100 seconds', audience_total = 1000, sent_count = 180,"
        " skipped_count = 15, error_count = 5 WHERE id = $1", running)
    # its current attempt started 100 s ago (an earlier one days ago must not matter) and
    # sent 120 messages in the last minute: 2/s
    await pool.execute("UPDATE shots_queue SET started_at = now() - interval '3 days', "
                       "attempt_count = 2 WHERE id = $1", running)
    await pool.execute("INSERT INTO shots_attempts (shot_id, attempt, worker_id, started_at) "
                       "VALUES ($1, 2, 'host:1:x', now() - interval '100 seconds')", running)
    await pool.execute(
        "INSERT INTO shots_sent (shot_id, telegram_id, bot_slug, position, status, sent_at) "
        "SELECT $1, n, 'other', n, 'sent', now() - make_interval(secs => n * 0.4) "
        "FROM generate_series(1, 180) n", running)  # 150 of them within the last 60 s
    cfg = write_config(tmp_path / "c.toml", dsn)
    as_json = await run_shotsd("status", "--json", "--config", str(cfg))
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["shots_by_status"] == {"pending": 1, "sent": 2, "error": 1, "running": 1}
    [progress] = data["running"]
    assert (progress["id"], progress["bot_slug"], progress["total"]) == (running, "other", 1000)
    assert (progress["sent"], progress["skipped"], progress["error"]) == (180, 15, 5)
    assert 2.4 < progress["rate_per_second"] <= 2.5  # ~149 sent in the last minute
    assert 320 < progress["eta_seconds"] < 335  # 800 left at ~2.5/s
    table = await run_shotsd("status", "--config", str(cfg))
    assert table.returncode == 0
    assert "180/15/5 of 1000" in table.stdout
    assert "running" in table.stdout


def test_a_reader_that_does_not_keep_up_never_blocks_the_daemon(
    notify_socket: socket.socket,
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.getsockname()})
    queue = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    # nobody reads: the socket's queue fills
    sent = [notifier.notify("WATCHDOG=1") for _ in range(queue + 100)]
    assert sent[0]
    assert not all(sent)  # later ones were dropped instead of blocking


def _need(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{binary} missing in CI (apt-get install prometheus)")
        pytest.skip(f"{binary} not installed: apt-get install prometheus")
    return found


@pytest.mark.asyncio
async def test_a_real_prometheus_scrapes_shotsd(
    pool: asyncpg.Pool, dsn: str, emulator: BotApiEmulator, tmp_path: Path
) -> None:
    prometheus = _need("prometheus")
    await add_contacts(pool, "shop", range(1, 11))
    shot = await add_shot(pool)
    port, web_port = _free_port(), _free_port()
    cfg = write_config(tmp_path / "c.toml", dsn, emulator.base_url,
                       telegram={"rate_per_second": 50.0}, metrics={"listen": f"127.0.0.1:{port}"})
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: shotsd, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}\n")
    daemon = await start_shotsd("run", "--config", str(cfg))
    server = await asyncio.create_subprocess_exec(
        prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web_port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        query = (f"http://127.0.0.1:{web_port}/api/v1/query?"
                 'query=shots_messages_total{job="shotsd",result="sent"}')
        deadline = asyncio.get_running_loop().time() + 60
        sent = None
        async with aiohttp.ClientSession() as http:
            while sent != 10:
                assert asyncio.get_running_loop().time() < deadline, "no scrape with the value"
                await asyncio.sleep(0.25)
                try:
                    async with http.get(query) as resp:
                        if resp.status != 200:
                            continue  # 503 until its storage is ready
                        body = await resp.json()
                except aiohttp.ClientConnectionError:
                    continue  # not listening yet
                result = body.get("data", {}).get("result", [])
                sent = int(float(result[0]["value"][1])) if result else None
        assert (await shot_row(pool, shot))["sent_count"] == 10
    finally:
        server.terminate()
        await server.wait()
        daemon.send_signal(signal.SIGTERM)
        await asyncio.wait_for(daemon.communicate(), 10)


@pytest.mark.asyncio
async def test_a_taken_metrics_port_fails_clearly_and_never_reports_ready(
    dsn: str, tmp_path: Path, notify_socket: socket.socket
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path / "c.toml", dsn, metrics={"listen": f"127.0.0.1:{port}"})
        done = await run_shotsd("run", "--config", str(cfg),
                                env=shotsd_env(NOTIFY_SOCKET=notify_socket.getsockname()))
    assert done.returncode == 1
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "database" not in done.stderr
    assert not any(m.startswith("READY=1") for m in _received(notify_socket))


@pytest.mark.asyncio
async def test_an_unreachable_database_at_start_fails_before_ready(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    cfg = write_config(tmp_path / "c.toml", f"postgresql://postgres@127.0.0.1:{_free_port()}/x")
    done = await run_shotsd("run", "--config", str(cfg),
                            env=shotsd_env(NOTIFY_SOCKET=notify_socket.getsockname()))
    assert done.returncode == 1
    assert "cannot use the database" in done.stderr
    assert _received(notify_socket) == []
