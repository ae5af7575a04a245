"""The simulator's side of STARTTLS: the scenario's certificate, or a self-signed one."""

from __future__ import annotations

import ipaddress
import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from postlane.errors import ConfigError
from postlane.simulate.scenario import Scenario, TLSMode


def self_signed_certificate(hostname: str) -> tuple[bytes, bytes] | None:
    """A throwaway certificate and key (PEM) for ``hostname``, or None without ``cryptography``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(UTC)
    alt_names: list[x509.GeneralName] = [
        x509.DNSName(hostname),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def tls_context(scenario: Scenario) -> ssl.SSLContext | None:
    """The server's TLS context for STARTTLS: the scenario's certificate, else a throwaway one;
    None when the scenario offers no TLS."""
    if scenario.tls is TLSMode.OFF:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if scenario.tls_cert is not None:
        try:
            context.load_cert_chain(scenario.tls_cert, scenario.tls_key or scenario.tls_cert)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"scenario {scenario.source}: tls_cert/tls_key: cannot load ({exc})"
            ) from None
        return context
    pem = self_signed_certificate(scenario.hostname)
    if pem is None:
        raise ConfigError(
            f"scenario {scenario.name}: tls = {scenario.tls.value!r} needs a certificate: set "
            "tls_cert and tls_key, or install the cryptography package to make a self-signed one"
        )
    with tempfile.TemporaryDirectory(prefix="postlane-simulate-") as folder:
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert.write_bytes(pem[0])
        key.write_bytes(pem[1])
        context.load_cert_chain(cert, key)
    return context
