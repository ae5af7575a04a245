"""Logging: readable lines by default, one JSON object per line with ``[log] format = "json"``.

Every delivery attempt is one line on the ``postlane.attempts`` logger (queue id, recipient
domain, destination, class, code, enhanced code, duration, decision; :func:`log_attempt`), and
so is every recipient dead-lettered without one (:func:`log_expiry`); the JSON format carries
those as fields. Nothing postlane logs contains a message body, a password or a token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from postlane.classify import ReplyClass, Verdict
from postlane.config import LogConfig
from postlane.policy import Decision
from postlane.records import ClaimedMessage, Delivery

#: attributes every LogRecord has; the rest came from ``extra=`` and become JSON fields
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_NOISY = ("aiosmtplib", "mail.log", "uvicorn.access", "uvicorn.error", "asyncio")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(settings: LogConfig, *, debug: bool = False) -> None:
    """Configure the root logger once for a postlane process (serve, worker, CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else getattr(logging, settings.level.upper()))
    if not debug:
        for noisy in _NOISY:
            logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("postlane.attempts").disabled = not settings.attempts


class OutageLog:
    """The lines of a task that keeps failing while the store cannot answer: the first failure
    at once, then one line a minute saying how many more, and one when it works again. (A
    store that could not be written made two warnings a second for as long as it lasted.)"""

    INTERVAL = 60.0

    def __init__(self, logger: logging.Logger, what: str, clock: Any = None) -> None:
        import time

        self._logger = logger
        self._what = what
        self._clock = clock or time.monotonic
        self._since: float | None = None
        self._logged_at = 0.0
        self._unlogged = 0

    def failed(self, error: object) -> None:
        now = self._clock()
        if self._since is None:
            self._since = now
        elif now - self._logged_at < self.INTERVAL:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more time(s) since the last line)" if self._unlogged else ""
        self._logger.warning("%s: the store cannot answer: %s%s", self._what, error, more)
        self._logged_at = now
        self._unlogged = 0

    def answered(self) -> None:
        if self._since is None:
            return
        lasted = self._clock() - self._since
        self._logger.warning("%s: the store answers again (after %.0f s)", self._what, lasted)
        self._since = None
        self._unlogged = 0


# -- the attempts' lines -----------------------------------------------------------------------

#: one line per delivery attempt (and per recipient dead-lettered without one)
attempt_log = logging.getLogger("postlane.attempts")


def log_attempt(
    message: ClaimedMessage,
    delivery: Delivery,
    verdict: Verdict,
    decision: Decision,
    duration_ms: int,
    recipients: str = "none",
    misconfigured: str | None = None,
) -> None:
    """One line per attempt, never the content; the recipient as ``[log] recipients`` says
    (by default the domain only); for a misconfiguration, what is wrong."""
    if not attempt_log.isEnabledFor(logging.INFO):
        return
    recipient = logged_recipient(delivery.address, recipients)
    reply = logged_reply(verdict.text, delivery.address, recipient)
    attempt_log.info(
        "attempt id=%s domain=%s%s destination=%s class=%s code=%s enhanced=%s "
        "duration_ms=%d next=%s%s reply=%s",
        message.queue_id,
        delivery.domain,
        f" recipient={recipient}" if recipient else "",
        delivery.destination,
        verdict.cls.value,
        verdict.code if verdict.code is not None else "-",
        verdict.enhanced or "-",
        duration_ms,
        decision.action.value,
        f' misconfigured="{misconfigured}"' if misconfigured else "",
        json.dumps(reply, ensure_ascii=False),
        extra={
            "event": "attempt",
            **({"misconfigured": misconfigured} if misconfigured else {}),
            "id": message.queue_id,
            "domain": delivery.domain,
            **({"recipient": recipient} if recipient else {}),
            "destination": delivery.destination,
            "class": verdict.cls.value,
            "code": verdict.code,
            "enhanced": verdict.enhanced,
            "duration_ms": duration_ms,
            "decision": decision.action.value,
            "lane": message.lane.value,
            "reply": reply,
        },
    )


def log_expiry(
    message: ClaimedMessage,
    delivery: Delivery,
    refusal: str,
    cls: ReplyClass | None,
    recipients: str = "none",
) -> None:
    """One line for a delivery dead-lettered without a try (its time or its tries ran out
    while it waited), as an attempt's line says a dead letter: an operator reading the log
    sees every recipient that went to the dead letters."""
    recipient = logged_recipient(delivery.address, recipients)
    attempt_log.warning(
        "expired id=%s domain=%s%s destination=%s class=%s next=dead reason=%s",
        message.queue_id,
        delivery.domain,
        f" recipient={recipient}" if recipient else "",
        delivery.destination,
        cls.value if cls else "-",
        json.dumps(refusal),
        extra={
            "event": "expired",
            "id": message.queue_id,
            "domain": delivery.domain,
            **({"recipient": recipient} if recipient else {}),
            "destination": delivery.destination,
            "class": cls.value if cls else None,
            "decision": "dead",
            "lane": message.lane.value,
            "reason": refusal,
        },
    )


#: the most of a reply an attempt line carries
LOGGED_REPLY_CHARS = 300


def logged_reply(text: str, address: str, shown: str | None) -> str:
    """A reply's text as an attempt line carries it (what a 3 a.m. operator needs: ``Connection
    refused``, ``4.7.0 try again later``): one line, cut at :data:`LOGGED_REPLY_CHARS`, the
    recipient's address in it shown as ``[log] recipients`` says (``<recipient>`` by default)."""
    line = " ".join(text.split())
    if address:
        line = re.sub(re.escape(address), shown or "<recipient>", line, flags=re.IGNORECASE)
    return line[:LOGGED_REPLY_CHARS]


def logged_recipient(address: str, mode: str) -> str | None:
    """A recipient as an attempt line shows it: nothing, a pseudonym, or the address."""
    if mode == "full":
        return address
    if mode == "hash":
        return hashlib.sha256(address.lower().encode("utf-8")).hexdigest()[:16]
    return None
