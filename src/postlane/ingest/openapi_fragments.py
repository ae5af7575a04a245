"""The fragments the OpenAPI document (:mod:`postlane.ingest.openapi`) is made of: a JSON body,
a JSON answer, the error answers every operation may give, a listing's selector and paging
parameters. Each path there then reads as what it does."""

from __future__ import annotations

from typing import Any

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


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def typed(*names: str, **extra: Any) -> Schema:
    """``{"type": "string"}``, or a list of types (``"integer", "null"``), with extras."""
    return {"type": names[0] if len(names) == 1 else list(names), **extra}


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def obj(properties: dict[str, Any], *, required: tuple[str, ...] = ()) -> Schema:
    if not required:
        return {"type": "object", "properties": properties}
    return {"type": "object", "required": list(required), "properties": properties}


def integers(*names: str) -> dict[str, Schema]:
    return {name: typed("integer") for name in names}


def strings(*names: str) -> dict[str, Schema]:
    return {name: typed("string") for name in names}


def enum_of(values: Any) -> Schema:
    return {"type": "string", "enum": [v.value for v in values]}


def json_answer(schema: Schema, description: str) -> dict[str, Any]:
    """An answer with a JSON body."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def json_object(description: str) -> dict[str, Any]:
    return json_answer(typed("object"), description)


def body(schema: Schema, *media: str) -> dict[str, Any]:
    """A required request body of ``schema`` in each of ``media`` (default JSON)."""
    return {
        "required": True,
        "content": {m: {"schema": schema} for m in media or ("application/json",)},
    }


def path_parameter(name: str, schema: Schema | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or typed("string")}


RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again",
        "schema": {"type": "integer"},
    }
}


def error_responses(*statuses: int) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for status in statuses:
        answer = {
            "description": _ERROR_TEXT[status],
            "content": {"application/json": {"schema": ERROR}},
        }
        if status in (429, 503):
            answer["headers"] = RETRY_AFTER
        answers[str(status)] = answer
    return answers


def operation(
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
    operation["responses"] = {**answers, **error_responses(*sorted(set(errors)))}
    return operation


def listing(summary: str, items: Schema, description: str, *, paged: bool = True) -> dict[str, Any]:
    """A GET of a list narrowed by the selector's query parameters (``paged``: and paged with
    ``cursor``, the next page's cursor in the answer's headers)."""
    answer = json_answer(array(items), description)
    return operation(
        summary,
        {"200": page(answer) if paged else answer},
        (400, 401, 403, 503),
        parameters=[*SELECTOR_PARAMS, CURSOR] if paged else SELECTOR_PARAMS,
    )


def page(answer: dict[str, Any]) -> dict[str, Any]:
    """A listing's answer, with the headers saying where its next page starts."""
    return {**answer, "headers": NEXT_PAGE}


CURSOR = {
    "name": "cursor",
    "in": "query",
    "required": False,
    "description": "Where the page starts: the X-Next-Cursor (or the Link rel=next) of the page "
    "before; none for the first page. Opaque; one this listing did not give (or an empty one) "
    "is a 400 invalid_field. Pages follow a stable keyset, so entries added between requests "
    "are neither skipped nor repeated.",
    "schema": typed("string", minLength=1, maxLength=2048),
}
NEXT_PAGE = {
    "Link": {
        "description": 'The next page: `<PATH?QUERY&cursor=...>; rel="next"` (this request with '
        "the next cursor). Absent on the last page.",
        "schema": typed("string"),
    },
    "X-Next-Cursor": {
        "description": "The next page's cursor (pass it as `cursor`). Absent on the last page.",
        "schema": typed("string"),
    },
}


ERROR = ref("Error")
#: a string, or a list of them (recipients; selector fields)
STRINGS = {"oneOf": [typed("string"), array(typed("string"), maxItems=1000)]}
DURATION = typed("string", example="2h")

SELECTOR_PARAMS = [
    {"name": name, "in": "query", "required": False, "schema": schema}
    for name, schema in (
        ("ids", array(typed("string"))),
        ("lane", array(ref("Lane"))),
        ("state", array(ref("State"))),
        ("domain", array(typed("string"))),
        ("class", array(ref("Class"))),
        ("older_than", DURATION),
        ("sender", typed("string")),
        ("recipient", typed("string")),
        ("limit", typed("integer", minimum=1, maximum=1000, default=100)),
    )
]

#: what `postlane queue delete --export` writes: one JSON object per message (content base64)
EXPORT_LINES = {
    "type": "string",
    "description": "JSON Lines: one postlane-export/1 record per message, with its content "
    "(base64), selected recipients and their attempt histories.",
}
