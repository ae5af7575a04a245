"""The HTTP API's OpenAPI 3.1 document (served at ``/openapi.json``).

Written out by hand, next to the handlers in :mod:`postlane.ingest.http`: it is the contract
clients generate code from, and the fuzz test (``tests/integration/test_http_fuzz.py``) drives the
API from it. The fragments every operation repeats (a JSON body, a JSON answer, the error
answers, a listing's selector parameters) are made by :mod:`postlane.ingest.openapi_fragments`,
so each path reads as what it does.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from postlane import __version__
from postlane.classify import ReplyClass
from postlane.ingest.openapi_fragments import (
    CURSOR,
    DURATION,
    EXPORT_LINES,
    RETRY_AFTER,
    STRINGS,
    Schema,
    array,
    body,
    enum_of,
    integers,
    json_answer,
    json_object,
    listing,
    obj,
    operation,
    page,
    path_parameter,
    ref,
    strings,
    typed,
)
from postlane.message import Lane, RecipientState
from postlane.records import SUPPRESSION_REASONS

# -- schemas ---------------------------------------------------------------------------------------


def _recipient() -> Schema:
    """A recipient of a message, with its last reply and (``GET /v1/messages/{id}``) history."""
    reply = {
        "type": ["object", "null"],
        "properties": {
            "code": typed("integer", "null"),
            "enhanced": typed("string", "null"),
            "text": typed("string"),
            "class": ref("Class"),
        },
    }
    attempt = obj(
        {
            "at": typed("string", format="date-time"),
            "class": ref("Class"),
            "code": typed("integer", "null"),
            "enhanced": typed("string", "null"),
            "text": typed("string"),
            "duration_ms": typed("integer"),
            **strings("relay", "destination"),
        }
    )
    return obj(
        {
            **strings("address", "domain", "destination"),
            "state": ref("State"),
            "attempts": typed("integer"),
            "next_attempt_at": typed("string", "null", format="date-time"),
            "last_response": reply,
            "history": array(attempt),
        },
        required=("address", "domain", "state", "attempts", "next_attempt_at", "last_response"),
    )


def _new_message() -> Schema:
    attachment = {
        **obj(
            {
                "filename": typed("string"),
                "content": typed("string", contentEncoding="base64"),
                "content_type": typed(
                    "string",
                    example="application/pdf",
                    description="type/subtype; neither multipart/* nor message/* "
                    "(message/global aside): an attachment is sent base64-encoded",
                ),
            },
            required=("content",),
        ),
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "Fields of a message, or `raw` (an RFC 5322 message) with from/to.",
        "properties": {
            "from": typed("string", example="App <app@example.com>"),
            "to": STRINGS,
            "cc": STRINGS,
            "bcc": STRINGS,
            **strings("subject", "text", "html"),
            "headers": typed("object", additionalProperties=typed("string")),
            "lane": ref("Lane"),
            "idempotency_key": typed("string", maxLength=255),
            "metadata": typed("object"),
            "attachments": array(attachment),
            "raw": typed("string"),
            "send_at": _WHEN,
            "expires_at": _WHEN,
        },
    }


#: a time given: ISO 8601 with its zone, or Unix seconds (docs/scheduling.md)
_WHEN: Schema = {
    "description": "ISO 8601 with a time zone (2026-12-24T08:00:00Z) or Unix seconds",
    "oneOf": [typed("string", format="date-time"), typed("number", minimum=0)],
}


def _message() -> Schema:
    properties = {
        "id": typed("string"),
        "lane": ref("Lane"),
        "state": ref("State"),
        "created_at": typed("string", format="date-time"),
        **strings("sender", "subject"),
        "size": typed("integer"),
        "message_id": typed("string"),
        "idempotency_key": typed("string", "null"),
        "metadata": typed("object"),
        "recipients": array(_recipient()),
        "send_at": typed("string", "null", format="date-time"),
        "expires_at": typed("string", "null", format="date-time"),
    }
    optional = ("metadata", "send_at", "expires_at")
    return obj(properties, required=tuple(p for p in properties if p not in optional))


def _stats() -> dict[str, Schema]:
    waiting = ("ready", "deferred", "held", "sending")
    lanes = {lane.value: ref("LaneStats") for lane in Lane}
    return {
        "LaneStats": obj(
            {**integers(*waiting), "oldest_age_seconds": typed("number")},
            required=(*waiting, "oldest_age_seconds"),
        ),
        "Stats": obj(
            {"lanes": obj(lanes), **integers("sent", "dead", "suppressed")},
            required=("lanes", "sent", "dead", "suppressed"),
        ),
    }


def _selector() -> Schema:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "ids": array(typed("string")),
            "all": typed("boolean"),
            **dict.fromkeys(("lane", "state", "domain", "class"), STRINGS),
            "older_than": DURATION,
            **strings("sender", "recipient"),
            "metadata": typed("object", additionalProperties=typed("string")),
            "dry_run": typed("boolean"),
            "unsuppress": typed(
                "boolean",
                description="requeue only: lift the suppression of the dead letters' addresses "
                "(else a requeue of a suppressed address is refused, 409, naming it)",
            ),
            "export": typed(
                "boolean",
                description="delete and purge only: answer with what was removed, as "
                "JSON Lines (at most 1000 recipients; all or nothing)",
            ),
        },
    }


def _schemas() -> dict[str, Schema]:
    error = obj(strings("code", "message"), required=("code", "message"))
    return {
        "Lane": enum_of(Lane),
        "State": enum_of(RecipientState),
        "Class": enum_of(ReplyClass),
        "Error": obj({"error": error}, required=("error",)),
        "NewMessage": _new_message(),
        "Enqueued": obj(
            {"id": typed("string"), "duplicate": typed("boolean")}, required=("id", "duplicate")
        ),
        "Message": _message(),
        **_stats(),
        "Selector": _selector(),
    }


# -- paths -----------------------------------------------------------------------------------------


def _action_path(actions: list[str]) -> dict[str, Any]:
    """``POST /v1/queue/{action}`` or ``/v1/dlq/{action}``: a selector in, counts (or, for an
    exported delete or purge, what was removed) out."""
    exporting = [a for a in actions if a in ("delete", "purge")]
    ok = json_object("How many changed (or would, with dry_run)")
    if exporting:
        ok["description"] += f'; with "export": true ({", ".join(exporting)}), what was removed'
        ok["content"]["application/x-ndjson"] = {"schema": EXPORT_LINES}
        ok["headers"] = {
            "X-Postlane-Count": {
                "description": "Recipients removed (with export)",
                "schema": typed("integer"),
            }
        }
    return {
        "post": operation(
            f"{', '.join(actions)} selected deliveries (admin)",
            {"200": ok},
            (400, 401, 403, 404, *((409,) if "requeue" in actions else ()), 413, 422, 503),
            parameters=[path_parameter("action", typed("string", enum=actions))],
            body=body(ref("Selector")),
        )
    }


def _message_paths() -> dict[str, Any]:
    batch = {
        **obj(
            {
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1000,
                    "items": ref("NewMessage"),
                }
            },
            required=("messages",),
        ),
        "additionalProperties": False,
    }
    return {
        "/v1/messages": {
            "post": operation(
                "Enqueue a message (202 once durably stored)",
                {"202": json_answer(ref("Enqueued"), "Stored")},
                (400, 401, 403, 413, 422, 503),
                parameters=[{"name": "Idempotency-Key", "in": "header", "schema": typed("string")}],
                body=body(ref("NewMessage")),
            ),
            "get": listing(
                "List messages (admin); default: not yet finished",
                ref("Message"),
                "Messages, oldest first",
            ),
        },
        "/v1/messages/batch": {
            "post": operation(
                "Enqueue up to 1000 messages in one durable commit",
                {
                    "202": json_object("All stored"),
                    "207": json_object("Some refused: one result per item"),
                },
                (400, 401, 403, 413, 503),
                description="An Idempotency-Key header is refused (400): each message of a "
                "batch takes its own idempotency_key.",
                body=body(batch),
            )
        },
        "/v1/messages/{queue_id}": {
            "get": operation(
                "A message with each recipient's attempt history",
                {"200": json_answer(ref("Message"), "The message")},
                (401, 403, 404, 503),
                parameters=[path_parameter("queue_id")],
            ),
            "delete": operation(
                "Cancel what of the message has not gone yet: its waiting recipients (queued, "
                "scheduled, deferred, held) are removed, each with a `deleted` event; one being "
                "sent or already final is left (a send token: its own messages only)",
                {
                    "200": json_object(
                        "What was cancelled: id, cancelled (recipients removed), left (the "
                        "recipients left, each an address and its state)"
                    )
                },
                (401, 403, 404, 503),
                parameters=[path_parameter("queue_id")],
            ),
        },
        "/v1/stats": {
            "get": operation(
                "Depth and oldest age by lane, counts by state (admin)",
                {"200": json_answer(ref("Stats"), "Stats")},
                (401, 403, 503),
            )
        },
    }


def _operator_paths() -> dict[str, Any]:
    imported = obj(integers("records", "imported"), required=("records", "imported"))
    return {
        "/v1/queue": {
            "get": listing(
                "List the queue (admin); default: not yet finished (mailq)",
                ref("Message"),
                "Messages, oldest first",
            )
        },
        "/v1/queue/import": {
            "post": operation(
                "Bring back what an exported delete or purge returned (admin)",
                {"200": json_answer(imported, "Records read, recipients restored")},
                (400, 401, 403, 413, 503),
                description="Every line is checked before anything is stored, then all are "
                "stored in one transaction: a bad line imports nothing. Messages and recipients "
                "already present are skipped.",
                body=body(EXPORT_LINES, "application/x-ndjson"),
            )
        },
        "/v1/queue/{action}": _action_path(["flush", "hold", "release", "delete"]),
        "/v1/dlq": {
            "get": listing(
                "Dead letters, one row per dead recipient (admin)",
                typed("object"),
                "Dead letters",
            )
        },
        "/v1/dlq/groups": {
            "get": listing(
                "Dead letters grouped by class, domain and reply (admin)",
                typed("object"),
                "Groups, largest first (not paged: page a group's letters through /v1/dlq)",
                paged=False,
            )
        },
        "/v1/dlq/{action}": _action_path(["requeue", "purge"]),
    }


def _event_paths() -> dict[str, Any]:
    from postlane.events import EVENT_TYPES

    event = obj(
        {
            "id": typed("string"),
            "type": typed("string", enum=list(EVENT_TYPES)),
            "at": typed("string", format="date-time"),
            "message_id": typed("string", description="postlane's id of the message"),
            "recipient": typed("string", "null"),
            "lane": ref("Lane"),
            "class": typed("string", "null"),
            "code": typed("integer", "null"),
            "enhanced": typed("string", "null"),
            "text": typed("string", "null"),
            "metadata": typed("object"),
        },
        required=("id", "type", "at", "message_id"),
    )
    page = obj({"events": array(event), "next": typed("string")}, required=("events", "next"))
    parameters: list[dict[str, Any]] = [
        {"name": "after", "in": "query", "schema": typed("string", pattern="^[0-9]{1,19}$")},
        {"name": "limit", "in": "query", "schema": typed("integer", minimum=1, maximum=1000)},
        {
            "name": "type",
            "in": "query",
            "schema": array(typed("string", enum=list(EVENT_TYPES))),
            "style": "form",
            "explode": True,
        },
    ]
    return {
        "/v1/events": {
            "get": operation(
                "The event log after a cursor, in commit order (admin)",
                {"200": json_answer(page, "A page of events and the cursor to read on from")},
                (400, 401, 404),
                description="`next` is the cursor for the following call (the cursor given "
                "when nothing new came; `0`, before any event, while the log is empty: "
                "`after=0` reads from the oldest event kept). 404: the cursor's event is no "
                "longer kept.",
                parameters=parameters,
            )
        }
    }


def _feedback_paths() -> dict[str, Any]:
    report = obj(
        {
            "id": typed("integer"),
            "received_at": typed("string", format="date-time"),
            **strings("source", "kind", "reason"),
            "mail_from": typed("string", "null"),
            "rcpt_to": typed("string", "null"),
            "size": typed("integer"),
        },
        required=("id", "received_at", "source", "kind", "reason", "size"),
    )
    limit = {"name": "limit", "in": "query", "schema": typed("integer", minimum=1, maximum=1000)}
    return {
        "/v1/feedback/unmatched": {
            "get": operation(
                "Reports that matched no delivery, newest first (admin)",
                {"200": json_answer(array(report), "Reports, without their contents")},
                (400, 401),
                parameters=[limit],
            )
        },
        "/v1/feedback/unmatched/{report_id}": {
            "get": operation(
                "One report that matched no delivery, with its content (admin)",
                {"200": json_object("The report and its content as text")},
                (401, 404),
                parameters=[path_parameter("report_id")],
            )
        },
    }


def _webhook_paths() -> dict[str, Any]:
    name = [path_parameter("name")]
    replay_body = {
        **obj({"after": typed("string", pattern="^[0-9]{1,19}$")}),
        "additionalProperties": False,
    }
    return {
        "/v1/webhooks/out": {
            "get": operation(
                "Each webhook endpoint: its settings (never its secret) and state (admin)",
                {"200": json_answer(array(typed("object")), "Endpoints")},
                (401, 404),
            )
        },
        "/v1/webhooks/out/{name}/failures": {
            "get": operation(
                "An endpoint's recent failed requests, newest first (admin)",
                {"200": json_answer(array(typed("object")), "Failures")},
                (401, 404),
                parameters=name,
            )
        },
        "/v1/webhooks/out/{name}/test": {
            "post": operation(
                "POST one signed test event to the endpoint now, once (admin)",
                {"200": json_object("How it went: ok, status, error, seconds")},
                (401, 404),
                parameters=name,
            )
        },
        "/v1/webhooks/out/{name}/replay": {
            "post": operation(
                "Send the endpoint the events after `after` again (none: from the oldest kept)",
                {"200": json_object("Replaying")},
                (400, 401, 404),
                parameters=name,
                body={**body(replay_body), "required": False},
            )
        },
        "/v1/webhooks/out/{name}/resume": {
            "post": operation(
                "Try a failing or paused endpoint at once (admin)",
                {"200": json_object("Resumed")},
                (401, 404),
                parameters=name,
            )
        },
    }


def _suppression_paths() -> dict[str, Any]:
    entry = {
        **obj(
            {
                "address": typed("string"),
                "reason": typed(
                    "string",
                    description="hard_bounce, complaint, unsubscribe or manual (other text: the "
                    "detail of a manual entry)",
                ),
                "scope": typed("string", description="* (every sender) or a sender domain"),
                "expires_at": _WHEN,
                "detail": typed("string"),
                "lanes": {
                    **typed("array", "null"),
                    "items": ref("Lane"),
                    "minItems": 1,
                    "description": "the lanes whose mail it stops (null or left out: every lane)",
                },
            },
            required=("address",),
        ),
        "additionalProperties": False,
    }
    return {
        "/v1/suppressions": {
            "get": operation(
                "The suppression list, newest first (admin)",
                {"200": page(json_answer(array(typed("object")), "Entries"))},
                (400, 401, 403, 503),
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": typed("integer", minimum=1, maximum=10_000, default=10_000),
                    },
                    CURSOR,
                    {
                        "name": "address",
                        "in": "query",
                        "description": "only these addresses' entries (repeatable; one page)",
                        "schema": typed("string"),
                    },
                ],
            ),
            "post": operation(
                "Add an address to the suppression list (admin)",
                {"201": json_object("Added"), "200": json_object("Already there")},
                (400, 401, 403, 422, 503),
                body=body(entry),
            ),
        },
        "/v1/suppressions/{address}": {
            "delete": operation(
                "Take an address off the suppression list (admin): its entries of one scope and "
                "one reason when given, else all",
                {"200": json_object("Removed")},
                (400, 401, 403, 404, 422, 503),
                parameters=[
                    path_parameter("address"),
                    {"name": "scope", "in": "query", "schema": typed("string")},
                    {
                        "name": "reason",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(SUPPRESSION_REASONS)},
                    },
                ],
            )
        },
    }


def _probe_paths() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": operation(
                "Liveness: the process answers (no token needed)",
                {"200": json_object("Alive")},
                (),
                public=True,
            )
        },
        "/readyz": {
            "get": operation(
                "Readiness: the store takes a write now, requests are not failing, the worker "
                "runs (no token needed)",
                {
                    "200": json_object("Ready"),
                    "503": {
                        **json_object("Not ready: the reason is in error"),
                        "headers": RETRY_AFTER,
                    },
                },
                (),
                public=True,
            )
        },
    }


#: each provider's webhook: what proves it, and the media type it posts
_PROVIDER_WEBHOOKS = {
    "ses": (
        "Amazon SES events through SNS",
        "SNS notifications (Bounce, Complaint, Delivery, DeliveryDelay), verified against SNS's "
        "signing certificate (SignatureVersion 1 or 2) and `[webhooks.ses] topic_arns`; a "
        "SubscriptionConfirmation is confirmed by visiting its SubscribeURL. SNS posts "
        "`text/plain`.",
    ),
    "sendgrid": (
        "SendGrid Event Webhook",
        "An array of events, signed (ECDSA P-256, headers X-Twilio-Email-Event-Webhook-"
        "Signature and -Timestamp) with `[webhooks.sendgrid] verification_key`'s private half.",
    ),
    "postmark": (
        "Postmark webhooks",
        "Bounce, SpamComplaint and Delivery records, with HTTP basic auth "
        "(`[webhooks.postmark] username` and `password`).",
    ),
    "mailgun": (
        "Mailgun webhooks",
        'One event, `{"signature": {"timestamp", "token", "signature"}, "event-data": {...}}`, '
        "signed with HMAC-SHA256 and `[webhooks.mailgun] signing_key`; old timestamps and "
        "reused tokens are refused.",
    ),
}


def _provider_webhook_paths() -> dict[str, Any]:
    result = obj(
        integers("received", "recorded", "duplicates", "unmatched", "ignored"),
        required=("received", "recorded", "duplicates", "unmatched", "ignored"),
    )
    paths: dict[str, Any] = {}
    for provider, (summary, description) in _PROVIDER_WEBHOOKS.items():
        events = array(typed("object")) if provider == "sendgrid" else typed("object")
        media = {"application/json": {"schema": events}}
        if provider == "ses":
            media["text/plain"] = {"schema": typed("string")}
        webhook = operation(
            f"{summary} (no token: the provider's signature is the proof)",
            {"200": json_answer(result, "The events were recorded, kept unmatched or ignored")},
            (400, 401, 413, 503),
            description=description + " 503: the store cannot record, "
            "or a delivery the events name is still being sent (the provider sends it again).",
            body={"required": True, "content": media},
            public=True,
        )
        webhook["responses"].pop("415", None)  # whatever type the provider says it posts
        webhook["responses"]["401"]["description"] = (
            "Not verified: no, a wrong, an expired or a replayed signature (or credentials), or "
            "the provider's [webhooks] table is not configured; nothing changed"
        )
        paths[f"/v1/webhooks/{provider}"] = {"post": webhook}
    return paths


@cache
def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "postlane",
            "version": __version__,
            "description": "A durable outbound email queue. Tokens: admin (`[http] tokens`) "
            "or send (`[http] send_tokens`: enqueue and read own messages).",
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            **_message_paths(),
            **_operator_paths(),
            **_suppression_paths(),
            **_event_paths(),
            **_feedback_paths(),
            **_webhook_paths(),
            **_provider_webhook_paths(),
            **_probe_paths(),
        },
    }
