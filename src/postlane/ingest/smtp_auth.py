"""SMTP AUTH for submission: who may try a password now, the check itself, and what a failure
costs.

A password guess is expensive for the guesser and cheap for everyone else:

- Failure budgets. ``auth_failures_per_address`` failed attempts from one address (an IPv6
  /64) and ``auth_failures_total`` from all addresses within ``auth_failure_window``; beyond
  either, AUTH is refused without checking anything (the address: 421 and closed; the total:
  454), and so is a new connection from such an address (421, before any TLS handshake). An
  attempt being checked counts against the budgets until its answer, so fifty parallel
  connections get no more checks than one. An address that logged in
  successfully within the last day is spared the total budget (a botnet's guesses do not lock
  out the applications that know their password); never its own.
- Growing delays. The n-th failure of an address within the window is answered after
  ``0.5 s * 2**(n-1)`` (at most 16 s), whichever connection it comes on.
- One cost for everyone. Each check is one scrypt of the default parameters, for a known user
  and an unknown one alike (an unknown user, or a plain password in the configuration, is
  checked against a throwaway hash), so the time of a 535 does not say whether a user exists.
- Off the event loop. Checks run on two threads of their own (scrypt releases the GIL), so
  guessing never stalls the sessions, the API or the worker sharing the loop.
- Quiet logs. One warning per minute sums the failures up (how many, from how many addresses,
  the busiest), one when an address or the total first runs out of budget; never a password.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum

from postlane.config import SmtpConfig
from postlane.metrics import SmtpMetrics

log = logging.getLogger("postlane.smtp")

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
#: password checks running at once (each scrypt takes 16 MB and one core for ~40 ms)
CHECK_THREADS = 2
#: the first failure's delay, doubled for each further failure of the address, up to the cap
FAILURE_DELAY, MAX_FAILURE_DELAY = 0.5, 16.0
#: how often the failures are summed up in the log
SUMMARY_INTERVAL = 60.0
#: an address that logged in is spared the total budget this long (and so many are remembered)
KNOWN_GOOD_FOR, MAX_KNOWN_GOOD = 86400.0, 10_000


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A hash for ``[smtp] users`` (what ``postlane hash-password`` prints): scrypt, salted."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Check a password against a ``users`` entry (an scrypt hash, or a plain password)."""
    if not stored.startswith("scrypt$"):
        return hmac.compare_digest(password.encode(), stored.encode())
    try:
        _, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


class Credentials:
    """The configured users, each check costing one scrypt whoever is named (blocking: run it
    on a thread)."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)
        # a hash no password has (random salt and digest): checking against it costs what
        # checking a real user's password costs, and never matches
        b64 = base64.b64encode
        salt, digest = b64(os.urandom(16)).decode(), b64(os.urandom(64)).decode()
        self._throwaway = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt}${digest}"

    def check(self, username: str, password: str) -> bool:
        stored = self._users.get(username)
        if stored is not None and stored.startswith("scrypt$"):
            return verify_password(password, stored)
        verify_password(password, self._throwaway)  # the cost of a real user's check
        return stored is not None and hmac.compare_digest(password.encode(), stored.encode())


class Outcome(StrEnum):
    SUCCESS = "success"
    INVALID = "invalid"
    #: refused unchecked: this address is over its budget (421, then the connection closes)
    REFUSED_ADDRESS = "refused_address"
    #: refused unchecked: all addresses together are over the total budget (454)
    REFUSED_TOTAL = "refused_total"


def address_key(host: object) -> str:
    """Whose budget an attempt counts against: the IPv4 address, or the IPv6 /64 (one host
    usually holds a whole /64)."""
    try:
        address = ipaddress.ip_address(str(host))
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class FailureBudgets:
    """Failed attempts within the window, per address and in total, plus the attempts being
    checked now (which count until answered). Memory is bounded by the budgets: only failures
    within the window are kept, and there are never more than the total budget of them (plus
    those of addresses spared it, each within its own budget)."""

    def __init__(
        self, per_address: int, total: int, window: float, clock: Callable[[], float]
    ) -> None:
        self.per_address = per_address
        self.total = total
        self.window = window
        self._clock = clock
        self._failures: collections.deque[tuple[float, str]] = collections.deque()
        self._by_address: collections.Counter[str] = collections.Counter()
        self._pending: collections.Counter[str] = collections.Counter()
        self._known_good: dict[str, float] = {}

    def _expire(self, now: float) -> None:
        while self._failures and self._failures[0][0] <= now - self.window:
            _, key = self._failures.popleft()
            self._by_address[key] -= 1
            if self._by_address[key] <= 0:
                del self._by_address[key]

    def _spent(self, key: str) -> int:
        return self._by_address.get(key, 0) + self._pending.get(key, 0)

    def address_blocked(self, key: str) -> bool:
        self._expire(self._clock())
        return self._spent(key) >= self.per_address

    def total_blocked(self, key: str) -> bool:
        now = self._clock()
        self._expire(now)
        if self._known_good.get(key, -KNOWN_GOOD_FOR) > now - KNOWN_GOOD_FOR:
            return False
        return len(self._failures) + self._pending.total() >= self.total

    def reserve(self, key: str) -> Outcome | None:
        """Take one attempt from the budgets for a check, or say which budget refuses it."""
        if self.address_blocked(key):
            return Outcome.REFUSED_ADDRESS
        if self.total_blocked(key):
            return Outcome.REFUSED_TOTAL
        self._pending[key] += 1
        return None

    def settle(self, key: str, success: bool) -> int:
        """The checked attempt's result; returns the address's failures within the window."""
        self._pending[key] -= 1
        if self._pending[key] <= 0:
            del self._pending[key]
        now = self._clock()
        if success:
            self._known_good.pop(key, None)
            self._known_good[key] = now
            if len(self._known_good) > MAX_KNOWN_GOOD:
                del self._known_good[next(iter(self._known_good))]
            return self._by_address.get(key, 0)
        self._failures.append((now, key))
        self._by_address[key] += 1
        return self._by_address[key]


class FailureLog:
    """Failures summed up per interval instead of one line each (an attack makes thousands)."""

    def __init__(self) -> None:
        self.failures = 0
        self.refused = 0
        self.addresses: collections.Counter[str] = collections.Counter()
        self._blocked: set[str] = set()
        self._total_blocked = False

    def failed(self, key: str) -> None:
        self.failures += 1
        self.addresses[key] += 1

    def refused_unchecked(self, key: str, outcome: Outcome, budgets: FailureBudgets) -> None:
        self.refused += 1
        self.addresses[key] += 1
        if outcome is Outcome.REFUSED_ADDRESS and key not in self._blocked:
            self._blocked.add(key)
            log.warning(
                "SMTP AUTH: %s is over its budget of %d failed attempts in %s; "
                "refused without checking until they age out",
                key,
                budgets.per_address,
                _seconds(budgets.window),
            )
        elif outcome is Outcome.REFUSED_TOTAL and not self._total_blocked:
            self._total_blocked = True
            log.warning(
                "SMTP AUTH: over the total budget of %d failed attempts in %s (all addresses); "
                "AUTH refused with 454 without checking, except for addresses that logged in "
                "within a day",
                budgets.total,
                _seconds(budgets.window),
            )

    def flush(self, interval: float) -> None:
        if self.failures or self.refused:
            busiest, count = self.addresses.most_common(1)[0]
            log.warning(
                "SMTP AUTH: %d failed attempts and %d refused unchecked from %d addresses in the "
                "last %s (most from %s: %d)",
                self.failures,
                self.refused,
                len(self.addresses),
                _seconds(interval),
                busiest,
                count,
            )
        self.failures = self.refused = 0
        self.addresses.clear()
        self._blocked.clear()
        self._total_blocked = False


def _seconds(value: float) -> str:
    return f"{value:g}s"


class AuthGuard:
    """Decides and checks every AUTH attempt of one listener (see the module docstring)."""

    def __init__(
        self,
        smtp: SmtpConfig,
        metrics: SmtpMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        summary_interval: float = SUMMARY_INTERVAL,
    ) -> None:
        self.budgets = FailureBudgets(
            smtp.auth_failures_per_address,
            smtp.auth_failures_total,
            smtp.auth_failure_window,
            clock,
        )
        self._credentials = Credentials(smtp.users)
        self._metrics = metrics
        self._log = FailureLog()
        self._interval = summary_interval
        self._executor = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="postlane-auth")
        self._summaries: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._summaries = asyncio.create_task(self._summarize(), name="postlane-smtp-auth-log")

    async def close(self) -> None:
        if self._summaries is not None:
            self._summaries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._summaries
        self._log.flush(self._interval)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _summarize(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self._log.flush(self._interval)

    def refuses_connections_from(self, host: object) -> bool:
        """An address AUTH would refuse unchecked (over its budget, or over the total one and
        not known good) is refused at connect instead, before it costs a TLS handshake."""
        key = address_key(host)
        return self.budgets.address_blocked(key) or self.budgets.total_blocked(key)

    async def authenticate(self, host: object, username: str, password: str) -> Outcome:
        key = address_key(host)
        refused = self.budgets.reserve(key)
        if refused is not None:
            self._metrics.auth_failures.labels("refused").inc()
            self._log.refused_unchecked(key, refused, self.budgets)
            return refused
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(
                self._executor, self._credentials.check, username, password
            )
        except BaseException:
            self.budgets.settle(key, success=False)  # a cut-off check counts as a failure
            raise
        failures = self.budgets.settle(key, success=ok)
        if ok:
            return Outcome.SUCCESS
        self._metrics.auth_failures.labels("invalid").inc()
        self._log.failed(key)
        await asyncio.sleep(min(FAILURE_DELAY * 2 ** (failures - 1), MAX_FAILURE_DELAY))
        return Outcome.INVALID
