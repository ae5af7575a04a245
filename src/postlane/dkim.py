"""DKIM signing (RFC 6376) of outgoing mail, per sender domain, with keys read from files.

Mail that leaves through a relay or straight to MX hosts carries our domain's signature only if
we put it there; receivers (Gmail and Yahoo require it of bulk senders) check it against the key
published in DNS at ``SELECTOR._domainkey.DOMAIN``. Provider APIs (SendGrid, Postmark, Mailgun,
SES) sign with the keys set up in the provider's console instead.

- :class:`DkimSigner` holds each sender domain's keys: an RSA key (``rsa-sha256``) and, beside
  it, an Ed25519 key (``ed25519-sha256``, RFC 8463). With both, each message gets two
  DKIM-Signature fields ("dual signing", what RFC 8463 advises while verifiers learn Ed25519): a
  receiver that knows Ed25519 checks the short, fast signature, the others the RSA one.
- Every signature is ``relaxed/relaxed`` (survives the header re-folding and whitespace changes
  relays make), over the header fields of :data:`SIGNED_HEADERS` that the message has, with
  ``From`` and the other fields that must never be added afterwards "oversigned" (listed once
  more than they occur in ``h=``, so a field added later breaks the signature), and so are
  ``List-Unsubscribe`` and ``List-Unsubscribe-Post`` when the message has them (RFC 8058: a
  one-click link must be signed, and no second one may slip in). The signatures are prepended
  to the stored bytes at each attempt; the stored message itself is never changed.
- The signing domain is the ``From`` header's (what DMARC aligns with), else the envelope
  sender's; a key for a parent domain signs its subdomains (``d=example.com`` for
  ``news.example.com``, aligned under DMARC's relaxed mode). Mail from a domain without a key
  goes unsigned.
- :class:`SigningTransport` wraps any transport (the SMTP relay's) so it sends signed mail;
  :class:`~postlane.transports.mx.MXTransport` takes the signer directly.
- :func:`generate_key` makes a key pair for ``postlane dkim keygen DOMAIN``: the private key
  (PEM) and the DNS TXT record to publish.

Canonicalisation and header selection are written here (a few regular expressions over the
whole body); the private-key operation is OpenSSL's, through ``cryptography``: about 0.3 ms for
RSA-2048, where dkimpy's pure-Python RSA took 8 ms of the 8.5 ms it spent per message. Signing
runs in the signer's own thread, and OpenSSL's RSA releases the GIL, so the event loop that every
other delivery shares keeps running meanwhile (docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import getaddresses
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from postlane.clock import Clock, SystemClock
from postlane.errors import ConfigError, PostlaneError
from postlane.transports.base import Envelope, Response, Transport, WrappingTransport
from postlane.waits import OffLoop

if TYPE_CHECKING:
    from postlane.config import DkimKey as DkimTable

__all__ = [
    "SIGNED_HEADERS",
    "DkimKey",
    "DkimSigner",
    "GeneratedKey",
    "KeyType",
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
#: fields signed one extra time when the message has them: a second List-Unsubscribe added in
#: transit, above the signed one, would otherwise pass and could be the link a client shows
#: (RFC 8058 4 requires both fields signed); a message without them may still gain them (a
#: mailing list it is forwarded to)
OVERSIGNED_WHEN_PRESENT = ("list-unsubscribe", "list-unsubscribe-post")
KEY_BITS = 2048
#: RFC 8301: verifiers refuse RSA keys shorter than this
MIN_RSA_BITS = 1024
#: where a DKIM-Signature field is folded (RFC 5322's recommended line length)
LINE_LENGTH = 78

_SIGNED = tuple(name.encode() for name in SIGNED_HEADERS)
_OVERSIGNED = tuple(name.encode() for name in OVERSIGNED_HEADERS)
_OVERSIGNED_WHEN_PRESENT = tuple(name.encode() for name in OVERSIGNED_WHEN_PRESENT)
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
#: a run of spaces and tabs other than a single space (which relaxed canonicalisation keeps)
_WSP_RUN = re.compile(rb" [ \t]+|\t[ \t]*")
_WSP_AT_LINE_END = re.compile(rb"[ \t]+\r\n")


class KeyType(StrEnum):
    """A key's kind: the ``k=`` tag of its DNS record; it signs with ``a=KIND-sha256``."""

    RSA = "rsa"
    ED25519 = "ed25519"

    @property
    def algorithm(self) -> str:
        """The ``a=`` tag of the signatures this kind of key makes."""
        return f"{self.value}-sha256"


PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class DkimKey:
    """One key of a sender domain: ``d=`` domain, ``s=`` selector, and the PEM private key (RSA
    or Ed25519, read when the key is made: a :class:`ValueError` says why one is unusable)."""

    domain: str
    selector: str
    private_key: bytes = dataclasses.field(repr=False)
    #: what the PEM holds
    kind: KeyType = dataclasses.field(init=False)
    _private: PrivateKey = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        private = _load_private_key(self.private_key)
        kind = KeyType.RSA if isinstance(private, rsa.RSAPrivateKey) else KeyType.ED25519
        object.__setattr__(self, "domain", self.domain.lower().rstrip("."))
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "_private", private)

    @property
    def dns_record(self) -> str:
        """The TXT record to publish at :func:`dns_record_name`: ``v=DKIM1; k=rsa; p=...``."""
        return _dns_record(self._private)

    def sign(self, data: bytes) -> bytes:
        """The ``b=`` signature of the canonicalised header data."""
        if isinstance(self._private, rsa.RSAPrivateKey):
            return self._private.sign(data, padding.PKCS1v15(), hashes.SHA256())
        # RFC 8463 3: Ed25519 (PureEdDSA) signs the SHA-256 hash of the data, not the data
        return self._private.sign(hashlib.sha256(data).digest())


class GeneratedKey(NamedTuple):
    """What :func:`generate_key` returns: the private key to keep, the TXT record to publish."""

    private_pem: bytes
    #: the TXT record's value: ``v=DKIM1; k=rsa; p=<base64 public key>``
    dns_record: str


def dns_record_name(domain: str, selector: str) -> str:
    """Where the public key is published: ``SELECTOR._domainkey.DOMAIN``."""
    return f"{selector}._domainkey.{domain.lower().rstrip('.')}"


class DkimSigner:
    """Signs messages with the keys of their sender domain (see the module docstring)."""

    def __init__(self, keys: Iterable[DkimKey], *, clock: Clock | None = None) -> None:
        by_domain: dict[str, dict[KeyType, DkimKey]] = {}
        for key in keys:
            of_domain = by_domain.setdefault(key.domain, {})
            if key.kind in of_domain:
                raise ConfigError(f"dkim.{key.domain}: two {key.kind} keys (one of each kind)")
            of_domain[key.kind] = key
        #: each domain's keys, the RSA key first (its signature ends up on top)
        self.keys: dict[str, tuple[DkimKey, ...]] = {
            domain: tuple(of_domain[kind] for kind in KeyType if kind in of_domain)
            for domain, of_domain in by_domain.items()
        }
        self.clock: Clock = clock or SystemClock()
        # One thread signs, beside the event loop (OpenSSL's RSA releases the GIL): with one,
        # the loop shares the GIL with a single other thread. Measured on a loaded 2-core
        # machine, its lag p99 while signing was 13-16 ms, against 40-100 ms with the default
        # executor's six threads, for the same rate. It signs what is queued in batches of up
        # to 4 and wakes the loop once a batch (the loop's CPU per signature 0.27 -> 0.12-0.20
        # ms, benchmarks/dkim.py). It starts on first use and ends with close().
        self._thread = OffLoop("dkim-signer", batch=4)

    @classmethod
    def from_config(
        cls,
        tables: Mapping[str, DkimTable],
        *,
        base_dir: Path | None = None,
        clock: Clock | None = None,
    ) -> DkimSigner:
        """The keys of ``[dkim."DOMAIN"]`` tables (``selector`` and ``private_key``, RSA; and
        ``ed25519_selector`` and ``ed25519_private_key``), read and checked now: a missing or
        unusable key is a :class:`ConfigError` at start, not a failed send."""
        keys = []
        for domain, table in tables.items():
            where = f"dkim.{domain}"
            slots = [("", KeyType.RSA, table.selector, table.private_key)]
            if table.ed25519_private_key:
                slots.append(
                    ("ed25519_", KeyType.ED25519, table.ed25519_selector, table.ed25519_private_key)
                )
                if table.ed25519_selector == table.selector:
                    # one DNS record per selector: the other key's signatures would all fail
                    raise ConfigError(
                        f"{where}.ed25519_selector: {table.selector!r} is the RSA key's selector "
                        "too; each key needs its own (one DNS record per selector)"
                    )
            for prefix, kind, selector, path in slots:
                keys.append(_read_key(domain, kind, selector, path, f"{where}.{prefix}", base_dir))
        return cls(keys, clock=clock)

    def keys_for(self, domain: str) -> tuple[DkimKey, ...]:
        """The keys of ``domain``, else of its nearest parent domain that has any; none else."""
        labels = domain.lower().rstrip(".").split(".")
        for start in range(len(labels) - 1):
            keys = self.keys.get(".".join(labels[start:]))
            if keys:
                return keys
        return ()

    def sign(self, content: bytes, sender_domain: str) -> bytes:
        """``content`` with a DKIM-Signature field per key of ``sender_domain`` (or of a parent)
        prepended, the RSA one on top; unchanged without a key, or without a From field (RFC
        6376 requires it signed)."""
        keys = self.keys_for(sender_domain)
        if not keys:
            return content
        # what the receiver gets: the SMTP session sends CRLF line ends and a final CRLF
        sent = _as_sent(content)
        head, body = _split(sent)
        fields = _header_fields(head)
        if b"from" not in fields:
            return content
        # each field as often as it occurs (the verifier takes instances from the bottom up),
        # then once more for those that must not be added: a name listed once more than the
        # field occurs signs that no other instance exists (RFC 6376 5.4.2), so one added in
        # transit, or a Reply-To/Cc the message never had, breaks the signature
        names = [name for name in _SIGNED for _ in fields.get(name, ())]
        names += _OVERSIGNED
        names += [name for name in _OVERSIGNED_WHEN_PRESENT if name in fields]
        remaining = {name: list(fields.get(name, ())) for name in _SIGNED}
        signed_fields = b"".join(
            _relaxed_field(remaining[name].pop()) for name in names if remaining[name]
        )
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()).decode()
        timestamp = int(self.clock.now())
        signatures = [
            _signature_field(key, names, body_hash, timestamp, signed_fields) for key in keys
        ]
        return b"".join(signatures) + sent

    def signing_domain(self, envelope: Envelope) -> str | None:
        """The domain whose keys sign ``envelope``: the From header's if we have a key for it
        (DMARC alignment), else the envelope sender's, else None."""
        candidates = [_from_domain(envelope.content), envelope.sender.rpartition("@")[2]]
        for domain in candidates:
            if domain and self.keys_for(domain):
                return domain
        return None

    async def sign_envelope(self, envelope: Envelope) -> Envelope:
        """The envelope with its content signed, in the signer's thread: the RSA operation
        (OpenSSL, the GIL released) runs beside the event loop instead of stopping it."""
        domain = self.signing_domain(envelope)
        if domain is None:
            return envelope
        signed = await self._thread.run(self.sign, envelope.content, domain)
        return dataclasses.replace(envelope, content=signed)

    def close(self) -> None:
        """Let the signing thread end (signing what is queued first)."""
        self._thread.close()


class SigningTransport(WrappingTransport):
    """A transport that DKIM-signs each message, then hands it to ``inner`` (e.g. the SMTP
    relay transport); everything else, its name, shared destination and routes, is ``inner``'s."""

    def __init__(self, inner: Transport, signer: DkimSigner) -> None:
        super().__init__(inner)
        self.signer = signer

    async def send(self, envelope: Envelope) -> list[Response]:
        return await self.inner.send(await self.signer.sign_envelope(envelope))

    async def close(self) -> None:
        self.signer.close()
        await self.inner.close()


def generate_key(
    domain: str, selector: str, *, kind: KeyType = KeyType.RSA, bits: int = KEY_BITS
) -> GeneratedKey:
    """A new key pair for ``domain``: the private key (PKCS#8 PEM, unencrypted: keep it mode
    0600) and the TXT record value to publish at :func:`dns_record_name`. ``bits`` is the size
    of an RSA key; Ed25519 keys have one size."""
    if not _valid_selector(selector):
        raise PostlaneError(f"{selector!r} is not a valid DKIM selector (letters, digits, '-')")
    private: PrivateKey
    if kind is KeyType.ED25519:
        private = ed25519.Ed25519PrivateKey.generate()
    elif bits < MIN_RSA_BITS:
        raise PostlaneError("DKIM keys shorter than 1024 bits are refused by receivers")
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return GeneratedKey(private_pem, _dns_record(private))


def zone_file_entry(domain: str, selector: str, record: str) -> str:
    """The record as a zone file line: the value split into quoted strings of at most 255
    characters (a TXT string's limit; a 2048-bit key's record is about 400)."""
    chunks = [record[i : i + 255] for i in range(0, len(record), 255)]
    quoted = " ".join(f'"{chunk}"' for chunk in chunks)
    return f"{dns_record_name(domain, selector)}. IN TXT ( {quoted} )"


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


class _ShortKey(ValueError):
    """An RSA key receivers refuse."""


def _load_private_key(pem: bytes) -> PrivateKey:
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM private key without a password ({exc})") from None
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise _ShortKey(
                f"a {private.key_size}-bit RSA key, too short: receivers refuse keys under "
                f"{MIN_RSA_BITS} bits (postlane dkim keygen makes 2048-bit ones)"
            )
        return private
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private
    raise ValueError("neither an RSA nor an Ed25519 key")


def _read_key(
    domain: str, kind: KeyType, selector: str, path: str | Path, where: str, base_dir: Path | None
) -> DkimKey:
    """The key of one ``[dkim."DOMAIN"]`` slot (``where`` names it: ``dkim.DOMAIN.`` or
    ``dkim.DOMAIN.ed25519_``), or a :class:`ConfigError` naming the setting to fix."""
    if not _valid_selector(selector):
        raise ConfigError(f"{where}selector: {selector!r} is not a valid selector")
    file = Path(path).expanduser()
    if base_dir is not None and not file.is_absolute():
        file = base_dir / file
    try:
        pem = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}private_key: cannot read {file}: {exc.strerror}") from None
    name = "RSA" if kind is KeyType.RSA else "Ed25519"
    try:
        key = DkimKey(domain, selector, pem)
    except _ShortKey as exc:
        raise ConfigError(f"{where}private_key: {file} holds {exc}") from None
    except ValueError as exc:
        raise ConfigError(
            f"{where}private_key: {file} is not a PEM {name} private key ({exc})"
        ) from None
    if key.kind is not kind:
        other = "private_key" if key.kind is KeyType.RSA else "ed25519_private_key"
        raise ConfigError(f"{where}private_key: {file} holds an {key.kind} key: give it as {other}")
    return key


def _dns_record(private: PrivateKey) -> str:
    """``v=DKIM1; k=rsa; p=`` the SubjectPublicKeyInfo (RFC 6376 3.6.1), or ``k=ed25519; p=``
    the 32 bytes of the public key itself (RFC 8463 4), in base64."""
    if isinstance(private, rsa.RSAPrivateKey):
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        public = private.public_key().public_bytes(serialization.Encoding.DER, spki)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode('ascii')}"
    public = private.public_key().public_bytes_raw()
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode('ascii')}"


def _as_sent(content: bytes) -> bytes:
    """``content`` as the SMTP session sends it (``transports/session.py``): CRLF line ends
    (stored mail already has them) and a CRLF at the end."""
    crlf = content.count(b"\r\n")
    if content.count(b"\n") != crlf or content.count(b"\r") != crlf:
        content = _LINE_ENDS.sub(b"\r\n", content)
    return content if content.endswith(b"\r\n") else content + b"\r\n"


def _split(content: bytes) -> tuple[bytes, bytes]:
    """The header block (each field ending with CRLF) and the body."""
    if content.startswith(b"\r\n"):
        return b"", content[2:]
    head, separator, body = content.partition(b"\r\n\r\n")
    return (head + b"\r\n", body) if separator else (content, b"")


def _header_fields(head: bytes) -> dict[bytes, list[bytes]]:
    """The fields of the header block by lower-case name, each as written (folded, without
    its final CRLF), in order. Lines that are neither a field nor a continuation are skipped."""
    fields: dict[bytes, list[bytes]] = {}
    last: list[bytes] | None = None
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if last is not None:
                last[-1] += b"\r\n" + line
            continue
        name, colon, _ = line.partition(b":")
        if not colon:
            last = None
            continue
        last = fields.setdefault(name.rstrip(b" \t").lower(), [])
        last.append(line)
    return fields


def _relaxed_field(field: bytes) -> bytes:
    """RFC 6376 3.4.2: the name in lower case, the value unfolded, each run of spaces and tabs
    one space, none around the colon or at the end; CRLF-terminated."""
    name, _, value = field.partition(b":")
    value = _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: no spaces or tabs at line ends, other runs of them one space, no empty
    lines at the end; an empty body stays empty, any other ends with one CRLF."""
    # the substring tests (C speed) spare most bodies the regular expressions' scans
    if b" \r\n" in body or b"\t" in body:
        body = _WSP_AT_LINE_END.sub(b"\r\n", body)
    if b"  " in body or b"\t" in body:
        body = _WSP_RUN.sub(b" ", body)
    body = body.rstrip(b"\r\n")  # every line end is CRLF by now, so this drops whole lines
    return body + b"\r\n" if body else b""


def _signature_field(
    key: DkimKey, names: list[bytes], body_hash: str, timestamp: int, signed_fields: bytes
) -> bytes:
    """The DKIM-Signature field of ``key``, folded at :data:`LINE_LENGTH`: its tags up to an
    empty ``b=`` are signed after ``signed_fields`` (RFC 6376 3.7), then the signature fills
    ``b=``. Folding is free whitespace to relaxed canonicalisation and to base64 values."""
    lines = ["DKIM-Signature:"]

    def add(token: str, separator: str = " ") -> None:
        if len(lines[-1]) + len(separator) + len(token) > LINE_LENGTH:
            lines.append(" " + token)
        else:
            lines[-1] += separator + token

    for tag in (f"v=1; a={key.kind.algorithm};", "c=relaxed/relaxed;", f"d={key.domain};"):
        add(tag)
    add(f"s={key.selector};")
    add(f"t={timestamp};")
    first, *rest = (name.decode("ascii") for name in names)
    add(f"h={first}")
    for name in rest:
        add(f":{name}", separator="")
    lines[-1] += ";"
    add(f"bh={body_hash};")
    add("b=")
    unsigned = "\r\n".join(lines).encode("ascii")
    header_data = signed_fields + _relaxed_field(unsigned)[:-2]  # the field signs without CRLF
    value = base64.b64encode(key.sign(header_data)).decode("ascii")
    room = max(LINE_LENGTH - len(lines[-1]), 0)
    chunks = [value[:room]] + [value[i : i + 76] for i in range(room, len(value), 76)]
    return unsigned + "\r\n ".join(chunks).encode("ascii") + b"\r\n"


def _from_domain(content: bytes) -> str | None:
    """The domain of the first address in the From header, or None."""
    end = content.find(b"\r\n\r\n")
    head = _as_sent(content if end < 0 else content[:end])
    for field in _header_fields(head).get(b"from", ()):
        value = field.partition(b":")[2].replace(b"\r\n", b"").decode("utf-8", "replace")
        for _, address in getaddresses([value]):
            if "@" in address:
                return address.rpartition("@")[2].lower()
    return None
