"""config.example.toml is the operator's reference: it must load and show the true defaults."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from daemon.config import Config, DatabaseConfig, TelegramConfig, WorkerConfig, load

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_example_config_loads_with_the_documented_defaults() -> None:
    config = load(EXAMPLE, {"SHOP_BOT_TOKEN": "123456:TEST-example-token-cccccccccccccc"})
    assert config.database == DatabaseConfig()
    assert config.telegram == TelegramConfig()
    assert config.worker == WorkerConfig()
    assert list(config.bots) == ["shop"]
    assert config.metrics.listen == "127.0.0.1:9464"
    assert config.logging.level == "info"


def test_example_config_lists_every_key() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    for section, cls in (("database", DatabaseConfig), ("telegram", TelegramConfig),
                         ("worker", WorkerConfig)):
        assert set(data[section]) == {f.name for f in dataclasses.fields(cls)}, section
    text = EXAMPLE.read_text()
    for key in ("token_file", "rate_per_second", "format"):
        assert key in text
    assert {f.name for f in dataclasses.fields(Config)} - {"warnings"} <= set(data)
