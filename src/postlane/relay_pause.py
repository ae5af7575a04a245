"""How the views show the queue while the relay every delivery goes through is paused."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from postlane.message import RecipientState
from postlane.records import MessageView, RecipientView, Selector, Stats, paused_reason

#: the states of recipients waiting for a try
WAITING = frozenset({RecipientState.QUEUED, RecipientState.DEFERRED})


@dataclass(frozen=True)
class RelayPause:
    """The recorded pause of the relay every delivery goes through. Meanwhile no worker claims
    anything (``ThrottleGate.relay_paused_until``), so the waiting mail goes at the pause's end
    whatever its own next attempt says; the views say so, rather than a time long past. (The
    rows are not rewritten: a relay outage would rewrite the whole queue at every pause and
    every failed probe, 2.6 s of the store's write lock for 300,000 recipients each time.)"""

    #: the relay's name among the destinations (``relay``, ``ses``, ...)
    name: str
    until: float

    @staticmethod
    def views(pause: RelayPause | None, views: Sequence[MessageView]) -> list[MessageView]:
        """``views`` as they show while ``pause`` lasts (None: no pause, as they are)."""
        return list(views) if pause is None else [pause.view(v) for v in views]

    @staticmethod
    def selection(pause: RelayPause | None, selector: Selector) -> Selector:
        """``selector`` reading states as the views show them: waiting mail due before the
        pause's end is ``deferred`` (a ``--state deferred`` selected a seventh of what ``queue
        list`` showed deferred: an operator audit)."""
        if pause is None:
            return selector
        return dataclasses.replace(selector, relay_paused_until=pause.until)

    def view(self, message: MessageView) -> MessageView:
        """``message`` with its waiting recipients due no sooner than the pause's end."""
        recipients = tuple(self._recipient(r) for r in message.recipients)
        if recipients == message.recipients:
            return message
        return dataclasses.replace(message, recipients=recipients)

    def _recipient(self, recipient: RecipientView) -> RecipientView:
        due = recipient.next_attempt_at
        if recipient.state not in WAITING or due is None or due >= self.until:
            return recipient
        return dataclasses.replace(
            recipient,
            state=RecipientState.DEFERRED,
            next_attempt_at=self.until,
            reason=paused_reason(self.name),
        )

    def stats(self, stats: Stats) -> Stats:
        """``stats`` with what was ready counted deferred: nothing is taken before the end."""
        lanes = {
            lane: dataclasses.replace(s, ready=0, deferred=s.deferred + s.ready)
            for lane, s in stats.lanes.items()
        }
        return dataclasses.replace(stats, lanes=lanes)
