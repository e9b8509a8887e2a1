"""An emulator of the Telegram Bot API, for the test-suite and the demo.

It serves ``/bot{token}/{method}`` over HTTP and answers the way api.telegram.org
does: the same JSON shapes, status codes and description strings (taken from
tdlib/telegram-bot-api and tdlib/td, or from answers quoted in public bug
reports). What each chat "is" (a blocked user, a deactivated one, a flood-limited
one, a flaky network...) is scripted per chat with small behaviour values::

    async with BotApiEmulator(["123:abc"]) as api:
        api.script(5, RetryAfter(1), Ok())   # first send to chat 5 gets 429, then all succeed
        ...                                  # point the daemon at api.base_url
        await api.wait_for(lambda a: len(a.delivered(5)) == 1)

Run ``python -m tests.botapi --help`` for the stand-alone server used by the demo.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import signal
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from aiohttp import web

from daemon.telegram_html import parse_html


@dataclass(frozen=True)
class RecordedRequest:
    at: float  # time.monotonic() when the request arrived
    token: str
    method: str  # as spelled in the URL, e.g. "sendMessage"
    payload: dict[str, Any]
    chat_id: int | None
    status: int  # HTTP status answered (0 if the connection was dropped)
    response: dict[str, Any] | None


# Behaviours: what a request to a chat runs into once it has passed validation.
@dataclass(frozen=True)
class Ok:
    pass


@dataclass(frozen=True)
class Blocked:
    pass


@dataclass(frozen=True)
class Deactivated:
    pass


@dataclass(frozen=True)
class ChatNotFound:
    pass


@dataclass(frozen=True)
class CantInitiate:
    pass


@dataclass(frozen=True)
class Kicked:
    pass


@dataclass(frozen=True)
class RetryAfter:
    seconds: int


@dataclass(frozen=True)
class ServerError:
    status: int = 500
    description: str = "Internal Server Error"


@dataclass(frozen=True)
class BadGateway:
    pass


@dataclass(frozen=True)
class Slow:
    seconds: float
    then: Behaviour = Ok()


@dataclass(frozen=True)
class Disconnect:
    """Close the connection without any HTTP answer, like a network failure."""


Behaviour: TypeAlias = (
    Ok | Blocked | Deactivated | ChatNotFound | CantInitiate | Kicked | RetryAfter
    | ServerError | BadGateway | Slow | Disconnect
)

_FAILURES: dict[type, tuple[int, str]] = {
    Blocked: (403, "Forbidden: bot was blocked by the user"),
    Deactivated: (403, "Forbidden: user is deactivated"),
    ChatNotFound: (400, "Bad Request: chat not found"),
    CantInitiate: (403, "Forbidden: bot can't initiate conversation with a user"),
    Kicked: (403, "Forbidden: bot was kicked from the group chat"),
    BadGateway: (502, "Bad Gateway"),
}
_SEND_METHODS = {"sendmessage": "text", "sendphoto": "photo", "sendvideo": "video",
                 "sendaudio": "audio"}  # method names are case-insensitive in the Bot API
TEXT_LIMIT, CAPTION_LIMIT = 4096, 1024  # in characters of the text left after entity parsing


class Refusal(Exception):
    """An error answer, with Telegram's status and description."""

    def __init__(self, status: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.status, self.description, self.retry_after = status, description, retry_after

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": False, "error_code": self.status,
                                "description": self.description}
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return body


def _formatted(text: str, parse_mode: str) -> str:
    mode = parse_mode.lower()
    if not text or mode in ("", "none", "markdown", "markdownv2"):  # Markdown is not checked
        return text
    if mode != "html":
        raise Refusal(400, "Bad Request: unsupported parse_mode")
    try:
        return parse_html(text)
    except ValueError as exc:
        raise Refusal(400, f"Bad Request: can't parse entities: {exc}") from None


def _validate(kind: str, p: dict[str, Any]) -> tuple[str, Any]:
    """Check a send request in the order the Bot API does; return (text or caption, media)."""
    media = None
    if kind == "text":
        if not (raw := _arg(p, "text")):
            raise Refusal(400, "Bad Request: message text is empty")
        text = _formatted(raw, _arg(p, "parse_mode"))
    else:
        if not (media := p.get(kind)):
            raise Refusal(400, f"Bad Request: there is no {kind} in the request")
        text = _formatted(_arg(p, "caption"), _arg(p, "parse_mode"))
    if not _arg(p, "chat_id"):
        raise Refusal(400, "Bad Request: chat_id is empty")
    text = text.strip()  # TDLib trims before it counts, so surrounding blanks are free
    if kind == "text" and not text:
        raise Refusal(400, "Bad Request: message must be non-empty")
    if kind == "text" and len(text) > TEXT_LIMIT:
        raise Refusal(400, "Bad Request: message is too long")
    if kind != "text" and len(text) > CAPTION_LIMIT:
        raise Refusal(400, "Bad Request: message caption is too long")
    if not isinstance(media, dict | None):  # a dict is an uploaded file, always acceptable
        url = urlsplit(_arg(p, kind))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise Refusal(400, "Bad Request: wrong file identifier/HTTP URL specified")
        if "unreachable" in url.hostname:
            raise Refusal(400, "Bad Request: failed to get HTTP URL content")
    return text, media


def _arg(payload: dict[str, Any], name: str) -> str:
    """A parameter as the Bot API sees it: JSON numbers and booleans arrive as strings."""
    value = payload.get(name)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def _chat_id(payload: dict[str, Any]) -> int | None:
    try:
        return int(_arg(payload, "chat_id"))
    except ValueError:
        return None  # missing, or an @username, which this emulator knows no chat for


async def _payload(request: web.Request) -> dict[str, Any]:
    """Query string plus body, JSON or form/multipart, as Telegram accepts all of them."""
    payload: dict[str, Any] = dict(request.query)
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            body = None
        payload.update(body if isinstance(body, dict) else {})
    elif request.can_read_body:
        for key, value in (await request.post()).items():
            if isinstance(value, web.FileField):  # keep a summary, not the open file
                payload[key] = {"file_name": value.filename, "content_type": value.content_type,
                                "size": len(value.file.read())}
            else:
                payload[key] = value
    return payload


class BotApiEmulator:
    """The Bot API on 127.0.0.1, with per-chat scripted behaviours and a request log.

    ``default`` is what chats without a script get. ``default_for``, when set, is asked
    first for unscripted chats: ``default_for(chat_id)`` returns the chat's behaviour, or
    None for ``default`` (the CLI uses it for its "every Nth chat is blocked" rules).
    """

    def __init__(self, tokens: Iterable[str] = (), *, host: str = "127.0.0.1", port: int = 0,
                 latency: float = 0.0) -> None:
        self.host, self.port, self.latency = host, port, latency
        self.requests: list[RecordedRequest] = []
        self.default: Behaviour = Ok()
        self.default_for: Callable[[int], Behaviour | None] | None = None
        # When set, every request of every method answers this way (Telegram or the network
        # down); set back to None to recover.
        self.outage: Behaviour | None = None
        # Per method (lower case, e.g. "sendmessage"): how every valid request of it answers,
        # whatever the chat (a refusal that is about the message, not the recipient).
        self.method_behaviour: dict[str, Behaviour] = {}
        # Requests being answered right now, and the most there ever were at once.
        self._open = 0
        self.max_open = 0
        self._tokens = set(tokens)
        self._scripts: dict[int, list[Behaviour]] = {}
        self._message_ids: dict[tuple[str, int], int] = {}
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        # A short shutdown timeout: a Slow answer in flight must not hold stop() for 60 s.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self._bound_port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> BotApiEmulator:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        if self._bound_port is None:
            raise RuntimeError("the emulator is not started")
        return f"http://{self.host}:{self._bound_port}"

    def add_token(self, token: str) -> None:
        self._tokens.add(token)

    def script(self, chat_id: int, *behaviours: Behaviour) -> None:
        """One behaviour per request that reaches the chat; the last one repeats forever.

        Requests refused by validation (empty text, bad HTML...) never reach the chat,
        so they do not consume a scripted behaviour.
        """
        if not behaviours:
            raise ValueError("script() needs at least one behaviour")
        self._scripts[chat_id] = list(behaviours)

    def delivered(self, chat_id: int | None = None) -> list[RecordedRequest]:
        """Send requests answered ok:true (getMe is not a delivery), optionally for one chat."""
        return [r for r in self.requests
                if r.response is not None and r.response["ok"]
                and "message_id" in r.response["result"]
                and (chat_id is None or r.chat_id == chat_id)]

    def max_in_window(self, token: str | None = None, window: float = 1.0) -> int:
        """Most requests (of one token, or all) arriving within any half-open [t, t+window)."""
        times = sorted(r.at for r in self.requests if token is None or r.token == token)
        best = first = 0
        for last, t in enumerate(times):
            while t - times[first] >= window:
                first += 1
            best = max(best, last - first + 1)
        return best

    async def wait_for(self, predicate: Callable[[BotApiEmulator], bool],
                       timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                name = getattr(predicate, "__name__", repr(predicate))
                raise TimeoutError(f"condition {name} not met within {timeout} s "
                                   f"({len(self.requests)} requests received, "
                                   f"{len(self.delivered())} delivered)")
            await asyncio.sleep(0.01)

    def _behaviour(self, chat_id: int) -> Behaviour:
        if queue := self._scripts.get(chat_id):
            return queue.pop(0) if len(queue) > 1 else queue[0]
        if self.default_for is not None and (rule := self.default_for(chat_id)) is not None:
            return rule
        return self.default

    def _bot_user(self, token: str) -> dict[str, Any]:
        prefix = token.partition(":")[0]
        bot_id = int(prefix) if prefix.isdigit() else zlib.crc32(token.encode())
        return {"id": bot_id, "is_bot": True, "first_name": "Emulated Bot",
                "username": "emulated_bot"}

    def _message(self, token: str, chat_id: int, kind: str, text: str) -> dict[str, Any]:
        # Message ids count per bot and chat, as in Telegram's private chats.
        key = (token, chat_id)
        self._message_ids[key] = message_id = self._message_ids.get(key, 0) + 1
        message: dict[str, Any] = {
            "message_id": message_id, "from": self._bot_user(token),
            "chat": {"id": chat_id, "first_name": "User", "type": "private"},
            "date": int(time.time())}
        if kind == "text":
            return message | {"text": text}
        file = {"file_id": f"{kind}-{chat_id}-{message_id}",
                "file_unique_id": f"u{chat_id}m{message_id}", "file_size": 65536}
        if kind == "photo":
            message["photo"] = [file | {"file_id": f"{file['file_id']}-{side}", "width": side,
                                        "height": side} for side in (90, 320, 800)]
        elif kind == "video":
            message["video"] = file | {"width": 1280, "height": 720, "duration": 10,
                                       "mime_type": "video/mp4"}
        else:
            message["audio"] = file | {"duration": 180, "mime_type": "audio/mpeg"}
        return message | ({"caption": text} if text else {})

    def _answer(self, token: str, method: str, payload: dict[str, Any],
                chat_id: int | None) -> tuple[int, dict[str, Any] | None, float]:
        """Decide (status, body, extra delay) for one request; status 0 means drop it."""
        if self.outage is not None:
            return self._misbehave(self.outage)
        if token not in self._tokens:
            return 401, Refusal(401, "Unauthorized").body(), 0.0
        if method.lower() == "getme":
            user = self._bot_user(token) | {"can_join_groups": True,
                                            "can_read_all_group_messages": False,
                                            "supports_inline_queries": False}
            return 200, {"ok": True, "result": user}, 0.0
        if (kind := _SEND_METHODS.get(method.lower())) is None:
            return 404, Refusal(404, "Not Found: method not found").body(), 0.0
        try:
            text, _ = _validate(kind, payload)
        except Refusal as invalid:
            return invalid.status, invalid.body(), 0.0
        if (forced := self.method_behaviour.get(method.lower())) is not None:
            return self._misbehave(forced)
        behaviour, delay = ChatNotFound() if chat_id is None else self._behaviour(chat_id), 0.0
        while isinstance(behaviour, Slow):
            delay += behaviour.seconds
            behaviour = behaviour.then
        if isinstance(behaviour, Ok) and chat_id is not None:
            return 200, {"ok": True, "result": self._message(token, chat_id, kind, text)}, delay
        status, body, extra = self._misbehave(behaviour)
        return status, body, delay + extra

    @staticmethod
    def _misbehave(behaviour: Behaviour) -> tuple[int, dict[str, Any] | None, float]:
        """The answer for any behaviour but a successful send."""
        delay = 0.0
        while isinstance(behaviour, Slow):
            delay += behaviour.seconds
            behaviour = behaviour.then
        if isinstance(behaviour, Disconnect):
            return 0, None, delay
        if isinstance(behaviour, Ok):
            behaviour = ChatNotFound()  # an Ok outage makes no sense; a send needs a chat
        if isinstance(behaviour, RetryAfter):
            refusal = Refusal(429, f"Too Many Requests: retry after {behaviour.seconds}",
                              behaviour.seconds)
        elif isinstance(behaviour, ServerError):
            refusal = Refusal(behaviour.status, behaviour.description)
        else:
            refusal = Refusal(*_FAILURES[type(behaviour)])
        return refusal.status, refusal.body(), delay

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        at = time.monotonic()  # first, so that the rate arithmetic sees true arrival times
        self._open += 1
        self.max_open = max(self.max_open, self._open)
        try:
            return await self._serve_one(request, at)
        finally:
            self._open -= 1

    async def _serve_one(self, request: web.Request, at: float) -> web.StreamResponse:
        token, method = request.match_info["token"], request.match_info["method"]
        payload = await _payload(request)
        chat_id = _chat_id(payload)
        status, body, delay = self._answer(token, method, payload, chat_id)
        # Reading bodies can interleave, so insert by arrival time to keep the log in order.
        bisect.insort(self.requests, RecordedRequest(at, token, method, payload, chat_id,
                                                     status, body), key=lambda r: r.at)
        if (delay := delay + self.latency) > 0:
            await asyncio.sleep(delay)
        if status == 0 or body is None:
            if request.transport is not None:
                request.transport.close()  # the client sees the connection drop, no answer
            return web.Response()
        return web.Response(status=status, content_type="application/json",
                            text=json.dumps(body, ensure_ascii=False, separators=(",", ":")))


async def _serve(args: argparse.Namespace) -> None:
    def rule(chat_id: int) -> Behaviour | None:
        # Checked in this order, so a chat matching several rules is blocked first.
        if args.blocked_every and chat_id % args.blocked_every == 0:
            return Blocked()
        if args.deactivated_every and chat_id % args.deactivated_every == 0:
            return Deactivated()
        if args.chat_not_found_every and chat_id % args.chat_not_found_every == 0:
            return ChatNotFound()
        return None

    api = BotApiEmulator(args.token, host=args.host, port=args.port, latency=args.latency)
    api.default_for = rule
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await api.start()
    print(f"botapi emulator listening on {api.base_url}", flush=True)
    try:
        await stopped.wait()
    finally:
        await api.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.botapi",
                                     description="Serve an emulated Telegram Bot API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--token", action="append", required=True,
                        help="bot token to accept (repeatable); others get 401")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to answers")
    parser.add_argument("--blocked-every", type=int, default=0, metavar="N",
                        help="chats with chat_id %% N == 0 have blocked the bot (0: none)")
    parser.add_argument("--deactivated-every", type=int, default=0, metavar="M",
                        help="chats with chat_id %% M == 0 are deactivated users (0: none)")
    parser.add_argument("--chat-not-found-every", type=int, default=0, metavar="K",
                        help="chats with chat_id %% K == 0 do not exist (0: none)")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
