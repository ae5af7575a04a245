"""Keeping secrets out of messages: URLs with their credentials masked, and known secret values
replaced wherever they appear.

Configuration errors, log lines and ``-v`` output may name a relay URL or a store URL; the
password in ``smtp://user:PASSWORD@host`` or the token in ``postmark://TOKEN`` must never show
with it. :func:`mask_url` masks what a URL's own syntax marks as a credential;
:func:`redact` is the net under it, replacing the values the configuration declared secret
(``password``, ``tokens``, ``*_file`` contents, ...) in any text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MASK", "is_secret_key", "mask_url", "misplaced_userinfo", "redact", "url_secrets"]

#: what a secret is replaced with
MASK = "****"

#: keys whose values are secrets: shown in no message, masked in every one
_SECRET_WORDS = ("password", "secret", "token", "tokens", "key", "users", "signature")
#: keys named like secrets that hold the path of a file holding one (the path is no secret)
_PATHS = frozenset({"private_key", "ed25519_private_key", "tls_key"})
#: schemes whose user info may be a user name alone, no secret (``smtp://user@host``)
_USER_NAMES = frozenset({"smtp", "smtps", "postgresql", "postgres"})
#: URL schemes whose credentials are the whole part before ``@`` (or, without one, the host
#: part itself: ``postmark://TOKEN``)
_CREDENTIALS_IN_HOST = frozenset({"sendgrid", "postmark"})
_PROVIDER_SCHEMES = frozenset({"sendgrid", "postmark", "mailgun", "ses"})
#: the URLs whose user info holds credentials (the relay's, the store's, a provider's)
_CREDENTIAL_SCHEMES = _USER_NAMES | _PROVIDER_SCHEMES
#: the URLs libpq reads (their authority ends at "/" only)
_LIBPQ = frozenset({"postgresql", "postgres"})
#: a secret shorter than this is not replaced in free text (it would mangle the words around)
_SHORTEST = 4


def is_secret_key(key: str) -> bool:
    """Whether a configuration key holds a secret: ``password``, ``secret``, ``token(s)``,
    ``key`` and the keys ending so (``signing_key``, ``verification_key``, ``send_tokens``),
    and ``[smtp] users`` (passwords by user name)."""
    name = key.lower().rsplit(".", 1)[-1]
    if name in _PATHS:
        return False
    return any(name == word or name.endswith("_" + word) for word in _SECRET_WORDS)


def mask_url(url: str) -> str:
    """``url`` fit for a message: the password of its user info masked (the whole user info,
    or the host part of ``sendgrid://KEY`` and ``postmark://TOKEN``, for provider URLs), and
    query values whose names are secret (``?token=...``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    scheme_name = scheme.lower()
    if misplaced_userinfo(rest, scheme_name):
        # a password holding what ends the user info unencoded (see misplaced_userinfo): the
        # whole of it, to the "@" that ends it, is masked (more than needed at worst, never less)
        region = rest.partition("?")[0] if scheme_name in _LIBPQ else rest
        cut = region.rfind("@")
        userinfo, rest = rest[:cut], rest[cut + 1 :]
        user, colon, _ = userinfo.partition(":")
        masked = f"{user}:{MASK}" if scheme_name in _USER_NAMES and colon else MASK
        rest, question, query = rest.partition("?")
        return f"{scheme}://{masked}@{rest}{question}{_masked_query(query)}"
    end = _authority_end(scheme_name, rest)
    netloc, remainder = rest[:end], rest[end:]
    path, question, query = remainder.partition("?")
    userinfo, at, host = netloc.rpartition("@")
    if at:
        if scheme_name in _USER_NAMES and ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + MASK
        elif scheme_name not in _USER_NAMES:
            userinfo = MASK
        netloc = f"{userinfo}@{host}"
    elif scheme_name in _CREDENTIALS_IN_HOST and netloc:
        netloc = MASK
    return f"{scheme}://{netloc}{path}{question}{_masked_query(query)}"


def _authority_end(scheme: str, rest: str) -> int:
    """Where the authority (user info, host, port) of ``scheme://rest`` ends, as the program
    that reads the URL decides: libpq (PostgreSQL) at the first ``/`` only (a password may hold
    ``?`` and ``#``), Python's URL parser (relays, providers) at the first ``/``, ``?`` or
    ``#``; other URLs here at the first ``/`` or ``?``."""
    ends = "/" if scheme in _LIBPQ else "/?#" if scheme in _CREDENTIAL_SCHEMES else "/?"
    return min((i for i in (rest.find(c) for c in ends) if i >= 0), default=len(rest))


def _masked_query(query: str) -> str:
    """A URL's query with the values of secret names masked (``token=****``)."""
    pairs = []
    for pair in query.split("&") if query else ():
        name, equals, _value = pair.partition("=")
        pairs.append(f"{name}={MASK}" if equals and is_secret_key(name) else pair)
    return "&".join(pairs)


def misplaced_userinfo(rest: str, scheme: str) -> bool:
    """Whether the part of a ``scheme`` URL (one that carries credentials) after ``scheme://``
    has its ``@`` only past where its authority ends (:func:`_authority_end`): a password
    holding that character unencoded, such as ``smtp://user:Zx9/kLm2@host``, which the URL's
    reader splits inside the password (a "port" ``Zx9``, a path ``/kLm2@host``). An ``@`` in a
    PostgreSQL URL's query is a parameter's value (``?user=app@tenant``), not user info."""
    scheme = scheme.lower()
    if scheme not in _CREDENTIAL_SCHEMES or rest.startswith("/"):  # sqlite:///, capture:///
        return False
    end = _authority_end(scheme, rest)
    after = rest[end:].partition("?")[0] if scheme in _LIBPQ else rest[end:]
    return "@" not in rest[:end] and "@" in after


def url_secrets(url: str) -> set[str]:
    """The credentials :func:`mask_url` hides in ``url`` (to :func:`redact` them elsewhere:
    a message may quote the URL in pieces)."""
    found: set[str] = set()
    masked = mask_url(url)
    if masked == url:
        return found
    # the differing stretches of the URL and its masked form are the secrets
    for original, _ in _differences(url, masked):
        found.add(original)
        if ":" in original:  # ses://KEY:SECRET@REGION: each half is a secret too
            found.update(part for part in original.split(":") if part)
    return found


def _differences(text: str, masked: str) -> Iterable[tuple[str, str]]:
    pattern = "(.*?)".join(re.escape(part) for part in masked.split(MASK))
    match = re.fullmatch(pattern, text, re.DOTALL)
    if match is None:
        return []
    return [(group, MASK) for group in match.groups() if group]


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every one of ``secrets`` replaced by :data:`MASK` (the longest first, so
    a secret that contains another goes whole; as written, and as Python's repr escapes it)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) < _SHORTEST:
            continue
        text = text.replace(secret, MASK)
        escaped = repr(secret)[1:-1]
        if escaped != secret:
            text = text.replace(escaped, MASK)
    return text
