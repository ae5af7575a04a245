"""Destinations: the unit that throttling, pauses and metrics work on.

A recipient domain belongs to a known provider (google, microsoft, yahoo, ...) when it is one of
the provider's domains, or, with MX lookups on, when its MX hosts end with one of the provider's
suffixes (a company on Google Workspace is ``google`` too); else the domain is its own
destination, as an address literal (``[192.0.2.1]``, never looked up in DNS) always is. The
table is data: ``data/providers.toml``, extended by ``[destinations.NAME]`` ``domains`` and
``mx_suffixes`` in the configuration.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

import dns.asyncresolver

from postlane.config import Config, DestinationLimits

#: how long an MX answer (or the lack of one) is trusted
MX_CACHE_SECONDS = 3600.0
#: an MX lookup that takes longer than this leaves the domain as its own destination
MX_TIMEOUT = 2.0


@dataclass(frozen=True)
class Provider:
    name: str
    domains: frozenset[str]
    mx_suffixes: tuple[str, ...]


@cache
def known_providers() -> tuple[Provider, ...]:
    text = resources.files("postlane.data").joinpath("providers.toml").read_text("utf-8")
    table = tomllib.loads(text)
    return tuple(
        Provider(
            name=name,
            domains=frozenset(d.lower() for d in entry.get("domains", [])),
            mx_suffixes=tuple(s.lower().rstrip(".") for s in entry.get("mx_suffixes", [])),
        )
        for name, entry in table.items()
    )


def provider_names() -> frozenset[str]:
    return frozenset(p.name for p in known_providers())


def merge_providers(extra: Mapping[str, DestinationLimits]) -> tuple[Provider, ...]:
    """The shipped table extended (or overridden, name by name) by the configuration."""
    providers = {p.name: p for p in known_providers()}
    for name, limits in extra.items():
        if not limits.domains and not limits.mx_suffixes:
            continue
        base = providers.get(name, Provider(name, frozenset(), ()))
        providers[name] = Provider(
            name=name,
            domains=base.domains | {d.lower() for d in limits.domains},
            mx_suffixes=base.mx_suffixes + tuple(s.lower().rstrip(".") for s in limits.mx_suffixes),
        )
    return tuple(providers.values())


class DestinationMap:
    """Maps recipient domains to destinations (with an MX cache when lookups are on)."""

    def __init__(
        self,
        providers: Iterable[Provider] | None = None,
        *,
        mx_lookup: bool = False,
        resolver: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        self.providers = tuple(known_providers() if providers is None else providers)
        self._by_domain = {d: p.name for p in self.providers for d in p.domains}
        self.mx_lookup = mx_lookup
        #: the resolver for MX lookups (None: the system's)
        self.resolver = resolver
        self._mx_cache: dict[str, tuple[float, str]] = {}

    @classmethod
    def from_config(cls, config: Config) -> DestinationMap:
        setting = config.throttle.mx_lookup
        lookup = setting == "true" or (setting == "auto" and config.delivery.relay == "mx")
        return cls(merge_providers(config.destinations), mx_lookup=lookup)

    def for_domain(self, domain: str) -> str:
        """From the domain alone (no DNS)."""
        domain = domain.lower().rstrip(".")
        return self._by_domain.get(domain, domain)

    def for_mx(self, host: str) -> str | None:
        """The provider whose MX suffix ``host`` ends with, if any."""
        host = host.lower().rstrip(".")
        for provider in self.providers:
            for suffix in provider.mx_suffixes:
                if host == suffix or host.endswith("." + suffix):
                    return provider.name
        return None

    async def resolve(self, domains: Iterable[str]) -> dict[str, str]:
        """Destinations of ``domains``: the table first, then (when on) cached MX lookups."""
        out: dict[str, str] = {}
        lookups = []
        for domain in {d.lower().rstrip(".") for d in domains}:
            known = self._by_domain.get(domain)
            if known is not None or not self.mx_lookup or domain.startswith("["):
                # an address literal ([192.0.2.1]) has no MX: it is its own destination
                out[domain] = known or domain
                continue
            cached = self._mx_cache.get(domain)
            if cached is not None and cached[0] > time.monotonic():
                out[domain] = cached[1]
            else:
                lookups.append(domain)
        if lookups:
            found = await asyncio.gather(*(self._by_mx(d) for d in lookups))
            for domain, destination in zip(lookups, found, strict=True):
                self._mx_cache[domain] = (time.monotonic() + MX_CACHE_SECONDS, destination)
                out[domain] = destination
        return out

    async def _by_mx(self, domain: str) -> str:
        """A known provider whose MX suffix one of the domain's MX hosts has; else its primary
        MX host, so that domains hosted on the same servers share one set of limits (and one
        pause); else (no MX, a null MX, a DNS failure) the domain itself."""
        import dns.exception

        resolver = self.resolver or dns.asyncresolver.get_default_resolver()
        try:
            answer = await resolver.resolve(domain, "MX", lifetime=MX_TIMEOUT)
        except (dns.exception.DNSException, OSError):
            return domain
        records = sorted(answer, key=lambda r: r.preference)
        for record in records:
            provider = self.for_mx(str(record.exchange))
            if provider is not None:
                return provider
        primary = str(records[0].exchange).lower().rstrip(".") if records else ""
        return primary or domain  # a null MX ("0 .") names no host


_DEFAULT = DestinationMap()


def destination_for(domain: str) -> str:
    """The destination of a recipient domain from the shipped table alone (no DNS)."""
    return _DEFAULT.for_domain(domain)


def provider_for_mx(host: str) -> str | None:
    return _DEFAULT.for_mx(host)
