"""Waiting on several things at once, interruptibly (every wait in the daemon ends on
shutdown), without leaking the helper tasks it makes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any


async def sleep_unless(event: asyncio.Event, seconds: float) -> bool:
    """Sleeps up to `seconds`; True (early) when `event` is set."""
    await wait_any([event], seconds)
    return event.is_set()


async def wait_any(
    waitables: Sequence[asyncio.Event | asyncio.Future[Any]], timeout: float | None
) -> None:
    """Returns when any event is set / future is done, or after `timeout` seconds. Only the
    waiters it made for events are cancelled; futures passed in are the caller's."""
    owned: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(w.wait()) for w in waitables if isinstance(w, asyncio.Event)]
    given: list[asyncio.Future[Any]] = [w for w in waitables if isinstance(w, asyncio.Future)]
    try:
        await asyncio.wait([*owned, *given], timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in owned:
            waiter.cancel()
