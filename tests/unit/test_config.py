from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.config import (
    config_from_dict,
    format_duration,
    load_config,
    parse_duration,
    parse_listen,
    parse_size,
)
from postlane.errors import ConfigError
from postlane.simulate import Scenario


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h", 3600), ("2d", 172800), ("1h30m", 5400)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "m5", "1h 30m", "-1s", "1.5.2s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@given(st.integers(min_value=1, max_value=10**7))
def test_format_duration_round_trips_whole_seconds(seconds: int) -> None:
    text = format_duration(seconds)
    # two most significant units are kept, so the result never exceeds the input
    assert 0 < parse_duration(text) <= seconds


@pytest.mark.parametrize(("text", "size"), [("25MB", 25_000_000), ("512KiB", 524288), ("100", 100)])
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_listen_parses_ipv4_and_ipv6() -> None:
    assert parse_listen("127.0.0.1:8025") == ("127.0.0.1", 8025)
    assert parse_listen("[::1]:2587") == ("::1", 2587)
    with pytest.raises(ValueError):
        parse_listen("localhost")


def test_defaults_work_with_no_file(tmp_path: Path) -> None:
    config = load_config(env={}, cwd=tmp_path)
    assert config.source == "built-in defaults"
    assert config.store.url == "sqlite:///postlane.db"
    assert config.http.listen == "127.0.0.1:8025"
    assert config.smtp.listen == "127.0.0.1:2587"
    assert config.delivery.relay.startswith("capture://")
    assert config.retry.delays == (60, 300, 900, 3600, 14400)
    assert config.retry.max_attempts == 8
    assert config.retry.max_age == 2 * 86400
    assert config.smtp.trusted_networks == ("127.0.0.0/8", "::1/128")


def test_contract_example_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "postlane.toml"
    path.write_text(
        """
[store]
url = "sqlite:///postlane.db"
[delivery]
relay = "smtp://127.0.0.1:2525"
concurrency = 100
lease = "1m"
[retry]
delays = ["1m", "5m", "15m", "1h", "4h"]
max_attempts = 8
max_age = "2d"
[lanes.high]
max_age = "1h"
[http]
listen = "127.0.0.1:8025"
tokens = ["secret"]
[smtp]
listen = "127.0.0.1:2587"
trusted_networks = ["127.0.0.0/8", "::1/128"]
users = { app = "password" }
max_size = "25MB"
"""
    )
    config = load_config(path, env={})
    assert config.lanes["high"].max_age == 3600
    assert config.delivery.lease == 60
    assert config.http.tokens == ("secret",)
    assert config.smtp.users == {"app": "password"}
    assert config.base_dir == tmp_path


def test_postlane_toml_in_cwd_is_found(tmp_path: Path) -> None:
    (tmp_path / "postlane.toml").write_text("[delivery]\nconcurrency = 7\n")
    assert load_config(env={}, cwd=tmp_path).delivery.concurrency == 7


def test_env_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text("[delivery]\nconcurrency = 3\n")
    assert load_config(env={"POSTLANE_CONFIG": str(path)}, cwd=tmp_path).delivery.concurrency == 3


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"delivery": {"relai": "x"}}, "delivery.relai"),
        ({"retry": {"max_age": "forever"}}, "retry.max_age"),
        ({"retry": {"max_age": 5}}, "retry.max_age"),
        ({"retry": {"delays": []}}, "retry.delays"),
        ({"delivery": {"concurrency": 0}}, "delivery.concurrency"),
        ({"delivery": {"concurrency": "ten"}}, "delivery.concurrency"),
        ({"http": {"listen": "nowhere"}}, "http.listen"),
        ({"smtp": {"trusted_networks": ["10.0.0.0/33"]}}, "smtp.trusted_networks"),
        ({"smtp": {"max_size": "huge"}}, "smtp.max_size"),
        ({"lanes": {"urgent": {}}}, "lanes.urgent"),
        ({"lanes": {"high": {"max_age": "1y"}}}, "lanes.high.max_age"),
        ({"stor": {}}, "stor"),
        ({"smtp": {"tls_cert": "c.pem"}}, "tls_key"),
    ],
)
def test_unknown_keys_and_bad_values_name_the_key(data: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config_from_dict(data)


def test_env_overrides_scalar_keys() -> None:
    config = config_from_dict(
        {},
        env={
            "POSTLANE_STORE_URL": "sqlite:////var/lib/postlane.db",
            "POSTLANE_DELIVERY_CONCURRENCY": "12",
            "POSTLANE_RETRY_DELAYS": "1s,2s",
            "POSTLANE_LANES_HIGH_MAX_AGE": "30m",
            "POSTLANE_DELIVERY_TLS_VERIFY": "false",
            "POSTLANE_API_TOKEN": "tok",
            "POSTLANE_TEST_SOMETHING": "ignored: not a section",
        },
    )
    assert config.store.url == "sqlite:////var/lib/postlane.db"
    assert config.delivery.concurrency == 12
    assert config.retry.delays == (1, 2)
    assert config.lanes["high"].max_age == 1800
    assert config.delivery.tls_verify is False
    assert config.http.tokens == ("tok",)


def test_env_with_unknown_key_of_known_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match="POSTLANE_DELIVERY_RELAI"):
        config_from_dict({}, env={"POSTLANE_DELIVERY_RELAI": "x"})


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[store\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, env={})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


@pytest.mark.parametrize(
    ("config", "scenario", "expected"),
    [
        ({"store": {"url": 5}}, {"hostname": 5}, "expected a string, got 5"),
        ({"log": {"attempts": "yes"}}, {"rules": [{"drop": "yes"}]}, "expected true or false"),
        ({"delivery": {"lease": 5}}, {"delays": {"rcpt": 5}}, 'a duration string like "30s"'),
        ({"retry": {"max_attempts": 0}}, {"throttle": {"rate": 1, "burst": 0}}, "positive integer"),
        ({"log": {"format": "xml"}}, {"tls": "xml"}, "expected one of "),
    ],
)
def test_the_configuration_and_scenarios_check_values_alike(
    config: dict[str, Any], scenario: dict[str, Any], expected: str
) -> None:
    """Both read through postlane.toml_values: one kind of value, one check, the same words."""
    with pytest.raises(ConfigError) as in_config:
        config_from_dict(config)
    with pytest.raises(ConfigError) as in_scenario:
        Scenario.from_dict(scenario)
    assert expected in in_config.value.message
    assert expected in in_scenario.value.message
