"""The SQL files shipped with the package: named queries and numbered migrations.

SQL lives in `sql/` (installed as the `daemon.sql` package) rather than in Python strings, so
a reader finds every statement in one place and a deployment can adapt the audience queries.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_NAME_LINE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def parse_named_queries(text: str) -> dict[str, str]:
    """Splits a file of `-- name: x` blocks into {name: statement}; a name may appear once."""
    queries: dict[str, str] = {}
    matches = list(_NAME_LINE.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() : end].strip()
        name = match.group(1)
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        if not body:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = body
    return queries


@cache
def _named(filename: str) -> dict[str, str]:
    text = resources.files("daemon.sql").joinpath(filename).read_text(encoding="utf-8")
    return parse_named_queries(text)


def query(name: str) -> str:
    """The runtime statement called `name` in sql/queries.sql."""
    return _named("queries.sql")[name]


def audience_query(target: str) -> str:
    """The INSERT … SELECT that materialises a shot's audience for `target` (sql/audience.sql)."""
    return _named("audience.sql")[f"audience_{target}"]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration file, in version order; versions must be 1, 2, 3… without gaps."""
    found: list[Migration] = []
    for entry in resources.files("daemon.sql.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            text = entry.read_text(encoding="utf-8")
            found.append(Migration(int(match.group(1)), match.group(2), text))
    found.sort(key=lambda m: m.version)
    expected = list(range(1, len(found) + 1))
    if [m.version for m in found] != expected:
        raise RuntimeError(f"migration files are not numbered 1..{len(found)} without gaps")
    return tuple(found)
