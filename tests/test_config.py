"""The configuration contract (SPEC §6, §7): defaults, every rejection naming its key path,
token resolution and masking, and the CLI's exit statuses as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import (
    Config,
    ConfigError,
    DatabaseConfig,
    LoggingConfig,
    MetricsConfig,
    TelegramConfig,
    WorkerConfig,
    effective_rate,
    load,
)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "123456:TEST-abcdefghijklmnopqrstuvwxyz012345"
OTHER = "654321:TEST-zyxwvutsrqponmlkjihgfedcba543210"
ENV = {"SHOP_TOKEN": TOKEN}
BOT = '[bots.shop]\ntoken_env = "SHOP_TOKEN"\n'


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load(write(tmp_path, text), ENV if env is None else env)


def rejected(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, env)
    return caught.value


# --- a valid config ----------------------------------------------------------------------------

def test_minimal_config_has_every_spec_default(tmp_path: Path) -> None:
    config = load_text(tmp_path, BOT)
    db, tg, w = config.database, config.telegram, config.worker
    assert (db.dsn, db.pool_size) == ("postgresql://shotsd@localhost/app", 10)
    assert (tg.api_base, tg.rate_per_second, tg.request_timeout, tg.max_retries) == (
        "https://api.telegram.org", 25.0, 15.0, 3)
    assert (w.poll_interval, w.batch_size, w.concurrency, w.max_running_shots) == (10.0, 50, 50, 8)
    assert (w.heartbeat_interval, w.stale_after, w.max_attempts) == (5.0, 60.0, 3)
    assert config.metrics.listen == "127.0.0.1:9464"
    assert config.metrics.host_port == ("127.0.0.1", 9464)
    assert (config.logging.level, config.logging.format) == ("info", None)  # None: TTY decides
    assert list(config.bots) == ["shop"]
    shop = config.bots["shop"]
    assert shop.token.reveal() == TOKEN
    assert shop.token_source == "token_env = SHOP_TOKEN"
    assert shop.rate_per_second is None
    assert effective_rate(config, "shop") == 25.0
    assert config.warnings == ()
    # the dataclass defaults agree with what parsing fills in
    assert (config.database, config.telegram, config.worker, config.metrics, config.logging) == (
        DatabaseConfig(), TelegramConfig(), WorkerConfig(), MetricsConfig(), LoggingConfig())


def test_explicit_values_are_used(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
        [database]
        dsn = "postgres://u@db:5433/x"
        pool_size = 2
        [telegram]
        api_base = "http://127.0.0.1:8081/"
        rate_per_second = 1      # an integer is fine for a float
        [worker]
        heartbeat_interval = 20.0  # exactly a third of stale_after is allowed
        stale_after = 60
        batch_size = 10000
        [metrics]
        listen = "[::1]:0"
        [logging]
        level = "debug"
        format = "console"
        """ + BOT)
    assert config.database.dsn == "postgres://u@db:5433/x"
    assert config.database.pool_size == 2
    assert config.telegram.api_base == "http://127.0.0.1:8081"  # trailing slash dropped
    assert config.telegram.rate_per_second == 1.0
    assert isinstance(config.telegram.rate_per_second, float)
    assert (config.worker.heartbeat_interval, config.worker.stale_after) == (20.0, 60.0)
    assert config.worker.batch_size == 10000
    assert config.metrics.host_port == ("::1", 0)
    assert (config.logging.level, config.logging.format) == ("debug", "console")


# --- rejections, each naming its key path ----------------------------------------------------

ERRORS = [
    pytest.param("colour = 1\n" + BOT, "colour: unknown key", id="unknown-top-level"),
    pytest.param("[worker]\nbatchsize = 5\n" + BOT, "worker.batchsize: unknown key",
                 id="unknown-in-worker"),
    pytest.param(BOT + "rate = 5\n", "bots.shop.rate: unknown key", id="unknown-in-bot"),
    pytest.param('[worker]\nbatch_size = "50"\n' + BOT,
                 "worker.batch_size: expected an integer, got a string", id="string-for-int"),
    pytest.param("[worker]\nconcurrency = true\n" + BOT,
                 "worker.concurrency: expected an integer, got true/false", id="bool-for-int"),
    pytest.param("[telegram]\nrate_per_second = false\n" + BOT,
                 "telegram.rate_per_second: expected a number, got true/false",
                 id="bool-for-float"),
    pytest.param("[worker]\nbatch_size = 5.0\n" + BOT,
                 "worker.batch_size: expected an integer, got a number", id="float-for-int"),
    pytest.param('[database]\ndsn = { host = "db" }\n' + BOT,
                 "database.dsn: expected a string, got a table", id="table-for-string"),
    pytest.param("worker = 5\n" + BOT, "worker: expected a table, got an integer",
                 id="int-for-table"),
    pytest.param('[bots]\nshop = "x"\n', "bots.shop: expected a table, got a string",
                 id="string-for-bot-table"),
    pytest.param("[telegram]\nrate_per_second = 0\n" + BOT,
                 "telegram.rate_per_second: must be between 0.01 and 1000, got 0.0",
                 id="zero-rate"),
    pytest.param("[worker]\nconcurrency = 0\n" + BOT,
                 "worker.concurrency: must be between 1 and 10000, got 0", id="zero-concurrency"),
    pytest.param("[worker]\npoll_interval = -1.5\n" + BOT,
                 "worker.poll_interval: must be between 0.05 and 3600, got -1.5",
                 id="negative-poll-interval"),
    pytest.param("[worker]\nstale_after = nan\n" + BOT,
                 "worker.stale_after: must be between 0.2 and 86400, got nan", id="nan"),
    pytest.param("[telegram]\nrequest_timeout = inf\n" + BOT,
                 "telegram.request_timeout: must be between 0.1 and 600, got inf", id="inf"),
    pytest.param("[database]\npool_size = 1\n" + BOT,
                 "database.pool_size: must be between 2 and 1000, got 1", id="small-pool"),
    pytest.param("[worker]\nheartbeat_interval = 20.5\nstale_after = 60.0\n" + BOT,
                 "worker.heartbeat_interval: must be at most a third of worker.stale_after",
                 id="heartbeat-vs-stale"),
    pytest.param("[worker]\nstale_after = 10.0\n" + BOT,  # default heartbeat 5.0 > 10/3
                 "worker.heartbeat_interval: must be at most a third of worker.stale_after",
                 id="heartbeat-default-vs-stale"),
    pytest.param('[database]\ndsn = "mysql://u@h/db"\n' + BOT,
                 "database.dsn: must be a postgresql:// URL", id="bad-dsn"),
    pytest.param('[telegram]\napi_base = "ftp://x"\n' + BOT,
                 "telegram.api_base: must be an http(s) URL", id="bad-api-base"),
    pytest.param("[bots.shop]\n", "bots.shop: needs exactly one of token_env, token_file, token"
                 " (found none)", id="no-token-source"),
    pytest.param(BOT + 'token_file = "shop.token"\n',
                 "bots.shop: needs exactly one of token_env, token_file, token"
                 " (found token_env and token_file)", id="two-token-sources"),
    pytest.param('[bots.shop]\ntoken_env = "NOT A NAME"\n',
                 "bots.shop.token_env: 'NOT A NAME' is not an environment variable name",
                 id="bad-env-name"),
    pytest.param("[bots.shop]\ntoken_env = 7\n",
                 "bots.shop.token_env: expected a string, got an integer", id="token-env-int"),
    pytest.param(BOT + "rate_per_second = 0\n",
                 "bots.shop.rate_per_second: must be between 0.01 and 1000", id="bot-rate-zero"),
    pytest.param('[bots."bad slug!"]\ntoken_env = "SHOP_TOKEN"\n',
                 "bots.bad slug!: bot slug must be letters, digits", id="bad-slug-chars"),
    pytest.param(f'[bots.{"a" * 65}]\ntoken_env = "SHOP_TOKEN"\n',
                 f"bots.{'a' * 65}: bot slug must be", id="slug-too-long"),
    pytest.param('[bots._shop]\ntoken_env = "SHOP_TOKEN"\n',
                 "bots._shop: bot slug must be", id="slug-leading-underscore"),
    pytest.param('[metrics]\nlisten = "9464"\n' + BOT,
                 "metrics.listen: must be host:port (e.g. 127.0.0.1:9464), got '9464'",
                 id="listen-no-host"),
    pytest.param('[metrics]\nlisten = "localhost:http"\n' + BOT,
                 "metrics.listen: must be host:port", id="listen-named-port"),
    pytest.param('[metrics]\nlisten = "127.0.0.1:65536"\n' + BOT,
                 "metrics.listen: must be host:port", id="listen-port-range"),
    pytest.param('[logging]\nlevel = "verbose"\n' + BOT,
                 "logging.level: must be one of debug, info, warning, error, got 'verbose'",
                 id="bad-level"),
    pytest.param('[logging]\nlevel = "INFO"\n' + BOT, "logging.level: must be one of",
                 id="level-is-lowercase"),
    pytest.param('[logging]\nformat = "xml"\n' + BOT,
                 "logging.format: must be one of json, console, got 'xml'", id="bad-format"),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_rejected_with_key_path(tmp_path: Path, text: str, expected: str) -> None:
    error = rejected(tmp_path, text)
    assert expected in str(error)
    assert TOKEN not in str(error)


def test_unset_token_env_exact_message(tmp_path: Path) -> None:
    error = rejected(tmp_path, BOT, env={})
    assert error.problems == ["bots.shop.token_env: environment variable SHOP_TOKEN is not set"]
    assert str(rejected(tmp_path, BOT, env={"SHOP_TOKEN": ""})) == error.problems[0]


def test_several_problems_reported_together(tmp_path: Path) -> None:
    error = rejected(tmp_path, """
        colour = "blue"
        [worker]
        batch_size = "many"
        concurrency = 0
        [logging]
        level = "loud"
        [bots.shop]
        token_env = "SHOP_TOKEN"
        [bots.other]
        token_env = "OTHER_TOKEN"
        """)
    assert sorted(p.split(":")[0] for p in error.problems) == [
        "bots.other.token_env", "colour", "logging.level", "worker.batch_size",
        "worker.concurrency"]
    assert str(error) == "\n".join(error.problems)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[worker\nbatch_size = 5\n")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load(path, ENV)
    assert str(caught.value).startswith(f"{path}: not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load(path, ENV)
    assert str(caught.value) == f"{path}: cannot read config file: No such file or directory"


# --- tokens ------------------------------------------------------------------------------------

def test_token_file_relative_resolves_in_credentials_directory(tmp_path: Path) -> None:
    creds, etc = tmp_path / "creds", tmp_path / "etc"
    creds.mkdir()
    etc.mkdir()
    (creds / "shop.token").write_text(TOKEN + "\n")
    (etc / "shop.token").write_text(OTHER + "\n")  # must lose to the credentials directory
    config = load(write(etc, '[bots.shop]\ntoken_file = "shop.token"\n'),
                  {"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.bots["shop"].token.reveal() == TOKEN
    assert config.bots["shop"].token_source == f"token_file = {creds / 'shop.token'}"


def test_token_file_relative_resolves_beside_config_without_credentials_directory(
        tmp_path: Path) -> None:
    (tmp_path / "shop.token").write_text(f"  {TOKEN}\n")
    config = load(write(tmp_path, '[bots.shop]\ntoken_file = "shop.token"\n'), {})
    assert config.bots["shop"].token.reveal() == TOKEN
    assert config.bots["shop"].token_source == f"token_file = {tmp_path / 'shop.token'}"


def test_token_env_value_is_stripped(tmp_path: Path) -> None:
    config = load_text(tmp_path, BOT, env={"SHOP_TOKEN": f" {TOKEN}\n"})
    assert config.bots["shop"].token.reveal() == TOKEN


def test_token_file_absolute_ignores_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "abs.token").write_text(TOKEN)
    config = load(write(tmp_path, f'[bots.shop]\ntoken_file = "{tmp_path / "abs.token"}"\n'),
                  {"CREDENTIALS_DIRECTORY": str(tmp_path / "nowhere")})
    assert config.bots["shop"].token.reveal() == TOKEN


@pytest.mark.parametrize("use_credentials", [True, False], ids=["credentials-dir", "config-dir"])
def test_token_file_missing(tmp_path: Path, use_credentials: bool) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    env = {"CREDENTIALS_DIRECTORY": str(creds)} if use_credentials else {}
    expected = (creds if use_credentials else tmp_path) / "shop.token"
    error = rejected(tmp_path, '[bots.shop]\ntoken_file = "shop.token"\n', env=env)
    assert error.problems == [
        f"bots.shop.token_file: cannot read {expected}: No such file or directory"]


@pytest.mark.parametrize("bad", ["12345", "abc:defghijk", "123456:has space", "123456:", ":abc",
                                 "123456:TEST-ok\n987:two-lines", TOKEN + "!"])
@pytest.mark.parametrize("source", ["token_env", "token_file", "token"])
def test_token_must_look_like_a_bot_token(tmp_path: Path, source: str, bad: str) -> None:
    (tmp_path / "shop.token").write_text(bad)
    value = {"token_env": "SHOP_TOKEN", "token_file": "shop.token", "token": bad}[source]
    text = f"[bots.shop]\n{source} = {json.dumps(value)}\n"
    error = rejected(tmp_path, text, env={"SHOP_TOKEN": bad})
    assert len(error.problems) == 1
    assert error.problems[0].startswith(f"bots.shop.{source}: ")
    assert "does not hold a bot token (expected <digits>:<secret>)" in str(error)
    assert bad.strip() not in str(error)


def test_inline_token_is_accepted_with_a_warning(tmp_path: Path) -> None:
    config = load_text(tmp_path, f'[bots.shop]\ntoken = "{TOKEN}"\n', env={})
    assert config.bots["shop"].token.reveal() == TOKEN
    assert config.bots["shop"].token_source == "token"
    assert len(config.warnings) == 1
    assert config.warnings[0].startswith("bots.shop.token: token written in the config file")
    assert TOKEN not in config.warnings[0]


@pytest.mark.parametrize("text", [
    f'colour = 1\n[bots.shop]\ntoken = "{TOKEN}"\n',
    f'[bots.shop]\ntoken = "{TOKEN}"\ntoken_env = "SHOP_TOKEN"\n',
    f'[bots.shop]\ntoken = "{TOKEN}"\nrate_per_second = -1\nextra = 1\n',
    f'[bots.shop]\ntoken = "{TOKEN}!"\n',
    f'[bots.shop]\ntoken = "{TOKEN}"\n[bots."bad slug"]\ntoken = "{TOKEN}"\n',
    '[bots.shop]\ntoken_file = "shop.token"\n[worker]\nconcurrency = 0\n',
    BOT + "[worker]\nconcurrency = 0\n",
], ids=["inline-other-error", "inline-two-sources", "inline-bot-errors", "inline-malformed",
        "inline-bad-slug", "file-other-error", "env-other-error"])
def test_token_never_in_error_message(tmp_path: Path, text: str) -> None:
    (tmp_path / "shop.token").write_text(TOKEN)
    error = rejected(tmp_path, text)
    assert error.problems  # it did fail, for some other reason
    assert TOKEN not in str(error)
    assert TOKEN not in repr(error)


def test_token_never_in_repr_or_str_of_config(tmp_path: Path) -> None:
    (tmp_path / "b.token").write_text(OTHER)
    config = load_text(tmp_path, BOT + '[bots.b]\ntoken_file = "b.token"\n'
                       f'[bots.c]\ntoken = "{TOKEN}"\n')
    assert [bot.token.reveal() for bot in config.bots.values()] == [TOKEN, OTHER, TOKEN]
    shown = [repr(config), str(config), f"{config}", repr(config.bots), str(config.bots["shop"]),
             repr(config.bots["shop"].token), f"{config.bots['b'].token}"]
    for text in shown:
        assert TOKEN not in text
        assert OTHER not in text
        assert "TEST-" not in text
    assert "Secret('***')" in str(config.bots["c"].token)
    assert TOKEN in config.secrets()
    assert OTHER in config.secrets()


# --- database override, rates ------------------------------------------------------------------

def test_database_url_env_overrides_dsn(tmp_path: Path) -> None:
    text = '[database]\ndsn = "postgresql://file@filehost/filedb"\n' + BOT
    env = {**ENV, "SHOTS_DATABASE_URL": "postgresql://env:pw@envhost:6543/envdb"}
    assert load_text(tmp_path, text, env).database.dsn == "postgresql://env:pw@envhost:6543/envdb"
    assert load_text(tmp_path, text).database.dsn == "postgresql://file@filehost/filedb"
    assert load_text(tmp_path, BOT, env).database.dsn == "postgresql://env:pw@envhost:6543/envdb"
    assert "pw" in load_text(tmp_path, BOT, env).secrets()
    error = rejected(tmp_path, text, {**ENV, "SHOTS_DATABASE_URL": "mysql://x@y/z"})
    assert error.problems == ["database.dsn: must be a postgresql:// URL (from SHOTS_DATABASE_URL)"]


def test_per_bot_rate_override_and_fallback(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[telegram]\nrate_per_second = 10.0\n"
                       + BOT + "rate_per_second = 5\n"
                       + '[bots.other]\ntoken_env = "SHOP_TOKEN"\n')
    assert config.bots["shop"].rate_per_second == 5.0
    assert config.bots["other"].rate_per_second is None
    assert effective_rate(config, "shop") == 5.0
    assert effective_rate(config, "other") == 10.0


# --- the command line, as a real subprocess ----------------------------------------------------

def shotsd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SHOTS_DATABASE") and k != "CREDENTIALS_DIRECTORY"}
    env["SHOP_TOKEN"] = TOKEN
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_check_config_prints_masked_json(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\ndsn = "postgresql://shotsd:Hunter2pw@127.0.0.1:1/app"\n'
                 '[logging]\nformat = "json"\n' + BOT + "rate_per_second = 3\n")
    done = shotsd("check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["database"]["dsn"] == "postgresql://shotsd:***@127.0.0.1:1/app"
    assert shown["bots"]["shop"] == {"token": "***", "token_source": "token_env = SHOP_TOKEN",
                                     "rate_per_second": 3.0}
    assert shown["worker"]["concurrency"] == 50
    for stream in (done.stdout, done.stderr):
        assert TOKEN not in stream
        assert "Hunter2pw" not in stream


BAD = ('[database]\ndsn = "postgresql://shotsd@127.0.0.1:1/app"\n'
       '[worker]\nbatch_size = "fifty"\n' + BOT)


@pytest.mark.parametrize("command", ["check-config", "run", "migrate", "status"])
def test_cli_bad_config_exits_2_before_connecting(tmp_path: Path, command: str) -> None:
    done = shotsd(command, "--config", str(write(tmp_path, BAD)))
    assert done.returncode == 2
    assert "worker.batch_size: expected an integer, got a string" in done.stderr
    assert "configuration error" in done.stderr
    assert "cannot use the database" not in done.stderr  # it never tried to connect
    assert done.stdout == ""


def test_cli_missing_config_exits_2(tmp_path: Path) -> None:
    done = shotsd("run", "--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 2
    assert "cannot read config file" in done.stderr


def test_cli_unknown_subcommand_exits_2() -> None:
    done = shotsd("frobnicate")
    assert done.returncode == 2
    assert "invalid choice: 'frobnicate'" in done.stderr


# --- inputs that once crashed or leaked instead of being reported ---------------------------

def test_listen_with_non_ascii_digit_is_a_config_error(tmp_path: Path) -> None:
    rejected(tmp_path, '[metrics]\nlisten = "127.0.0.1:\u00b2"\n' + BOT)


def test_config_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_bytes(b"\xff\xfe = 1\n")
    with pytest.raises(ConfigError):
        load(tmp_path / "config.toml", ENV)


def test_token_file_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "shop.token").write_bytes(b"\xff" + TOKEN.encode())
    rejected(tmp_path, '[bots.shop]\ntoken_file = "shop.token"\n')


@pytest.mark.parametrize("source", ["token_env", "token_file"])
def test_token_written_in_wrong_key_is_not_echoed(tmp_path: Path, source: str) -> None:
    assert TOKEN not in str(rejected(tmp_path, f'[bots.shop]\n{source} = "{TOKEN}"\n'))


def test_slug_with_trailing_newline_is_rejected(tmp_path: Path) -> None:
    rejected(tmp_path, '[bots."shop\\n"]\ntoken_env = "SHOP_TOKEN"\n')


def test_migrate_and_status_do_not_need_the_bot_tokens(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[bots.shop]\ntoken_file = "missing.token"\n'
                    '[bots.other]\ntoken_env = "UNSET_VARIABLE_FOR_TEST"\n')
    config = load(path, {}, resolve_tokens=False)
    assert sorted(config.bots) == ["other", "shop"]
    assert config.secrets() == []
    with pytest.raises(ConfigError, match="token_file: cannot read"):
        load(path, {})
    path.write_text('[bots.shop]\ntoken_envv = "X"\n')  # other mistakes are still errors
    with pytest.raises(ConfigError, match=r"bots\.shop\.token_envv: unknown key"):
        load(path, {}, resolve_tokens=False)
