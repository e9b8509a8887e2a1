"""`shotsd status`: shots by status and the running shots' progress."""

from __future__ import annotations

import json
from typing import Any

from daemon.config import Config
from daemon.db import Db, create_pool


async def show(config: Config, *, as_json: bool) -> int:
    pool = await create_pool(config.database.dsn, 2)
    try:
        db = Db(pool)
        by_status = await db.shots_by_status()
        running = [_progress(row) for row in await db.running_shots()]
    finally:
        await pool.close()
    if as_json:
        print(json.dumps({"shots_by_status": by_status, "running": running}, default=str))
    else:
        print(render(by_status, running))
    return 0


def _progress(row: dict[str, Any]) -> dict[str, Any]:
    """Counts are the shot's (all attempts); rate and ETA are the current attempt's."""
    done = row["sent_count"] + row["skipped_count"] + row["error_count"]
    window = min(60.0, row["attempt_seconds"])
    rate = row["recent_sent"] / window if window > 0 else 0.0
    left = max(0, row["audience_total"] - done)
    return {
        "id": row["id"], "bot_slug": row["bot_slug"], "total": row["audience_total"],
        "sent": row["sent_count"], "skipped": row["skipped_count"], "error": row["error_count"],
        "rate_per_second": round(rate, 2),
        "eta_seconds": round(left / rate) if rate > 0 else None,
    }


def render(by_status: dict[str, int], running: list[dict[str, Any]]) -> str:
    lines = ["status     shots"]
    lines += [f"{name:<10} {count:>5}" for name, count in sorted(by_status.items())]
    if running:
        lines += ["", f"{'id':>6}  {'bot':<16} {'progress':<26} {'rate/s':>7} {'eta':>8}"]
        for r in running:
            progress = f"{r['sent']}/{r['skipped']}/{r['error']} of {r['total']}"
            eta = "-" if r["eta_seconds"] is None else f"{r['eta_seconds']}s"
            lines.append(f"{r['id']:>6}  {r['bot_slug']:<16} {progress:<26} "
                         f"{r['rate_per_second']:>7} {eta:>8}")
    return "\n".join(lines)
