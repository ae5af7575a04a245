"""Which sender domains a caller may send from, as configured: ``[http] send_tokens`` (a
bearer token each, bound or not to domains) and ``[smtp] user_senders`` (SMTP users bound the
same way). Read here, checked for every message by :mod:`postlane.auth`."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from postlane import toml_values


@dataclass(frozen=True)
class SendToken:
    """One of ``[http] send_tokens``: a bearer token that may enqueue mail and read back what
    it enqueued, and, with ``senders``, only mail from those sender domains (one token per
    application or tenant, so none sends as another's domain)."""

    token: str = field(repr=False)
    #: the sender domains its mail may come from, lower-cased; exact (a subdomain is listed
    #: on its own). None: any domain
    senders: tuple[str, ...] | None = None


#: the keys of a ``[http] send_tokens`` table
_SEND_TOKEN_KEYS = ("token", "senders")


class _SendTokenError(toml_values.UnexpectedValue):
    """What is wrong with one of ``[http] send_tokens``, said by its place ("token 2 of 3",
    "sender 1 of 2"), never by its value: the key holds secrets, and its values (the domains
    beside the tokens too) are masked in every configuration error."""

    def __init__(self, problem: str) -> None:
        ValueError.__init__(self, problem)
        self.what = problem
        self.value = None

    def without_value(self) -> str:
        return self.what


def send_tokens(value: Any) -> tuple[SendToken, ...]:
    """``[http] send_tokens``: tokens as strings (they may send from any domain), or tables
    ``{ token = "...", senders = ["shop.example.com"] }`` (``[[http.send_tokens]]`` too) bound
    to the sender domains they may send from."""
    if not isinstance(value, list):
        raise toml_values.expected(
            'a list of tokens, or of tables like { token = "...", senders = ["example.com"] }',
            value,
        )
    tokens = tuple(
        _send_token(item, f"token {number} of {len(value)}") for number, item in enumerate(value, 1)
    )
    first: dict[str, int] = {}
    for number, token in enumerate(tokens, 1):
        seen = first.setdefault(token.token, number)
        if tokens[seen - 1].senders != token.senders:
            raise _SendTokenError(
                f"token {number} of {len(tokens)} is token {seen} again, with other senders: "
                "list a token once, with all the domains it may send from"
            )
    return tokens


def _send_token(item: Any, where: str) -> SendToken:
    if isinstance(item, str):
        return SendToken(item)
    if not isinstance(item, Mapping):
        raise _SendTokenError(
            f'{where}: expected a token (a string) or a table {{ token = "...", senders = '
            f'["example.com"] }}, got {toml_values.kind_of(item)}'
        )
    unknown = [key for key in item if key not in _SEND_TOKEN_KEYS]
    if unknown:  # the key itself is not shown: it might be a token written in the wrong place
        near = difflib.get_close_matches(str(unknown[0]), _SEND_TOKEN_KEYS, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise _SendTokenError(f"{where}: a table takes the keys token and senders only{hint}")
    token = item.get("token")
    if token is None:
        raise _SendTokenError(f'{where}: the table has no token (token = "...")')
    if not isinstance(token, str):
        raise _SendTokenError(f"{where}: token must be a string, got {toml_values.kind_of(token)}")
    if "senders" not in item:
        return SendToken(token)
    return SendToken(token, _sender_domains(item["senders"], where))


def _sender_domains(value: Any, where: str, holder: str = "token") -> tuple[str, ...]:
    """The sender domains a ``holder`` (a send token, an SMTP user) may send from."""
    if not isinstance(value, list):
        raise _SendTokenError(
            f"{where}: senders must be a list of domains like "
            f'["shop.example.com"], got {toml_values.kind_of(value)}'
        )
    if not value:
        raise _SendTokenError(
            f"{where}: senders is empty, so the {holder} could send nothing: list the domains "
            f"it may send from, or leave it out for a {holder} that may send from any domain"
        )
    domains = []
    for number, domain in enumerate(value, 1):
        try:
            domains.append(toml_values.mail_domain(domain))
        except ValueError:
            text = domain if isinstance(domain, str) else ""
            hint = ""
            if "@" in text:
                hint = " (a domain, not an address)"
            elif "*" in text:
                hint = " (no wildcards: list each subdomain)"
            raise _SendTokenError(
                f"{where}: sender {number} of {len(value)} is not a domain name like "
                f"shop.example.com{hint}"
            ) from None
    return tuple(dict.fromkeys(domains))


def user_senders(value: Any) -> dict[str, tuple[str, ...]]:
    """``[smtp] user_senders``: SMTP users (of ``users``) bound to the sender domains they
    may send from, ``{ shop = ["shop.example.com"] }``; a user not named may send from any."""
    if not isinstance(value, Mapping):
        raise toml_values.expected('a table like { shop = ["shop.example.com"] }', value)
    return {
        str(user): _sender_domains(senders, f"user {user}", "user")
        for user, senders in value.items()
    }
