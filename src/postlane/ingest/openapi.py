"""The HTTP API's OpenAPI 3.1 document (served at ``/openapi.json``).

Written out by hand, next to the handlers in :mod:`postlane.ingest.http`: it is the contract
clients generate code from, and the fuzz test (``tests/integration/test_http_fuzz.py``) drives the
API from it. The fragments every operation repeats (a JSON body, a JSON answer, the error
answers, a listing's selector parameters) are made by the small functions below, so each path
reads as what it does.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from postlane import __version__
from postlane.classify import ReplyClass
from postlane.message import Lane, RecipientState
from postlane.records import SUPPRESSION_REASONS

Schema = dict[str, Any]

_ERROR_TEXT = {
    400: "Malformed request",
    401: "Missing or invalid token",
    403: "The token's scope does not allow this, a send token bound to sender domains was "
    "given another (code sender_not_allowed), or a browser says another site's page sent it "
    "(code cross_site)",
    404: "Not found",
    408: "The request body stalled (no byte for the body timeout): the connection is closed",
    409: "Refused as asked, nothing changed: a requeue of suppressed addresses (the error's "
    "addresses name them; unsuppress lifts them)",
    413: "Too large",
    415: "The body is not of the type this endpoint takes (application/json)",
    422: "The message was refused (nothing stored)",
    429: "Too many failed attempts with a wrong token from this client: wait Retry-After",
    503: "The store cannot answer, or the server is busy: retry after Retry-After",
}
#: the operations that need a token
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]

# -- fragments -------------------------------------------------------------------------------------


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _type(*names: str, **extra: Any) -> Schema:
    """``{"type": "string"}``, or a list of types (``"integer", "null"``), with extras."""
    return {"type": names[0] if len(names) == 1 else list(names), **extra}


def _array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def _object(properties: dict[str, Any], *, required: tuple[str, ...] = ()) -> Schema:
    if not required:
        return {"type": "object", "properties": properties}
    return {"type": "object", "required": list(required), "properties": properties}


def _integers(*names: str) -> dict[str, Schema]:
    return {name: _type("integer") for name in names}


def _strings(*names: str) -> dict[str, Schema]:
    return {name: _type("string") for name in names}


def _enum(values: Any) -> Schema:
    return {"type": "string", "enum": [v.value for v in values]}


def _json(schema: Schema, description: str) -> dict[str, Any]:
    """An answer with a JSON body."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _json_object(description: str) -> dict[str, Any]:
    return _json(_type("object"), description)


def _body(schema: Schema, *media: str) -> dict[str, Any]:
    """A required request body of ``schema`` in each of ``media`` (default JSON)."""
    return {
        "required": True,
        "content": {m: {"schema": schema} for m in media or ("application/json",)},
    }


def _path_parameter(name: str, schema: Schema | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or _type("string")}


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again",
        "schema": {"type": "integer"},
    }
}


def _error_responses(*statuses: int) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for status in statuses:
        answer = {
            "description": _ERROR_TEXT[status],
            "content": {"application/json": {"schema": _ERROR}},
        }
        if status in (429, 503):
            answer["headers"] = _RETRY_AFTER
        answers[str(status)] = answer
    return answers


def _operation(
    summary: str,
    answers: dict[str, Any],
    errors: tuple[int, ...],
    *,
    description: str | None = None,
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    public: bool = False,
) -> dict[str, Any]:
    """One operation: its answers, then the error answers it may give."""
    operation: dict[str, Any] = {"summary": summary}
    if description is not None:
        operation["description"] = description
    if not public:
        operation["security"] = _BEARER
        # what every door with a token may answer: a cross-site page (403), a client guessing
        # tokens (429), a store that cannot answer or a server at its limits (503)
        errors = (*errors, 403, 429, 503)
    if parameters is not None:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
        errors = (*errors, 408, 415)
    operation["responses"] = {**answers, **_error_responses(*sorted(set(errors)))}
    return operation


def _listing(
    summary: str, items: Schema, description: str, *, paged: bool = True
) -> dict[str, Any]:
    """A GET of a list narrowed by the selector's query parameters (``paged``: and paged with
    ``cursor``, the next page's cursor in the answer's headers)."""
    answer = _json(_array(items), description)
    return _operation(
        summary,
        {"200": _page(answer) if paged else answer},
        (400, 401, 403, 503),
        parameters=[*_SELECTOR_PARAMS, _CURSOR] if paged else _SELECTOR_PARAMS,
    )


def _page(answer: dict[str, Any]) -> dict[str, Any]:
    """A listing's answer, with the headers saying where its next page starts."""
    return {**answer, "headers": _NEXT_PAGE}


_CURSOR = {
    "name": "cursor",
    "in": "query",
    "required": False,
    "description": "Where the page starts: the X-Next-Cursor (or the Link rel=next) of the page "
    "before; none for the first page. Opaque; one this listing did not give (or an empty one) "
    "is a 400 invalid_field. Pages follow a stable keyset, so entries added between requests "
    "are neither skipped nor repeated.",
    "schema": _type("string", minLength=1, maxLength=2048),
}
_NEXT_PAGE = {
    "Link": {
        "description": 'The next page: `<PATH?QUERY&cursor=...>; rel="next"` (this request with '
        "the next cursor). Absent on the last page.",
        "schema": _type("string"),
    },
    "X-Next-Cursor": {
        "description": "The next page's cursor (pass it as `cursor`). Absent on the last page.",
        "schema": _type("string"),
    },
}


_ERROR = _ref("Error")
#: a string, or a list of them (recipients; selector fields)
_STRINGS = {"oneOf": [_type("string"), _array(_type("string"), maxItems=1000)]}
_DURATION = _type("string", example="2h")

_SELECTOR_PARAMS = [
    {"name": name, "in": "query", "required": False, "schema": schema}
    for name, schema in (
        ("ids", _array(_type("string"))),
        ("lane", _array(_ref("Lane"))),
        ("state", _array(_ref("State"))),
        ("domain", _array(_type("string"))),
        ("class", _array(_ref("Class"))),
        ("older_than", _DURATION),
        ("sender", _type("string")),
        ("recipient", _type("string")),
        ("limit", _type("integer", minimum=1, maximum=1000, default=100)),
    )
]

#: what `postlane queue delete --export` writes: one JSON object per message (content base64)
_EXPORT_LINES = {
    "type": "string",
    "description": "JSON Lines: one postlane-export/1 record per message, with its content "
    "(base64), selected recipients and their attempt histories.",
}


# -- schemas ---------------------------------------------------------------------------------------


def _recipient() -> Schema:
    """A recipient of a message, with its last reply and (``GET /v1/messages/{id}``) history."""
    reply = {
        "type": ["object", "null"],
        "properties": {
            "code": _type("integer", "null"),
            "enhanced": _type("string", "null"),
            "text": _type("string"),
            "class": _ref("Class"),
        },
    }
    attempt = _object(
        {
            "at": _type("string", format="date-time"),
            "class": _ref("Class"),
            "code": _type("integer", "null"),
            "enhanced": _type("string", "null"),
            "text": _type("string"),
            "duration_ms": _type("integer"),
            **_strings("relay", "destination"),
        }
    )
    return _object(
        {
            **_strings("address", "domain", "destination"),
            "state": _ref("State"),
            "attempts": _type("integer"),
            "next_attempt_at": _type("string", "null", format="date-time"),
            "last_response": reply,
            "history": _array(attempt),
        },
        required=("address", "domain", "state", "attempts", "next_attempt_at", "last_response"),
    )


def _new_message() -> Schema:
    attachment = {
        **_object(
            {
                "filename": _type("string"),
                "content": _type("string", contentEncoding="base64"),
                "content_type": _type(
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
            "from": _type("string", example="App <app@example.com>"),
            "to": _STRINGS,
            "cc": _STRINGS,
            "bcc": _STRINGS,
            **_strings("subject", "text", "html"),
            "headers": _type("object", additionalProperties=_type("string")),
            "lane": _ref("Lane"),
            "idempotency_key": _type("string", maxLength=255),
            "metadata": _type("object"),
            "attachments": _array(attachment),
            "raw": _type("string"),
            "send_at": _WHEN,
            "expires_at": _WHEN,
        },
    }


#: a time given: ISO 8601 with its zone, or Unix seconds (docs/scheduling.md)
_WHEN: Schema = {
    "description": "ISO 8601 with a time zone (2026-12-24T08:00:00Z) or Unix seconds",
    "oneOf": [_type("string", format="date-time"), _type("number", minimum=0)],
}


def _message() -> Schema:
    properties = {
        "id": _type("string"),
        "lane": _ref("Lane"),
        "state": _ref("State"),
        "created_at": _type("string", format="date-time"),
        **_strings("sender", "subject"),
        "size": _type("integer"),
        "message_id": _type("string"),
        "idempotency_key": _type("string", "null"),
        "metadata": _type("object"),
        "recipients": _array(_recipient()),
        "send_at": _type("string", "null", format="date-time"),
        "expires_at": _type("string", "null", format="date-time"),
    }
    optional = ("metadata", "send_at", "expires_at")
    return _object(properties, required=tuple(p for p in properties if p not in optional))


def _stats() -> dict[str, Schema]:
    waiting = ("ready", "deferred", "held", "sending")
    lanes = {lane.value: _ref("LaneStats") for lane in Lane}
    return {
        "LaneStats": _object(
            {**_integers(*waiting), "oldest_age_seconds": _type("number")},
            required=(*waiting, "oldest_age_seconds"),
        ),
        "Stats": _object(
            {"lanes": _object(lanes), **_integers("sent", "dead", "suppressed")},
            required=("lanes", "sent", "dead", "suppressed"),
        ),
    }


def _selector() -> Schema:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "ids": _array(_type("string")),
            "all": _type("boolean"),
            **dict.fromkeys(("lane", "state", "domain", "class"), _STRINGS),
            "older_than": _DURATION,
            **_strings("sender", "recipient"),
            "metadata": _type("object", additionalProperties=_type("string")),
            "dry_run": _type("boolean"),
            "unsuppress": _type(
                "boolean",
                description="requeue only: lift the suppression of the dead letters' addresses "
                "(else a requeue of a suppressed address is refused, 409, naming it)",
            ),
            "export": _type(
                "boolean",
                description="delete and purge only: answer with what was removed, as "
                "JSON Lines (at most 1000 recipients; all or nothing)",
            ),
        },
    }


def _schemas() -> dict[str, Schema]:
    error = _object(_strings("code", "message"), required=("code", "message"))
    return {
        "Lane": _enum(Lane),
        "State": _enum(RecipientState),
        "Class": _enum(ReplyClass),
        "Error": _object({"error": error}, required=("error",)),
        "NewMessage": _new_message(),
        "Enqueued": _object(
            {"id": _type("string"), "duplicate": _type("boolean")}, required=("id", "duplicate")
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
    ok = _json_object("How many changed (or would, with dry_run)")
    if exporting:
        ok["description"] += f'; with "export": true ({", ".join(exporting)}), what was removed'
        ok["content"]["application/x-ndjson"] = {"schema": _EXPORT_LINES}
        ok["headers"] = {
            "X-Postlane-Count": {
                "description": "Recipients removed (with export)",
                "schema": _type("integer"),
            }
        }
    return {
        "post": _operation(
            f"{', '.join(actions)} selected deliveries (admin)",
            {"200": ok},
            (400, 401, 403, 404, *((409,) if "requeue" in actions else ()), 413, 422, 503),
            parameters=[_path_parameter("action", _type("string", enum=actions))],
            body=_body(_ref("Selector")),
        )
    }


def _message_paths() -> dict[str, Any]:
    batch = {
        **_object(
            {
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1000,
                    "items": _ref("NewMessage"),
                }
            },
            required=("messages",),
        ),
        "additionalProperties": False,
    }
    return {
        "/v1/messages": {
            "post": _operation(
                "Enqueue a message (202 once durably stored)",
                {"202": _json(_ref("Enqueued"), "Stored")},
                (400, 401, 403, 413, 422, 503),
                parameters=[{"name": "Idempotency-Key", "in": "header", "schema": _type("string")}],
                body=_body(_ref("NewMessage")),
            ),
            "get": _listing(
                "List messages (admin); default: not yet finished",
                _ref("Message"),
                "Messages, oldest first",
            ),
        },
        "/v1/messages/batch": {
            "post": _operation(
                "Enqueue up to 1000 messages in one durable commit",
                {
                    "202": _json_object("All stored"),
                    "207": _json_object("Some refused: one result per item"),
                },
                (400, 401, 403, 413, 503),
                description="An Idempotency-Key header is refused (400): each message of a "
                "batch takes its own idempotency_key.",
                body=_body(batch),
            )
        },
        "/v1/messages/{queue_id}": {
            "get": _operation(
                "A message with each recipient's attempt history",
                {"200": _json(_ref("Message"), "The message")},
                (401, 403, 404, 503),
                parameters=[_path_parameter("queue_id")],
            ),
            "delete": _operation(
                "Cancel what of the message has not gone yet: its waiting recipients (queued, "
                "scheduled, deferred, held) are removed, each with a `deleted` event; one being "
                "sent or already final is left (a send token: its own messages only)",
                {
                    "200": _json_object(
                        "What was cancelled: id, cancelled (recipients removed), left (the "
                        "recipients left, each an address and its state)"
                    )
                },
                (401, 403, 404, 503),
                parameters=[_path_parameter("queue_id")],
            ),
        },
        "/v1/stats": {
            "get": _operation(
                "Depth and oldest age by lane, counts by state (admin)",
                {"200": _json(_ref("Stats"), "Stats")},
                (401, 403, 503),
            )
        },
    }


def _operator_paths() -> dict[str, Any]:
    imported = _object(_integers("records", "imported"), required=("records", "imported"))
    return {
        "/v1/queue": {
            "get": _listing(
                "List the queue (admin); default: not yet finished (mailq)",
                _ref("Message"),
                "Messages, oldest first",
            )
        },
        "/v1/queue/import": {
            "post": _operation(
                "Bring back what an exported delete or purge returned (admin)",
                {"200": _json(imported, "Records read, recipients restored")},
                (400, 401, 403, 413, 503),
                description="Every line is checked before anything is stored, then all are "
                "stored in one transaction: a bad line imports nothing. Messages and recipients "
                "already present are skipped.",
                body=_body(_EXPORT_LINES, "application/x-ndjson"),
            )
        },
        "/v1/queue/{action}": _action_path(["flush", "hold", "release", "delete"]),
        "/v1/dlq": {
            "get": _listing(
                "Dead letters, one row per dead recipient (admin)",
                _type("object"),
                "Dead letters",
            )
        },
        "/v1/dlq/groups": {
            "get": _listing(
                "Dead letters grouped by class, domain and reply (admin)",
                _type("object"),
                "Groups, largest first (not paged: page a group's letters through /v1/dlq)",
                paged=False,
            )
        },
        "/v1/dlq/{action}": _action_path(["requeue", "purge"]),
    }


def _event_paths() -> dict[str, Any]:
    from postlane.events import EVENT_TYPES

    event = _object(
        {
            "id": _type("string"),
            "type": _type("string", enum=list(EVENT_TYPES)),
            "at": _type("string", format="date-time"),
            "message_id": _type("string", description="postlane's id of the message"),
            "recipient": _type("string", "null"),
            "lane": _ref("Lane"),
            "class": _type("string", "null"),
            "code": _type("integer", "null"),
            "enhanced": _type("string", "null"),
            "text": _type("string", "null"),
            "metadata": _type("object"),
        },
        required=("id", "type", "at", "message_id"),
    )
    page = _object({"events": _array(event), "next": _type("string")}, required=("events", "next"))
    parameters: list[dict[str, Any]] = [
        {"name": "after", "in": "query", "schema": _type("string", pattern="^[0-9]{1,19}$")},
        {"name": "limit", "in": "query", "schema": _type("integer", minimum=1, maximum=1000)},
        {
            "name": "type",
            "in": "query",
            "schema": _array(_type("string", enum=list(EVENT_TYPES))),
            "style": "form",
            "explode": True,
        },
    ]
    return {
        "/v1/events": {
            "get": _operation(
                "The event log after a cursor, in commit order (admin)",
                {"200": _json(page, "A page of events and the cursor to read on from")},
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
    report = _object(
        {
            "id": _type("integer"),
            "received_at": _type("string", format="date-time"),
            **_strings("source", "kind", "reason"),
            "mail_from": _type("string", "null"),
            "rcpt_to": _type("string", "null"),
            "size": _type("integer"),
        },
        required=("id", "received_at", "source", "kind", "reason", "size"),
    )
    limit = {"name": "limit", "in": "query", "schema": _type("integer", minimum=1, maximum=1000)}
    return {
        "/v1/feedback/unmatched": {
            "get": _operation(
                "Reports that matched no delivery, newest first (admin)",
                {"200": _json(_array(report), "Reports, without their contents")},
                (400, 401),
                parameters=[limit],
            )
        },
        "/v1/feedback/unmatched/{report_id}": {
            "get": _operation(
                "One report that matched no delivery, with its content (admin)",
                {"200": _json_object("The report and its content as text")},
                (401, 404),
                parameters=[_path_parameter("report_id")],
            )
        },
    }


def _webhook_paths() -> dict[str, Any]:
    name = [_path_parameter("name")]
    replay_body = {
        **_object({"after": _type("string", pattern="^[0-9]{1,19}$")}),
        "additionalProperties": False,
    }
    return {
        "/v1/webhooks/out": {
            "get": _operation(
                "Each webhook endpoint: its settings (never its secret) and state (admin)",
                {"200": _json(_array(_type("object")), "Endpoints")},
                (401, 404),
            )
        },
        "/v1/webhooks/out/{name}/failures": {
            "get": _operation(
                "An endpoint's recent failed requests, newest first (admin)",
                {"200": _json(_array(_type("object")), "Failures")},
                (401, 404),
                parameters=name,
            )
        },
        "/v1/webhooks/out/{name}/test": {
            "post": _operation(
                "POST one signed test event to the endpoint now, once (admin)",
                {"200": _json_object("How it went: ok, status, error, seconds")},
                (401, 404),
                parameters=name,
            )
        },
        "/v1/webhooks/out/{name}/replay": {
            "post": _operation(
                "Send the endpoint the events after `after` again (none: from the oldest kept)",
                {"200": _json_object("Replaying")},
                (400, 401, 404),
                parameters=name,
                body={**_body(replay_body), "required": False},
            )
        },
        "/v1/webhooks/out/{name}/resume": {
            "post": _operation(
                "Try a failing or paused endpoint at once (admin)",
                {"200": _json_object("Resumed")},
                (401, 404),
                parameters=name,
            )
        },
    }


def _suppression_paths() -> dict[str, Any]:
    entry = {
        **_object(
            {
                "address": _type("string"),
                "reason": _type(
                    "string",
                    description="hard_bounce, complaint, unsubscribe or manual (other text: the "
                    "detail of a manual entry)",
                ),
                "scope": _type("string", description="* (every sender) or a sender domain"),
                "expires_at": _WHEN,
                "detail": _type("string"),
                "lanes": {
                    **_type("array", "null"),
                    "items": _ref("Lane"),
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
            "get": _operation(
                "The suppression list, newest first (admin)",
                {"200": _page(_json(_array(_type("object")), "Entries"))},
                (400, 401, 403, 503),
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": _type("integer", minimum=1, maximum=10_000, default=10_000),
                    },
                    _CURSOR,
                    {
                        "name": "address",
                        "in": "query",
                        "description": "only these addresses' entries (repeatable; one page)",
                        "schema": _type("string"),
                    },
                ],
            ),
            "post": _operation(
                "Add an address to the suppression list (admin)",
                {"201": _json_object("Added"), "200": _json_object("Already there")},
                (400, 401, 403, 422, 503),
                body=_body(entry),
            ),
        },
        "/v1/suppressions/{address}": {
            "delete": _operation(
                "Take an address off the suppression list (admin): its entries of one scope and "
                "one reason when given, else all",
                {"200": _json_object("Removed")},
                (400, 401, 403, 404, 422, 503),
                parameters=[
                    _path_parameter("address"),
                    {"name": "scope", "in": "query", "schema": _type("string")},
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
            "get": _operation(
                "Liveness: the process answers (no token needed)",
                {"200": _json_object("Alive")},
                (),
                public=True,
            )
        },
        "/readyz": {
            "get": _operation(
                "Readiness: the store takes a write now, requests are not failing, the worker "
                "runs (no token needed)",
                {
                    "200": _json_object("Ready"),
                    "503": {
                        **_json_object("Not ready: the reason is in error"),
                        "headers": _RETRY_AFTER,
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
    result = _object(
        _integers("received", "recorded", "duplicates", "unmatched", "ignored"),
        required=("received", "recorded", "duplicates", "unmatched", "ignored"),
    )
    paths: dict[str, Any] = {}
    for provider, (summary, description) in _PROVIDER_WEBHOOKS.items():
        events = _array(_type("object")) if provider == "sendgrid" else _type("object")
        media = {"application/json": {"schema": events}}
        if provider == "ses":
            media["text/plain"] = {"schema": _type("string")}
        operation = _operation(
            f"{summary} (no token: the provider's signature is the proof)",
            {"200": _json(result, "The events were recorded, kept unmatched or ignored")},
            (400, 401, 413, 503),
            description=description + " 503: the store cannot record, "
            "or a delivery the events name is still being sent (the provider sends it again).",
            body={"required": True, "content": media},
            public=True,
        )
        operation["responses"].pop("415", None)  # whatever type the provider says it posts
        operation["responses"]["401"]["description"] = (
            "Not verified: no, a wrong, an expired or a replayed signature (or credentials), or "
            "the provider's [webhooks] table is not configured; nothing changed"
        )
        paths[f"/v1/webhooks/{provider}"] = {"post": operation}
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
