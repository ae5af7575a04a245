"""Django signals for postlane's events: what happened to each recipient, told to the
application's receivers::

    from django.dispatch import receiver
    from postlane.django.signals import mail_event, bounced

    @receiver(mail_event)
    def on_mail_event(sender, event, **kwargs):
        ...                                   # every event: event["type"], event["metadata"], ...

    @receiver(bounced)
    def on_bounce(sender, event, **kwargs):
        ...                                   # only bounces

``event`` is the event as ``GET /v1/events`` and the webhooks give it (a dict: ``id``, ``type``,
``at``, ``message_id``, ``recipient``, ``lane``, ``class``, ``code``, ``enhanced``, ``text``,
``metadata``); ``sender`` is the class that told it:
:class:`postlane.django.events.EventRelay` (the command) or
:class:`postlane.webhooks.subscribers.EventSubscribers` (in process). For each event
:data:`mail_event` is sent first, then the signal of its type.

What sends them: ``manage.py postlane_events [--follow]`` (reads the log from a cursor it saves
in ``POSTLANE_EVENTS_CURSOR_FILE``), or, in a process that embeds postlane,
:func:`connect_subscribers` on an :class:`~postlane.webhooks.subscribers.EventSubscribers`.
"""

from __future__ import annotations

from django.dispatch import Signal  # type: ignore[import-untyped]

from postlane.events import EVENT_TYPES

__all__ = [
    "SIGNALS",
    "bounced",
    "complained",
    "dead",
    "deferred",
    "deleted",
    "expired",
    "mail_event",
    "queued",
    "sent",
    "suppressed",
    "unsubscribed",
]

#: every event, whatever its type (sent first)
mail_event = Signal()

#: one signal per event type, sent after :data:`mail_event`
queued = Signal()
sent = Signal()
deferred = Signal()
bounced = Signal()
complained = Signal()
unsubscribed = Signal()
dead = Signal()
suppressed = Signal()
expired = Signal()
deleted = Signal()

#: the signal of each event type
SIGNALS: dict[str, Signal] = {
    "queued": queued,
    "sent": sent,
    "deferred": deferred,
    "bounced": bounced,
    "complained": complained,
    "unsubscribed": unsubscribed,
    "dead": dead,
    "suppressed": suppressed,
    "expired": expired,
    "deleted": deleted,
}
assert tuple(SIGNALS) == EVENT_TYPES, "a signal for every event type"
