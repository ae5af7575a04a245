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
from postlane.sender_bindings import SendToken
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
    with pytest.raises(ValueError, match="a port from 1 to 65535"):
        parse_listen("127.0.0.1:99999")  # said as such, not as a malformed HOST:PORT


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
        ({"delivery": {"lease": "0s"}}, "delivery.lease"),
        ({"delivery": {"lease": "500ms"}}, "delivery.lease"),
        ({"alerts": {"interval": "10m"}}, "alerts.interval"),
        ({"alerts": {"interval": "0s"}}, "alerts.interval"),
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


# -- secrets never shown (audit finding 9) --------------------------------------------------------

SECRET = "S3cretRelayPw"


@pytest.mark.parametrize(
    ("data", "env", "named"),
    [
        (
            {"delivery": {"relay": f"smtp://relayuser:{SECRET}@relay.example.com:99999"}},
            {},
            "delivery.relay",
        ),
        ({"delivery": {"relay": f"smtpx://relayuser:{SECRET}@relay.example.com"}}, {}, "relay"),
        ({"delivery": {"relay": f"smtp://u:{SECRET}@:25"}}, {}, "delivery.relay"),
        ({"delivery": {"password": 12345678}}, {}, "delivery.password"),
        ({"delivery": {"password": [SECRET]}}, {}, "delivery.password"),
        ({"delivery": {"username": 5, "password": SECRET}}, {}, "delivery.username"),
        (
            {"routes": [{"relay": f"smtp://u:{SECRET}@relay.example.com:0x19"}]},
            {},
            "routes[1].relay",
        ),
        (
            {"routes": [{"relay": "mx", "fallback": f"smtps://u:{SECRET}@h:0"}]},
            {},
            "routes[1].fallback",
        ),
        ({"http": {"tokens": SECRET}}, {}, "http.tokens"),
        ({"http": {"tokens": [[SECRET]]}}, {}, "http.tokens"),
        ({"http": {"send_tokens": [SECRET, 5]}}, {}, "http.send_tokens"),
        ({"smtp": {"users": f"app:{SECRET}"}}, {}, "smtp.users"),
        ({"smtp": {"users": {"app": [SECRET]}}}, {}, "smtp.users"),
        ({"store": {"url": f"mysql://u:{SECRET}@db.example.com/q"}}, {}, "store.url"),
        ({"alerts": {"webhook": f"ftp://u:{SECRET}@hooks.example.com"}}, {}, "alerts.webhook"),
        ({"delivery": {"relay": f"postmark://{SECRET}", "concurrency": "x"}}, {}, "concurrency"),
        (
            {"delivery": {"relay": "smtp://u:${PW}@relay.example.com:99999"}},
            {"PW": SECRET},
            "delivery.relay",
        ),
        ({}, {"POSTLANE_DELIVERY_RELAY": f"smtp://u:{SECRET}@h:bad"}, "POSTLANE_DELIVERY_RELAY"),
        ({}, {"POSTLANE_HTTP_TOKENS": SECRET, "POSTLANE_RETRY_DELAYS": "x"}, "RETRY_DELAYS"),
        ({"delivery": {"password": SECRET, "lease": "soon"}}, {}, "delivery.lease"),
    ],
)
def test_finding_9_no_config_error_shows_a_secret(
    data: dict[str, Any], env: dict[str, str], named: str
) -> None:
    """Every error is a ConfigError naming the key, and none holds the secret: not a URL's
    password, not a secret key's value, not what a ${VAR} put there."""
    with pytest.raises(ConfigError) as raised:
        config_from_dict(data, env=env)
    assert named in raised.value.message
    assert SECRET not in raised.value.message
    assert "12345678" not in raised.value.message


def test_finding_9_a_secret_keys_error_says_what_was_expected_without_the_value() -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict({"delivery": {"password": 12345678}})
    assert raised.value.message == "delivery.password: expected a string, got an integer"


def test_config_redacts_its_secrets_in_any_text(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("FileS3cret\n")
    config = config_from_dict(
        {
            "delivery": {"relay": f"smtp://u:{SECRET}@relay.example.com", "password": "Pw12345"},
            "http": {"tokens_file": "token"},
        },
        base_dir=tmp_path,
        env={"POSTLANE_API_TOKEN": "ApiS3cret"},
    )
    text = f"{SECRET} Pw12345 FileS3cret ApiS3cret relay.example.com"
    assert config.redact(text) == "**** **** **** **** relay.example.com"
    assert SECRET not in repr(config)


def test_url_masking() -> None:
    from postlane.redact import mask_url

    assert mask_url(f"smtp://user:{SECRET}@h:587") == "smtp://user:****@h:587"
    assert mask_url("smtp://user@h") == "smtp://user@h"
    assert mask_url(f"postmark://{SECRET}") == "postmark://****"
    assert mask_url(f"mailgun://{SECRET}@mg.example.com") == "mailgun://****@mg.example.com"
    assert mask_url(f"ses://AKIA:{SECRET}@eu-west-1") == "ses://****@eu-west-1"
    assert mask_url(f"https://h/x?token={SECRET}&a=b") == "https://h/x?token=****&a=b"
    assert mask_url("mx") == "mx"
    assert mask_url("sqlite:////var/lib/a@b/postlane.db") == "sqlite:////var/lib/a@b/postlane.db"


@pytest.mark.parametrize(
    ("section", "key", "url", "password"),
    [
        ("delivery", "relay", "smtps://apikey:{}@smtp.example.com", "Zx9/kLm2Qp"),
        ("delivery", "relay", "smtp://user:{}@smtp.example.com:587", "pa?ss1234"),
        ("delivery", "relay", "smtp://user:{}@smtp.example.com:587", "Top#Secret"),
        ("store", "url", "postgresql://postlane:{}@127.0.0.1:5432/postlane", "S3cr/et99"),
    ],
)
def test_a_password_holding_url_delimiters_is_refused_masked_saying_how_to_encode_it(
    section: str, key: str, url: str, password: str
) -> None:
    """A new user's audit: a generated password with "/" ("?" or "#" too, for a relay URL)
    written into a relay or store URL was shown in clear in the error, which blamed a "bad
    port" (the URL parser read a piece of the password as one) or a host named after the user.
    Both forms (the file and the environment) now say to percent-encode it, the password
    masked."""
    written = url.format(password)
    for source in ({section: {key: written}}, None):
        env = {f"POSTLANE_{section.upper()}_{key.upper()}": written} if source is None else {}
        with pytest.raises(ConfigError) as refused:
            config_from_dict(source or {}, env=env)
        message = str(refused.value)
        assert password not in message and "bad port" not in message
        assert "percent-encode" in message and "%2F" in message
        assert "****@" in message
    encoded = url.format(password.replace("/", "%2F").replace("?", "%3F").replace("#", "%23"))
    config = config_from_dict({section: {key: encoded}})
    assert getattr(getattr(config, section), key) == encoded


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postlane:pa?ss1234@127.0.0.1:5432/postlane",  # libpq reads these whole
        "postgresql://postlane:Top#Secret@127.0.0.1:5432/postlane",
        "postgresql://db.example.com:5432/mail?user=app@tenant",  # "@" in a parameter
    ],
)
def test_store_urls_libpq_reads_as_meant_are_taken(url: str) -> None:
    """A review: libpq ends a URL's user info at "/" only, so "?" and "#" in a password, and
    "@" in a query parameter, are what was meant; refusing them stopped working deployments.
    The password is still masked in every message."""
    from postlane.redact import mask_url

    assert config_from_dict({"store": {"url": url}}).store.url == url
    assert "pa?ss1234" not in mask_url(url) and "Top#Secret" not in mask_url(url)
    assert "db.example.com:5432" in mask_url(url) or "127.0.0.1:5432" in mask_url(url)


def test_an_at_sign_in_a_web_urls_query_hides_nothing_else() -> None:
    """A review: "@" in a webhook URL's query made the redaction take the host for a secret
    ("could not reach ****")."""
    from postlane.redact import redact, url_secrets

    url = "https://alerts.example.com:8443/hook?owner=ops@example.com"
    assert url_secrets(url) == set()
    assert redact("could not reach alerts.example.com", url_secrets(url)) == (
        "could not reach alerts.example.com"
    )


def test_a_provider_secret_holding_a_slash_is_masked_whole() -> None:
    from postlane.redact import mask_url

    # AWS secret keys often hold "/": the URL parser ends the user info there, and the secret
    # showed in clear in any message quoting the URL
    assert mask_url("ses://AKIAX:ab/cd+ef@eu-west-1") == "ses://****@eu-west-1"


# -- the relay's forms (new user's item 5) ------------------------------------------------------


def test_issue_17_5_a_bad_relay_lists_the_forms_as_the_docs_write_them() -> None:
    from postlane.config import RELAY_FORMS

    with pytest.raises(ConfigError) as raised:
        config_from_dict({"delivery": {"relay": "smtpx://relay.example.com"}})
    docs = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    for form in RELAY_FORMS.values():
        assert form in raised.value.message
        assert f"`{form}`" in docs, form
    assert "mx://" not in raised.value.message


def test_issue_17_5_every_relay_form_has_a_transport() -> None:
    from postlane.config import RELAY_FORMS
    from postlane.transports import SCHEMES

    assert set(RELAY_FORMS) == set(SCHEMES)


@pytest.mark.parametrize(
    "relay",
    ["mx", "smtp://relay.example.com", "smtp://u:p@[::1]:2525", "capture:///tmp/x", "ses://x"],
)
def test_issue_17_5_good_relays_pass(relay: str) -> None:
    assert config_from_dict({"delivery": {"relay": relay}}).delivery.relay == relay


# -- ${VAR} and *_file (new user's item 3) ------------------------------------------------------


def test_issue_17_3_variables_are_expanded_in_every_string_value() -> None:
    config = config_from_dict(
        {
            "delivery": {"relay": "postmark://${POSTMARK_TOKEN}", "lease": "${LEASE}"},
            "http": {"tokens": ["${TOKEN_A}", "b-${TOKEN_B}"]},
            "smtp": {"users": {"app": "${APP_PASSWORD}"}},
            "destinations": {"google": {"rate": "${GOOGLE_RATE}", "concurrency": "${CONC}"}},
            "routes": [{"lane": ["${LANE}"], "relay": "smtp://${RELAY_HOST}:25"}],
        },
        env={
            "POSTMARK_TOKEN": "pm-123",
            "LEASE": "2m",
            "TOKEN_A": "a",
            "TOKEN_B": "b",
            "APP_PASSWORD": "pw",
            "GOOGLE_RATE": "0.5",
            "CONC": "4",
            "LANE": "high",
            "RELAY_HOST": "mta.internal",
        },
    )
    assert config.delivery.relay == "postmark://pm-123"
    assert config.delivery.lease == 120
    assert config.http.tokens == ("a", "b-b")
    assert config.smtp.users == {"app": "pw"}
    assert config.destinations["google"].rate == 0.5
    assert config.destinations["google"].concurrency == 4
    assert config.routes[0].lane == ("high",) and config.routes[0].relay == "smtp://mta.internal:25"


def test_issue_17_3_double_dollar_is_a_dollar_and_a_lone_dollar_is_itself() -> None:
    config = config_from_dict(
        {"smtp": {"users": {"a": "pa$$word", "b": "scrypt$16384$8$1$c2FsdA$aGFzaA", "c": "$${X}"}}}
    )
    assert config.smtp.users == {"a": "pa$word", "b": "scrypt$16384$8$1$c2FsdA$aGFzaA", "c": "${X}"}


def test_issue_17_3_a_default_is_used_when_the_variable_is_unset_or_empty() -> None:
    data = {"delivery": {"helo_name": "${HELO:-mail.example.com}"}}
    assert config_from_dict(data).delivery.helo_name == "mail.example.com"
    assert config_from_dict(data, env={"HELO": ""}).delivery.helo_name == "mail.example.com"
    assert config_from_dict(data, env={"HELO": "mx1"}).delivery.helo_name == "mx1"


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"delivery": {"relay": "postmark://${POSTMARK_TOKEN}"}}, "delivery.relay"),
        ({"http": {"tokens": ["ok", "${POSTMARK_TOKEN}"]}}, "http.tokens[2]"),
        ({"routes": [{"relay": "smtp://${POSTMARK_TOKEN}"}]}, "routes[1].relay"),
    ],
)
def test_issue_17_3_an_unset_variable_names_the_key_and_the_variable(
    data: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict(data, env={})
    assert raised.value.message.startswith(f"{named}: ")
    assert "POSTMARK_TOKEN is not set" in raised.value.message


def test_issue_17_3_a_broken_reference_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"delivery\.helo_name: '\$\{' is not a reference"):
        config_from_dict({"delivery": {"helo_name": "a${b"}})


def test_issue_17_3_secret_bearing_keys_read_from_files(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "password").write_text("  Pw from a file \n")
    (secrets / "relay").write_text("smtp://u:pw@relay.example.com:587\n")
    (secrets / "tokens").write_text("tok-1\n\ntok-2\n")
    (secrets / "users").write_text("app: scrypt$1$2$3\nweb:plain:with:colons\n")
    (secrets / "db").write_text(f"sqlite:///{tmp_path / 'q.db'}")
    config = config_from_dict(
        {
            "store": {"url_file": "secrets/db"},
            "delivery": {"relay_file": "secrets/relay", "password_file": "secrets/password"},
            "http": {"tokens_file": str(secrets / "tokens")},
            "smtp": {"users_file": "secrets/users"},
            "routes": [{"lane": ["high"], "relay_file": "secrets/relay"}],
        },
        base_dir=tmp_path,
    )
    assert config.delivery.password == "Pw from a file"  # trimmed
    assert config.delivery.relay == "smtp://u:pw@relay.example.com:587"
    assert config.http.tokens == ("tok-1", "tok-2")
    assert config.smtp.users == {"app": "scrypt$1$2$3", "web": "plain:with:colons"}
    assert config.store.url.endswith("q.db")
    assert config.routes[0].relay == config.delivery.relay
    assert "Pw from a file" in config.secrets


def test_issue_17_3_file_forms_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-env-file\n")
    config = config_from_dict(
        {"delivery": {"password": "from the file"}},
        env={"POSTLANE_DELIVERY_PASSWORD_FILE": str(tmp_path / "pw")},
    )
    assert config.delivery.password == "from-env-file"  # the environment wins


@pytest.mark.parametrize(
    ("data", "env", "message"),
    [
        (
            {"delivery": {"password": "x", "password_file": "pw"}},
            {},
            "give delivery.password or delivery.password_file, not both",
        ),
        (
            {},
            {"POSTLANE_DELIVERY_PASSWORD": "x", "POSTLANE_DELIVERY_PASSWORD_FILE": "pw"},
            "give POSTLANE_DELIVERY_PASSWORD or POSTLANE_DELIVERY_PASSWORD_FILE, not both",
        ),
        ({"delivery": {"password_file": "missing"}}, {}, "delivery.password_file: cannot read"),
        ({"delivery": {"password_file": "empty"}}, {}, "delivery.password_file: "),
        ({"delivery": {"concurrency_file": "pw"}}, {}, "unknown key delivery.concurrency_file"),
        ({"delivery": {"password_file": 5}}, {}, "delivery.password_file: expected the path"),
    ],
)
def test_issue_17_3_file_form_mistakes_name_the_key(
    tmp_path: Path, data: dict[str, Any], env: dict[str, str], message: str
) -> None:
    (tmp_path / "pw").write_text("secret")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError) as raised:
        config_from_dict(data, env=env, base_dir=tmp_path)
    assert message in raised.value.message


# -- the environment (new user's item 3) -------------------------------------------------------


def test_issue_17_3_env_sets_lists_and_tables_too() -> None:
    config = config_from_dict(
        {},
        env={
            "POSTLANE_HTTP_TOKENS": "t1, t2",
            "POSTLANE_HTTP_SEND_TOKENS": "s1",
            "POSTLANE_SMTP_USERS": "app:scrypt$1$2$3,web:pw",
            "POSTLANE_DELIVERY_REQUIRE_TLS": "google,example.com",
            "POSTLANE_THROTTLE_MIN_RATE": "0.5",
        },
    )
    assert config.http.tokens == ("t1", "t2")
    assert config.http.send_tokens == (SendToken("s1"),)
    assert config.smtp.users == {"app": "scrypt$1$2$3", "web": "pw"}
    assert config.delivery.require_tls == ("google", "example.com")
    assert config.throttle.min_rate == 0.5


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("POSTLANE_DESTINATIONS_GOOGLE_RATE", "[destinations] tables cannot be set from the"),
        ("POSTLANE_DKIM_EXAMPLE_COM_SELECTOR", "[dkim] tables cannot be set from the"),
        ("POSTLANE_ROUTES_1_RELAY", "[routes] tables cannot be set from the"),
        ("POSTLANE_DELIVRY_RELAY", "POSTLANE_DELIVERY_...?"),
        ("POSTLANE_LANE_HIGH_MAX_AGE", "POSTLANE_LANES_...?"),
        ("POSTLANE_LANES_URGENT_MAX_AGE", "lanes are high, normal, low"),
        ("POSTLANE_DELIVERY", "unknown setting POSTLANE_DELIVERY"),
    ],
)
def test_issue_17_3_env_variables_that_set_nothing_are_refused(variable: str, message: str) -> None:
    """Never silently ignored: what looks like configuration and is not is an error."""
    with pytest.raises(ConfigError) as raised:
        config_from_dict({}, env={variable: "5"})
    assert variable in raised.value.message and message in raised.value.message


def test_issue_17_3_variables_that_are_not_configuration_are_left_alone() -> None:
    env = {
        "POSTLANE_CONFIG": "x.toml",
        "POSTLANE_DEBUG": "1",
        "POSTLANE_WORKER_METRICS": "127.0.0.1:9025",
        "POSTLANE_TEST_POSTGRES": "postgresql://...",
        "POSTLANE_URL": "http://postlane:8025",  # the Django integration's
    }
    assert config_from_dict({}, env=env) == config_from_dict({})


def test_kubernetes_service_links_are_not_configuration(tmp_path: Path) -> None:
    """A Service named postlane-smtp puts POSTLANE_SMTP_SERVICE_HOST and friends in every pod's
    environment: postlane must start, not refuse them as unknown settings."""
    links = {
        "POSTLANE_SMTP_SERVICE_HOST": "10.0.0.7",
        "POSTLANE_SMTP_SERVICE_PORT": "2587",
        "POSTLANE_SMTP_SERVICE_PORT_SUBMISSION": "2587",
        "POSTLANE_SMTP_PORT": "tcp://10.0.0.7:2587",
        "POSTLANE_SMTP_PORT_2587_TCP": "tcp://10.0.0.7:2587",
        "POSTLANE_SMTP_PORT_2587_TCP_ADDR": "10.0.0.7",
        "POSTLANE_HTTP_PORT_8025_TCP_PROTO": "tcp",
    }
    config = load_config(None, env=links, cwd=tmp_path)
    assert config.smtp.listen == "127.0.0.1:2587"


@pytest.mark.parametrize(
    ("delivery", "reserve"),
    [
        ({"concurrency": 1}, 0),  # one slot: nothing to keep aside
        ({"concurrency": 2}, 1),
        ({"concurrency": 100}, 10),  # a tenth by default
        ({"concurrency": 100, "high_reserve": 0}, 0),
        ({"concurrency": 100, "high_reserve": 30}, 30),
        ({"concurrency": 4, "high_reserve": 9}, 3),  # never every slot
    ],
)
def test_the_high_lane_reserve_defaults_to_a_tenth_of_the_slots(
    delivery: dict[str, int], reserve: int
) -> None:
    assert config_from_dict({"delivery": delivery}).delivery.reserve_for_high == reserve


def test_the_http_listeners_limits_come_from_the_http_section() -> None:
    from postlane.auth import Tokens
    from postlane.ingest.server import HttpLimits, default_max_connections

    http = {
        "header_timeout": "3s",
        "keep_alive": "2s",
        "body_timeout": "7s",
        "max_connections": 7,
        "max_request_bytes": "10MB",
        "session_lifetime": "1h",
    }
    config = config_from_dict({"http": http})
    limits = HttpLimits.from_config(config)
    assert (limits.header_timeout, limits.keep_alive, limits.body_timeout) == (3.0, 2, 7.0)
    assert (limits.max_connections, limits.request_bytes) == (7, 10_000_000)
    assert Tokens.from_config(config.http).sessions.lifetime == 3600.0
    defaults = HttpLimits.from_config(config_from_dict({}))
    assert defaults.max_connections == default_max_connections()
    assert defaults.request_bytes is None
    with pytest.raises(ConfigError, match=r"http\.header_timeout"):
        config_from_dict({"http": {"header_timeout": "0s"}})


WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_webhook_endpoints_read_variables_and_secret_files_and_never_show_the_secret(
    tmp_path: Path,
) -> None:
    (tmp_path / "hook.secret").write_text(WHSEC + "\n")
    data = {
        "webhooks": {
            "out": [
                {"url": "${APP_HOOKS}", "secret_file": "hook.secret", "events": ["bounced"]},
                {"url": "https://crm.example.com/mail", "secret": "${CRM_SECRET}", "name": "crm"},
            ]
        }
    }
    env = {"APP_HOOKS": "https://app.example.com/hooks", "CRM_SECRET": WHSEC}
    config = config_from_dict(data, env=env, base_dir=tmp_path)
    first, second = config.webhooks_out
    assert (first.url, first.events, second.name) == (
        "https://app.example.com/hooks",
        frozenset({"bounced"}),
        "crm",
    )
    assert WHSEC not in repr(config) and WHSEC in config.secrets
    with pytest.raises(ConfigError, match=r"unknown table \[webhooks\.inbound\]") as caught:
        config_from_dict({"webhooks": {"inbound": {}, "out": data["webhooks"]["out"]}}, env=env,
                         base_dir=tmp_path)  # fmt: skip
    bad = {"webhooks": {"out": [{"url": "https://a.example/h", "secret": WHSEC[:-4] + "!!!!"}]}}
    with pytest.raises(ConfigError, match=r"webhooks\.out\[1\]\.secret") as caught:
        config_from_dict(bad)
    assert WHSEC[:-4] not in caught.value.message


def test_a_missing_tls_file_is_named(tmp_path: Path) -> None:
    """An audit's missing certificate read 'smtp.tls_cert/tls_key: cannot load ([Errno 2] No
    such file or directory)': which one?"""
    import trustme

    from postlane.ingest.smtp import server_tls_context

    cert = trustme.CA().issue_cert("localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    config = config_from_dict(
        {"smtp": {"tls_cert": "missing.pem", "tls_key": "key.pem"}}, base_dir=tmp_path
    )
    with pytest.raises(ConfigError, match=r"smtp\.tls_cert: cannot read .*missing\.pem"):
        server_tls_context(config)


# -- send tokens bound to sender domains (a security audit) -------------------------------------

SHOP_TOKEN = "Sh0pT0ken-for-the-tests"


def test_a_send_token_may_be_bound_to_sender_domains_in_an_inline_table_or_an_array(
    tmp_path: Path,
) -> None:
    """Plain strings stay tokens for any sender; a table binds its token to its senders,
    lower-cased, without a final dot, each once."""
    inline = tmp_path / "inline.toml"
    inline.write_text(
        '[http]\nsend_tokens = ["plain-token-for-the-tests", { token = "${SHOP_TOKEN}", '
        'senders = ["${SHOP_DOMAIN}", "mail.shop.example.com.", "shop.example.com"] }]\n'
    )
    array = tmp_path / "array.toml"
    array.write_text(
        '[[http.send_tokens]]\ntoken = "plain-token-for-the-tests"\n\n'
        '[[http.send_tokens]]\ntoken = "${SHOP_TOKEN}"\n'
        'senders = ["Shop.Example.com", "mail.shop.example.com.", "shop.example.com"]\n'
    )
    expected = (
        SendToken("plain-token-for-the-tests"),
        SendToken(SHOP_TOKEN, ("shop.example.com", "mail.shop.example.com")),
    )
    for path in (inline, array):
        config = load_config(
            path, env={"SHOP_TOKEN": SHOP_TOKEN, "SHOP_DOMAIN": "Shop.Example.com"}
        )
        assert config.http.send_tokens == expected
        assert SHOP_TOKEN in config.secrets and SHOP_TOKEN not in repr(config)
        # the domains are no secret: a relay or an error naming one shows it
        assert config.redact(f"smtp://mail.shop.example.com {SHOP_TOKEN}") == (
            "smtp://mail.shop.example.com ****"
        )


def test_the_environment_may_not_silently_unbind_send_tokens(tmp_path: Path) -> None:
    """An audit: POSTLANE_HTTP_SEND_TOKENS replaced the file's bound tokens without a word, and
    the bound tenant could then send from any domain."""
    path = tmp_path / "postlane.toml"
    path.write_text(
        '[http]\nsend_tokens = [{ token = "${SHOP_TOKEN}", senders = ["shop.example.com"] }]\n'
    )
    for variable in ("POSTLANE_HTTP_SEND_TOKENS", "POSTLANE_HTTP_SEND_TOKENS_FILE"):
        env = {"SHOP_TOKEN": SHOP_TOKEN, variable: str(tmp_path / "x")}
        with pytest.raises(ConfigError, match=f"^{variable} would replace") as caught:
            load_config(path, env=env)
        assert SHOP_TOKEN not in caught.value.message
    # plain tokens in the file: the environment replaces them, as any key
    path.write_text('[http]\nsend_tokens = ["plain-token-for-the-tests"]\n')
    replaced = load_config(path, env={"POSTLANE_HTTP_SEND_TOKENS": SHOP_TOKEN})
    assert [t.token for t in replaced.http.send_tokens] == [SHOP_TOKEN]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"token": SHOP_TOKEN, "senders": []}, "token 2 of 2: senders is empty"),
        ({"token": SHOP_TOKEN, "senders": ["localhost"]}, "sender 1 of 1 is not a domain"),
        ({"token": SHOP_TOKEN, "senders": ["a.example", "bad_domain.example"]}, "sender 2 of 2"),
        ({"token": SHOP_TOKEN, "senders": ["orders@shop.example.com"]}, "not an address"),
        ({"token": SHOP_TOKEN, "senders": ["*.shop.example.com"]}, "no wildcards"),
        ({"token": SHOP_TOKEN, "senders": [5]}, "sender 1 of 1 is not a domain"),
        ({"token": SHOP_TOKEN, "senders": "shop.example.com"}, "senders must be a list"),
        ({"token": SHOP_TOKEN, "sender": ["shop.example.com"]}, "did you mean senders?"),
        ({SHOP_TOKEN: ["shop.example.com"]}, "takes the keys token and senders only"),
        ({"senders": ["shop.example.com"]}, "the table has no token"),
        ({"token": 5, "senders": ["shop.example.com"]}, "token must be a string"),
        (5, "token 2 of 2: expected a token (a string) or a table"),
    ],
)
def test_a_bad_send_token_table_is_one_line_naming_the_key_and_never_the_token(
    entry: Any, problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict({"http": {"send_tokens": ["plain-token-for-the-tests", entry]}})
    message = raised.value.message
    assert message.startswith("http.send_tokens: ") and problem in message
    assert "\n" not in message
    assert SHOP_TOKEN not in message and "plain-token-for-the-tests" not in message


def test_one_token_bound_twice_to_other_senders_is_refused() -> None:
    twice = [
        {"token": SHOP_TOKEN, "senders": ["shop.example.com"]},
        {"token": SHOP_TOKEN, "senders": ["other.example"]},
    ]
    with pytest.raises(ConfigError) as raised:
        config_from_dict({"http": {"send_tokens": twice}})
    assert raised.value.message == (
        "http.send_tokens: token 2 of 2 is token 1 again, with other senders: list a token "
        "once, with all the domains it may send from"
    )


def test_smtp_users_may_be_bound_to_sender_domains() -> None:
    """``[smtp] user_senders`` binds SMTP users to the domains they may send from (lower-cased,
    the trailing dot and repeats dropped); users not named there may send from any domain."""
    config = config_from_dict(
        {
            "smtp": {
                "users": {"shop": "pass-one", "blog": "pass-two", "ops": "pass-three"},
                "user_senders": {
                    "shop": ["Shop.Example.com", "mail.shop.example.com.", "shop.example.com"],
                    "blog": ["blog.example.org"],
                },
            }
        }
    )
    assert config.smtp.user_senders == {
        "shop": ("shop.example.com", "mail.shop.example.com"),
        "blog": ("blog.example.org",),
    }


@pytest.mark.parametrize(
    ("senders", "problem"),
    [
        ({"shop": []}, "user shop: senders is empty"),
        ({"shop": ["localhost"]}, "user shop: sender 1 of 1 is not a domain"),
        ({"shop": ["orders@shop.example.com"]}, "not an address"),
        ({"shop": ["*.shop.example.com"]}, "no wildcards"),
        ({"shop": "shop.example.com"}, "user shop: senders must be a list"),
        ({"shpo": ["shop.example.com"]}, "shpo is not one of smtp.users (did you mean shop?)"),
        (["shop.example.com"], "expected a table"),
    ],
)
def test_a_bad_smtp_user_binding_is_one_line(senders: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict({"smtp": {"users": {"shop": "pass-one"}, "user_senders": senders}})
    message = raised.value.message
    assert message.startswith("smtp.user_senders") and problem in message, message
    assert "\n" not in message and "pass-one" not in message
