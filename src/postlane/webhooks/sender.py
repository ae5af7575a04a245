"""The webhook sender: follows the event log and POSTs each event to every endpoint that wants
it, at least once, in order per message, durably.

One :class:`WebhookSender` per process (``serve`` starts it); one :class:`EndpointSender` task
per configured endpoint, so a slow or failing endpoint holds up neither mail (the sender never
writes to a delivery, and the worker never waits for it) nor another endpoint. Each endpoint:

1. **Claims** the endpoint in the store: a lease, as deliveries have, so that of several
   processes (``serve --processes``, several hosts on one PostgreSQL) one sends to it at a time.
   The lease is renewed while the process works and handed back on a graceful stop; a process
   found dead on this host (``kill -9``) has its lease taken over at once, another host's runs
   out.
2. **Reads** the event log from the endpoint's cursor (``events_after``), in batches, into a
   window of at most ``window`` events. An event type the endpoint does not want is passed over
   (the cursor moves past it). A cursor whose event retention removed is logged and the
   endpoint goes on from the oldest event kept.
3. **Sends** with ``concurrency`` requests in flight: the events of one message go one after
   another, each once the one before it was acknowledged, so they arrive in order; different
   messages go in parallel, and a message whose event the endpoint refuses waits on its own
   schedule while the others go on (no head-of-line blocking). Each attempt is signed afresh
   (its own ``webhook-timestamp``), each event keeps its ``webhook-id``.
4. **Moves the cursor** only past events the endpoint acknowledged (2xx) and every event before
   them, at most every ``save_every`` seconds (the cursor is one small write per second, not
   one per event: the mail queue shares the store). A crash sends again what was acknowledged
   after the last save: at least once, never lost; duplicates carry the same ``webhook-id``.
5. **Backs off** on a failure (non-2xx, timeout, connection error, a refused address):
   :class:`~postlane.webhooks.retry.RetrySchedule`, starting within seconds, up to an hour.
   While failing, one request probes the endpoint and the others wait, so a down endpoint gets
   one request per retry, not one per lane. A message whose event the endpoint refuses while
   it acknowledges others also waits on its own, longer after each refusal, so one event the
   endpoint keeps refusing does not hold the others up. The failures, the time of the next
   try and the last error are kept in the store (``postlane webhooks list``); after
   ``pause_after`` failures in a row the endpoint counts as paused and an alert fires.

An operator's ``replay`` (or ``resume``) changes the endpoint's state in the store; the sender
holding it notices within a second and starts over from there.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from postlane.clock import Clock, SystemClock, iso
from postlane.errors import NotFound
from postlane.events import Event, WebhookEndpointState
from postlane.leases import lease_owner_id, owner_is_dead
from postlane.records import JsonRecord, in_json
from postlane.store.base import HistoryStore, WebhookStore
from postlane.waits import MailFirst, first_of
from postlane.webhooks.addresses import (
    AddressRefused,
    Resolver,
    WebhookDeliveryError,
    system_resolver,
)
from postlane.webhooks.endpoints import WebhookEndpoint
from postlane.webhooks.http import EndpointClient, Reply, TimedOut
from postlane.webhooks.retry import Ended, EndpointHealth, RetrySchedule
from postlane.webhooks.signing import Signer, payload, webhook_id

log = logging.getLogger("postlane.webhooks")

#: how a request ended, as metrics count it (a bounded label)
OUTCOMES = ("delivered", "rejected", "timeout", "connection", "refused")
#: failures kept in memory per endpoint for the operator
RECENT_FAILURES = 20


#: how often a process that does not hold an endpoint tries to claim it (one small write): a
#: graceful stop hands it back, and another process takes it within this
WATCH_INTERVAL = 1.0


class WebhookSenderStore(HistoryStore, WebhookStore, Protocol):
    """What the sender needs of the store: the event log and the endpoints' state."""


class WebhookObserver(Protocol):
    """Told about every request to an endpoint (metrics implement this; the method's name
    differs from the worker's ``DeliveryObserver.attempted`` so one object can be both)."""

    def webhook_attempted(self, endpoint: str, outcome: str, seconds: float) -> None:
        """``outcome`` is one of :data:`OUTCOMES`; ``seconds`` is the request's duration."""
        ...


class _NoObserver:
    def webhook_attempted(self, endpoint: str, outcome: str, seconds: float) -> None:
        return None


@dataclass(frozen=True)
class DeliveryFailure(JsonRecord):
    """One failed request, as an operator sees it."""

    at: float = field(metadata=in_json(render=iso))
    endpoint: str
    webhook_id: str
    outcome: str
    error: str


@dataclass(frozen=True)
class SenderSettings:
    """How the sender paces itself (not per endpoint; serve's defaults suit production)."""

    #: an endpoint's lease; renewed every third of it
    lease: float = 30.0
    #: how often a caught-up endpoint looks for new events
    poll: float = 0.25
    #: events read per store round trip
    batch: int = 500
    #: events read ahead and not yet acknowledged, at most (memory stays bounded)
    window: int = 1024
    #: how often the cursor is saved while events are acknowledged
    save_every: float = 1.0
    #: on stop, how long requests in flight may take to finish
    shutdown_grace: float = 5.0
    retry: RetrySchedule = field(default_factory=RetrySchedule)
    #: while mail is being delivered, the share of the time webhooks may start requests
    busy_share: float = 0.1
    #: ... unless the event to send is older than this: then webhooks go at full speed
    max_lag: float = 60.0


class WebhookSender:
    """Sends the event log to every configured endpoint until stopped (one per process).

    ``mail_activity``: a counter that moves while this process delivers mail (``serve`` passes
    the worker's attempt count); while it moves, webhooks yield (:class:`MailFirst`)."""

    def __init__(
        self,
        store: WebhookSenderStore,
        endpoints: Sequence[WebhookEndpoint],
        *,
        clock: Clock | None = None,
        owner: str | None = None,
        observer: WebhookObserver | None = None,
        settings: SenderSettings | None = None,
        resolver: Resolver = system_resolver,
        ssl_context: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
        mail_activity: Callable[[], int] | None = None,
    ) -> None:
        self.store = store
        self.endpoints = tuple(endpoints)
        self.clock: Clock = clock or SystemClock()
        self.owner = owner or lease_owner_id()
        self.settings = settings or SenderSettings()
        self.mail_first = MailFirst(mail_activity, self.settings.busy_share, self.settings.max_lag)
        self.senders = {
            endpoint.name: EndpointSender(
                endpoint,
                store,
                clock=self.clock,
                owner=self.owner,
                observer=observer or _NoObserver(),
                settings=self.settings,
                resolver=resolver,
                ssl_context=ssl_context,
                rng=rng or random.Random(),
                mail_first=self.mail_first,
            )
            for endpoint in self.endpoints
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Forget the state of endpoints no longer configured, then send to each configured
        one until ``stop`` is set; then finish what is in flight (briefly), save each cursor
        and hand each endpoint back."""
        try:
            forgotten = await self.store.forget_webhook_endpoints(list(self.senders))
            if forgotten:
                log.info(
                    "forgot the state of %d webhook endpoint(s) no longer configured", forgotten
                )
        except Exception:
            log.exception("could not forget the state of unconfigured webhook endpoints")
        if not self.senders:
            return
        tasks = [
            asyncio.create_task(sender.run(stop), name=f"postlane-webhook-{name}")
            for name, sender in self.senders.items()
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def sender(self, name: str) -> EndpointSender:
        """The sender of the endpoint ``name``; :class:`NotFound` for an unknown one."""
        try:
            return self.senders[name]
        except KeyError:
            raise NotFound(f"no webhook endpoint is named {name!r}") from None

    def recent_failures(self, name: str | None = None) -> list[DeliveryFailure]:
        """This process's last failed requests, newest first (of one endpoint, or all)."""
        senders = [self.sender(name)] if name is not None else list(self.senders.values())
        failures = [failure for sender in senders for failure in sender.recent]
        return sorted(failures, key=lambda failure: failure.at, reverse=True)


class EndpointSender:
    """Sends the event log to one endpoint while this process holds its lease."""

    def __init__(
        self,
        endpoint: WebhookEndpoint,
        store: WebhookSenderStore,
        *,
        clock: Clock,
        owner: str,
        observer: WebhookObserver,
        settings: SenderSettings,
        resolver: Resolver,
        ssl_context: ssl.SSLContext | None,
        rng: random.Random,
        mail_first: MailFirst | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.name = endpoint.name
        self.mail_first = mail_first or MailFirst(None, 1.0, 0.0)
        self.store = store
        self.clock = clock
        self.owner = owner
        self.observer = observer
        self.settings = settings
        self.resolver = resolver
        self.ssl_context = ssl_context
        self.rng = rng
        self.signer = Signer(endpoint.secrets)
        #: the last failed requests (this process's), oldest first
        self.recent: deque[DeliveryFailure] = deque(maxlen=RECENT_FAILURES)
        #: True while this process holds the endpoint's lease
        self.holding = False
        #: events acknowledged to this process since it started
        self.delivered = 0
        self._tenure: _Tenure | None = None

    def status(self) -> dict[str, Any]:
        """This process's view of the endpoint, for operators (JSON-able)."""
        tenure = self._tenure
        return {
            "holding": self.holding,
            "in_flight": tenure.in_flight if tenure else 0,
            "read_ahead": len(tenure.pending) if tenure else 0,
            "delivered_here": self.delivered,
            "recent_failures": [f.as_json() for f in reversed(self.recent)],
        }

    def client(self) -> EndpointClient:
        """A client for one request lane (its own kept-alive connection)."""
        return EndpointClient(
            self.endpoint.parts,
            allow_private=self.endpoint.allow_private,
            timeout=self.endpoint.timeout,
            resolver=self.resolver,
            ssl_context=self.ssl_context,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Claim the endpoint and send until ``stop``; wait while another process holds it."""
        retry_in = max(self.settings.lease / 3, 0.05)
        trouble = 0
        while not stop.is_set():
            try:
                state = await self.claim()
            except Exception as exc:
                trouble += 1
                log.warning("webhook endpoint %s: cannot claim it: %s", self.name, exc)
                await first_of(stop.wait(), timeout=min(30.0, retry_in * trouble))
                continue
            if state is None:  # held elsewhere: look again soon (a graceful stop hands it back)
                await first_of(stop.wait(), timeout=min(retry_in, WATCH_INTERVAL))
                continue
            self.holding = True
            tenure = self._tenure = _Tenure(self, state)
            try:
                reason = await tenure.run(stop)
            finally:
                self.holding = False
                self._tenure = None
            if reason == "error":
                trouble += 1
                await first_of(stop.wait(), timeout=min(30.0, retry_in * trouble))
            else:
                trouble = 0

    async def claim(self) -> WebhookEndpointState | None:
        """Lease the endpoint (or renew the lease); take it over from a process of this host
        that is provably dead; None while a live process holds it."""
        now = self.clock.now()
        lease_until = now + self.settings.lease
        state = await self.store.claim_webhook_endpoint(
            self.name, self.owner, now=now, lease_until=lease_until, start_after=0
        )
        if state is not None:
            return state
        holder = await self.row()
        if holder is None or holder.lease_owner is None or not owner_is_dead(holder.lease_owner):
            return None
        await self.store.release_webhook_endpoint(self.name, holder.lease_owner)
        log.info("webhook endpoint %s: taking over from a stopped process", self.name)
        return await self.store.claim_webhook_endpoint(
            self.name, self.owner, now=now, lease_until=lease_until, start_after=0
        )

    async def row(self) -> WebhookEndpointState | None:
        for state in await self.store.webhook_endpoints():
            if state.name == self.name:
                return state
        return None

    def failed_request(self, failure: DeliveryFailure) -> None:
        self.recent.append(failure)


_Outcome = Literal["acked", "refused", "failed"]


@dataclass
class _Slot:
    """One event read and not yet passed by the cursor."""

    id: int
    wanted: bool
    done: bool = False


class _Tenure:
    """Sending to one endpoint for as long as this process holds it unchanged: from a claim to
    a stop, a lost lease, an operator's change of its state, or a store error."""

    def __init__(self, sender: EndpointSender, state: WebhookEndpointState) -> None:
        self.sender = sender
        self.endpoint = sender.endpoint
        self.store = sender.store
        self.clock = sender.clock
        self.settings = sender.settings
        #: what the store holds, as this tenure wrote it (a difference is someone else's)
        self.stored_cursor = state.cursor
        self.stored_failures = state.failures
        #: the last event passed by the cursor in memory (None: none yet, from the oldest kept)
        self.acked: int | None = state.cursor or None
        #: the last event read
        self.read: int | None = self.acked
        self.pending: deque[_Slot] = deque()
        #: wanted events passed by the cursor since the last save
        self.unsaved = 0
        self.health = EndpointHealth(
            self.clock, self.settings.retry, sender.rng, state.failures, state.paused_until
        )
        self.recovered = False
        self.failures_to_record: list[tuple[str, float]] = []
        self.in_flight = 0
        #: set while no request is in flight
        self.idle = asyncio.Event()
        self.idle.set()
        self.ended = asyncio.Event()
        self.reason = ""
        self.progress = asyncio.Event()
        self.urgent = asyncio.Event()
        #: per message (its queue id), its events read and not yet acknowledged, in log order;
        #: a message is here exactly while it is ready, in flight or waiting to try again
        self.chains: dict[str | None, deque[tuple[_Slot, Event]]] = {}
        #: messages whose first unacknowledged event may go now
        self.ready: asyncio.Queue[str | None] = asyncio.Queue()
        #: messages waiting after a refusal: their refusals in a row and their wait
        self.message_failures: dict[str | None, int] = {}
        #: messages whose last try failed, with the endpoint's acknowledgements then: if it
        #: acknowledged others since, the next failure is the message's own, not the endpoint's
        self.failed_at: dict[str | None, int] = {}
        self.waiting: dict[str | None, asyncio.Task[None]] = {}
        self.warned_purge = False

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.reason = reason
            self.ended.set()

    async def run(self, stop: asyncio.Event) -> str:
        """Send until the tenure ends; returns why (stop, lost, changed, error)."""
        name = self.endpoint.name
        lanes = [
            asyncio.create_task(self._guard(self._lane()), name=f"postlane-webhook-{name}")
            for _ in range(self.endpoint.concurrency)
        ]
        keeper = asyncio.create_task(self._guard(self._keep()), name=f"postlane-webhook-{name}")
        reader = asyncio.create_task(self._guard(self._read()), name=f"postlane-webhook-{name}")
        tasks = (*lanes, reader, keeper)
        try:
            await first_of(stop.wait(), self.ended.wait(), timeout=None)
            self.end("stop")
            reader.cancel()
            keeper.cancel()
            if self.reason == "stop" and self.in_flight:
                # requests in flight may finish; lanes waiting to retry leave at once
                await first_of(self.idle.wait(), timeout=self.settings.shutdown_grace)
        finally:
            for task in (*tasks, *self.waiting.values()):
                task.cancel()
        await asyncio.gather(*tasks, *self.waiting.values(), return_exceptions=True)
        if self.reason == "stop":
            try:
                await self._record_failures()
                await self._save()
                await self.store.release_webhook_endpoint(name, self.sender.owner)
            except Exception as exc:
                log.warning("webhook endpoint %s: could not save its cursor on stop: %s", name, exc)
        elif self.reason == "changed":
            log.info("webhook endpoint %s: its state was changed (replay); starting over", name)
        elif self.reason == "lost":
            log.warning("webhook endpoint %s: another process holds it now", name)
        return self.reason

    async def _guard(self, work: Awaitable[None]) -> None:
        try:
            await work
        except (Ended, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("webhook endpoint %s: sending stopped by an error", self.endpoint.name)
            self.end("error")

    # -- reading the log -----------------------------------------------------------------------

    async def _read(self) -> None:
        settings = self.settings
        while not self.ended.is_set():
            room = settings.window - len(self.pending)
            if room <= 0:
                self.progress.clear()
                await first_of(self.progress.wait(), self.ended.wait(), timeout=1.0)
                continue
            try:
                events = await self.store.events_after(self.read, limit=min(room, settings.batch))
            except NotFound:
                await self._purged()
                continue
            if not events:
                await first_of(self.ended.wait(), timeout=settings.poll)
                continue
            for event in events:
                slot = _Slot(event.id, self.endpoint.wants(event.type))
                self.pending.append(slot)
                if slot.wanted:
                    chain = self.chains.get(event.queue_id)
                    if chain is None:
                        self.chains[event.queue_id] = deque([(slot, event)])
                        self.ready.put_nowait(event.queue_id)
                    else:
                        chain.append((slot, event))
                else:
                    slot.done = True
            self.read = events[-1].id
            self._advance()

    async def _purged(self) -> None:
        """The event at the cursor is no longer kept: go on from the oldest kept event, once
        what was read before it has been sent."""
        while self.pending and not self.ended.is_set():
            self.progress.clear()
            await first_of(self.progress.wait(), self.ended.wait(), timeout=1.0)
        if not self.warned_purge:
            log.warning(
                "webhook endpoint %s: events after %s were removed by retention before it got "
                "them; going on from the oldest event kept",
                self.endpoint.name,
                self.read,
            )
            self.warned_purge = True
        self.read = None

    def _advance(self) -> None:
        """Move the in-memory cursor past every event done at the head of the window."""
        pending = self.pending
        if not pending or not pending[0].done:
            return
        while pending and pending[0].done:
            slot = pending.popleft()
            self.acked = slot.id
            self.unsaved += slot.wanted
        self.progress.set()

    # -- sending -------------------------------------------------------------------------------

    async def _lane(self) -> None:
        """One request lane (its own connection): takes the next ready message and tries its
        first unacknowledged event once."""
        client = self.sender.client()
        try:
            while True:
                message = await self.ready.get()
                chain = self.chains[message]
                slot, event = chain[0]
                outcome = await self._deliver(client, event, message)
                if outcome == "failed":  # the endpoint's failure: its pause gates every message
                    self.ready.put_nowait(message)
                    continue
                if outcome == "refused":  # refused while the endpoint works: this message's
                    self._wait(message)
                    continue
                chain.popleft()
                self.message_failures.pop(message, None)
                self.failed_at.pop(message, None)
                if chain:
                    self.ready.put_nowait(message)
                else:
                    del self.chains[message]
                slot.done = True
                self.sender.delivered += 1
                self._advance()
        finally:
            client.close()

    def _wait(self, message: str | None) -> None:
        """The endpoint, working for other messages, refused this message's event: it goes
        again after its own backoff, growing with its refusals in a row (the endpoint's pause,
        shared by every message, comes on top), while the other messages go on."""
        failures = self.message_failures.get(message, 0) + 1
        self.message_failures[message] = failures
        delay = self.settings.retry.ceiling(failures)

        async def later() -> None:
            try:
                await self.clock.sleep(delay)
            finally:
                if self.waiting.get(message) is task:
                    del self.waiting[message]
                    self.ready.put_nowait(message)

        task = asyncio.create_task(later(), name=f"postlane-webhook-{self.endpoint.name}-wait")
        self.waiting[message] = task

    async def _deliver(self, client: EndpointClient, event: Event, message: str | None) -> _Outcome:
        """POST one event once the endpoint may be tried: acknowledged; refused while the
        endpoint acknowledged other events, during this request or since this message's last
        failure (this message's failure: it waits on its own, the endpoint is not paused for
        it); or failed with nothing acknowledged meanwhile (the endpoint's failure, as far as
        anyone can tell)."""
        body = payload(event)
        msg_id = webhook_id(event.id)
        name = self.endpoint.name
        observer = self.sender.observer
        await self.sender.mail_first.turn(self.clock.now() - event.at)
        failed_before = self.failed_at.get(message)
        generation = await self.health.admit(self.ended, suspect=failed_before is not None)
        acknowledged = self.health.acknowledged
        healthy = self.health.failures == 0
        headers = self.sender.signer.headers(msg_id, self.clock.now(), body)
        started = time.monotonic()
        self.in_flight += 1
        self.idle.clear()
        reply: Reply | None = None
        try:
            reply = await client.post(headers, body)
            outcome = "delivered" if reply.ok else "rejected"
            error = "" if reply.ok else reply.describe()
        except AddressRefused as exc:
            reply, outcome, error = None, "refused", exc.message
        except TimedOut as exc:
            reply, outcome, error = None, "timeout", exc.message
        except WebhookDeliveryError as exc:
            reply, outcome, error = None, "connection", exc.message
        except Exception as exc:  # nothing unexpected stops the sender
            log.exception("webhook endpoint %s: unexpected error sending", name)
            reply, outcome, error = None, "connection", f"{type(exc).__name__}: {exc}"
            client.close()
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()
        observer.webhook_attempted(name, outcome, time.monotonic() - started)
        if outcome == "delivered":
            if self.health.succeeded():
                self.recovered = True
                self.urgent.set()
                log.info("webhook endpoint %s: delivering again", name)
            return "acked"
        self.sender.failed_request(DeliveryFailure(self.clock.now(), name, msg_id, outcome, error))
        acknowledged_now = self.health.acknowledged
        self.failed_at[message] = acknowledged_now
        if acknowledged_now != acknowledged or (
            healthy and failed_before is not None and acknowledged_now != failed_before
        ):
            log.warning(
                "webhook endpoint %s: %s for %s, while it acknowledges other events "
                "(this message waits on its own)",
                name,
                error,
                msg_id,
            )
            return "refused"
        next_try = self.health.failed(
            generation,
            message,
            retry_after=reply.retry_after if reply is not None else None,
            status=reply.status if reply is not None else None,
        )
        if next_try is not None:
            self.failures_to_record.append((error, next_try))
            self.urgent.set()
            failures = self.health.failures
            paused = self.settings.retry.paused(failures)
            log.log(
                logging.ERROR if paused else logging.WARNING,
                "webhook endpoint %s: %s (%d failure(s) in a row%s; next try at %s)",
                name,
                error,
                failures,
                ", paused" if paused else "",
                iso(next_try),
            )
        return "failed"

    # -- keeping the store up to date ------------------------------------------------------------

    async def _keep(self) -> None:
        """Record failures, save the cursor, renew the lease, and notice an operator's change
        of the endpoint's state: the only writer of this endpoint's state in this process."""
        settings = self.settings
        renew_every = max(settings.lease / 3, 0.05)
        renewed = time.monotonic()
        last_save = time.monotonic()
        while not self.ended.is_set():
            await first_of(self.urgent.wait(), self.ended.wait(), timeout=settings.save_every)
            self.urgent.clear()
            if self.ended.is_set():
                return
            await self._record_failures()
            if time.monotonic() - renewed >= renew_every:
                if not await self._renew():
                    return
                renewed = time.monotonic()
            elif not await self._unchanged():
                return
            due = time.monotonic() - last_save >= settings.save_every
            if due or self.recovered:
                await self._save()
                last_save = time.monotonic()

    async def _record_failures(self) -> None:
        while self.failures_to_record:
            error, next_try = self.failures_to_record.pop(0)
            recorded = await self.store.webhook_failed(
                self.endpoint.name,
                self.sender.owner,
                error=error[:1000],
                paused_until=next_try,
                now=self.clock.now(),
            )
            if not recorded:
                self.end("lost")
                return
            self.stored_failures += 1

    async def _renew(self) -> bool:
        now = self.clock.now()
        state = await self.store.claim_webhook_endpoint(
            self.endpoint.name,
            self.sender.owner,
            now=now,
            lease_until=now + self.settings.lease,
            start_after=0,
        )
        return self._compare(state)

    async def _unchanged(self) -> bool:
        return self._compare(await self.sender.row())

    def _compare(self, state: WebhookEndpointState | None) -> bool:
        """True when the store holds what this tenure wrote; else end the tenure."""
        if state is None or state.lease_owner != self.sender.owner:
            self.end("lost")
            return False
        if state.cursor != self.stored_cursor or state.failures != self.stored_failures:
            self.end("changed")
            return False
        return True

    async def _save(self) -> None:
        """Save the cursor (and, after a recovery, that the endpoint is healthy)."""
        cursor = self.acked if self.acked is not None else self.stored_cursor
        if cursor == self.stored_cursor and not self.unsaved and not self.recovered:
            return
        count = self.unsaved
        saved = await self.store.webhook_delivered(
            self.endpoint.name,
            self.sender.owner,
            previous=self.stored_cursor,
            cursor=cursor,
            count=count,
            now=self.clock.now(),
        )
        if saved:
            self.stored_cursor = cursor
            self.stored_failures = 0
            self.unsaved -= count
            self.recovered = False
            return
        # Refused: the lease is gone, or the stored cursor moved (an operator's replay or
        # resume): the comparison ends this tenure either way; a transient refusal (a store
        # hiccup) is saved with a later event.
        self._compare(await self.sender.row())
