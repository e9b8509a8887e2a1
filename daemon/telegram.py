"""Bot API client: request payloads per media type, outcome classification, per-bot pacing.

Knows nothing about PostgreSQL. Every answer, error or exception becomes a `Result` whose
text never contains the bot token (aiohttp's own messages embed the URL, which does).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter

from daemon.config import Secret
from daemon.telegram_html import parse_html

MAX_TEXT = 4096
MAX_CAPTION = 1024

# 400 answers that are about the shot's content, not the recipient: every recipient would
# get the same answer, so the shot stops at once instead of burning its audience.
_SHOT_LEVEL_400 = (
    "can't parse entities",
    "wrong file identifier",
    "failed to get http url content",
    "message is too long",
    "message caption is too long",
    "message text is empty",
    "wrong type of the web page content",
    "wrong remote file identifier",
    "wrong http url",
    "media_empty",
    "photo_invalid_dimensions",
    "text must be non-empty",
    "message must be non-empty",
    "there is no photo in the request",
    "there is no video in the request",
    "there is no audio in the request",
)
_RECIPIENT_SKIPS = (
    "chat not found",
    "bot can't initiate conversation",
    "bot was kicked",
)


class Kind(enum.Enum):
    SENT = "sent"
    SKIPPED = "skipped"  # the recipient cannot receive it; not an error of ours
    FAILED = "failed"  # this recipient failed for good
    RETRY_AFTER = "retry_after"  # 429: the whole bot must pause
    TRANSIENT = "transient"  # 5xx, or the request never left: try again later
    UNKNOWN = "unknown"  # sent, but no answer (timeout, dropped connection): never resend
    SHOT_FATAL = "shot_fatal"  # the shot itself is wrong; stop it
    TOKEN_REJECTED = "token_rejected"  # noqa: S105 - 401/404: the bot token is refused


@dataclass(frozen=True)
class Result:
    kind: Kind
    description: str = ""
    message_id: int | None = None
    chat_state: str | None = None  # new telegram_contacts.chat_state, when the answer says so
    retry_after: float = 0.0
    code: str = ""  # HTTP status, or "timeout" / "network": the metrics label


@dataclass(frozen=True)
class ApiCall:
    method: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Content:
    """What a shot sends: the copy (Telegram HTML) and optional media."""

    copy: str
    media_type: str = "none"
    media_url: str | None = None


def text_length(copy: str) -> int:
    """Characters Telegram counts for an HTML text: tags removed, entities decoded, ends
    trimmed. A copy Telegram cannot parse counts its raw length (content_problem says why)."""
    try:
        return len(parse_html(copy).strip())
    except ValueError:
        return len(copy)


def content_problem(content: Content) -> str | None:
    """Why Telegram would refuse this content for every recipient; checked before anyone is
    sent anything, so a broken shot fails whole instead of recipient by recipient."""
    try:
        text = parse_html(content.copy).strip()
    except ValueError as exc:
        return f"copy is not valid Telegram HTML: {exc}"
    if len(text) > MAX_TEXT:
        return f"copy is {len(text)} characters of text; Telegram allows at most {MAX_TEXT}"
    if not text:
        return "copy has no visible text once its HTML tags are removed"
    return None


def calls_for(content: Content, chat_id: int) -> list[ApiCall]:
    """The requests that deliver `content` to one chat, in order (SPEC §5)."""
    return [ApiCall(call.method, {"chat_id": chat_id} | call.payload) for call in _plan(content)]


@functools.lru_cache(maxsize=64)
def _plan(content: Content) -> tuple[ApiCall, ...]:
    """The requests for any chat, without chat_id: worked out (the copy's HTML parsed) once
    per shot, not once per recipient."""
    html: dict[str, Any] = {"parse_mode": "HTML"}
    message = ApiCall("sendMessage", html | {
        "text": content.copy, "link_preview_options": {"is_disabled": True}})
    if content.media_type == "none" or content.media_url is None:
        return (message,)
    if content.media_type == "audio":
        return ApiCall("sendAudio", {"audio": content.media_url}), message
    field = content.media_type  # "photo" or "video": the method's media field has its name
    method = "sendPhoto" if field == "photo" else "sendVideo"
    if text_length(content.copy) <= MAX_CAPTION:
        return (ApiCall(method, html | {field: content.media_url, "caption": content.copy}),)
    # Too long for a caption: the media alone, then the copy as its own message.
    return ApiCall(method, {field: content.media_url}), message


def classify(status: int, body: Any) -> Result:
    """Maps one Bot API answer (HTTP status + decoded JSON) to what it means for the shot."""
    code = str(status)
    if not isinstance(body, dict):
        # Not the Bot API talking (a proxy, a wrong api_base): judge by the status alone.
        return _classify_error(status, f"HTTP {status} without a Bot API answer", None, code)
    if body.get("ok") is True:
        result = body.get("result")
        message_id = result.get("message_id") if isinstance(result, dict) else None
        return Result(Kind.SENT, message_id=message_id if isinstance(message_id, int) else None,
                      code=code)
    description = str(body.get("description") or f"HTTP {status}")
    error_code = body.get("error_code")
    effective = error_code if isinstance(error_code, int) else status
    return _classify_error(effective, description, body.get("parameters"), code)


def _classify_error(status: int, description: str, parameters: Any, code: str) -> Result:
    lowered = description.lower()
    if status == 429:
        retry = parameters.get("retry_after") if isinstance(parameters, dict) else None
        seconds = float(retry) if isinstance(retry, int | float) and retry > 0 else 1.0
        return Result(Kind.RETRY_AFTER, description, retry_after=seconds, code=code)
    if status in (401, 404):
        return Result(Kind.TOKEN_REJECTED, description, code=code)
    if status >= 500:
        return Result(Kind.TRANSIENT, description, code=code)
    if status == 403 and "bot was blocked by the user" in lowered:
        return Result(Kind.SKIPPED, description, chat_state="blocked", code=code)
    if status == 403 and "user is deactivated" in lowered:
        return Result(Kind.SKIPPED, description, chat_state="deactivated", code=code)
    if any(marker in lowered for marker in _RECIPIENT_SKIPS):
        return Result(Kind.SKIPPED, description, code=code)
    if status == 400 and any(marker in lowered for marker in _SHOT_LEVEL_400):
        return Result(Kind.SHOT_FATAL, description, code=code)
    return Result(Kind.FAILED, description, code=code)


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# The bucket spaces requests slightly tighter than 1/rate: the event loop's timers fire a
# little late (millisecond clock), which alone would cost ~2% of the rate, and the window
# log below, not the bucket, is what guarantees the limit.
SPACING = 0.97


class BotPacer:
    """Paces one bot's requests: never more than `rate` in any 1-second window.

    Two rules, both needed. A leaky bucket of capacity one (aiolimiter, max_rate=1 per
    SPACING/rate seconds) spaces requests evenly from the very first, so there is no start-up
    burst. A log of the last floor(rate) send times then holds a request until the oldest of
    them is more than a second (plus a small margin for the trip to Telegram) old: that is
    the guarantee; the bucket alone would let ceil(rate) through in a second at a
    fractional rate, and the event loop's millisecond clock shortens or stretches its gaps.
    `pause` holds every request of the bot until a 429's retry_after has passed.
    """

    WINDOW = 1.0
    MARGIN = 0.03  # seconds: jitter between our clock and the request reaching Telegram

    def __init__(self, rate_per_second: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.rate = rate_per_second
        self._clock = clock
        self._limiter = AsyncLimiter(1, SPACING / rate_per_second)
        self._sent: deque[float] = deque(maxlen=max(1, math.floor(rate_per_second)))
        self._window_lock = asyncio.Lock()
        self._resume_at = 0.0

    def pause(self, seconds: float) -> None:
        self._resume_at = max(self._resume_at, self._clock() + seconds)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._resume_at - self._clock())

    async def acquire(self) -> None:
        while True:
            while (delay := self.paused_for) > 0:
                await asyncio.sleep(delay)
            await self._limiter.acquire()
            async with self._window_lock:
                while (wait := self._window_wait()) > 0:
                    await asyncio.sleep(wait)
                if self.paused_for == 0:
                    self._sent.append(self._clock())
                    return
            # A 429 arrived while we queued: this slot falls inside the pause; wait it out.

    def _window_wait(self) -> float:
        if len(self._sent) < (self._sent.maxlen or 1):
            return 0.0
        return self._sent[0] + self.WINDOW + self.MARGIN - self._clock()


class BotApi:
    """Sends Bot API requests; always returns a Result, never raises for Telegram's sake."""

    def __init__(self, session: aiohttp.ClientSession, api_base: str, timeout: float) -> None:
        self._session = session
        self._api_base = api_base.rstrip("/")
        # A separate connect timeout tells "never reached Telegram" (safe to retry) from
        # "sent, no answer" (maybe delivered: must not be resent).
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 10.0))

    async def call(self, token: Secret, call: ApiCall) -> Result:
        url = f"{self._api_base}/bot{token.reveal()}/{call.method}"
        try:
            async with self._session.post(url, json=call.payload, timeout=self._timeout) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                return classify(resp.status, body)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # The request never left: retrying cannot deliver it twice.
            detail = redact(_client_error_detail(exc), [token.reveal()])
            return Result(Kind.TRANSIENT, f"cannot connect to Telegram: {detail}",
                          code="network")
        except TimeoutError:
            return Result(Kind.UNKNOWN, f"no answer within {self._timeout.total:g} s",
                          code="timeout")
        except aiohttp.ClientError as exc:
            # str(exc) may carry the URL, and with it the token: describe by type only.
            detail = redact(_client_error_detail(exc), [token.reveal()])
            return Result(Kind.UNKNOWN, f"connection lost before an answer: {detail}",
                          code="network")


def _client_error_detail(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{type(exc).__name__} ({exc.os_error.strerror or 'connect failed'})"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__} (HTTP {exc.status})"
    return type(exc).__name__
