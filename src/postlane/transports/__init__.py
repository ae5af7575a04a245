"""Transports, chosen by ``delivery.relay``'s scheme. Adding one is a new module and a line in
:data:`SCHEMES`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from postlane.config import Config, destination_limits
from postlane.errors import ConfigError
from postlane.transports.base import Envelope, Response, Transport

if TYPE_CHECKING:
    from postlane.dkim import DkimSigner
    from postlane.store.base import AccessStore
    from postlane.transports.http_api import ProviderTransport

__all__ = ["Envelope", "Response", "Transport", "delivery_transport", "transport_for"]


def _capture(config: Config) -> Transport:
    from postlane.transports.capture import CaptureTransport

    return CaptureTransport(Path(capture_folder(config)))


def _signer(config: Config) -> DkimSigner | None:
    """The DKIM signer of ``[dkim."domain"]`` tables (None without any)."""
    if not config.dkim:
        return None
    from postlane.dkim import DkimSigner

    return DkimSigner.from_config(config.dkim, base_dir=config.base_dir)


def _smtp(config: Config, destination: str = "relay", verp_key: bytes | None = None) -> Transport:
    """``destination`` names the relay as a throttle destination; its ``[destinations.NAME]``
    limits apply (messages per connection). With ``verp_key``, each recipient gets its own
    return path (inside the DKIM signing: the message is signed once)."""
    from postlane.transports.smtp import RelaySettings, SMTPRelayTransport

    limits = destination_limits(config.destinations, destination)
    settings = RelaySettings.from_url(config.delivery.relay, config.delivery, limits)
    relay: Transport = SMTPRelayTransport(settings, destination=destination)
    return _signed(config, _verp(config, relay, verp_key))


def _signed(config: Config, transport: Transport) -> Transport:
    """``transport`` signing with ``[dkim."domain"]`` keys, when there are any."""
    signer = _signer(config)
    if signer is None:
        return transport
    from postlane.dkim import SigningTransport

    return SigningTransport(transport, signer)


def _verp(config: Config, transport: Transport, verp_key: bytes | None) -> Transport:
    """``transport`` giving each recipient a return path at ``[bounces] domain`` (VERP), when
    there is one and the store's key is given; else ``transport``."""
    if config.bounces.domain is None or verp_key is None:
        return transport
    from postlane.feedback.verp import VerpTransport

    return VerpTransport(transport, config.bounces.domain, verp_key)


def _mx(config: Config) -> Transport:
    from postlane.destinations import DestinationMap
    from postlane.transports.mx import MXTransport

    return MXTransport.from_config(
        config.delivery,
        destinations=DestinationMap.from_config(config),
        signer=_signer(config),
        limits=config.destinations,
    )


def _provider(module: str, class_name: str) -> Callable[[Config], Transport]:
    """The factory of a provider API transport, ``postlane.transports.MODULE.CLASS_NAME``
    built by its ``from_url``; the module is imported when first used, like the others."""

    def build(config: Config) -> Transport:
        provider: type[ProviderTransport] = getattr(
            import_module(f"postlane.transports.{module}"), class_name
        )
        return provider.from_url(config.delivery.relay, config.delivery)

    return build


SCHEMES: dict[str, Callable[[Config], Transport]] = {
    "capture": _capture,
    "smtp": _smtp,
    "smtps": _smtp,
    "mx": _mx,
    "sendgrid": _provider("sendgrid", "SendGridTransport"),
    "postmark": _provider("postmark", "PostmarkTransport"),
    "mailgun": _provider("mailgun", "MailgunTransport"),
    "ses": _provider("ses", "SESTransport"),
}


def capture_folder(config: Config) -> str:
    """``capture:///abs/path`` or ``capture://relative/path`` (relative to the config's folder)."""
    rest = config.delivery.relay[len("capture://") :]
    if rest.startswith("/"):
        return str(config.resolve_path("/" + rest.lstrip("/")))
    return str(config.resolve_path(rest or "postlane-capture"))


def shared_destination(relay: str, where: str = "delivery.relay") -> str | None:
    """The throttle destination every delivery through ``relay`` (the URL of ``where``) is
    charged to as well: an SMTP relay's (``relay`` for ``[delivery] relay``; a routed relay is
    one of its own, ``relay:HOST:PORT``), a provider API's (its name); none for MX delivery and
    capture, where each recipient domain is its own destination."""
    scheme = relay.split(":", 1)[0].lower()
    factory = SCHEMES.get(scheme)
    if factory is _smtp:
        if where == "delivery.relay":
            return "relay"
        parts = urlsplit(relay)
        return f"relay:{parts.hostname}:{parts.port or ''}".rstrip(":")
    if factory is not None and factory not in (_mx, _capture):
        return scheme  # a provider's transport: ``ProviderTransport.provider``
    return None


def shared_destinations(config: Config) -> set[str]:
    """The shared destinations of every relay ``[delivery]`` and ``[[routes]]`` name (a flush
    lifts their pauses too: what it selects goes through one of them)."""
    relays = [(config.delivery.relay, "delivery.relay")]
    for number, route in enumerate(config.routes, 1):
        relays.append((route.relay, f"routes[{number}].relay"))
        if route.fallback:
            relays.append((route.fallback, f"routes[{number}].fallback"))
    return {name for relay, where in relays if (name := shared_destination(relay, where))}


def _one(
    config: Config,
    relay: str,
    built: dict[str, Transport],
    where: str,
    verp_key: bytes | None = None,
) -> Transport:
    """The transport of one relay URL (one per URL: routes sharing a relay share its pool).
    SMTP relays and MX delivery get VERP return paths with ``verp_key``; a provider's API
    reports its bounces as events of its own (its webhooks)."""
    if relay not in built:
        scheme = relay.split(":", 1)[0].lower()
        factory = SCHEMES.get(scheme)
        if factory is None:
            known = ", ".join(f"{name}://" for name in SCHEMES)
            raise ConfigError(f"{where}: unknown scheme {scheme!r} (known: {known})")
        delivery = dataclasses.replace(config.delivery, relay=relay)
        relay_config = dataclasses.replace(config, delivery=delivery)
        if factory is _smtp:
            name = shared_destination(relay, where)
            assert name is not None
            transport = _smtp(relay_config, name, verp_key)
        elif factory is _mx:
            transport = _verp(config, _mx(relay_config), verp_key)
        elif factory is _capture:  # what would go out, as it would: return paths, signatures
            transport = _signed(config, _verp(config, _capture(relay_config), verp_key))
        else:
            transport = factory(relay_config)
        built[relay] = transport
    return built[relay]


def _unsubscribe(config: Config, transport: Transport, key: bytes | None) -> Transport:
    """``transport`` adding one-click unsubscribe links to the mail of ``[unsubscribe] lanes``,
    when there is an ``[unsubscribe] url`` and the store's key is given; else ``transport``.
    It wraps everything (routes, DKIM signing, VERP): each copy is signed with its link."""
    if config.unsubscribe.url is None or key is None:
        return transport
    from postlane.feedback.unsubscribe import UnsubscribeLinks, UnsubscribeTransport

    links = UnsubscribeLinks(config.unsubscribe.url, key)
    return UnsubscribeTransport(transport, links, config.unsubscribe.lanes)


async def delivery_transport(config: Config, store: AccessStore, now: float) -> Transport:
    """:func:`transport_for` with the store's keys for what the configuration turns on (the
    return paths of ``[bounces] domain``, the links of ``[unsubscribe] url``): what serve,
    ``worker --burst`` and the pytest plugin deliver through, so that mail goes out alike
    whichever runs."""
    verp_key = None
    if config.bounces.domain is not None:
        verp_key = await store.secret("verp", now)
    unsubscribe_key = None
    if config.unsubscribe.url is not None:
        unsubscribe_key = await store.secret("unsubscribe", now)
    return transport_for(config, verp_key=verp_key, unsubscribe_key=unsubscribe_key)


def transport_for(
    config: Config, *, verp_key: bytes | None = None, unsubscribe_key: bytes | None = None
) -> Transport:
    """The transport of ``[delivery] relay``, or a router over ``[[routes]]`` when there are
    any (see :mod:`postlane.transports.router`). ``verp_key`` (the store's ``verp`` secret,
    which serve and worker pass) turns on the return paths of ``[bounces] domain``;
    ``unsubscribe_key`` (its ``unsubscribe`` secret) the links of ``[unsubscribe] url``."""
    built: dict[str, Transport] = {}
    default = _one(config, config.delivery.relay, built, "delivery.relay", verp_key)
    if not config.routes:
        return _unsubscribe(config, default, unsubscribe_key)
    from postlane.transports.router import Router, RouteRule

    routes = []
    for number, route in enumerate(config.routes, 1):
        primary = _one(config, route.relay, built, f"routes[{number}].relay", verp_key)
        fallback = (
            _one(config, route.fallback, built, f"routes[{number}].fallback", verp_key)
            if route.fallback
            else None
        )
        routes.append((RouteRule.from_config(route), primary, fallback))
    return _unsubscribe(config, Router(default, routes), unsubscribe_key)
