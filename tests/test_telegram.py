"""Pure logic of the Bot API client: payloads, outcome classification, pacing, masking."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator

import pytest
import structlog

from daemon import logs
from daemon.db import Tally
from daemon.logs import SecretMasker
from daemon.shot import decide_finish
from daemon.telegram import (
    BotPacer,
    Content,
    Kind,
    calls_for,
    classify,
    content_problem,
    text_length,
)


def _error(code: int, description: str, **extra: object) -> dict[str, object]:
    return {"ok": False, "error_code": code, "description": description, **extra}


@pytest.mark.parametrize(
    ("status", "body", "kind", "chat_state"),
    [
        (200, {"ok": True, "result": {"message_id": 7}}, Kind.SENT, None),
        (403, _error(403, "Forbidden: bot was blocked by the user"), Kind.SKIPPED, "blocked"),
        (403, _error(403, "Forbidden: user is deactivated"), Kind.SKIPPED, "deactivated"),
        (400, _error(400, "Bad Request: chat not found"), Kind.SKIPPED, None),
        (403, _error(403, "Forbidden: bot can't initiate conversation with a user"),
         Kind.SKIPPED, None),
        (403, _error(403, "Forbidden: bot was kicked from the group chat"), Kind.SKIPPED, None),
        (429, _error(429, "Too Many Requests: retry after 7", parameters={"retry_after": 7}),
         Kind.RETRY_AFTER, None),
        (500, _error(500, "Internal Server Error"), Kind.TRANSIENT, None),
        (502, None, Kind.TRANSIENT, None),
        (400, _error(400, "Bad Request: can't parse entities: Unsupported start tag \"x\""),
         Kind.SHOT_FATAL, None),
        (400, _error(400, "Bad Request: wrong file identifier/HTTP URL specified"),
         Kind.SHOT_FATAL, None),
        (400, _error(400, "Bad Request: failed to get HTTP URL content"), Kind.SHOT_FATAL, None),
        (400, _error(400, "Bad Request: message is too long"), Kind.SHOT_FATAL, None),
        (401, _error(401, "Unauthorized"), Kind.TOKEN_REJECTED, None),
        (404, _error(404, "Not Found"), Kind.TOKEN_REJECTED, None),
        (400, _error(400, "Bad Request: user not found"), Kind.FAILED, None),
        (403, _error(403, "Forbidden: bot is not a member of the channel chat"), Kind.FAILED, None),
    ],
)
def test_classify(status: int, body: object, kind: Kind, chat_state: str | None) -> None:
    result = classify(status, body)
    assert result.kind is kind
    assert result.chat_state == chat_state
    assert result.code == str(status)
    if isinstance(body, dict) and not body.get("ok"):
        assert result.description == body["description"]


def test_classify_reads_message_id_and_retry_after() -> None:
    assert classify(200, {"ok": True, "result": {"message_id": 42}}).message_id == 42
    limited = classify(429, _error(429, "Too Many Requests: retry after 3",
                                   parameters={"retry_after": 3}))
    assert limited.retry_after == 3.0


def test_text_message_payload() -> None:
    [call] = calls_for(Content("Hi <b>you</b>"), 99)
    assert call.method == "sendMessage"
    assert call.payload == {"chat_id": 99, "parse_mode": "HTML", "text": "Hi <b>you</b>",
                            "link_preview_options": {"is_disabled": True}}


def test_photo_with_caption_and_caption_overflow() -> None:
    url = "https://cdn.test/p.jpg"
    [photo] = calls_for(Content("short", "photo", url), 1)
    assert (photo.method, photo.payload["photo"], photo.payload["caption"]) == (
        "sendPhoto", url, "short")
    long_copy = "<b>" + "x" * 1025 + "</b>"
    media, message = calls_for(Content(long_copy, "video", url), 1)
    assert media.method == "sendVideo"
    assert "caption" not in media.payload
    assert message.method == "sendMessage"
    assert message.payload["text"] == long_copy


def test_audio_goes_first_then_the_copy() -> None:
    audio, message = calls_for(Content("listen", "audio", "https://cdn.test/a.mp3"), 5)
    assert audio.method == "sendAudio"
    assert audio.payload == {
        "chat_id": 5, "audio": "https://cdn.test/a.mp3"}
    assert message.method == "sendMessage"


def test_text_length_counts_visible_characters() -> None:
    assert text_length("<b>a&amp;b</b> <a href=\"https://x\">link</a>") == len("a&b link")
    assert content_problem(Content("<i>" + "y" * 4096 + "</i>")) is None
    problem = content_problem(Content("y" * 4097))
    assert problem is not None
    assert "4097" in problem
    assert content_problem(Content("<b></b>")) is not None


def _tally(**kw: object) -> Tally:
    base: dict[str, object] = {"status": "running", "total": 10, "sent": 10, "skipped": 0,
                               "error": 0, "unsent": 0, "top_error": None, "top_error_count": 0}
    return Tally(**(base | kw))  # type: ignore[arg-type]


def test_decide_finish() -> None:
    assert decide_finish(_tally(), None) == ("sent", None)
    assert decide_finish(_tally(total=0, sent=0), None)[0] == "skipped"
    status, last_error = decide_finish(
        _tally(sent=7, error=3, top_error="Bad Request: user not found", top_error_count=2), None)
    assert status == "error"
    assert last_error == "3 of 10 recipients failed; most frequent: Bad Request: user not found (2)"
    status, last_error = decide_finish(_tally(sent=2, unsent=8), "bot token for 'x' rejected")
    assert status == "error"
    assert last_error is not None
    assert last_error.startswith("bot token for 'x' rejected")
    assert "8 not sent" in last_error
    assert decide_finish(_tally(status="cancelled", unsent=4), None)[0] == "cancelled"


def test_masker_hides_tokens_in_every_field() -> None:
    token = "123456:TEST-abcdefghijklmnopqrstuvwxyz"
    masker = SecretMasker([token])
    event = masker(None, "info", {
        "event": f"failed POST https://api.test/bot{token}/sendMessage",
        "error": ValueError(f"boom {token}"),
        "other": "654321:TEST-zyxwvutsrqponmlkjihgfedcba in text",
        "worker_id": "vm:8708:20f630a1",
        "count": 3,
    })
    assert token not in str(event)
    assert "654321:TEST" not in str(event)
    assert event["worker_id"] == "vm:8708:20f630a1"
    assert event["count"] == 3


@pytest.mark.asyncio
async def test_pacer_has_no_start_up_burst_and_honours_pauses() -> None:
    pacer = BotPacer(rate_per_second=20)
    stamps: list[float] = []

    async def one() -> None:
        await pacer.acquire()
        stamps.append(time.monotonic())

    await asyncio.gather(*(one() for _ in range(25)))
    for i, start in enumerate(stamps):
        assert sum(1 for t in stamps[i:] if t < start + 1.0) <= 20
    # evenly spaced from the very first request: no burst at start
    assert stamps[4] - stamps[0] >= 4 * 0.97 / 20 - 0.004
    pacer.pause(0.3)
    paused_at = time.monotonic()
    await one()
    assert stamps[-1] - paused_at >= 0.3


@pytest.mark.asyncio
async def test_pacer_caps_any_window_at_floor_rate_for_fractional_rates() -> None:
    pacer = BotPacer(rate_per_second=2.5)
    stamps: list[float] = []
    for _ in range(5):
        await pacer.acquire()
        stamps.append(time.monotonic())
    for i, start in enumerate(stamps):
        in_window = [t for t in stamps[i:] if t < start + 1.0]
        assert len(in_window) <= 2, stamps


@pytest.mark.parametrize(
    ("status", "kind"),
    [(404, Kind.TOKEN_REJECTED), (401, Kind.TOKEN_REJECTED), (502, Kind.TRANSIENT),
     (429, Kind.RETRY_AFTER)],
)
def test_answers_that_are_not_the_bot_api_are_judged_by_status(status: int, kind: Kind) -> None:
    result = classify(status, None)
    assert result.kind is kind
    assert f"HTTP {status} without a Bot API answer" in result.description


@pytest.mark.parametrize(
    ("copy", "problem"),
    [
        ("Hi<br>there", 'copy is not valid Telegram HTML: Unsupported start tag "br" at byte '
                        "offset 2"),
        ("<b>bold", 'copy is not valid Telegram HTML: Can\'t find end tag corresponding to '
                    'start tag "b"'),
        ("<b>a</i>", "copy is not valid Telegram HTML: Unmatched end tag at byte offset 4, "
                     'expected "</b>", found "</i>"'),
        ("   ", "copy has no visible text once its HTML tags are removed"),
    ],
)
def test_copies_telegram_would_refuse_are_caught_before_sending(copy: str, problem: str) -> None:
    assert content_problem(Content(copy)) == problem


def test_valid_telegram_html_passes() -> None:
    copy = ('<b>Hi</b> <a href="https://x.test/?a=1&amp;b=2">link</a> <tg-spoiler>s</tg-spoiler> '
            '<span class="tg-spoiler">t</span> <blockquote expandable>q</blockquote> 5 &lt; 6')
    assert content_problem(Content(copy)) is None


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """logs.configure() changes process-wide state; put it back for the tests after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_library_log_records_are_json_lines_with_secrets_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:

    token = "123456:TEST-abcdefghijklmnopqrstuvwxyz"
    logs.configure("info", "json", [token])
    try:
        raise ConnectionResetError(f"POST https://api.test/bot{token}/sendMessage")
    except ConnectionResetError:
        logging.getLogger("aiohttp.client").exception("request to %s failed",
                                                      f"https://api.test/bot{token}/x")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1  # the traceback stays inside the one JSON object
    record = json.loads(lines[0])
    assert record["logger"] == "aiohttp.client"
    assert record["level"] == "error"
    assert record["event"] == "request to https://api.test/bot***/x failed"
    assert "ConnectionResetError" in record["exception"]
    assert token not in lines[0]
    assert "TEST-abcdef" not in lines[0]


@pytest.mark.usefixtures("restore_logging")
def test_a_library_record_that_cannot_be_formatted_never_leaks_its_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = "123456:TEST-abcdefghijklmnopqrstuvwxyz"
    logs.configure("info", "json", [token])
    logging.getLogger("somelib").error("two args expected %s %s", token)  # a library's bug
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err
    assert json.loads(captured.out.splitlines()[-1])["event"] == "log_record_unformattable"
