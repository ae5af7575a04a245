"""What an operator does with webhook endpoints; the CLI (``postlane webhooks ...``) and the
HTTP API call these, so both say the same.

- :func:`endpoint_statuses`: every configured endpoint with its state (JSON-able): where it is
  in the log, how far behind, failing or paused, the last error;
- :func:`failures`: the recent failures (the store's last error of each endpoint, and, in the
  process that sends, its last requests that failed);
- :func:`send_test_event`: a synthetic ``test`` event, signed as the real ones, not stored;
- :func:`replay`: send again from an event on; :func:`resume`: try a paused endpoint now.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from postlane.clock import iso
from postlane.errors import NotFound
from postlane.events import Event, WebhookEndpointState
from postlane.records import JsonRecord, in_json, round_ms
from postlane.store.base import HistoryStore
from postlane.webhooks.addresses import Resolver, WebhookDeliveryError, system_resolver
from postlane.webhooks.endpoints import WebhookEndpoint, endpoint_named
from postlane.webhooks.http import EndpointClient
from postlane.webhooks.retry import RetrySchedule
from postlane.webhooks.sender import WebhookSender, WebhookSenderStore
from postlane.webhooks.signing import TEST_EVENT_TYPE, Signer, encode


@dataclass(frozen=True)
class EndpointGauges:
    """What metrics show of one endpoint (read from the store, the same in every process)."""

    name: str
    failures: int
    paused: bool
    #: age of the oldest event it wants and has not acknowledged (0: caught up)
    lag_seconds: float


async def oldest_unsent(
    store: HistoryStore, endpoint: WebhookEndpoint, cursor: int
) -> Event | None:
    """The first event after ``cursor`` that ``endpoint`` wants (None: it is caught up)."""
    types = sorted(endpoint.events)
    try:
        found = await store.events_after(cursor or None, limit=1, types=types)
    except NotFound:  # its cursor was removed by retention: it goes on from the oldest kept
        found = await store.events_after(None, limit=1, types=types)
    return found[0] if found else None


def _state_of(states: Sequence[WebhookEndpointState], name: str) -> WebhookEndpointState | None:
    return next((state for state in states if state.name == name), None)


async def endpoint_gauges(
    store: WebhookSenderStore,
    endpoints: Sequence[WebhookEndpoint],
    *,
    now: float,
    retry: RetrySchedule | None = None,
) -> list[EndpointGauges]:
    """Each configured endpoint's failures in a row, whether it is paused, and its lag."""
    retry = retry or RetrySchedule()
    states = await store.webhook_endpoints()
    gauges = []
    for endpoint in endpoints:
        state = _state_of(states, endpoint.name)
        failures = state.failures if state else 0
        first = await oldest_unsent(store, endpoint, state.cursor if state else 0)
        gauges.append(
            EndpointGauges(
                name=endpoint.name,
                failures=failures,
                paused=retry.paused(failures),
                lag_seconds=max(0.0, now - first.at) if first else 0.0,
            )
        )
    return gauges


async def endpoint_statuses(
    store: WebhookSenderStore,
    endpoints: Sequence[WebhookEndpoint],
    *,
    now: float,
    sender: WebhookSender | None = None,
    retry: RetrySchedule | None = None,
) -> list[dict[str, Any]]:
    """Every configured endpoint, its settings (never its secret) and state, JSON-able::

    {"name", "url", "events", "allow_private", "timeout_seconds", "concurrency",
     "state": "healthy" | "failing" | "paused" | "new", "cursor", "lag_seconds",
     "failures", "next_attempt_at", "last_error", "last_error_at", "last_success_at",
     "delivered", "sending": bool (a process holds its lease),
     "process": {...} (only in the process that sends: in flight, recent failures)}
    """
    retry = retry or RetrySchedule()
    states = await store.webhook_endpoints()
    listed = []
    for endpoint in endpoints:
        state = _state_of(states, endpoint.name)
        row: dict[str, Any] = endpoint.as_json()
        if state is None:
            row.update(
                state="new",
                cursor=None,
                lag_seconds=None,
                failures=0,
                next_attempt_at=None,
                last_error=None,
                last_error_at=None,
                last_success_at=None,
                delivered=0,
                sending=False,
            )
        else:
            first = await oldest_unsent(store, endpoint, state.cursor)
            health = "healthy"
            if state.failures:
                health = "paused" if retry.paused(state.failures) else "failing"
            held = state.lease_owner is not None and (state.lease_expires_at or 0) > now
            row.update(state.as_json())
            row.update(
                state=health,
                lag_seconds=round(max(0.0, now - first.at), 3) if first else 0.0,
                next_attempt_at=iso(state.paused_until) if state.failures else None,
                sending=held,
            )
            row.pop("paused_until", None)
        if sender is not None and endpoint.name in sender.senders:
            row["process"] = sender.senders[endpoint.name].status()
        listed.append(row)
    return listed


async def failures(
    store: WebhookSenderStore,
    endpoints: Sequence[WebhookEndpoint],
    *,
    sender: WebhookSender | None = None,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """The recent failures, newest first: each endpoint's last error as the store keeps it and,
    given the process's sender, its last failed requests."""
    chosen = [endpoint_named(endpoints, name)] if name is not None else list(endpoints)
    names = {endpoint.name for endpoint in chosen}
    rows: list[tuple[float, dict[str, Any]]] = []
    if sender is not None:
        for failure in sender.recent_failures():
            if failure.endpoint in names:
                rows.append((failure.at, failure.as_json()))
    else:
        for state in await store.webhook_endpoints():
            if state.name in names and state.last_error and state.last_error_at:
                rows.append(
                    (
                        state.last_error_at,
                        {
                            "at": iso(state.last_error_at),
                            "endpoint": state.name,
                            "webhook_id": None,
                            "outcome": None,
                            "error": state.last_error,
                            "failures_in_a_row": state.failures,
                        },
                    )
                )
    rows.sort(key=lambda item: item[0], reverse=True)
    return [row for _, row in rows]


@dataclass(frozen=True)
class WebhookTestResult(JsonRecord):
    """How a test event went."""

    endpoint: str
    webhook_id: str
    ok: bool
    status: int | None
    error: str | None
    seconds: float = field(metadata=in_json(render=round_ms))


def synthetic_event_body(webhook_id: str, now: float) -> bytes:
    """A ``test`` event: the shape of a real one, with nothing about any message."""
    data: dict[str, Any] = {
        "id": webhook_id,
        "type": TEST_EVENT_TYPE,
        "at": iso(now),
        "message_id": None,
        "recipient": None,
        "lane": None,
        "class": None,
        "code": None,
        "enhanced": None,
        "text": "a test event sent by an operator (postlane webhooks test)",
        "metadata": {},
    }
    return encode(TEST_EVENT_TYPE, now, data)


async def send_test_event(
    endpoint: WebhookEndpoint,
    *,
    now: float | None = None,
    resolver: Resolver = system_resolver,
    ssl_context: ssl.SSLContext | None = None,
) -> WebhookTestResult:
    """POST one synthetic ``test`` event to ``endpoint``, signed as real events are, once (no
    retry) and without storing anything."""
    now = time.time() if now is None else now
    msg_id = f"evt_test_{os.urandom(8).hex()}"
    body = synthetic_event_body(msg_id, now)
    headers = Signer(endpoint.secrets).headers(msg_id, now, body)
    client = EndpointClient(
        endpoint.parts,
        allow_private=endpoint.allow_private,
        timeout=endpoint.timeout,
        resolver=resolver,
        ssl_context=ssl_context,
    )
    started = time.monotonic()
    try:
        reply = await client.post(headers, body)
    except WebhookDeliveryError as exc:
        return WebhookTestResult(
            endpoint.name, msg_id, False, None, exc.message, time.monotonic() - started
        )
    finally:
        client.close()
    return WebhookTestResult(
        endpoint.name,
        msg_id,
        reply.ok,
        reply.status,
        None if reply.ok else reply.describe(),
        time.monotonic() - started,
    )


async def replay(
    store: WebhookSenderStore,
    endpoints: Sequence[WebhookEndpoint],
    name: str,
    *,
    after: int | None,
    now: float,
) -> None:
    """Send ``name`` every event after the event ``after`` again (None: from the oldest
    kept), at once, its failures forgotten. Raises :class:`NotFound` for an unknown endpoint,
    one postlane has not sent to yet, or an event no longer kept."""
    endpoint_named(endpoints, name)
    if after is not None:
        try:
            await store.events_after(after, limit=1)
        except NotFound:
            raise NotFound(
                f"no event {after} is kept (removed by retention, or unknown); give a later "
                "one, or none to replay from the oldest event kept"
            ) from None
    if not await store.replay_webhook(name, after=after or 0, now=now):
        raise NotFound(
            f"webhook endpoint {name} has no state yet: postlane serve has not sent to it"
        )


async def resume(
    store: WebhookSenderStore, endpoints: Sequence[WebhookEndpoint], name: str, *, now: float
) -> None:
    """Try a failing or paused endpoint at once, from where it is (its failures forgotten)."""
    endpoint_named(endpoints, name)
    state = _state_of(await store.webhook_endpoints(), name)
    if state is None or not await store.replay_webhook(name, after=state.cursor, now=now):
        raise NotFound(
            f"webhook endpoint {name} has no state yet: postlane serve has not sent to it"
        )
