"""Destinations: the unit that throttling, pauses and metrics work on.

A recipient domain belongs to a known provider (google, microsoft, yahoo, ...) when it is one of
the provider's domains or its MX hosts end with one of the provider's suffixes; else the domain is
its own destination. The table is data (``data/providers.toml``), not code.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources


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


@cache
def _by_domain() -> dict[str, str]:
    return {domain: p.name for p in known_providers() for domain in p.domains}


def provider_names() -> frozenset[str]:
    return frozenset(p.name for p in known_providers())


def destination_for(domain: str) -> str:
    """The destination of a recipient domain, from the domain alone (no DNS)."""
    domain = domain.lower().rstrip(".")
    return _by_domain().get(domain, domain)


def provider_for_mx(host: str) -> str | None:
    """The provider whose MX suffix ``host`` ends with, if any."""
    host = host.lower().rstrip(".")
    for provider in known_providers():
        for suffix in provider.mx_suffixes:
            if host == suffix or host.endswith("." + suffix):
                return provider.name
    return None
