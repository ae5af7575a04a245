"""The capture transport (the default): each delivery becomes an ``.eml`` file in a folder, so
nothing leaves the machine until a relay is configured."""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path

from postlane.transports.base import BaseTransport, Envelope, Response

#: headers prepended to each captured file, so the envelope is visible (like Postfix's
#: X-Original-To / Return-Path)
ENVELOPE_FROM = "X-Postlane-Envelope-From"
ENVELOPE_TO = "X-Postlane-Envelope-To"


class CaptureTransport(BaseTransport):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.name = f"capture://{folder}"
        self._counter = itertools.count(1)

    async def send(self, envelope: Envelope) -> list[Response]:
        path = self.folder / f"{envelope.queue_id}-{os.getpid()}-{next(self._counter)}.eml"
        try:
            await asyncio.to_thread(self._write, path, envelope)
        except OSError as exc:
            text = f"451 4.3.0 cannot write {path}: {exc.strerror}"
            return [Response(451, text, self.name) for _ in envelope.recipients]
        reply = f"250 2.0.0 Ok: captured as {path.name}"
        return [Response(250, reply, self.name) for _ in envelope.recipients]

    def _write(self, path: Path, envelope: Envelope) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        head = (
            f"{ENVELOPE_FROM}: <{envelope.sender}>\r\n"
            f"{ENVELOPE_TO}: {', '.join(f'<{r}>' for r in envelope.recipients)}\r\n"
        ).encode()
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            handle.write(head + envelope.content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    async def close(self) -> None:
        return None
