"""Direct MX delivery (``relay = "mx"``): each recipient domain's mail goes to that domain's own
mail servers, the way an MTA delivers it.

Routing (RFC 5321 section 5.1)
    The domain's MX records are tried in preference order (equal preferences in random order, to
    spread the load as the RFC asks), and each MX host's addresses (IPv4 first, then IPv6) until
    one accepts a connection. A domain without MX records is its own mail host (the "implicit
    MX": its A/AAAA records). An address literal (``user@[192.0.2.1]``) is used as it is.

What DNS answers becomes a response like any server reply, so the queue acts on it:

    ==============================  ============================================  =============
    DNS says                        response                                      class
    ==============================  ============================================  =============
    NXDOMAIN                        ``550 5.1.2 domain ... does not exist``       hard_bounce
    null MX (RFC 7505, ``0 .``)     ``556 5.1.10 ... accepts no mail (null MX)``  hard_bounce
    no MX and no address            ``550 5.1.2 ... has no MX or address``        hard_bounce
    SERVFAIL, timeout, no server    no reply                                      connection
    no address for any MX host      no reply                                      connection
    ==============================  ============================================  =============

When every MX host refuses or cannot be reached, the recipients get the last host's answer: a
``421`` greeting is classified as written, anything else is a ``connection`` failure (retried,
and repeated failures pause the destination).

TLS
    STARTTLS is used whenever a server offers it, without verifying its certificate: what MTAs do
    (RFC 7435, opportunistic security), since most MX certificates would not verify and refusing
    them would only push the mail into clear text. A failed handshake is retried once in clear
    text on a new connection (Postfix does the same). Destinations listed in ``require_tls``
    (recipient domains, ``.example.com`` for its subdomains, provider names such as ``google``,
    or ``*``) need a certificate valid for the MX host name; when STARTTLS is missing or the
    certificate does not verify, nothing is sent and the attempt is a ``connection`` failure.

Connections
    Each MX host has a pool of its own, :class:`SMTPRelayTransport`'s, reused by every domain
    that host serves; its sessions are :mod:`postlane.transports.session`'s (pipelined
    transactions, RSET after a failed transaction). Only where a session is opened (each of the
    host's addresses in turn) and its TLS policy differ, so only that is here. A session carries
    at most the ``messages_per_connection`` of the destination each message goes to (its
    ``[destinations.NAME]`` or ``[destinations.default]`` table, else ``[delivery]``'s).

Destinations
    Domains served by the same MX hosts share limits: :meth:`MXTransport.mx_destination` names
    the throttle destination of a domain (a provider recognised by its MX suffix, else the
    primary MX host, else the domain itself). Limits per connection are looked up under the
    destination the queue records for a recipient: :meth:`MXTransport.limits_destination`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import random
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from postlane.classify import ReplyClass
from postlane.config import DeliveryConfig, DestinationLimits, destination_limits
from postlane.destinations import DestinationMap
from postlane.dkim import DkimSigner
from postlane.transports.base import BaseTransport, Envelope, Response
from postlane.transports.session import ClearTextRetry, Refusal, Session, TLSPolicy, open_session
from postlane.transports.smtp import RelaySettings, SMTPRelayTransport

__all__ = ["MXTransport", "Route"]

DEFAULT_PORT = 25
#: how long one DNS question may take, retries included, before the attempt is a connection
#: failure (the whole route may need three: MX, then A and AAAA of a host)
DNS_TIMEOUT = 10.0
#: pools are looked over at most this often: idle connections past their time closed, pools
#: of MX hosts no longer in use dropped (a busy MTA meets thousands of MX hosts a day)
SWEEP_INTERVAL = 30.0
#: the ``[delivery]`` settings that :meth:`MXTransport.from_config` passes on, as named there
_DELIVERY_SETTINGS = (
    "helo_name",
    "require_tls",
    "tls_ca",
    "connect_timeout",
    "command_timeout",
    "data_timeout",
    "messages_per_connection",
    "connections_per_host",
)


@dataclass(frozen=True)
class Route:
    """Where a domain's mail goes: MX host names in the order to try them, or, when the domain
    cannot be reached at all, the answer every recipient gets."""

    domain: str
    hosts: tuple[str, ...] = ()
    #: the primary MX host (lowest preference, then name): stable, unlike the shuffled order
    primary: str | None = None
    #: when ``hosts`` is empty: the reply code and text (or the failure) to answer with
    code: int | None = None
    text: str = ""
    failure: ReplyClass | None = None

    @classmethod
    def refused(cls, domain: str, code: int, text: str) -> Route:
        """The domain cannot receive mail: a permanent answer, classified from its text."""
        return cls(domain, code=code, text=text)

    @classmethod
    def unreachable(cls, domain: str, text: str) -> Route:
        """DNS could not tell (SERVFAIL, timeout): a connection failure, retried."""
        return cls(domain, text=text, failure=ReplyClass.CONNECTION)

    def response(self, relay: str) -> Response:
        return Response(self.code, self.text, relay, self.failure)


class _HostUnavailable(Exception):
    """No session with an MX host could be opened: the next MX host is tried."""

    def __init__(self, refusal: Refusal, relay: str) -> None:
        super().__init__(refusal.text)
        self.refusal = refusal
        self.relay = relay


class _NoAddress(Exception):
    """DNS says the host has no address (NXDOMAIN, or neither A nor AAAA records)."""


class _MXHostPool(SMTPRelayTransport):
    """The pooled sessions with one MX host, on whichever of its addresses answers.

    Everything but which address to open a session to, and with what TLS policy, is
    :class:`SMTPRelayTransport`'s: the transactions, pipelining, reuse and RSET. A host that
    cannot be reached raises :class:`_HostUnavailable` out of :meth:`send` instead of answering,
    so the next MX host can be tried.
    """

    def __init__(
        self,
        settings: RelaySettings,
        addresses: Callable[[str], Awaitable[list[str]]],
    ) -> None:
        super().__init__(settings)
        self.mx_host = settings.host
        self.verified = settings.tls_verify
        self._addresses = addresses
        self._busy = 0

    async def send(
        self, envelope: Envelope, *, messages_per_connection: int | None = None
    ) -> list[Response]:
        self._busy += 1
        try:
            return await super().send(envelope, messages_per_connection=messages_per_connection)
        finally:
            self._busy -= 1

    async def _acquire(self, per_connection: int) -> Session:
        try:
            return await super()._acquire(per_connection)
        except Refusal as refusal:
            raise _HostUnavailable(refusal, self.name) from refusal

    async def _connect(self) -> Session:
        try:
            addresses = await self._addresses(self.mx_host)
        except _NoAddress as exc:
            # an MX host without an address is the domain's misconfiguration, often fixed
            # within hours: retried like an unreachable host, never a bounce
            raise Refusal(f"{self.name}: {exc}", None, ReplyClass.CONNECTION) from exc
        refusals: list[Refusal] = []
        for address in addresses:
            try:
                return await self._connect_to(address, starttls=True)
            except ClearTextRetry:
                try:
                    return await self._connect_to(address, starttls=False)
                except Refusal as refusal:
                    refusals.append(refusal)
            except Refusal as refusal:
                refusals.append(refusal)
        raise _combine(refusals, f"{self.name}: no address to connect to")

    async def _connect_to(self, address: str, *, starttls: bool) -> Session:
        """A session with the MX host at ``address``: STARTTLS whenever offered, its
        certificate checked for the MX host's name when the destination requires TLS (see the
        module docstring)."""
        tls = TLSPolicy(
            self._context(),
            starttls=starttls,
            server_hostname=self.mx_host,
            required=self.verified,
            clear_text_retry=not self.verified,
        )
        return await open_session(self.settings, tls, address)

    def drop_idle(self) -> bool:
        """Close idle sessions past their time; True when the pool holds nothing at all."""
        self.close_expired()
        return not self._idle and not self._busy


class MXTransport(BaseTransport):
    """Deliver each recipient to its domain's MX hosts (see the module docstring)."""

    name = "mx"

    def __init__(
        self,
        *,
        helo_name: str | None = None,
        port: int = DEFAULT_PORT,
        resolver: dns.asyncresolver.Resolver | None = None,
        require_tls: Collection[str] = (),
        tls_ca: str | None = None,
        signer: DkimSigner | None = None,
        destinations: DestinationMap | None = None,
        connect_timeout: float = 30.0,
        command_timeout: float = 120.0,
        data_timeout: float = 600.0,
        dns_timeout: float = DNS_TIMEOUT,
        messages_per_connection: int = 100,
        connections_per_host: int = 20,
        limits: Mapping[str, DestinationLimits] | None = None,
    ) -> None:
        """``port`` and ``resolver`` are there for tests (and for networks that reach the
        internet's port 25 through a redirect); ``require_tls`` lists the destinations that
        need verified TLS, ``tls_ca`` the CA bundle that verifies them (default: the system's);
        ``signer`` DKIM-signs every message before it leaves; ``limits`` are the
        ``[destinations.NAME]`` tables (their ``messages_per_connection`` win over the
        argument's)."""
        #: every MX host's session and pool settings, but for its name and TLS verification
        self.host_settings = RelaySettings(
            host="",
            port=port,
            implicit_tls=False,
            username=None,
            password=None,
            helo_name=helo_name or socket.gethostname(),
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            messages_per_connection=messages_per_connection,
            connections=connections_per_host,
            tls_verify=False,
            tls_ca=tls_ca,
            data_timeout=data_timeout,
        )
        self.require_tls = frozenset(entry.lower().rstrip(".") for entry in require_tls)
        self.signer = signer
        self.destinations = destinations or DestinationMap()
        self.dns_timeout = dns_timeout
        self.limits = dict(limits or {})
        if resolver is None:
            resolver = dns.asyncresolver.Resolver()
            resolver.cache = dns.resolver.Cache()  # honours each answer's TTL
        self.resolver = resolver
        self._pools: dict[tuple[str, bool], _MXHostPool] = {}
        self._swept = time.monotonic()

    @classmethod
    def from_config(
        cls,
        delivery: DeliveryConfig,
        *,
        signer: DkimSigner | None = None,
        destinations: DestinationMap | None = None,
        resolver: dns.asyncresolver.Resolver | None = None,
        limits: Mapping[str, DestinationLimits] | None = None,
    ) -> MXTransport:
        """The transport ``[delivery]`` describes (its settings of the same names: TLS,
        timeouts, HELO name, pool sizes), with the ``[destinations.NAME]`` ``limits``."""
        settings = {name: getattr(delivery, name) for name in _DELIVERY_SETTINGS}
        return cls(
            **settings, signer=signer, destinations=destinations, resolver=resolver, limits=limits
        )

    # -- sending ----------------------------------------------------------------------------------

    async def send(self, envelope: Envelope) -> list[Response]:
        """Deliver to every recipient, each domain's share to its own MX hosts (concurrently);
        one response per recipient, in order."""
        self._sweep()
        if self.signer is not None:
            envelope = await self.signer.sign_envelope(envelope)
        by_domain: dict[str, list[int]] = {}
        for index, recipient in enumerate(envelope.recipients):
            by_domain.setdefault(recipient_domain(recipient), []).append(index)
        if not by_domain:
            return []
        if len(by_domain) == 1:
            return await self._deliver_domain(next(iter(by_domain)), envelope)
        results: list[Response | None] = [None] * len(envelope.recipients)

        async def deliver(domain: str, indexes: list[int]) -> None:
            share = dataclasses.replace(
                envelope, recipients=tuple(envelope.recipients[i] for i in indexes)
            )
            for index, response in zip(
                indexes, await self._deliver_domain(domain, share), strict=True
            ):
                results[index] = response

        async with asyncio.TaskGroup() as group:
            for domain, indexes in by_domain.items():
                group.create_task(deliver(domain, indexes))
        return [response for response in results if response is not None]

    async def _deliver_domain(self, domain: str, envelope: Envelope) -> list[Response]:
        count = len(envelope.recipients)
        route = await self.route(domain)
        if not route.hosts:
            return [route.response(self.name)] * count
        verified = self.tls_required(domain, route)
        limits = destination_limits(self.limits, self.limits_destination(domain, route))
        per_connection = (
            limits.messages_per_connection or self.host_settings.messages_per_connection
        )
        refusals: list[Refusal] = []
        relay = self.name
        literal = _address_literal(domain) is not None
        for host in route.hosts:
            pool = self._pool(host, verified, literal=literal)
            try:
                return await pool.send(envelope, messages_per_connection=per_connection)
            except _HostUnavailable as unavailable:
                refusals.append(unavailable.refusal)
                relay = unavailable.relay
        refusal = _combine(refusals, f"no MX host of {domain} could be reached")
        return [refusal.response(relay)] * count

    def _pool(self, host: str, verified: bool, *, literal: bool = False) -> _MXHostPool:
        """The pool of ``host``: an MX host name (its addresses from DNS), or, for an address
        literal's route, the address itself (kept apart from a host named like it)."""
        key = (f"[{host}]" if literal else host, verified)
        pool = self._pools.get(key)
        if pool is None:
            settings = dataclasses.replace(self.host_settings, host=host, tls_verify=verified)
            addresses = _the_address_itself if literal else self.addresses
            pool = self._pools[key] = _MXHostPool(settings, addresses)
        return pool

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < SWEEP_INTERVAL:
            return
        self._swept = now
        for key, pool in list(self._pools.items()):
            if pool.drop_idle():
                del self._pools[key]

    @property
    def pooled_hosts(self) -> list[str]:
        """The MX hosts with a connection pool now (idle ones are dropped by the sweep)."""
        return sorted({host for host, _ in self._pools})

    async def close(self) -> None:
        pools = list(self._pools.values())
        self._pools.clear()
        await asyncio.gather(*(pool.close() for pool in pools))

    # -- TLS policy -------------------------------------------------------------------------------

    def tls_required(self, domain: str, route: Route | None = None) -> bool:
        """Whether mail to ``domain`` needs verified TLS: the domain is listed, or a parent
        listed as ``.parent``, or its destination (``google``), or ``*``."""
        required = self.require_tls
        if not required:
            return False
        domain = domain.lower().rstrip(".")
        if "*" in required or domain in required:
            return True
        if any(domain.endswith(entry) for entry in required if entry.startswith(".")):
            return True
        destination = self.destinations.for_domain(domain)
        if destination in required:
            return True
        if route is not None and route.primary is not None:
            return self.destinations.for_mx(route.primary) in required
        return False

    # -- DNS --------------------------------------------------------------------------------------

    async def route(self, domain: str) -> Route:
        """Where mail for ``domain`` goes (see the module docstring's table)."""
        domain = domain.lower().rstrip(".")
        literal = _address_literal(domain)
        if literal is not None:
            return Route(domain, (literal,), primary=literal)
        try:
            name = dns.name.from_text(domain)
        except dns.exception.DNSException:
            return Route.refused(domain, 553, f"553 5.1.3 {domain!r} is not a valid domain name")
        try:
            answer = await self.resolver.resolve(name, "MX", lifetime=self.dns_timeout)
        except dns.resolver.NXDOMAIN:
            return Route.refused(
                domain, 550, f"550 5.1.2 domain {domain} does not exist (NXDOMAIN)"
            )
        except dns.resolver.NoAnswer:
            return await self._implicit_route(domain)
        except dns.exception.DNSException as exc:
            return Route.unreachable(
                domain, f"DNS: MX lookup of {domain} failed: {_dns_error(exc)}"
            )
        records = [(int(r.preference), r.exchange) for r in answer]
        if any(exchange == dns.name.root for _, exchange in records):
            return Route.refused(
                domain,
                556,
                f"556 5.1.10 domain {domain} accepts no mail (null MX, RFC 7505)",
            )
        hosts = [(preference, _host_text(exchange)) for preference, exchange in records]
        return Route(domain, _in_delivery_order(hosts), primary=min(hosts)[1])

    async def _implicit_route(self, domain: str) -> Route:
        """No MX records: the domain itself, if it has an address (RFC 5321 5.1)."""
        try:
            await self.addresses(domain)
        except _NoAddress:
            return Route.refused(
                domain, 550, f"550 5.1.2 domain {domain} has no MX or address records"
            )
        except Refusal as refusal:
            return Route.unreachable(domain, refusal.text)
        return Route(domain, (domain,), primary=domain)

    async def addresses(self, host: str) -> list[str]:
        """The host's addresses, IPv4 first. Raises :class:`_NoAddress` when it has none, and
        :class:`Refusal` (a connection failure) when DNS could not tell."""
        literal = _address_literal(host)
        if literal is not None:
            return [literal]
        answers = await asyncio.gather(
            self.resolver.resolve(host, "A", lifetime=self.dns_timeout),
            self.resolver.resolve(host, "AAAA", lifetime=self.dns_timeout),
            return_exceptions=True,
        )
        found: list[str] = []
        errors: list[BaseException] = []
        for answer in answers:
            if isinstance(answer, dns.resolver.Answer):
                found.extend(str(record) for record in answer)
            elif isinstance(answer, dns.resolver.NXDOMAIN | dns.resolver.NoAnswer):
                continue
            elif isinstance(answer, Exception):
                errors.append(answer)
            else:
                raise answer  # cancellation and the like
        if found:
            return found
        if errors:
            detail = _dns_error(errors[0])
            raise Refusal(
                f"DNS: address lookup of {host} failed: {detail}", None, ReplyClass.CONNECTION
            )
        raise _NoAddress(f"{host} has no address (no A or AAAA record)")

    def limits_destination(self, domain: str, route: Route) -> str:
        """The destination whose ``[destinations.NAME]`` limits apply to mail for ``domain``:
        the one the queue records for its recipients (a known provider, by domain or by MX
        suffix in preference order, else the domain itself)."""
        domain = domain.lower().rstrip(".")
        known = self.destinations.for_domain(domain)
        if known != domain:
            return known
        for host in route.hosts:
            provider = self.destinations.for_mx(host)
            if provider is not None:
                return provider
        return domain

    async def mx_destination(self, domain: str) -> str:
        """The throttle destination of ``domain`` for direct delivery: a known provider (by
        domain, else by its primary MX host's suffix), else the primary MX host itself, so that
        domains hosted on the same servers share one set of limits; else the domain."""
        domain = domain.lower().rstrip(".")
        known = self.destinations.for_domain(domain)
        if known != domain:
            return known
        route = await self.route(domain)
        if route.primary is None or route.primary == domain:
            return domain
        return self.destinations.for_mx(route.primary) or route.primary


def recipient_domain(address: str) -> str:
    """The domain part of an address, lower-cased (``[192.0.2.1]`` literals kept)."""
    return address.rpartition("@")[2].lower().rstrip(".")


def _address_literal(domain: str) -> str | None:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` -> the address; anything else -> None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


async def _the_address_itself(address: str) -> list[str]:
    """Where an address literal's host is: that address (no DNS, RFC 5321 5.1)."""
    return [address]


def _host_text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _in_delivery_order(hosts: Iterable[tuple[int, str]]) -> tuple[str, ...]:
    """By preference; hosts of equal preference in random order (RFC 5321 5.1), duplicates
    dropped."""
    by_preference: dict[int, list[str]] = {}
    for preference, host in hosts:
        by_preference.setdefault(preference, []).append(host)
    ordered: list[str] = []
    for preference in sorted(by_preference):
        group = by_preference[preference]
        random.shuffle(group)
        ordered.extend(host for host in group if host not in ordered)
    return tuple(ordered)


def _dns_error(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no name server answered (SERVFAIL or refused)"
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    return str(exc) or type(exc).__name__


def _combine(refusals: list[Refusal], nothing: str) -> Refusal:
    """One refusal for several failed hosts or addresses: the last one's code and class (a reply
    such as a 421 greeting stays as written), the others' texts kept for the record."""
    if not refusals:
        return Refusal(nothing, None, ReplyClass.CONNECTION)
    last = refusals[-1]
    if last.failure is None or len(refusals) == 1:
        return last
    return Refusal("; ".join(r.text for r in refusals), last.code, last.failure)
