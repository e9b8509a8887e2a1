"""structlog setup: one JSON object per line on stdout (journald), secrets masked.

Masking is belt and braces: the configured secrets are replaced verbatim, and anything shaped
like a bot token (`<5+ digits>:<20+ url-safe chars>` or `/bot<token>/` in a URL) is masked too,
in the event and every field, including rendered exceptions.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_TOKEN_SHAPES = re.compile(r"(?<![0-9])[0-9]{5,20}:[A-Za-z0-9_-]{20,}|/bot[^/\s]+/")


class SecretMasker:
    """A structlog processor that removes bot tokens and other secrets from every field."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return _TOKEN_SHAPES.sub(_mask_match, text)

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.mask(value)
            elif not isinstance(value, int | float | bool | type(None)):
                event[key] = self.mask(str(value))
        return event


def _mask_match(match: re.Match[str]) -> str:
    return "/bot***/" if match.group(0).startswith("/bot") else "***"


def configure(level: str, fmt: str | None, secrets: list[str]) -> None:
    """Configures structlog (and stdlib logging, for libraries) for the whole process."""
    json_output = fmt == "json" or (fmt is None and not sys.stdout.isatty())
    masker = SecretMasker(secrets)
    renderer: Any = (structlog.processors.JSONRenderer() if json_output
                     else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            masker,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Libraries (asyncio, aiohttp, asyncpg) log through stdlib logging: their records go
    # through the same masker and renderer, so stdout stays one JSON object per line.
    handler = _QuietHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            masker,
            renderer,
        ],
    ))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python warnings take the same masked, JSON path


class _QuietHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A record that cannot be formatted is dropped with a masked note: the stdlib default
    prints its raw message and arguments to stderr, tokens included."""

    def handleError(self, record: logging.LogRecord) -> None:
        note = {"event": "log_record_unformattable", "logger": record.name}
        self.stream.write(json.dumps(note) + "\n")


def get(name: str = "shotsd") -> Any:
    return structlog.get_logger(name)
