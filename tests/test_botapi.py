"""Tests of the Bot API emulator itself: if it lies about Telegram, every other test does."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.botapi import (
    Blocked,
    BotApiEmulator,
    Deactivated,
    Disconnect,
    Ok,
    RecordedRequest,
    RetryAfter,
    parse_html,
)

TOKEN = "123456:TEST-token"


@pytest_asyncio.fixture
async def api() -> AsyncIterator[BotApiEmulator]:
    async with BotApiEmulator([TOKEN]) as emulator:
        yield emulator


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http: aiohttp.ClientSession, api: BotApiEmulator, method: str,
               token: str = TOKEN, **params: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{api.base_url}/bot{token}/{method}", json=params) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


def error(code: int, description: str) -> dict[str, Any]:
    return {"ok": False, "error_code": code, "description": description}


@pytest.mark.asyncio
async def test_ok_send_returns_a_message_and_is_recorded(
        api: BotApiEmulator, http: aiohttp.ClientSession) -> None:
    status, body = await call(http, api, "sendMessage", chat_id=42, text="<b>hi</b> &amp; bye",
                              parse_mode="HTML")
    assert status == 200
    assert body["ok"] is True
    message = body["result"]
    assert message["message_id"] == 1
    assert message["text"] == "hi & bye"
    assert message["chat"] == {"id": 42, "first_name": "User", "type": "private"}
    assert message["from"]["id"] == 123456
    assert message["from"]["is_bot"] is True
    # Form-encoded, as some clients send it; ids keep counting per chat.
    async with http.post(f"{api.base_url}/bot{TOKEN}/sendMessage",
                         data={"chat_id": "42", "text": "again"}) as resp:
        assert (await resp.json())["result"]["message_id"] == 2
    [first, second] = api.requests
    assert (first.method, first.chat_id, first.status, first.token) == ("sendMessage", 42, 200,
                                                                         TOKEN)
    assert first.payload["text"] == "<b>hi</b> &amp; bye"
    assert first.response == body
    assert first.at <= second.at
    assert api.delivered(42) == [first, second]
    assert api.delivered(7) == []


@pytest.mark.asyncio
async def test_unknown_token_and_unknown_method(
        api: BotApiEmulator, http: aiohttp.ClientSession) -> None:
    assert await call(http, api, "sendMessage", token="999:nope", chat_id=1, text="x") == (
        401, error(401, "Unauthorized"))
    assert await call(http, api, "sendTelepathy", chat_id=1) == (
        404, error(404, "Not Found: method not found"))
    assert [r.status for r in api.requests] == [401, 404]
    assert api.delivered() == []


@pytest.mark.asyncio
async def test_blocked_and_deactivated_users(
        api: BotApiEmulator, http: aiohttp.ClientSession) -> None:
    api.script(10, Blocked())
    api.script(11, Deactivated())
    assert await call(http, api, "sendMessage", chat_id=10, text="x") == (
        403, error(403, "Forbidden: bot was blocked by the user"))
    assert await call(http, api, "sendMessage", chat_id=11, text="x") == (
        403, error(403, "Forbidden: user is deactivated"))
    assert (await call(http, api, "sendMessage", chat_id=12, text="x"))[0] == 200


@pytest.mark.asyncio
async def test_retry_after_then_ok(api: BotApiEmulator, http: aiohttp.ClientSession) -> None:
    api.script(5, RetryAfter(3), Ok())
    assert await call(http, api, "sendMessage", chat_id=5, text="x") == (429, {
        **error(429, "Too Many Requests: retry after 3"), "parameters": {"retry_after": 3}})
    for expected_id in (1, 2):  # the last behaviour repeats forever
        status, body = await call(http, api, "sendMessage", chat_id=5, text="x")
        assert (status, body["result"]["message_id"]) == (200, expected_id)


@pytest.mark.asyncio
async def test_html_that_telegram_cannot_parse(
        api: BotApiEmulator, http: aiohttp.ClientSession) -> None:
    api.script(1, RetryAfter(9))  # validation comes first and must not consume the script
    assert await call(http, api, "sendMessage", chat_id=1, text="Hello, <foo>!",
                      parse_mode="HTML") == (400, error(
        400, "Bad Request: can't parse entities: Unsupported start tag \"foo\" at byte offset 7"))
    assert (await call(http, api, "sendMessage", chat_id=1, text="x"))[0] == 429


@pytest.mark.parametrize(("html", "detail"), [
    ("<b>bold", 'Can\'t find end tag corresponding to start tag "b"'),
    ("a < b", 'Unsupported start tag "" at byte offset 2'),
    ("<b>x</i>", 'Unmatched end tag at byte offset 4, expected "</b>", found "</i>"'),
    ("x</b>", "Unexpected end tag at byte offset 1"),
    ("é<span>x</span>", 'Tag "span" must have class "tg-spoiler" at byte offset 2'),
])
def test_parse_html_errors(html: str, detail: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(detail)}$"):
        parse_html(html)


def test_parse_html_keeps_the_visible_text() -> None:
    html = ('<a href="https://e.com/?a=1&amp;b=2">l</a> <span class="tg-spoiler">s</span> '
            "&lt;&#65;&#x42;&quot; &nbsp; <blockquote expandable>q</blockquote>")
    assert parse_html(html) == 'l s <AB" &nbsp; q'  # unknown entities stay literal


@pytest.mark.asyncio
async def test_length_limits_count_visible_characters(
        api: BotApiEmulator, http: aiohttp.ClientSession) -> None:
    fits = "<b>" + "&amp;" * 4096 + "</b>"
    assert (await call(http, api, "sendMessage", chat_id=3, text=fits, parse_mode="HTML"))[0] == 200
    assert await call(http, api, "sendMessage", chat_id=3, text="x" * 4097) == (
        400, error(400, "Bad Request: message is too long"))
    assert await call(http, api, "sendPhoto", chat_id=3, photo="https://e.com/p.jpg",
                      caption="y" * 1025) == (
        400, error(400, "Bad Request: message caption is too long"))


@pytest.mark.asyncio
async def test_photo_urls(api: BotApiEmulator, http: aiohttp.ClientSession) -> None:
    assert await call(http, api, "sendPhoto", chat_id=4,
                      photo="https://unreachable.example/p.jpg") == (
        400, error(400, "Bad Request: failed to get HTTP URL content"))
    assert await call(http, api, "sendPhoto", chat_id=4, photo="not a url") == (
        400, error(400, "Bad Request: wrong file identifier/HTTP URL specified"))
    status, body = await call(http, api, "sendPhoto", chat_id=4, photo="https://e.com/p.jpg",
                              caption="c")
    assert status == 200
    assert body["result"]["caption"] == "c"
    assert len(body["result"]["photo"]) == 3


def test_max_in_window_arithmetic() -> None:
    api = BotApiEmulator()

    def at(t: float, token: str = "a") -> RecordedRequest:
        return RecordedRequest(t, token, "sendMessage", {}, 1, 200, None)

    api.requests = [at(0.0), at(0.5), at(0.99), at(1.0), at(1.2), at(1.3, "b"), at(5.0)]
    assert api.max_in_window() == 5  # [0.5, 1.5) holds 0.5, 0.99, 1.0, 1.2 and b's 1.3
    assert api.max_in_window("a") == 4
    assert api.max_in_window("a", window=0.5) == 3  # [0.99, 1.49)
    assert api.max_in_window("b") == 1
    assert api.max_in_window("nobody") == 0
    api.requests = [at(0.0), at(1.0)]
    assert api.max_in_window() == 1  # half-open: [0.0, 1.0) does not reach 1.0
    assert api.max_in_window(window=1.5) == 2

@pytest.mark.asyncio
async def test_disconnect_drops_the_connection(
        api: BotApiEmulator, http: aiohttp.ClientSession) -> None:
    api.script(8, Disconnect(), Ok())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(http, api, "sendMessage", chat_id=8, text="x")
    assert (await call(http, api, "sendMessage", chat_id=8, text="x"))[0] == 200
    assert [(r.status, r.response is None) for r in api.requests] == [(0, True), (200, False)]
    await api.wait_for(lambda a: len(a.delivered(8)) == 1, timeout=1)
    with pytest.raises(TimeoutError, match="not met within"):
        await api.wait_for(lambda a: len(a.delivered(8)) == 2, timeout=0.05)
