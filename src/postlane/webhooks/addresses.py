"""Where a webhook may be posted: public addresses only, unless an endpoint says
``allow_private = true`` (an application on this host or network).

A webhook URL is a request forgery waiting to happen (SSRF): ``http://169.254.169.254/`` reads a
cloud instance's credentials, ``http://10.0.0.5:9200/`` writes into an internal database. So an
address is checked twice: a literal IP in the URL when the configuration is read
(:func:`literal_address_refusal`), and every address a host name resolves to right before
connecting (:func:`resolve_allowed`). The connection then goes to the address that was checked,
never to the name again: a DNS answer that changes between the check and the connect (DNS
rebinding) cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

from postlane.errors import PostlaneError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: looks a host name up: ``(host, port) -> addresses`` (tests give their own)
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class WebhookDeliveryError(PostlaneError):
    """A webhook could not be delivered (the endpoint's reply, a timeout, a refused address)."""

    code = "webhook_failed"


class AddressRefused(WebhookDeliveryError):
    """The endpoint's host is (or resolves to) an address webhooks may not be posted to."""

    code = "webhook_address_refused"


#: IPv6 prefixes that carry an IPv4 address in their last 32 bits: IPv4-compatible (::/96),
#: SIIT's IPv4-translated (::ffff:0:0:0/96) and NAT64's well-known prefix (64:ff9b::/96)
_IPV4_IN_LAST_32 = tuple(
    ipaddress.IPv6Network(prefix) for prefix in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96")
)
#: NAT64's local-use prefix (RFC 8215): the IPv4 address may sit anywhere in it
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, translated, NAT64, 6to4,
    Teredo's client), where a network that translates it would reach that IPv4 address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in network for network in _IPV4_IN_LAST_32):
        low = int(address) & 0xFFFFFFFF
        if int(address) >> 32 or low > 1:  # not :: nor ::1, IPv6's own
            return ipaddress.IPv4Address(low)
    return None


def refusal(address: IPAddress) -> str | None:
    """Why ``address`` is no place for a webhook without ``allow_private``, or None when it is
    a public address. An IPv6 address carrying an IPv4 one (``::ffff:169.254.169.254``,
    NAT64's ``64:ff9b::a9fe:a9fe``, 6to4, ...) is judged as that IPv4 address too."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return "a NAT64 local-use address (it may reach any IPv4 address)"
        inner = embedded_ipv4(address)
        if inner is not None and (why := refusal(inner)) is not None:
            return f"{why}, inside an IPv6 address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (cloud metadata services live at 169.254.169.254)"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved address"
    return None


def parse_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is one, including the legacy IPv4 spellings a
    resolver accepts (``2852039166``, ``0xa9.0xfe.0xa9.0xfe``), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return None
    return ipaddress.IPv4Address(packed)


def literal_address_refusal(host: str, allow_private: bool) -> str | None:
    """The configuration-time check: a literal address in a URL that webhooks may not reach."""
    address = parse_literal(host)
    if address is None or allow_private:
        return None
    why = refusal(address)
    return None if why is None else f"{host} is {why}"


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's resolver (``/etc/hosts``, DNS), every address once, in its order."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise WebhookDeliveryError(f"cannot resolve {host}: {exc.strerror}") from None
    found: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in found:
            found.append(address)
    return found


async def resolve_allowed(
    host: str, port: int, *, allow_private: bool, resolver: Resolver = system_resolver
) -> str:
    """The address to connect to for ``host``: the first it resolves to that webhooks may
    reach. Raises :class:`AddressRefused` when there is none."""
    literal = parse_literal(host)
    if literal is not None:
        candidates: Sequence[str] = [str(literal)]
    else:
        candidates = await resolver(host, port)
        if not candidates:
            raise WebhookDeliveryError(f"{host} resolves to no address")
    refused: list[tuple[str, str]] = []
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate.split("%", 1)[0])  # drop an IPv6 zone
        except ValueError:
            continue
        why = None if allow_private else refusal(address)
        if why is None:
            return candidate
        refused.append((candidate, why))
    if not refused:
        raise WebhookDeliveryError(f"{host} resolves to no usable address")
    if literal is not None:
        where = f"{host}, {refused[0][1]}"
    else:
        where = f"{host}, which resolves to " + "; ".join(f"{a}, {why}" for a, why in refused)
    raise AddressRefused(
        f"refused to post to {where}: webhooks go to public addresses only "
        "(allow_private = true on the endpoint allows this one)"
    )
