"""``[webhooks.ses]``, ``[webhooks.sendgrid]``, ``[webhooks.postmark]``, ``[webhooks.mailgun]``:
read with ``${VAR}`` and ``*_file`` like ``[[webhooks.out]]``, checked when the configuration is
read, never showing a secret."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from postlane.config import config_from_dict
from postlane.errors import ConfigError

TOPIC = "arn:aws:sns:eu-west-1:123456789012:postlane-feedback"
SIGNING_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"


def public_key(private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


SENDGRID_KEY = public_key(ec.generate_private_key(ec.SECP256R1()))


def test_no_provider_table_means_no_provider_endpoint() -> None:
    webhooks = config_from_dict({}).provider_webhooks
    assert (webhooks.ses, webhooks.sendgrid, webhooks.postmark, webhooks.mailgun) == (None,) * 4


def test_every_provider_reads_variables_and_files_and_never_shows_a_secret(
    tmp_path: Path,
) -> None:
    (tmp_path / "mailgun.key").write_text(SIGNING_KEY + "\n")
    (tmp_path / "postmark.password").write_text("hunter2-but-longer\n")
    data = {
        "webhooks": {
            "ses": {"topic_arns": [TOPIC, "${OTHER_TOPIC}"]},
            "sendgrid": {"verification_key": "${SENDGRID_KEY}", "max_age": "10m"},
            "postmark": {"username": "postmark", "password_file": "postmark.password"},
            "mailgun": {"signing_key_file": "mailgun.key"},
        }
    }
    other = "arn:aws:sns:us-east-1:123456789012:other"
    env = {"OTHER_TOPIC": other, "SENDGRID_KEY": SENDGRID_KEY}
    config = config_from_dict(data, env=env, base_dir=tmp_path)
    webhooks = config.provider_webhooks
    assert webhooks.ses is not None and webhooks.ses.topic_arns == (TOPIC, other)
    assert webhooks.sendgrid is not None and webhooks.sendgrid.max_age == 600.0
    assert webhooks.sendgrid.public_key.curve.name == "secp256r1"
    assert webhooks.postmark is not None
    assert (webhooks.postmark.username, webhooks.postmark.password) == (
        "postmark",
        "hunter2-but-longer",
    )
    assert webhooks.mailgun is not None and webhooks.mailgun.signing_key == SIGNING_KEY
    assert webhooks.mailgun.max_age == 300.0
    for secret in (SIGNING_KEY, "hunter2-but-longer", SENDGRID_KEY):
        assert secret in config.secrets
        assert secret not in repr(config)
    assert config.webhooks_out == ()  # the outbound endpoints are another table


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"ses": {}}, r"webhooks\.ses: give topic_arns"),
        ({"ses": {"topic_arns": []}}, r"webhooks\.ses\.topic_arns: expected a list"),
        ({"ses": {"topic_arns": ["arn:aws:sqs:us-east-1:123456789012:q"]}}, "not an SNS topic"),
        ({"ses": {"topic_arns": [TOPIC], "region": "x"}}, r"unknown key webhooks\.ses\.region"),
        ({"sendgrid": {}}, r"webhooks\.sendgrid: give verification_key"),
        ({"sendgrid": {"verification_key": SENDGRID_KEY, "max_age": "soon"}}, "duration"),
        ({"postmark": {"username": "u"}}, r"webhooks\.postmark: give password"),
        ({"mailgun": {"signing_key": ""}}, r"webhooks\.mailgun\.signing_key"),
        ({"mailgun": "key"}, r"webhooks\.mailgun: expected a table"),
        ({"inbound": {}}, r"unknown table \[webhooks\.inbound\]"),
    ],
)
def test_mistakes_name_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"webhooks": table})


def test_a_bad_verification_key_is_refused_without_being_shown() -> None:
    rsa_key = public_key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    for bad, why in (
        (SENDGRID_KEY[:-8] + "AAAAAAAA", "not a public key"),
        ("not base64 at all!!", "not a public key"),
        (rsa_key, "not an ECDSA P-256"),
    ):
        with pytest.raises(ConfigError, match=why) as caught:
            config_from_dict({"webhooks": {"sendgrid": {"verification_key": bad}}})
        assert bad not in caught.value.message
        assert "verification_key" in caught.value.message


@pytest.mark.parametrize(
    ("provider", "table", "key"),
    [
        ("postmark", {"username": "postmark", "password": "hunter2"}, "password"),
        ("mailgun", {"signing_key": "k3y-0f-12-chars"}, "signing_key"),
    ],
)
def test_a_secret_a_guesser_could_find_is_refused_without_being_shown(
    provider: str, table: dict[str, str], key: str
) -> None:
    """Postmark's basic auth is a password anybody may try: as the API's tokens, it needs 16
    characters or more."""
    with pytest.raises(ConfigError, match=f"webhooks.{provider}.{key}: .* at least 16") as bad:
        config_from_dict({"webhooks": {provider: table}})
    assert table[key] not in bad.value.message


def test_a_secret_and_its_file_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(SIGNING_KEY)
    table = {"mailgun": {"signing_key": SIGNING_KEY, "signing_key_file": "k"}}
    with pytest.raises(ConfigError, match="signing_key or") as caught:
        config_from_dict({"webhooks": table}, base_dir=tmp_path)
    assert SIGNING_KEY not in caught.value.message


def test_an_unset_variable_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"webhooks\.mailgun\.signing_key: .*MAILGUN_KEY"):
        config_from_dict({"webhooks": {"mailgun": {"signing_key": "${MAILGUN_KEY}"}}})
