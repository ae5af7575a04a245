"""What the transport wrappers that give each recipient a copy of its own share (VERP return
paths, unsubscribe links): ``inner``'s name, shared destination and routes, and sending the
copies side by side with one response each."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from postlane.classify import ReplyClass
from postlane.transports.base import Envelope, Response, WrappingTransport

__all__ = ["PerRecipientTransport"]

log = logging.getLogger("postlane.transports")


class PerRecipientTransport(WrappingTransport):
    """A wrapper around ``inner`` that sends some messages as one transaction per recipient
    (:meth:`send_each`); everything else, its name, shared destination and routes, is
    ``inner``'s. Subclasses say in :meth:`send` which envelopes they split and how."""

    async def send_each(self, transactions: Sequence[Envelope]) -> list[Response]:
        """Send single-recipient ``transactions`` through ``inner`` side by side; one response
        each, in order. One failing (an exception, a wrong number of responses) is that
        recipient's ``temporary`` attempt; the others' replies stand."""
        if len(transactions) == 1:
            return await self.inner.send(transactions[0])
        replies = await asyncio.gather(*(self._send_one(t) for t in transactions))
        return [reply for one in replies for reply in one]

    async def _send_one(self, envelope: Envelope) -> list[Response]:
        try:
            responses = await self.inner.send(envelope)
        except Exception as exc:  # the worker's rule (invariant 9), per recipient here
            log.exception("transport %s failed unexpectedly", self.inner.name)
            text = f"unexpected error in transport {self.inner.name}: {type(exc).__name__}: {exc}"
            return [Response(None, text, self.inner.name, failure=ReplyClass.TEMPORARY)]
        if len(responses) != 1:
            text = f"transport {self.inner.name} returned {len(responses)} responses for 1"
            return [Response(None, text, self.inner.name, failure=ReplyClass.TEMPORARY)]
        return responses
