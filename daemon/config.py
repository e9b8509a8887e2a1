"""TOML configuration -> frozen, validated, typed objects (SPEC §6).

Everything is checked here, once, before anything connects: unknown keys, wrong types,
out-of-range values and unresolvable bot tokens are reported together, each naming its key
path, so an operator fixes the file in one pass.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

DEFAULT_PATH = Path("/etc/shotsd/config.toml")
DSN_ENV = "SHOTS_DATABASE_URL"
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_TOKEN = re.compile(r"^[0-9]{1,20}:[A-Za-z0-9_-]{1,200}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PORT = re.compile(r"[0-9]{1,5}")
T = TypeVar("T")


class ConfigError(Exception):
    """The configuration cannot be used; each line of the message names a key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Secret:
    """A string that never shows itself in repr(), str() or f-strings; `.reveal()` to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class DatabaseConfig:
    dsn: str = field(default="postgresql://shotsd@localhost/app", repr=False)  # may hold a password
    pool_size: int = 10


@dataclass(frozen=True)
class TelegramConfig:
    api_base: str = "https://api.telegram.org"
    rate_per_second: float = 25.0
    request_timeout: float = 15.0
    max_retries: int = 3


@dataclass(frozen=True)
class WorkerConfig:
    poll_interval: float = 10.0
    batch_size: int = 50
    concurrency: int = 50
    max_running_shots: int = 8
    heartbeat_interval: float = 5.0
    stale_after: float = 60.0
    max_attempts: int = 3


@dataclass(frozen=True)
class BotConfig:
    slug: str
    token: Secret = field(repr=False)
    token_source: str  # "token_env = X", "token_file = /p" or "token" — for messages only
    rate_per_second: float | None  # None: telegram.rate_per_second


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str | None = None  # None: "console" on a TTY, else "json"


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = DatabaseConfig()
    telegram: TelegramConfig = TelegramConfig()
    worker: WorkerConfig = WorkerConfig()
    bots: Mapping[str, BotConfig] = field(default_factory=dict)
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    warnings: tuple[str, ...] = ()

    def secrets(self) -> list[str]:
        """Every secret value in this config, for log and error masking."""
        values = [bot.token.reveal() for bot in self.bots.values()]
        parts = urlsplit(self.database.dsn)
        values += [parts.password or "", *parse_qs(parts.query).get("password", [])]
        return [value for value in values if value]


class _Table:
    """One TOML table being read; records problems instead of stopping at the first."""

    def __init__(self, data: Mapping[str, Any], path: str, problems: list[str]) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, name: str, message: str) -> None:
        self.problems.append(f"{self.key(name)}: {message}")

    def get(self, name: str, kind: type[T], default: T) -> T:
        self.seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problem(name, f"expected {_type_name(kind)}, got {_type_name(type(value))}")
            return default
        return value

    def number(self, name: str, kind: type[T], default: T, *, low: float, high: float) -> T:
        value = self.get(name, kind, default)
        number = float(value)  # type: ignore[arg-type]
        if not (math.isfinite(number) and low <= number <= high):
            self.problem(name, f"must be between {_fmt(low)} and {_fmt(high)}, got {value}")
            return default
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            self.problem(name, f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def table(self, name: str) -> _Table:
        value = self.get(name, dict, {})
        return _Table(value, self.key(name), self.problems)

    def finish(self) -> None:
        for name in sorted(set(self.data) - self.seen):
            self.problem(name, "unknown key")


def _type_name(kind: type) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
             dict: "a table", list: "an array"}
    return names.get(kind, kind.__name__)


def _fmt(number: float) -> str:
    return f"{number:g}"


def load(path: Path, environ: Mapping[str, str] | None = None, *,
         resolve_tokens: bool = True) -> Config:
    """Reads and validates the config file; raises ConfigError naming every bad key.
    `resolve_tokens=False` (migrate, status) leaves bot tokens unread: those commands never
    talk to Telegram and must work where the credentials are not (yet) in place."""
    env = os.environ if environ is None else environ
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid UTF-8"]) from None
    return parse(data, env, base_dir=path.parent, resolve_tokens=resolve_tokens)


def parse(data: Mapping[str, Any], env: Mapping[str, str], base_dir: Path, *,
          resolve_tokens: bool = True) -> Config:
    problems: list[str] = []
    warnings: list[str] = []
    root = _Table(data, "", problems)
    config = Config(
        database=_database(root.table("database"), env),
        telegram=_telegram(root.table("telegram")),
        worker=_worker(root.table("worker")),
        bots=_bots(root.table("bots"), env, base_dir, warnings, resolve_tokens),
        metrics=_metrics(root.table("metrics")),
        logging=_logging(root.table("logging")),
        warnings=tuple(warnings),
    )
    root.finish()
    if problems:
        raise ConfigError(problems)
    return config


def _database(t: _Table, env: Mapping[str, str]) -> DatabaseConfig:
    dsn = t.get("dsn", str, DatabaseConfig.dsn)
    if env.get(DSN_ENV):
        dsn = env[DSN_ENV]
    if not dsn.startswith(("postgresql://", "postgres://")):
        where = f"(from {DSN_ENV})" if env.get(DSN_ENV) else ""
        t.problem("dsn", f"must be a postgresql:// URL {where}".rstrip())
    config = DatabaseConfig(dsn=dsn, pool_size=t.number("pool_size", int, 10, low=2, high=1000))
    t.finish()
    return config


def _telegram(t: _Table) -> TelegramConfig:
    api_base = t.get("api_base", str, TelegramConfig.api_base).rstrip("/")
    if urlsplit(api_base).scheme not in ("http", "https") or not urlsplit(api_base).netloc:
        t.problem("api_base", f"must be an http(s) URL, got {api_base!r}")
    config = TelegramConfig(
        api_base=api_base,
        rate_per_second=t.number("rate_per_second", float, 25.0, low=0.01, high=1000),
        request_timeout=t.number("request_timeout", float, 15.0, low=0.1, high=600),
        max_retries=t.number("max_retries", int, 3, low=0, high=100),
    )
    t.finish()
    return config


def _worker(t: _Table) -> WorkerConfig:
    config = WorkerConfig(
        poll_interval=t.number("poll_interval", float, 10.0, low=0.05, high=3600),
        batch_size=t.number("batch_size", int, 50, low=1, high=10_000),
        concurrency=t.number("concurrency", int, 50, low=1, high=10_000),
        max_running_shots=t.number("max_running_shots", int, 8, low=1, high=1000),
        heartbeat_interval=t.number("heartbeat_interval", float, 5.0, low=0.05, high=3600),
        stale_after=t.number("stale_after", float, 60.0, low=0.2, high=86_400),
        max_attempts=t.number("max_attempts", int, 3, low=1, high=1000),
    )
    # A lease must survive a couple of missed renewals before another daemon may take it.
    if config.heartbeat_interval * 3 > config.stale_after:
        t.problem("heartbeat_interval", "must be at most a third of worker.stale_after")
    t.finish()
    return config


def _bots(
    t: _Table, env: Mapping[str, str], base_dir: Path, warnings: list[str],
    resolve_tokens: bool,
) -> dict[str, BotConfig]:
    bots: dict[str, BotConfig] = {}
    for slug in list(t.data):
        bot = t.table(slug)
        if not _SLUG.fullmatch(slug):
            t.problem(slug, "bot slug must be letters, digits, '_' or '-' (at most 64)")
        if resolve_tokens:
            resolved = _token(bot, env, base_dir)
        else:
            bot.seen.update(("token_env", "token_file", "token"))
            resolved = ("", "not read: this command does not talk to Telegram")
        if resolve_tokens and "token" in bot.data and resolved is not None:
            warnings.append(f"{bot.key('token')}: token written in the config file; "
                            "prefer token_env or token_file")
        rate = (bot.number("rate_per_second", float, 25.0, low=0.01, high=1000)
                if "rate_per_second" in bot.data else None)
        bot.finish()
        if resolved is not None:
            token, source = resolved
            bots[slug] = BotConfig(slug, Secret(token), source, rate)
    t.finish()
    return bots


def _token(bot: _Table, env: Mapping[str, str], base_dir: Path) -> tuple[str, str] | None:
    """Resolves exactly one token source; the token itself never enters an error message."""
    sources = [name for name in ("token_env", "token_file", "token") if name in bot.data]
    for name in sources:
        bot.get(name, str, "")
    if len(sources) != 1:
        found = " and ".join(sources) if sources else "none"
        bot.problems.append(f"{bot.path}: needs exactly one of token_env, token_file, token "
                            f"(found {found})")
        return None
    source = sources[0]
    value = bot.data[source]
    if not isinstance(value, str):
        return None  # already reported by get()
    if source == "token_env":
        if _TOKEN.fullmatch(value.strip()):
            bot.problem(source, "holds what looks like a bot token itself; put the token in "
                                "the environment and name the variable here")
            return None
        if not _ENV_NAME.fullmatch(value):
            bot.problem(source, f"{value!r} is not an environment variable name")
            return None
        if not env.get(value):
            bot.problem(source, f"environment variable {value} is not set")
            return None
        token, where = env[value].strip(), f"token_env = {value}"
    elif source == "token_file":
        if _TOKEN.fullmatch(value.strip()):
            bot.problem(source, "holds what looks like a bot token, not a file path")
            return None
        path = _credential_path(value, env, base_dir)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            bot.problem(source, f"cannot read {path}: {exc.strerror}")
            return None
        except UnicodeDecodeError:
            bot.problem(source, f"{path} is not a text file")
            return None
        where = f"token_file = {path}"
    else:
        token, where = value.strip(), "token"
    if not _TOKEN.fullmatch(token):
        bot.problem(source, f"{where} does not hold a bot token (expected <digits>:<secret>)")
        return None
    return token, where


def _credential_path(value: str, env: Mapping[str, str], base_dir: Path) -> Path:
    """Relative token files live in systemd's $CREDENTIALS_DIRECTORY, else beside the config."""
    path = Path(value)
    if path.is_absolute():
        return path
    return Path(env.get("CREDENTIALS_DIRECTORY") or base_dir) / path


def _metrics(t: _Table) -> MetricsConfig:
    listen = t.get("listen", str, MetricsConfig.listen)
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not _PORT.fullmatch(port) or int(port) > 65535:
        t.problem("listen", f"must be host:port (e.g. 127.0.0.1:9464), got {listen!r}")
        listen = MetricsConfig.listen
    t.finish()
    return MetricsConfig(listen=listen)


def _logging(t: _Table) -> LoggingConfig:
    config = LoggingConfig(
        level=t.choice("level", "info", ("debug", "info", "warning", "error")),
        format=t.choice("format", "json", ("json", "console")) if "format" in t.data else None,
    )
    t.finish()
    return config


def mask_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ***, for printing."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def effective_rate(config: Config, slug: str) -> float:
    bot = config.bots[slug]
    return config.telegram.rate_per_second if bot.rate_per_second is None else bot.rate_per_second


def describe(config: Config) -> dict[str, Any]:
    """The resolved config as plain data with every secret masked (for check-config)."""
    return {
        "database": {"dsn": mask_dsn(config.database.dsn),
                     "pool_size": config.database.pool_size},
        "telegram": vars(config.telegram) | {},
        "worker": vars(config.worker) | {},
        "bots": {
            slug: {"token": "***", "token_source": bot.token_source,
                   "rate_per_second": effective_rate(config, slug)}
            for slug, bot in config.bots.items()
        },
        "metrics": {"listen": config.metrics.listen},
        "logging": {"level": config.logging.level,
                    "format": config.logging.format or "auto (console on a TTY, else json)"},
    }
