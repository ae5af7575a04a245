"""DKIM: what postlane signs verifies with dkimpy's verifier against the published key.

Two paths are exercised end to end: through the SMTP relay (wrapped in SigningTransport) and
straight to an MX host (MXTransport's signer). The relay test looks the key up through dkimpy's
documented ``dnsfunc`` hook; the MX test publishes the generated record in the test DNS server
and looks it up there over the wire, as a receiver would.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import dkim
import dns.resolver
import pytest
from aiosmtpd.smtp import SMTP as SMTPServer

import postlane.dkim
from postlane.classify import ReplyClass
from postlane.config import DeliveryConfig
from postlane.dkim import (
    DkimKey,
    DkimSigner,
    GeneratedKey,
    SigningTransport,
    dns_record_name,
    generate_key,
    zone_file_entry,
)
from postlane.errors import ConfigError
from postlane.transports.base import Envelope
from postlane.transports.mx import MXTransport
from postlane.transports.smtp import RelaySettings, SMTPRelayTransport
from tests.conftest import ScriptedHandler, SMTPPeer
from tests.dns_server import DNSServer, running_dns_server


@pytest.fixture(scope="module")
def key() -> GeneratedKey:
    return generate_key("sender.test", "pl2026")


@pytest.fixture
def signer(key: GeneratedKey) -> DkimSigner:
    return DkimSigner([DkimKey("sender.test", "pl2026", key.private_pem)])


def published(key: GeneratedKey) -> Callable[..., bytes | None]:
    """dkimpy's DNS hook: the TXT record at pl2026._domainkey.sender.test, nothing else."""
    name = dns_record_name("sender.test", "pl2026") + "."

    def dnsfunc(queried: bytes, timeout: float = 5) -> bytes | None:
        return key.dns_record.encode() if queried.decode() == name else None

    return dnsfunc


def message(sender: str = "Shop <app@sender.test>", body: bytes = b"Your order shipped.") -> bytes:
    return (
        (
            f"From: {sender}\r\nTo: ann@example.test\r\nSubject: Shipped\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <m1@sender.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        ).encode()
        + body
        + b"\r\n.leading dot\r\n"
    )


def envelope(content: bytes, sender: str = "bounces@sender.test") -> Envelope:
    return Envelope(
        queue_id="q1",
        sender=sender,
        recipients=("ann@example.test",),
        content=content,
        message_id="<m1@sender.test>",
    )


async def test_a_relay_bound_message_verifies_against_the_published_key(
    smtp_peer: SMTPPeer, signer: DkimSigner, key: GeneratedKey
) -> None:
    relay = SMTPRelayTransport(
        RelaySettings.from_url(smtp_peer.url, DeliveryConfig(helo_name="postlane.test"))
    )
    transport = SigningTransport(relay, signer)
    assert (transport.name, transport.shared_destination) == (relay.name, "relay")
    try:
        [response] = await transport.send(envelope(message()))
    finally:
        await transport.close()
    assert response.verdict().cls is ReplyClass.DELIVERED
    received = smtp_peer.handler.received[0].content
    assert received.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert dkim.verify(received, dnsfunc=published(key))
    tampered = received.replace(b"Your order shipped.", b"Your order was cancelled.")
    assert not dkim.verify(tampered, dnsfunc=published(key))


@pytest.fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    async with running_dns_server({}) as server:
        yield server


async def test_an_mx_bound_message_verifies_through_dns(
    dns_server: DNSServer, signer: DkimSigner, key: GeneratedKey
) -> None:
    handler = ScriptedHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTPServer(handler, hostname="mx.example.test", loop=loop), "127.0.0.2", 0
    )
    dns_server.zone.update(
        {
            "example.test": {"MX": [(10, "mx.example.test")]},
            "mx.example.test": {"A": ["127.0.0.2"]},
            dns_record_name("sender.test", "pl2026"): {"TXT": [key.dns_record]},
        }
    )
    transport = MXTransport(
        port=server.sockets[0].getsockname()[1], resolver=dns_server.resolver(), signer=signer
    )
    try:
        [response] = await transport.send(envelope(message()))
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()
    assert response.verdict().cls is ReplyClass.DELIVERED
    received = handler.received[0].content

    def over_dns(name: bytes, timeout: float = 5) -> bytes | None:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = [dns_server.host], dns_server.port
        answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        return b"".join(b"".join(record.strings) for record in answer)

    # the verifier's lookups are blocking: a thread, while the DNS server answers on this loop
    assert await asyncio.to_thread(dkim.verify, received, dnsfunc=over_dns)
    tampered = received.replace(b"Subject: Shipped", b"Subject: Refund")
    assert not await asyncio.to_thread(dkim.verify, tampered, dnsfunc=over_dns)


async def test_the_from_domain_signs_and_a_parent_domain_key_covers_subdomains(
    signer: DkimSigner, key: GeneratedKey
) -> None:
    content = message(sender="News <news@mail.sender.test>")
    signed = await signer.sign_envelope(envelope(content, sender="bounce@elsewhere.test"))
    assert b" d=sender.test;" in signed.content
    assert dkim.verify(signed.content, dnsfunc=published(key))


async def test_mail_from_a_domain_without_a_key_goes_unsigned(signer: DkimSigner) -> None:
    original = envelope(message(sender="someone@other.test"), sender="x@other.test")
    assert await signer.sign_envelope(original) is original


async def test_from_and_subject_are_oversigned(signer: DkimSigner, key: GeneratedKey) -> None:
    signed = (await signer.sign_envelope(envelope(message()))).content
    # a second From added after signing (the classic abuse of a valid signature) breaks it
    assert not dkim.verify(b"From: attacker@evil.test\r\n" + signed, dnsfunc=published(key))


#: the fields that must never be added to a signed message, so postlane signs each once more than
#: it occurs (RFC 6376 5.4.2; OpenDKIM's OversignHeaders). Written out here, not read from
#: postlane.dkim: dropping one there, or the oversigning itself, must fail these tests.
OVERSIGNED = ("from", "to", "cc", "subject", "date", "message-id", "reply-to")
#: what an attacker would add to a message carrying a valid signature
FORGED = {
    "From": "Shop <refunds@attacker.test>",
    "To": "victim@example.test",
    "Cc": "archive@attacker.test",
    "Subject": "Action needed: confirm your refund",
    "Date": "Fri, 02 Jan 2026 00:00:00 +0000",
    "Message-ID": "<forged@attacker.test>",
    "Reply-To": "refunds@attacker.test",
}


def every_oversigned_field() -> bytes:
    """:func:`message` with the two oversigned fields it lacks: Cc and Reply-To."""
    return message().replace(
        b"Subject:", b"Cc: bo@example.test\r\nReply-To: help@sender.test\r\nSubject:"
    )


def two_to_fields() -> bytes:
    """A raw message may carry a field twice (RFC 5322 forbids it; postlane takes raw mail)."""
    return message().replace(
        b"To: ann@example.test\r\n", b"To: ann@example.test\r\nTo: bo@x.test\r\n"
    )


def field_names(content: bytes) -> list[str]:
    """The header field names of ``content``, lower-cased, in order."""
    head = content.split(b"\r\n\r\n", 1)[0]
    return [
        line.split(b":", 1)[0].strip().lower().decode()
        for line in head.split(b"\r\n")
        if line and not line[:1].isspace()
    ]


def signed_field_names(signed: bytes) -> list[str]:
    """The ``h=`` tag of the DKIM-Signature on top of ``signed``: the signed names, in order."""
    assert signed.startswith(b"DKIM-Signature:")
    lines = signed.split(b"\r\n")
    field = lines[0] + b"".join(line for line in lines[1:] if line[:1] in (b" ", b"\t"))
    tags = dict(
        tag.strip().split(b"=", 1) for tag in field.split(b":", 1)[1].split(b";") if tag.strip()
    )
    return [name.strip().lower().decode() for name in tags[b"h"].split(b":")]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(every_oversigned_field(), id="each field once"),
        pytest.param(message(), id="no Cc, no Reply-To"),
        pytest.param(two_to_fields(), id="To twice"),
    ],
)
def test_each_field_that_must_not_be_added_is_signed_once_more_than_it_occurs(
    signer: DkimSigner, content: bytes
) -> None:
    signed = signer.sign(content, "sender.test")
    occurs = Counter(field_names(content))
    listed = Counter(signed_field_names(signed))
    assert {name: listed[name] for name in OVERSIGNED} == {
        name: occurs[name] + 1 for name in OVERSIGNED
    }


@pytest.mark.parametrize("field", list(FORGED))
def test_a_field_added_after_signing_breaks_the_signature(
    signer: DkimSigner, key: GeneratedKey, field: str
) -> None:
    signed = signer.sign(every_oversigned_field(), "sender.test")
    assert dkim.verify(signed, dnsfunc=published(key))
    # on top, above the signature: a verifier takes signed fields from the bottom up, so only an
    # extra entry in h= (signing "no further field") makes it count this one
    forged = f"{field}: {FORGED[field]}\r\n".encode() + signed
    assert not dkim.verify(forged, dnsfunc=published(key))


@pytest.mark.parametrize(
    ("content", "field"),
    [
        pytest.param(message(), "Reply-To", id="Reply-To to a message without one"),
        pytest.param(message(), "Cc", id="Cc to a message without one"),
        pytest.param(two_to_fields(), "To", id="a third To"),
    ],
)
def test_a_field_added_where_there_was_none_or_two_breaks_the_signature(
    signer: DkimSigner, key: GeneratedKey, content: bytes, field: str
) -> None:
    signed = signer.sign(content, "sender.test")
    assert dkim.verify(signed, dnsfunc=published(key))
    forged = f"{field}: {FORGED[field]}\r\n".encode() + signed
    assert not dkim.verify(forged, dnsfunc=published(key))


def test_keys_are_read_from_files_and_bad_ones_fail_at_start(
    tmp_path: Path, key: GeneratedKey
) -> None:
    (tmp_path / "sender.pem").write_bytes(key.private_pem)
    signer = DkimSigner.from_files({"Sender.Test": ("pl2026", "sender.pem")}, base_dir=tmp_path)
    assert signer.key_for("sender.test") is not None
    with pytest.raises(ConfigError, match=r"dkim.other.test.private_key: cannot read"):
        DkimSigner.from_files({"other.test": ("s1", tmp_path / "missing.pem")})
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM RSA private key"):
        DkimSigner.from_files({"other.test": ("s1", tmp_path / "junk.pem")})
    with pytest.raises(ConfigError, match="selector"):
        DkimSigner.from_files({"other.test": ("bad selector!", tmp_path / "sender.pem")})


def test_the_dns_record_and_its_zone_file_entry(key: GeneratedKey) -> None:
    assert dns_record_name("Sender.Test.", "pl2026") == "pl2026._domainkey.sender.test"
    assert key.dns_record.startswith("v=DKIM1; k=rsa; p=MII")
    entry = zone_file_entry("sender.test", "pl2026", key.dns_record)
    assert entry.startswith('pl2026._domainkey.sender.test. IN TXT ( "v=DKIM1; k=rsa; p=')
    strings = entry.split('"')[1::2]
    assert all(len(s) <= 255 for s in strings) and "".join(strings) == key.dns_record
    assert key.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_keys_can_be_generated_with_the_openssl_command(monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("openssl") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("the openssl command is missing, but CI must run this test")
        pytest.skip("needs the openssl command")

    def no_cryptography(bits: int) -> tuple[bytes, bytes]:
        raise ImportError("cryptography")

    monkeypatch.setattr(postlane.dkim, "_generate_with_cryptography", no_cryptography)
    generated = generate_key("sender.test", "ossl")
    signer = DkimSigner([DkimKey("sender.test", "ossl", generated.private_pem)])
    signed = signer.sign(message(), "sender.test")
    name = b"ossl._domainkey.sender.test."
    assert dkim.verify(
        signed, dnsfunc=lambda q, timeout=5: generated.dns_record.encode() if q == name else None
    )


def test_keygen_writes_a_private_key_and_prints_the_record_that_verifies(tmp_path: Path) -> None:
    from tests.integration.test_cli import ok, one_line_error, postlane

    printed = ok("dkim", "keygen", "Sender.Test", "--selector", "pl2026", cwd=tmp_path)
    path = tmp_path / "dkim" / "sender.test.pem"
    assert f"wrote {path.relative_to(tmp_path)}" in printed
    assert path.stat().st_mode & 0o777 == 0o600
    [entry] = [line for line in printed.splitlines() if "IN TXT" in line]
    assert entry.startswith("pl2026._domainkey.sender.test. IN TXT (")
    record = "".join(entry.split('"')[1::2])  # what a resolver returns: the strings joined

    # the key file is what [dkim."sender.test"] private_key points at, as printed
    assert 'private_key = "dkim/sender.test.pem"' in printed
    signer = DkimSigner.from_files(
        {"sender.test": ("pl2026", "dkim/sender.test.pem")}, base_dir=tmp_path
    )
    signed = signer.sign(message(), "sender.test")
    name = b"pl2026._domainkey.sender.test."
    assert dkim.verify(signed, dnsfunc=lambda q, timeout=5: record.encode() if q == name else None)

    # never overwrites a key in use; refuses a bad domain with one line
    one_line_error(
        postlane("dkim", "keygen", "sender.test", "--selector", "pl2026", cwd=tmp_path), "exists"
    )
    one_line_error(postlane("dkim", "keygen", "not a domain", cwd=tmp_path), "not a domain name")
    as_json = json.loads(
        ok("dkim", "keygen", "other.test", "--out", "keys/o.pem", "--json", cwd=tmp_path)
    )
    assert as_json["record_name"] == "postlane._domainkey.other.test"
    assert as_json["record"].startswith("v=DKIM1; k=rsa; p=")
    assert (tmp_path / "keys" / "o.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
