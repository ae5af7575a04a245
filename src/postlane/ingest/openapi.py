"""The HTTP API's OpenAPI 3.1 document (served at ``/openapi.json``).

Written out by hand, next to the handlers in :mod:`postlane.ingest.http`: it is the contract
clients generate code from, and the fuzz test (``tests/integration/test_http_fuzz.py``) drives the
API from it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from postlane import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_STRINGS = {
    "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 1000}]
}


def _error_responses(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Malformed request",
        401: "Missing or invalid token",
        403: "The token's scope does not allow this",
        404: "Not found",
        413: "Too large",
        422: "The message was refused (nothing stored)",
        503: "The store cannot be reached",
    }
    return {
        str(s): {
            "description": text[s],
            "content": {"application/json": {"schema": _ERROR}},
        }
        for s in statuses
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_SELECTOR_PARAMS = [
    {"name": name, "in": "query", "required": False, "schema": schema}
    for name, schema in (
        ("ids", {"type": "array", "items": {"type": "string"}}),
        ("lane", {"type": "array", "items": {"$ref": "#/components/schemas/Lane"}}),
        ("state", {"type": "array", "items": {"$ref": "#/components/schemas/State"}}),
        ("domain", {"type": "array", "items": {"type": "string"}}),
        ("class", {"type": "array", "items": {"$ref": "#/components/schemas/Class"}}),
        ("older_than", {"type": "string", "example": "2h"}),
        ("sender", {"type": "string"}),
        ("recipient", {"type": "string"}),
        ("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
    )
]


#: what `postlane queue delete --export` writes: one JSON object per message (content base64)
_EXPORT_LINES = {
    "type": "string",
    "description": "JSON Lines: one postlane-export/1 record per message, with its content "
    "(base64), selected recipients and their attempt histories.",
}


def _action_path(actions: list[str], bearer: list[dict[str, list[str]]]) -> dict[str, Any]:
    exporting = [a for a in actions if a in ("delete", "purge")]
    ok = _json({"type": "object"}, "How many changed (or would, with dry_run)")
    if exporting:
        ok["description"] += f'; with "export": true ({", ".join(exporting)}), what was removed'
        ok["content"]["application/x-ndjson"] = {"schema": _EXPORT_LINES}
        ok["headers"] = {
            "X-Postlane-Count": {
                "description": "Recipients removed (with export)",
                "schema": {"type": "integer"},
            }
        }
    return {
        "post": {
            "summary": f"{', '.join(actions)} selected deliveries (admin)",
            "security": bearer,
            "parameters": [
                {
                    "name": "action",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": actions},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Selector"}}
                },
            },
            "responses": {
                "200": ok,
                **_error_responses(400, 401, 403, 404, 413, 422, 503),
            },
        }
    }


@cache
def openapi_document() -> dict[str, Any]:
    reply = {
        "type": ["object", "null"],
        "properties": {
            "code": {"type": ["integer", "null"]},
            "enhanced": {"type": ["string", "null"]},
            "text": {"type": "string"},
            "class": {"$ref": "#/components/schemas/Class"},
        },
    }
    attempt = {
        "type": "object",
        "properties": {
            "at": {"type": "string", "format": "date-time"},
            "class": {"$ref": "#/components/schemas/Class"},
            "code": {"type": ["integer", "null"]},
            "enhanced": {"type": ["string", "null"]},
            "text": {"type": "string"},
            "duration_ms": {"type": "integer"},
            "relay": {"type": "string"},
            "destination": {"type": "string"},
        },
    }
    recipient = {
        "type": "object",
        "required": ["address", "domain", "state", "attempts", "next_attempt_at", "last_response"],
        "properties": {
            "address": {"type": "string"},
            "domain": {"type": "string"},
            "destination": {"type": "string"},
            "state": {"$ref": "#/components/schemas/State"},
            "attempts": {"type": "integer"},
            "next_attempt_at": {"type": ["string", "null"], "format": "date-time"},
            "last_response": reply,
            "history": {"type": "array", "items": attempt},
        },
    }
    schemas: dict[str, Any] = {
        "Lane": {"type": "string", "enum": ["high", "normal", "low"]},
        "State": {
            "type": "string",
            "enum": ["queued", "sending", "deferred", "held", "sent", "dead", "suppressed"],
        },
        "Class": {
            "type": "string",
            "enum": [
                "delivered",
                "temporary",
                "throttled",
                "connection",
                "soft_bounce",
                "hard_bounce",
                "policy_block",
                "message_error",
            ],
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                }
            },
        },
        "NewMessage": {
            "type": "object",
            "additionalProperties": False,
            "description": "Fields of a message, or `raw` (an RFC 5322 message) with from/to.",
            "properties": {
                "from": {"type": "string", "example": "App <app@example.com>"},
                "to": _STRINGS,
                "cc": _STRINGS,
                "bcc": _STRINGS,
                "subject": {"type": "string"},
                "text": {"type": "string"},
                "html": {"type": "string"},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                "lane": {"$ref": "#/components/schemas/Lane"},
                "idempotency_key": {"type": "string", "maxLength": 255},
                "metadata": {"type": "object"},
                "attachments": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["content"],
                        "properties": {
                            "filename": {"type": "string"},
                            "content": {"type": "string", "contentEncoding": "base64"},
                            "content_type": {"type": "string", "example": "application/pdf"},
                        },
                    },
                },
                "raw": {"type": "string"},
            },
        },
        "Enqueued": {
            "type": "object",
            "required": ["id", "duplicate"],
            "properties": {"id": {"type": "string"}, "duplicate": {"type": "boolean"}},
        },
        "Message": {
            "type": "object",
            "required": [
                "id",
                "lane",
                "state",
                "created_at",
                "sender",
                "subject",
                "size",
                "message_id",
                "idempotency_key",
                "recipients",
            ],
            "properties": {
                "id": {"type": "string"},
                "lane": {"$ref": "#/components/schemas/Lane"},
                "state": {"$ref": "#/components/schemas/State"},
                "created_at": {"type": "string", "format": "date-time"},
                "sender": {"type": "string"},
                "subject": {"type": "string"},
                "size": {"type": "integer"},
                "message_id": {"type": "string"},
                "idempotency_key": {"type": ["string", "null"]},
                "metadata": {"type": "object"},
                "recipients": {"type": "array", "items": recipient},
            },
        },
        "LaneStats": {
            "type": "object",
            "required": ["ready", "deferred", "held", "sending", "oldest_age_seconds"],
            "properties": {
                "ready": {"type": "integer"},
                "deferred": {"type": "integer"},
                "held": {"type": "integer"},
                "sending": {"type": "integer"},
                "oldest_age_seconds": {"type": "number"},
            },
        },
        "Stats": {
            "type": "object",
            "required": ["lanes", "sent", "dead", "suppressed"],
            "properties": {
                "lanes": {
                    "type": "object",
                    "properties": {
                        lane: {"$ref": "#/components/schemas/LaneStats"}
                        for lane in ("high", "normal", "low")
                    },
                },
                "sent": {"type": "integer"},
                "dead": {"type": "integer"},
                "suppressed": {"type": "integer"},
            },
        },
        "Selector": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "ids": {"type": "array", "items": {"type": "string"}},
                "all": {"type": "boolean"},
                "lane": _STRINGS,
                "state": _STRINGS,
                "domain": _STRINGS,
                "class": _STRINGS,
                "older_than": {"type": "string", "example": "2h"},
                "sender": {"type": "string"},
                "recipient": {"type": "string"},
                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                "dry_run": {"type": "boolean"},
                "export": {
                    "type": "boolean",
                    "description": "delete and purge only: answer with what was removed, as "
                    "JSON Lines (at most 1000 recipients; all or nothing)",
                },
            },
        },
    }
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    paths: dict[str, Any] = {
        "/v1/messages": {
            "post": {
                "summary": "Enqueue a message (202 once durably stored)",
                "security": bearer,
                "parameters": [
                    {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/NewMessage"}}
                    },
                },
                "responses": {
                    "202": _json({"$ref": "#/components/schemas/Enqueued"}, "Stored"),
                    **_error_responses(400, 401, 403, 413, 422, 503),
                },
            },
            "get": {
                "summary": "List messages (admin); default: not yet finished",
                "security": bearer,
                "parameters": _SELECTOR_PARAMS,
                "responses": {
                    "200": _json(
                        {"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
                        "Messages, oldest first",
                    ),
                    **_error_responses(400, 401, 403, 503),
                },
            },
        },
        "/v1/messages/batch": {
            "post": {
                "summary": "Enqueue up to 1000 messages in one durable commit",
                "security": bearer,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["messages"],
                                "properties": {
                                    "messages": {
                                        "type": "array",
                                        "minItems": 1,
                                        "maxItems": 1000,
                                        "items": {"$ref": "#/components/schemas/NewMessage"},
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json({"type": "object"}, "All stored"),
                    "207": _json({"type": "object"}, "Some refused: one result per item"),
                    **_error_responses(400, 401, 403, 413, 503),
                },
            }
        },
        "/v1/messages/{queue_id}": {
            "get": {
                "summary": "A message with each recipient's attempt history",
                "security": bearer,
                "parameters": [
                    {
                        "name": "queue_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Message"}, "The message"),
                    **_error_responses(401, 403, 404, 503),
                },
            }
        },
        "/v1/stats": {
            "get": {
                "summary": "Depth and oldest age by lane, counts by state (admin)",
                "security": bearer,
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Stats"}, "Stats"),
                    **_error_responses(401, 403, 503),
                },
            }
        },
        "/v1/queue": {
            "get": {
                "summary": "List the queue (admin); default: not yet finished (mailq)",
                "security": bearer,
                "parameters": _SELECTOR_PARAMS,
                "responses": {
                    "200": _json(
                        {"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
                        "Messages, oldest first",
                    ),
                    **_error_responses(400, 401, 403, 503),
                },
            }
        },
        "/v1/queue/import": {
            "post": {
                "summary": "Bring back what an exported delete or purge returned (admin)",
                "description": "Every line is checked before anything is stored, then all are "
                "stored in one transaction: a bad line imports nothing. Messages and recipients "
                "already present are skipped.",
                "security": bearer,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-ndjson": {"schema": _EXPORT_LINES},
                        "text/plain": {"schema": _EXPORT_LINES},
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["records", "imported"],
                            "properties": {
                                "records": {"type": "integer"},
                                "imported": {"type": "integer"},
                            },
                        },
                        "Records read, recipients restored",
                    ),
                    **_error_responses(400, 401, 403, 413, 503),
                },
            }
        },
        "/v1/queue/{action}": _action_path(["flush", "hold", "release", "delete"], bearer),
        "/v1/dlq": {
            "get": {
                "summary": "Dead letters, one row per dead recipient (admin)",
                "security": bearer,
                "parameters": _SELECTOR_PARAMS,
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}, "Dead letters"),
                    **_error_responses(400, 401, 403, 503),
                },
            }
        },
        "/v1/dlq/groups": {
            "get": {
                "summary": "Dead letters grouped by class, domain and reply (admin)",
                "security": bearer,
                "parameters": _SELECTOR_PARAMS,
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}, "Groups"),
                    **_error_responses(400, 401, 403, 503),
                },
            }
        },
        "/v1/dlq/{action}": _action_path(["requeue", "purge"], bearer),
        "/v1/suppressions": {
            "get": {
                "summary": "The suppression list (admin)",
                "security": bearer,
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}, "Entries"),
                    **_error_responses(401, 403, 503),
                },
            },
            "post": {
                "summary": "Add an address to the suppression list (admin)",
                "security": bearer,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["address"],
                                "properties": {
                                    "address": {"type": "string"},
                                    "reason": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": _json({"type": "object"}, "Added"),
                    "200": _json({"type": "object"}, "Already there"),
                    **_error_responses(400, 401, 403, 422, 503),
                },
            },
        },
        "/v1/suppressions/{address}": {
            "delete": {
                "summary": "Take an address off the suppression list (admin)",
                "security": bearer,
                "parameters": [
                    {
                        "name": "address",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json({"type": "object"}, "Removed"),
                    **_error_responses(401, 403, 404, 503),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Health (no token needed)",
                "responses": {
                    "200": _json({"type": "object"}, "Healthy"),
                    "503": _json({"type": "object"}, "The store cannot be reached"),
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "postlane",
            "version": __version__,
            "description": "A durable outbound email queue. Tokens: admin (`[http] tokens`) "
            "or send (`[http] send_tokens`: enqueue and read own messages).",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": paths,
    }
