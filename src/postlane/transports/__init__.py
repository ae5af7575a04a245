"""Transports, chosen by ``delivery.relay``'s scheme. Adding one is a new module and a line in
:data:`SCHEMES`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from postlane.config import Config
from postlane.errors import ConfigError
from postlane.transports.base import Envelope, Response, Transport

__all__ = ["Envelope", "Response", "Transport", "describe_relay", "transport_for"]


def _capture(config: Config) -> Transport:
    from postlane.transports.capture import CaptureTransport

    return CaptureTransport(Path(capture_folder(config)))


def _smtp(config: Config) -> Transport:
    from postlane.transports.smtp import RelaySettings, SMTPRelayTransport

    return SMTPRelayTransport(RelaySettings.from_url(config.delivery.relay, config.delivery))


def _mx(config: Config) -> Transport:
    from postlane.destinations import DestinationMap
    from postlane.transports.mx import MXTransport

    return MXTransport.from_config(config.delivery, destinations=DestinationMap.from_config(config))


def _sendgrid(config: Config) -> Transport:
    from postlane.transports.sendgrid import SendGridTransport

    return SendGridTransport.from_url(config.delivery.relay, config.delivery)


def _postmark(config: Config) -> Transport:
    from postlane.transports.postmark import PostmarkTransport

    return PostmarkTransport.from_url(config.delivery.relay, config.delivery)


def _mailgun(config: Config) -> Transport:
    from postlane.transports.mailgun import MailgunTransport

    return MailgunTransport.from_url(config.delivery.relay, config.delivery)


def _ses(config: Config) -> Transport:
    from postlane.transports.ses import SESTransport

    return SESTransport.from_url(config.delivery.relay, config.delivery)


SCHEMES: dict[str, Callable[[Config], Transport]] = {
    "capture": _capture,
    "smtp": _smtp,
    "smtps": _smtp,
    "mx": _mx,
    "sendgrid": _sendgrid,
    "postmark": _postmark,
    "mailgun": _mailgun,
    "ses": _ses,
}


def capture_folder(config: Config) -> str:
    """``capture:///abs/path`` or ``capture://relative/path`` (relative to the config's folder)."""
    rest = config.delivery.relay[len("capture://") :]
    if rest.startswith("/"):
        return str(config.resolve_path("/" + rest.lstrip("/")))
    return str(config.resolve_path(rest or "postlane-capture"))


def transport_for(config: Config) -> Transport:
    scheme = config.delivery.relay.split(":", 1)[0].lower()
    factory = SCHEMES.get(scheme)
    if factory is None:
        known = ", ".join(f"{name}://" for name in SCHEMES)
        raise ConfigError(f"delivery.relay: unknown scheme {scheme!r} (known: {known})")
    return factory(config)


def describe_relay(config: Config) -> str:
    """The relay for log lines, without any password."""
    relay = config.delivery.relay
    if "@" in relay and "://" in relay:
        scheme, rest = relay.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return relay
