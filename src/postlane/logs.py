"""Logging: readable lines by default, one JSON object per line with ``[log] format = "json"``.

Every delivery attempt is one line on the ``postlane.attempts`` logger (queue id, recipient
domain, destination, class, code, enhanced code, duration, decision); the JSON format carries
those as fields. Nothing postlane logs contains a message body, a password or a token.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from postlane.config import LogConfig

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
