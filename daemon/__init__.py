"""shotsd: delivers scheduled Telegram bot broadcasts ("shots") from a PostgreSQL queue."""

from __future__ import annotations

__version__ = "0.1.0"
