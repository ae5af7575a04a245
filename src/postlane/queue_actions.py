"""What an operator can do to selected recipients (Postfix's postqueue/postsuper verbs), and the
states each action applies to. :class:`~postlane.app.AsyncPostlane` carries the actions out;
the CLI, the HTTP API and the dashboard name them."""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from typing import Any

from postlane.errors import ValidationError
from postlane.records import Selector


class QueueAction(StrEnum):
    """What an operator can do to selected deliveries (Postfix's postqueue/postsuper verbs)."""

    FLUSH = "flush"
    HOLD = "hold"
    RELEASE = "release"
    DELETE = "delete"
    REQUEUE = "requeue"
    PURGE = "purge"


#: the states each action applies to (a selector's --state narrows within them)
ACTION_STATES: dict[QueueAction, tuple[str, ...]] = {
    QueueAction.FLUSH: ("queued", "deferred"),
    QueueAction.HOLD: ("queued", "deferred", "sending"),
    QueueAction.RELEASE: ("held", "sending"),
    # a delivery being sent is never deleted under its worker: its result decides
    QueueAction.DELETE: ("queued", "deferred", "held"),
    QueueAction.REQUEUE: ("dead",),
    QueueAction.PURGE: ("dead",),
}
#: delete may also remove finished recipients when asked for them by --state
_DELETABLE = ("queued", "deferred", "held", "sent", "dead", "suppressed")


@dataclasses.dataclass(frozen=True)
class Requeued:
    """What :meth:`AsyncPostlane.requeue` did."""

    #: recipients requeued
    count: int
    #: addresses whose suppression was lifted for the requeue (``unsuppress=True``)
    unsuppressed: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"requeued": self.count, "unsuppressed": list(self.unsuppressed)}


def action_states(action: QueueAction, selector: Selector) -> tuple[str, ...]:
    allowed = _DELETABLE if action is QueueAction.DELETE else ACTION_STATES[action]
    if not selector.states:
        return ACTION_STATES[action]
    chosen = tuple(s.value for s in selector.states if s.value in allowed)
    if not chosen:
        wanted = ", ".join(s.value for s in selector.states)
        raise ValidationError(
            f"{action.value} does not apply to {wanted} recipients "
            f"(it applies to: {', '.join(allowed)})"
        )
    paused = selector.relay_paused_until is not None
    if paused and "queued" in allowed and "deferred" in chosen and "queued" not in chosen:
        # what the views show deferred while the relay is paused is queued in the store
        return (*chosen, "queued")
    return chosen
