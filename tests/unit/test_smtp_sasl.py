"""The SASL exchanges of SMTP AUTH (PLAIN and LOGIN): what the server asks, what it reads, and
its replies to what goes wrong (aiosmtpd's)."""

from __future__ import annotations

import asyncio
import base64

import pytest

from postlane.ingest.smtp_sasl import SaslExchange


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def exchange(
    mechanism: str, initial: str | None, answers: list[bytes | None]
) -> tuple[tuple[str, str] | None, list[str]]:
    """The credentials read, and every line the server said (334 challenges and errors)."""
    said: list[str] = []
    pending = list(answers)

    async def ask(challenge: str) -> bytes | None:
        said.append(challenge)
        return pending.pop(0)

    credentials = asyncio.run(SaslExchange(ask, said.append).credentials(mechanism, initial))
    assert not pending, "every answer is read"
    return credentials, said


def test_plain_with_an_initial_response() -> None:
    assert exchange("PLAIN", b64(b"\x00app\x00s3cret"), []) == (("app", "s3cret"), [])


def test_plain_asked_for() -> None:
    answer = b64(b"\x00app\x00s3cret").encode() + b"\r\n"
    assert exchange("PLAIN", None, [answer]) == (("app", "s3cret"), ["334 "])


def test_login_asks_the_user_name_then_the_password() -> None:
    answers = [b64(b"app").encode() + b"\r\n", b64(b"s3cret").encode() + b"\r\n"]
    assert exchange("LOGIN", None, answers) == (
        ("app", "s3cret"),
        ["334 " + b64(b"User Name\x00"), "334 " + b64(b"Password\x00")],
    )


def test_login_with_the_user_name_as_initial_response() -> None:
    answers = [b64(b"s3cret").encode()]
    assert exchange("LOGIN", b64(b"app"), answers) == (
        ("app", "s3cret"),
        ["334 " + b64(b"Password\x00")],
    )


def test_undecodable_text_is_read_as_replacement_characters() -> None:
    assert exchange("PLAIN", b64(b"\x00\xffapp\x00pw"), []) == (("\ufffdapp", "pw"), [])


@pytest.mark.parametrize(
    ("mechanism", "initial", "answers", "reply"),
    [
        ("PLAIN", "not base64!", [], "501 5.5.2 Can't decode base64"),
        ("PLAIN", b64(b"app\x00s3cret"), [], "501 5.5.2 Can't split auth value"),
        ("PLAIN", None, [b"*\r\n"], "501 5.7.0 Auth aborted"),
        ("LOGIN", None, [b"%%%\r\n"], "501 5.5.2 Can't decode base64"),
        ("LOGIN", b64(b"app"), [b"*"], "501 5.7.0 Auth aborted"),
    ],
)
def test_refusals(mechanism: str, initial: str | None, answers: list[bytes], reply: str) -> None:
    credentials, said = exchange(mechanism, initial, list(answers))
    assert credentials is None
    assert said[-1] == reply


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_a_connection_gone_ends_the_exchange_without_a_reply(mechanism: str) -> None:
    credentials, said = exchange(mechanism, None, [None])
    assert credentials is None
    assert [line[:4] for line in said] == ["334 "]
