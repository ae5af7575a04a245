"""Routing: which transport each delivery goes through.

``[[routes]]`` rules choose by lane, sender domain and recipient domain (each narrows; globs
allowed; the first matching rule wins); anything no rule matches goes through ``[delivery]
relay``. A rule may name a ``fallback``, used while the rule's own relay is paused (its
``shared_destination``, e.g. a provider account that keeps refusing connections)::

    [[routes]]                     # password resets through the provider API,
    lane = ["high"]
    relay = "postmark://..."
    fallback = "smtp://mta.internal:25"   # and through our own MTA while Postmark is down

The router is a transport itself: it splits an envelope's recipients by route and sends each
part through its transport, answering one response per recipient in order.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, replace

from postlane.config import Route
from postlane.transports.base import BaseTransport, Envelope, PauseCheck, Response, Transport


@dataclass(frozen=True)
class RouteRule:
    lanes: frozenset[str]
    sender_domains: tuple[str, ...]
    recipient_domains: tuple[str, ...]

    @classmethod
    def from_config(cls, route: Route) -> RouteRule:
        return cls(
            lanes=frozenset(route.lane),
            sender_domains=tuple(d.lower() for d in route.sender_domain),
            recipient_domains=tuple(d.lower() for d in route.recipient_domain),
        )

    def matches(self, lane: str, sender_domain: str, recipient_domain: str) -> bool:
        if self.lanes and lane not in self.lanes:
            return False
        if self.sender_domains and not _any_glob(sender_domain, self.sender_domains):
            return False
        return not self.recipient_domains or _any_glob(recipient_domain, self.recipient_domains)


def _any_glob(value: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, glob) for glob in globs)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class Router(BaseTransport):
    """A transport that sends each recipient through the transport its route chooses. It has
    no shared destination of its own: each delivery has its route's
    (:meth:`shared_destination_for`)."""

    name = "router"

    def __init__(
        self,
        default: Transport,
        routes: Sequence[tuple[RouteRule, Transport, Transport | None]],
    ) -> None:
        self.default = default
        self.routes = list(routes)
        #: whether a shared destination (a relay) is paused now: nothing is, until the throttle
        #: gate says how to tell (:meth:`follow_pauses`)
        self._is_paused: PauseCheck = lambda _name: False

    def follow_pauses(self, is_paused: PauseCheck) -> None:
        self._is_paused = is_paused

    def choose(self, lane: str, sender: str, recipient_domain: str) -> Transport:
        sender_domain = _domain(sender)
        for rule, primary, fallback in self.routes:
            if rule.matches(lane, sender_domain, recipient_domain):
                shared = primary.shared_destination
                if fallback is not None and shared is not None and self._is_paused(shared):
                    return fallback
                return primary
        return self.default

    def shared_destination_for(self, lane: str, sender: str, recipient_domain: str) -> str | None:
        return self.choose(lane, sender, recipient_domain).shared_destination

    async def send(self, envelope: Envelope) -> list[Response]:
        parts: dict[int, tuple[Transport, list[int]]] = {}
        for index, recipient in enumerate(envelope.recipients):
            transport = self.choose(envelope.lane, envelope.sender, _domain(recipient))
            parts.setdefault(id(transport), (transport, []))[1].append(index)
        results: list[Response | None] = [None] * len(envelope.recipients)

        async def send_part(transport: Transport, indexes: list[int]) -> None:
            part = replace(envelope, recipients=tuple(envelope.recipients[i] for i in indexes))
            for index, response in zip(indexes, await transport.send(part), strict=True):
                results[index] = response

        await asyncio.gather(*(send_part(t, i) for t, i in parts.values()))
        return [r for r in results if r is not None]

    def transports(self) -> list[Transport]:
        seen: dict[int, Transport] = {id(self.default): self.default}
        for _, primary, fallback in self.routes:
            seen.setdefault(id(primary), primary)
            if fallback is not None:
                seen.setdefault(id(fallback), fallback)
        return list(seen.values())

    async def close(self) -> None:
        await asyncio.gather(*(t.close() for t in self.transports()))
