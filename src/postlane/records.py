"""Values that cross the store boundary: what a claim hands a worker, what a worker records, and
the read-side views the CLI, HTTP API and dashboard render (with their contract JSON shapes)."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from postlane.classify import ReplyClass
from postlane.clock import iso
from postlane.message import Lane, RecipientState

# -- JSON ----------------------------------------------------------------------------------------

#: the key of a field's :class:`_JsonSpec` in its metadata
_JSON = "postlane.json"


@dataclass(frozen=True)
class _JsonSpec:
    key: str | None = None
    render: Callable[[Any], Any] | None = None
    shown: bool = True
    #: left out while None (a part read only on request), rather than shown as null
    only_when_set: bool = False


_PLAIN = _JsonSpec()


def in_json(
    *,
    key: str | None = None,
    render: Callable[[Any], Any] | None = None,
    only_when_set: bool = False,
) -> Mapping[str, Any]:
    """The metadata of a :class:`JsonRecord`'s field shown under ``key`` (instead of its own
    name), its value passed through ``render`` (e.g. :func:`~postlane.clock.iso`):
    ``field(metadata=in_json(key="class"))``. ``only_when_set``: the key is absent while the
    value is None (a recipient's history, which a listing does not read), not null."""
    return {_JSON: _JsonSpec(key, render, only_when_set=only_when_set)}


#: the metadata of a :class:`JsonRecord`'s field left out of its JSON
NOT_IN_JSON: Mapping[str, Any] = {_JSON: _JsonSpec(shown=False)}


def round_ms(seconds: float) -> float:
    """A duration in seconds to the millisecond, as the JSON documents show durations."""
    return round(seconds, 3)


class JsonRecord:
    """A dataclass whose JSON document (:meth:`as_json`) is its fields in the order they are
    declared, under their own names and with their values as they are, unless their metadata
    says otherwise (:func:`in_json`) or leaves them out (:data:`NOT_IN_JSON`)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            spec: _JsonSpec = f.metadata.get(_JSON, _PLAIN)
            value = getattr(self, f.name)
            if not spec.shown or (spec.only_when_set and value is None):
                continue
            data[spec.key or f.name] = value if spec.render is None else spec.render(value)
        return data


# -- delivery side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One recipient of one message, leased to a worker."""

    id: int
    address: str
    domain: str
    destination: str
    attempts: int
    #: tries that used up no attempt (throttled, connection), for backoff spacing
    deferrals: int
    #: when this recipient joined the queue (its message's arrival, its send_at when it was
    #: scheduled, or its requeue from the dead-letter queue): max_age counts from here
    created_at: float
    #: the class of its last reply (None before any)
    last_class: ReplyClass | None = None
    #: never sent after this time (None: max_age decides)
    expires_at: float | None = None
    #: made due by an operator (``queue flush``) rather than by its retry schedule: a try
    #: that fails for a while uses no attempt
    flushed: bool = False


@dataclass(frozen=True)
class ClaimedMessage:
    """A message with the deliveries of it that one claim leased, and its stored bytes."""

    queue_id: str
    lane: Lane
    sender: str
    message_id: str
    idempotency_key: str | None
    created_at: float
    content: bytes
    deliveries: tuple[Delivery, ...]


@dataclass(frozen=True)
class AttemptRecord:
    """One try at delivering to one recipient, as it goes into the attempt history."""

    at: float
    cls: ReplyClass
    code: int | None
    enhanced: str | None
    text: str
    relay: str
    destination: str
    duration_ms: int
    #: False for throttled/connection deferrals, which use up no attempt
    counted: bool = True


@dataclass(frozen=True)
class Outcome:
    """The new state of one leased delivery, recorded with its attempt in one transaction."""

    delivery_id: int
    state: RecipientState
    attempts: int
    deferrals: int
    next_attempt_at: float | None
    attempt: AttemptRecord | None
    #: add the address to the suppression list (hard bounce)
    suppress: bool = False
    #: why the queue decided this (e.g. "max_attempts 8 reached"), kept with dead letters
    reason: str | None = None
    #: the event this change is told as, when not the state's own (``expired`` for a dead
    #: letter whose time ran out)
    event: str | None = None
    #: without an attempt: the class it is recorded under (a dead letter's, and its event's),
    #: e.g. ``connection`` for one that expired while its relay was paused (None: its last
    #: reply's stays)
    cls: ReplyClass | None = None


# -- read side -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply(JsonRecord):
    code: int | None
    enhanced: str | None
    text: str
    cls: ReplyClass = field(metadata=in_json(key="class"))


@dataclass(frozen=True)
class AttemptView(JsonRecord):
    at: float = field(metadata=in_json(render=iso))
    cls: ReplyClass = field(metadata=in_json(key="class"))
    code: int | None
    enhanced: str | None
    text: str
    duration_ms: int
    relay: str
    destination: str
    counted: bool


def _reply_json(reply: Reply | None) -> dict[str, Any] | None:
    return reply.as_json() if reply else None


def _history_json(history: tuple[AttemptView, ...]) -> list[dict[str, Any]]:
    return [attempt.as_json() for attempt in history]


#: a recipient's or a dead letter's attempts: in its JSON when they were read (one recipient's
#: or message's details), absent from a listing's
_HISTORY = in_json(render=_history_json, only_when_set=True)


@dataclass(frozen=True)
class RecipientView(JsonRecord):
    address: str
    domain: str
    destination: str
    state: RecipientState
    attempts: int
    next_attempt_at: float | None = field(metadata=in_json(render=iso))
    last_response: Reply | None = field(metadata=in_json(render=_reply_json))
    updated_at: float = field(metadata=NOT_IN_JSON)
    reason: str | None = None
    history: tuple[AttemptView, ...] | None = field(default=None, metadata=_HISTORY)

    def as_json(self) -> dict[str, Any]:
        data = super().as_json()
        if self.state not in _WAITING:
            data["next_attempt_at"] = None  # only a waiting recipient has a next attempt
        return data


_WAITING = frozenset({RecipientState.QUEUED, RecipientState.DEFERRED})

#: a message's state is its least advanced recipient's, in this order
_MESSAGE_STATE_ORDER = (
    RecipientState.SENDING,
    RecipientState.QUEUED,
    RecipientState.DEFERRED,
    RecipientState.HELD,
    RecipientState.DEAD,
    RecipientState.BOUNCED,
    RecipientState.COMPLAINED,
    RecipientState.SENT,
    RecipientState.SUPPRESSED,
)


def message_state(states: Sequence[RecipientState]) -> RecipientState:
    present = set(states)
    for state in _MESSAGE_STATE_ORDER:
        if state in present:
            return state
    return RecipientState.QUEUED


@dataclass(frozen=True)
class MessageView:
    id: str
    lane: Lane
    created_at: float
    sender: str
    subject: str
    size: int
    message_id: str
    idempotency_key: str | None
    metadata: Mapping[str, Any]
    recipients: tuple[RecipientView, ...]
    #: who handed it in (not part of the JSON: it identifies an API token)
    submitter: str | None = None
    #: not before this time (None: at once)
    send_at: float | None = None
    #: never after this time
    expires_at: float | None = None

    @property
    def state(self) -> RecipientState:
        return message_state([r.state for r in self.recipients])

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "lane": self.lane,
            "state": self.state,
            "created_at": iso(self.created_at),
            "sender": self.sender,
            "subject": self.subject,
            "size": self.size,
            "message_id": self.message_id,
            "idempotency_key": self.idempotency_key,
            "metadata": dict(self.metadata),
            "send_at": iso(self.send_at) if self.send_at is not None else None,
            "expires_at": iso(self.expires_at) if self.expires_at is not None else None,
            "recipients": [r.as_json() for r in self.recipients],
        }


def _reply_without_class(reply: Reply | None) -> dict[str, Any] | None:
    if reply is None:
        return None
    return {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}


@dataclass(frozen=True)
class DeadLetter(JsonRecord):
    """One dead recipient (the DLQ is one row per dead recipient; ``id`` is its message's id)."""

    id: str
    address: str
    domain: str
    destination: str
    lane: Lane
    attempts: int
    cls: ReplyClass = field(metadata=in_json(key="class"))
    dead_at: float = field(metadata=in_json(render=iso))
    #: its class is the dead letter's own ``class``
    last_response: Reply | None = field(metadata=in_json(render=_reply_without_class))
    relay: str
    reason: str | None
    sender: str
    subject: str
    history: tuple[AttemptView, ...] | None = field(default=None, metadata=_HISTORY)
    #: the store's row of this recipient (not part of the JSON: selects exactly this one)
    delivery_id: int = field(default=0, metadata=NOT_IN_JSON)


@dataclass(frozen=True)
class Suppression:
    """An address postlane never sends to: for every sender (``scope`` "*") or for one sender
    domain, mail of every lane or (``lanes``) of some, until ``expires_at`` (None: for good)."""

    address: str
    created_at: float
    #: where it came from: bounce, dsn, arf, webhook:ses, unsubscribe, operator, api
    source: str
    #: why: hard_bounce, complaint, unsubscribe or manual
    reason: str | None
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    queue_id: str | None = None
    scope: str = "*"
    expires_at: float | None = None
    #: a note: an operator's words, or the reply or report that caused it
    detail: str | None = None
    #: the lanes whose mail it stops, in lane order (None: every lane; a one-click unsubscribe
    #: stops [unsubscribe] lanes, the bulk mail that offered it)
    lanes: tuple[Lane, ...] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "reason": self.reason,
            "scope": self.scope,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at) if self.expires_at is not None else None,
            "detail": self.detail,
            "source": self.source,
            "code": self.code,
            "enhanced": self.enhanced,
            "text": self.text,
            "id": self.queue_id,
            "lanes": None if self.lanes is None else [lane.value for lane in self.lanes],
        }


#: the version tag on every line of an export (``queue delete --export``)
EXPORT_FORMAT = "postlane-export/1"

#: why an address is suppressed
SUPPRESSION_REASONS = ("hard_bounce", "complaint", "unsubscribe", "manual")


@dataclass(frozen=True)
class LaneStats(JsonRecord):
    #: queued and due: what a worker takes next
    ready: int = 0
    deferred: int = 0
    held: int = 0
    sending: int = 0
    oldest_age_seconds: float = field(default=0.0, metadata=in_json(render=round_ms))
    #: queued for later (``send_at`` in the future): not late, not waiting on anything
    scheduled: int = 0


@dataclass(frozen=True)
class Stats:
    lanes: Mapping[Lane, LaneStats]
    sent: int
    dead: int
    suppressed: int
    #: size of the suppression list (addresses), as opposed to recipients recorded suppressed
    suppression_list: int = 0
    #: busy destinations: being sent to, slowed down or paused
    destinations: tuple[DestinationStatus, ...] = ()
    #: recipients sent, then bounced (a DSN or provider event) or complained about
    bounced: int = 0
    complained: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "lanes": {lane.value: self.lanes.get(lane, LaneStats()).as_json() for lane in Lane},
            "sent": self.sent,
            "dead": self.dead,
            "suppressed": self.suppressed,
            "bounced": self.bounced,
            "complained": self.complained,
            "suppression_list": self.suppression_list,
            "destinations": [d.as_json() for d in self.destinations],
        }


@dataclass(frozen=True)
class EnqueueResult(JsonRecord):
    id: str
    duplicate: bool


@dataclass(frozen=True)
class Selector:
    """Which deliveries an operator command touches (exiqgrep's habits: every field narrows)."""

    ids: tuple[str, ...] = ()
    all: bool = False
    lanes: tuple[Lane, ...] = ()
    states: tuple[RecipientState, ...] = ()
    domains: tuple[str, ...] = ()
    classes: tuple[ReplyClass, ...] = ()
    older_than: float | None = None
    sender: str | None = None
    recipient: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: exact recipients by their store rows (the dashboard's dead-letter groups)
    delivery_ids: tuple[int, ...] = ()
    #: mail scheduled for later (``send_at`` still ahead): True includes it; None leaves it to
    #: the action (a flush leaves it alone: it is not late, it is not yet due)
    scheduled: bool | None = None
    #: only mail whose ``send_at`` is at most this time, or none (set by the app, from
    #: ``scheduled`` and the clock)
    send_at_by: float | None = None
    #: only mail with no ``expires_at`` or one after this time (set by the app: a requeue that
    #: names no message leaves expired mail dead)
    expires_after: float | None = None
    #: the end of the pause of the relay every delivery goes through (set by the app): states
    #: are then read as the views show them, waiting mail due before it being ``deferred``
    relay_paused_until: float | None = None


#: the reason recorded on deliveries sent back to wait for their destination (no attempt): a
#: lift of the destination's limits calls them back
WAITING_FOR_DESTINATION = "waiting for the destination's rate, cap or pause"


@dataclass(frozen=True)
class Deferral:
    """A leased delivery handed back, unattempted, to wait until ``until``: its destination
    (or the relay it goes through) cannot take it now.

    ``lifts`` is how many operator lifts of ``waits_for`` the deciding process had heard of.
    An operator's ``queue flush`` in another process may end the pause (or slow-down) the
    decision rested on before the deferral is written; the store then finds more lifts
    recorded, and the delivery is made due now instead of pushed to the end of a pause that is
    over (the flush's own call-back of waiting mail ran while the delivery was still leased,
    and did not see it)."""

    delivery_id: int
    until: float
    #: the destination or relay whose pause or limits sent it back (None: nothing to check)
    waits_for: str | None = None
    lifts: int = 0


def paused_reason(destination: str) -> str:
    """The reason recorded on a paused destination's backlog, pushed to the pause's end (a
    lift of the pause calls it back: ``flush_destinations`` matches it)."""
    return f"destination {destination} is paused"


@dataclass(frozen=True)
class DestinationStatus:
    """What ``stats`` and the HTTP API show about a destination (also what is persisted)."""

    destination: str
    #: the rate allowed now (messages/second), None when unlimited
    rate: float | None
    #: the configured ceiling (None: no limit configured)
    configured_rate: float | None
    paused_until: float | None
    reason: str | None
    in_flight: int = 0
    concurrency: int | None = None
    updated_at: float = 0.0
    #: how many operator lifts of it are recorded (in the store), or the process recording it
    #: had heard of (a generation: see :class:`Deferral`)
    lifts: int = 0

    def as_json(self) -> dict[str, object]:
        return {
            "destination": self.destination,
            "rate": None if self.rate is None else round(self.rate, 3),
            "configured_rate": self.configured_rate,
            "concurrency": self.concurrency,
            "in_flight": self.in_flight,
            "paused_until": iso(self.paused_until),
            "reason": self.reason,
        }


# -- operator side -------------------------------------------------------------------------------


class ProbeTurn(enum.StrEnum):
    """What the fleet's probe after a destination's pause says to a process that asks for it
    (:meth:`postlane.store.base.ThrottleStore.take_probe`)."""

    #: this process probes: one delivery goes, and its reply opens or pauses again
    PROBE = "probe"
    #: another process probes, or its probe failed (a longer pause is recorded): wait
    WAIT = "wait"
    #: another process's probe went through: the destination is open again
    OPEN = "open"


@dataclass(frozen=True)
class FleetShares:
    """Live demands of the fleet's processes on some destinations, by destination then
    owner, and how many processes hold shares at all."""

    demands: Mapping[str, Mapping[str, float]]
    owners: int
    #: since when each (destination, owner) has been asked for
    since: Mapping[tuple[str, str], float] = field(default_factory=dict)


@dataclass(frozen=True)
class SelectionCount(JsonRecord):
    """How many selected deliveries share a lane, domain, state and last reply class."""

    lane: Lane
    domain: str
    state: RecipientState
    cls: ReplyClass | None = field(metadata=in_json(key="class"))
    count: int


@dataclass(frozen=True)
class DeadGroup(JsonRecord):
    """Dead letters that failed the same way: same class, domain and (normalised) reply."""

    cls: ReplyClass = field(metadata=in_json(key="class"))
    domain: str
    code: int | None
    enhanced: str | None
    reply: str
    count: int
    first_dead_at: float = field(metadata=in_json(render=iso))
    last_dead_at: float = field(metadata=in_json(render=iso))
    sample_id: str


@dataclass(frozen=True)
class ShapeRow:
    """qshape's row: a destination domain's waiting recipients by age bucket."""

    domain: str
    total: int
    buckets: tuple[int, ...]

    @property
    def later(self) -> int:
        """Recipients scheduled for later (``send_at`` ahead): in the total, in no age bucket
        (they have not been waiting at all)."""
        return self.total - sum(self.buckets)

    def as_json(self, edges: Sequence[float]) -> dict[str, Any]:
        labels = [f"{int(e // 60)}m" for e in edges] + [f"{int(edges[-1] // 60)}m+"]
        return {
            "domain": self.domain,
            "total": self.total,
            "later": self.later,
            "buckets": dict(zip(labels, self.buckets, strict=True)),
        }


@dataclass(frozen=True)
class ExportedRecipient:
    address: str
    domain: str
    destination: str
    state: RecipientState
    attempts: int
    deferrals: int
    next_attempt_at: float
    created_at: float
    last_response: Reply | None
    reason: str | None
    history: tuple[AttemptView, ...]
    #: when it last changed: a dead letter's time of death, kept across an export and an import
    #: (its dead-letter retention counts from there); None in exports older than this field
    updated_at: float | None = None
    #: never sent after this time (None: max_age decides, and in exports older than the field)
    expires_at: float | None = None


@dataclass(frozen=True)
class ExportedMessage:
    """Everything about a message (content, recipients, histories), for `queue delete --export`
    and `queue import`: one JSON line each."""

    id: str
    lane: Lane
    sender: str
    subject: str
    message_id: str
    idempotency_key: str | None
    metadata: Mapping[str, Any]
    created_at: float
    content: bytes
    recipients: tuple[ExportedRecipient, ...]
    #: not sent before this time (None: at once, and in exports older than the field)
    send_at: float | None = None
    #: never sent after this time (None: max_age decides, and in exports older than the field)
    expires_at: float | None = None

    def as_json(self) -> dict[str, Any]:
        import base64

        return {
            "format": EXPORT_FORMAT,
            "id": self.id,
            "lane": self.lane,
            "sender": self.sender,
            "subject": self.subject,
            "message_id": self.message_id,
            "idempotency_key": self.idempotency_key,
            "metadata": dict(self.metadata),
            "created_at": self.created_at,
            "send_at": self.send_at,
            "expires_at": self.expires_at,
            "content": base64.b64encode(self.content).decode("ascii"),
            "recipients": [
                {
                    "address": r.address,
                    "domain": r.domain,
                    "destination": r.destination,
                    "state": r.state,
                    "attempts": r.attempts,
                    "deferrals": r.deferrals,
                    "next_attempt_at": r.next_attempt_at,
                    "created_at": r.created_at,
                    "last_response": r.last_response.as_json() if r.last_response else None,
                    "reason": r.reason,
                    "updated_at": r.updated_at,
                    "expires_at": r.expires_at,
                    "history": [{**a.as_json(), "at": a.at} for a in r.history],
                }
                for r in self.recipients
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportedMessage:
        """The inverse of :meth:`as_json` (raises KeyError/ValueError/TypeError on bad input)."""
        import base64

        if data.get("format") != EXPORT_FORMAT:
            raise ValueError(f"not a postlane export line (format {EXPORT_FORMAT})")
        recipients = []
        for r in data["recipients"]:
            last = r.get("last_response")
            recipients.append(
                ExportedRecipient(
                    address=str(r["address"]),
                    domain=str(r["domain"]),
                    destination=str(r["destination"]),
                    state=RecipientState(r["state"]),
                    attempts=int(r["attempts"]),
                    deferrals=int(r["deferrals"]),
                    next_attempt_at=float(r["next_attempt_at"]),
                    created_at=float(r["created_at"]),
                    last_response=(
                        Reply(
                            last["code"], last["enhanced"], last["text"], ReplyClass(last["class"])
                        )
                        if last
                        else None
                    ),
                    reason=r.get("reason"),
                    updated_at=(
                        float(r["updated_at"]) if r.get("updated_at") is not None else None
                    ),
                    expires_at=(
                        float(r["expires_at"]) if r.get("expires_at") is not None else None
                    ),
                    history=tuple(
                        AttemptView(
                            at=float(a["at"]),
                            cls=ReplyClass(a["class"]),
                            code=a["code"],
                            enhanced=a["enhanced"],
                            text=str(a["text"]),
                            duration_ms=int(a["duration_ms"]),
                            relay=str(a["relay"]),
                            destination=str(a["destination"]),
                            counted=bool(a["counted"]),
                        )
                        for a in r["history"]
                    ),
                )
            )
        return cls(
            id=str(data["id"]),
            lane=Lane(data["lane"]),
            sender=str(data["sender"]),
            subject=str(data["subject"]),
            message_id=str(data["message_id"]),
            idempotency_key=data.get("idempotency_key"),
            metadata=dict(data.get("metadata") or {}),
            created_at=float(data["created_at"]),
            content=base64.b64decode(data["content"]),
            recipients=tuple(recipients),
            send_at=float(data["send_at"]) if data.get("send_at") is not None else None,
            expires_at=float(data["expires_at"]) if data.get("expires_at") is not None else None,
        )


# -- recorded history ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample(JsonRecord):
    """One minute of recorded history: a lane's depth and oldest age, or (``lane`` "*") the
    queue-wide events of the minute before and the destinations paused then."""

    at: float = field(metadata=in_json(render=iso))
    lane: str
    ready: int = 0
    deferred: int = 0
    held: int = 0
    sending: int = 0
    oldest_age: float = field(
        default=0.0, metadata=in_json(key="oldest_age_seconds", render=round_ms)
    )
    sent: int = 0
    dead: int = 0
    hard_bounces: int = 0
    #: attempts of the minute before that deferred (temporary, throttled, connection)
    deferrals: int = 0
    #: attempts of the minute before classed soft_bounce
    soft_bounces: int = 0
    paused: tuple[str, ...] = field(default=(), metadata=in_json(render=list))
    #: relays or provider accounts paused then for a configuration that cannot work
    misconfigured: tuple[str, ...] = field(default=(), metadata=in_json(render=list))
    #: recipients of the minute before reported bounced after they were sent (a DSN, an event)
    bounced: int = field(default=0, metadata=NOT_IN_JSON)
    #: complaints of the minute before (a feedback loop's report, a provider's event)
    complaints: int = field(default=0, metadata=NOT_IN_JSON)

    @property
    def depth(self) -> int:
        return self.ready + self.deferred + self.sending

    def params(self) -> dict[str, Any]:
        """The ``insert_samples`` parameters (lists as JSON text)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["paused"] = json.dumps(list(self.paused))
        values["misconfigured"] = json.dumps(list(self.misconfigured))
        return values


@dataclass(frozen=True)
class Cancelled:
    """What a cancel did (:meth:`postlane.AsyncPostlane.cancel`)."""

    id: str
    #: recipients removed before they were sent
    cancelled: int
    #: the recipients it left, with their states: already sent (or otherwise final), or being
    #: sent at that moment (``sending``: it may still go; its result decides)
    left: tuple[tuple[str, RecipientState], ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "cancelled": self.cancelled,
            "left": [{"address": address, "state": state} for address, state in self.left],
        }
