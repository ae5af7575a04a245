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
