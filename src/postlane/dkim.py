"""DKIM signing (RFC 6376) of outgoing mail, per sender domain, with keys read from files.

Mail that leaves through a relay or straight to MX hosts carries our domain's signature only if
we put it there; receivers (Gmail and Yahoo require it of bulk senders) check it against the key
published in DNS at ``SELECTOR._domainkey.DOMAIN``. Provider APIs (SendGrid, Postmark, Mailgun,
SES) sign with the keys set up in the provider's console instead.

- :class:`DkimSigner` holds one key per sender domain and signs with dkimpy: ``rsa-sha256``,
  ``relaxed/relaxed`` canonicalisation (survives the header re-folding and whitespace changes
  relays make), the header fields of :data:`SIGNED_HEADERS` that the message has, ``From`` and
  the other fields that must never be added afterwards "oversigned" (a second, empty entry in
  ``h=``, so a field added later breaks the signature). The signature is prepended to the stored
  bytes at each attempt; the stored message itself is never changed.
- The signing domain is the ``From`` header's (what DMARC aligns with), else the envelope
  sender's; a key for a parent domain signs its subdomains (``d=example.com`` for
  ``news.example.com``, aligned under DMARC's relaxed mode). Mail from a domain without a key
  goes unsigned.
- :class:`SigningTransport` wraps any transport (the SMTP relay's) so it sends signed mail;
  :class:`~postlane.transports.mx.MXTransport` takes the signer directly.
- :func:`generate_key` makes a key pair for ``postlane dkim keygen DOMAIN``: the private key
  (PEM) and the DNS TXT record to publish.

Signing costs about 9 ms of CPU for a 2048-bit key (dkimpy's RSA is pure Python), so it runs in
a worker thread, off the event loop that every other delivery shares.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import NamedTuple

import dkim
import dkim.crypto

from postlane.errors import ConfigError, PostlaneError
from postlane.transports.base import BaseTransport, Envelope, PauseCheck, Response, Transport

__all__ = [
    "SIGNED_HEADERS",
    "DkimKey",
    "DkimSigner",
    "GeneratedKey",
    "SigningTransport",
    "dns_record_name",
    "generate_key",
    "valid_domain",
    "zone_file_entry",
]

#: header fields signed when present (RFC 6376 5.4.1's list, trimmed to what our mail carries)
SIGNED_HEADERS = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
#: fields signed one extra time, so that adding one later invalidates the signature (a second
#: From or Subject is the classic way to abuse a valid signature)
OVERSIGNED_HEADERS = ("from", "to", "cc", "subject", "date", "message-id", "reply-to")
KEY_BITS = 2048


@dataclass(frozen=True)
class DkimKey:
    """One sender domain's key: ``d=`` domain, ``s=`` selector, and the PEM private key."""

    domain: str
    selector: str
    private_key: bytes = dataclasses.field(repr=False)


class GeneratedKey(NamedTuple):
    """What :func:`generate_key` returns: the private key to keep, the TXT record to publish."""

    private_pem: bytes
    #: the TXT record's value: ``v=DKIM1; k=rsa; p=<base64 public key>``
    dns_record: str


def dns_record_name(domain: str, selector: str) -> str:
    """Where the public key is published: ``SELECTOR._domainkey.DOMAIN``."""
    return f"{selector}._domainkey.{domain.lower().rstrip('.')}"


class DkimSigner:
    """Signs messages with the key of their sender domain (see the module docstring)."""

    def __init__(self, keys: Iterable[DkimKey]) -> None:
        self.keys = {key.domain.lower().rstrip("."): key for key in keys}

    @classmethod
    def from_files(
        cls, keys: Mapping[str, tuple[str, str | Path]], *, base_dir: Path | None = None
    ) -> DkimSigner:
        """Keys from ``{domain: (selector, path to PEM private key)}`` (the shape of a
        ``[dkim.DOMAIN]`` table with ``selector`` and ``private_key``), read and checked now:
        a missing or unreadable key is a :class:`ConfigError` at start, not a failed send."""
        loaded = []
        for domain, (selector, path) in keys.items():
            where = f"dkim.{domain}"
            if not _valid_selector(selector):
                raise ConfigError(f"{where}.selector: {selector!r} is not a valid selector")
            file = Path(path).expanduser()
            if base_dir is not None and not file.is_absolute():
                file = base_dir / file
            try:
                pem = file.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"{where}.private_key: cannot read {file}: {exc.strerror}"
                ) from None
            try:
                dkim.crypto.parse_pem_private_key(pem)
            except Exception as exc:  # dkimpy raises its own UnparsableKeyError, untyped
                raise ConfigError(
                    f"{where}.private_key: {file} is not a PEM RSA private key ({exc})"
                ) from None
            loaded.append(DkimKey(domain.lower().rstrip("."), selector, pem))
        return cls(loaded)

    def key_for(self, domain: str) -> DkimKey | None:
        """The key of ``domain``, else of its nearest parent domain that has one."""
        labels = domain.lower().rstrip(".").split(".")
        for start in range(len(labels) - 1):
            key = self.keys.get(".".join(labels[start:]))
            if key is not None:
                return key
        return None

    def sign(self, content: bytes, sender_domain: str) -> bytes:
        """``content`` with a DKIM-Signature header prepended, signed with the key of
        ``sender_domain`` (or a parent's); unchanged when there is no such key."""
        key = self.key_for(sender_domain)
        if key is None:
            return content
        signer = dkim.DKIM(content, linesep=b"\r\n")
        occurs = Counter(name.lower() for name, _ in signer.headers)
        # each field as often as it occurs (the verifier takes instances from the bottom up)
        include = [name.encode() for name in SIGNED_HEADERS for _ in range(occurs[name.encode()])]
        if b"from" not in include:  # RFC 6376 requires From; without one, there is no signing
            return content
        # a name listed once more than the field occurs signs that no other instance exists
        # (RFC 6376 5.4.2): one added in transit, or a Reply-To/Cc the message never had, breaks
        # the signature
        include += [name.encode() for name in OVERSIGNED_HEADERS]
        signature: bytes = signer.sign(
            key.selector.encode(),
            key.domain.encode(),
            key.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )
        return signature + content

    def signing_domain(self, envelope: Envelope) -> str | None:
        """The domain whose key signs ``envelope``: the From header's if we have a key for it
        (DMARC alignment), else the envelope sender's, else None."""
        candidates = [_from_domain(envelope.content), envelope.sender.rpartition("@")[2]]
        for domain in candidates:
            if domain and self.key_for(domain) is not None:
                return domain
        return None

    async def sign_envelope(self, envelope: Envelope) -> Envelope:
        """The envelope with its content signed (in a worker thread: signing is CPU-bound)."""
        domain = self.signing_domain(envelope)
        if domain is None:
            return envelope
        signed = await asyncio.to_thread(self.sign, envelope.content, domain)
        return dataclasses.replace(envelope, content=signed)


class SigningTransport(BaseTransport):
    """A transport that DKIM-signs each message, then hands it to ``inner`` (e.g. the SMTP
    relay transport); everything else, its name, shared destination and routes, is ``inner``'s."""

    def __init__(self, inner: Transport, signer: DkimSigner) -> None:
        self.inner = inner
        self.signer = signer
        self.name = inner.name
        self.shared_destination = inner.shared_destination

    def shared_destination_for(self, lane: str, sender: str, recipient_domain: str) -> str | None:
        return self.inner.shared_destination_for(lane, sender, recipient_domain)

    def follow_pauses(self, is_paused: PauseCheck) -> None:
        self.inner.follow_pauses(is_paused)

    async def send(self, envelope: Envelope) -> list[Response]:
        return await self.inner.send(await self.signer.sign_envelope(envelope))

    async def close(self) -> None:
        await self.inner.close()


def generate_key(domain: str, selector: str, *, bits: int = KEY_BITS) -> GeneratedKey:
    """A new RSA key pair for ``domain``: the private key (PKCS#8 PEM, unencrypted: keep it
    mode 0600) and the TXT record value to publish at :func:`dns_record_name`.

    Uses the ``cryptography`` package when installed, else the ``openssl`` command (what
    dkimpy's own ``dknewkey`` does); raises :class:`PostlaneError` when neither is there.
    """
    if not _valid_selector(selector):
        raise PostlaneError(f"{selector!r} is not a valid DKIM selector (letters, digits, '-')")
    if bits < 1024:
        raise PostlaneError("DKIM keys shorter than 1024 bits are refused by receivers")
    try:
        private_pem, public_der = _generate_with_cryptography(bits)
    except ImportError:
        private_pem, public_der = _generate_with_openssl(bits)
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(public_der).decode('ascii')}"
    return GeneratedKey(private_pem, record)


def zone_file_entry(domain: str, selector: str, record: str) -> str:
    """The record as a zone file line: the value split into quoted strings of at most 255
    characters (a TXT string's limit; a 2048-bit key's record is about 400)."""
    chunks = [record[i : i + 255] for i in range(0, len(record), 255)]
    quoted = " ".join(f'"{chunk}"' for chunk in chunks)
    return f"{dns_record_name(domain, selector)}. IN TXT ( {quoted} )"


def _generate_with_cryptography(bits: int) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_der


def _generate_with_openssl(bits: int) -> tuple[bytes, bytes]:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise PostlaneError(
            "generating a DKIM key needs the 'cryptography' package or the openssl command"
        )
    with tempfile.TemporaryDirectory() as folder:
        key_file = Path(folder) / "private.pem"
        try:
            generate = [openssl, "genpkey", "-algorithm", "RSA", "-out", str(key_file)]
            subprocess.run(
                [*generate, "-pkeyopt", f"rsa_keygen_bits:{bits}"],
                check=True,
                capture_output=True,
                timeout=120,
            )
            public_der = subprocess.run(
                [openssl, "pkey", "-in", str(key_file), "-pubout", "-outform", "DER"],
                check=True,
                capture_output=True,
                timeout=60,
            ).stdout
        except (subprocess.SubprocessError, OSError) as exc:
            raise PostlaneError(f"openssl could not generate a DKIM key: {exc}") from exc
        return key_file.read_bytes(), public_der


def valid_domain(domain: str) -> bool:
    """A host name: dot-separated DNS labels of letters, digits and hyphens, at least two."""
    labels = domain.split(".")
    return (
        len(labels) >= 2
        and len(domain) <= 253
        and all(
            label
            and len(label) <= 63
            and not label.startswith("-")
            and not label.endswith("-")
            and label.replace("-", "").isalnum()
            and label.isascii()
            for label in labels
        )
    )


def _valid_selector(selector: str) -> bool:
    """Selectors are DNS labels (dots allowed between them): letters, digits and hyphens."""
    labels = selector.split(".")
    return all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    )


def _from_domain(content: bytes) -> str | None:
    """The domain of the first address in the From header, or None."""
    head = content.split(b"\r\n\r\n", 1)[0]
    values = BytesHeaderParser().parsebytes(head + b"\r\n\r\n").get_all("from", [])
    for _, address in getaddresses([str(value) for value in values]):
        if "@" in address:
            return address.rpartition("@")[2].lower()
    return None
