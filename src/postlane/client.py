"""A client for postlane's HTTP API: what a web application on another host (Flask, FastAPI, a
Django project in HTTP mode) uses to hand mail to a postlane server::

    import postlane

    mail = postlane.Client("http://postlane.internal:8025", token="...")
    result = mail.send(sender="app@example.com", to=["ada@example.net"], subject="Hi", text="Hello")
    print(result.id, result.duplicate)

:class:`AsyncClient` has the same methods for asyncio code (``await mail.send(...)``).

Retrying is built in, and safe. A connection error, a timeout, or a 502/503/504 answer is
retried a few times with a growing, jittered delay. Retrying a POST whose answer was lost can
only be safe with an idempotency key, so every message sent without one gets a fresh one (a
UUID), kept for all the tries of that call: the server stores the message once and answers the
retry with the first message's id and ``duplicate: true``. (That key protects this call's own
retries; to make *your* retries across calls safe, pass your own ``idempotency_key``.)

Errors are postlane's own (:mod:`postlane.errors`), each with the server's message:
:class:`ValidationError` (400, 422; :class:`MessageTooLarge` for 413), :class:`NotFound` (404),
:class:`IdempotencyConflict` (409: the key was used for another message),
:class:`StoreUnavailable` once the retries are used up, :class:`PostlaneError` otherwise (401,
403, ...). httpx's exceptions never reach the caller for these expected failures.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Self, TypeVar
from urllib.parse import quote

import httpx

from postlane.errors import (
    ConfigError,
    IdempotencyConflict,
    MessageTooLarge,
    NotFound,
    PostlaneError,
    StoreUnavailable,
    ValidationError,
)
from postlane.message import Message
from postlane.mime import Attachment
from postlane.records import EnqueueResult

__all__ = ["AsyncClient", "BatchRefused", "Client"]

#: statuses that mean "not now" rather than "not this": the store is busy or a proxy in front
#: of postlane lost it; with an idempotency key on every POST, they are safe to retry
RETRY_STATUSES = frozenset({502, 503, 504})
#: a retry never waits longer than this, whatever the backoff or a Retry-After says
MAX_RETRY_DELAY = 5.0
#: the keyword a caller may use for the sender, as in the Python API, mapped to the JSON "from"
_SENDER_ALIASES = ("sender", "from_")

MessageInput = Message | Mapping[str, Any]

_TransportT = TypeVar("_TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)
_HttpT = TypeVar("_HttpT", httpx.Client, httpx.AsyncClient)


class BatchRefused(ValidationError):
    """:meth:`Client.send_many`: the server refused some messages of a batch and stored the
    others. ``results`` has one entry per message sent (``None`` where refused), ``errors``
    the server's reason for each refused one, by position."""

    def __init__(
        self, results: list[EnqueueResult | None], errors: dict[int, str], total: int
    ) -> None:
        reasons = "; ".join(f"message {index}: {reason}" for index, reason in errors.items())
        super().__init__(
            f"{len(errors)} of {total} messages refused (the others are stored): {reasons}"
        )
        self.results = results
        self.errors = errors


# -- turning messages into the API's JSON ------------------------------------------------------


def message_json(message: MessageInput | None = None, /, **fields: Any) -> dict[str, Any]:
    """The API's JSON shape for a :class:`~postlane.Message`, a JSON-shaped mapping (``"from"``
    or ``"sender"``), or Python-API keywords (``sender=``, ``to=``, ...). Attachments may be
    :class:`~postlane.Attachment` values (their bytes are base64-encoded here) or the API's
    dicts; a raw message may be bytes (it must be UTF-8: the API carries it as a JSON string)."""
    if message is not None and fields:
        raise TypeError("pass a message or keyword fields, not both")
    if isinstance(message, Message):
        data = _dataclass_json(message)
    else:
        data = dict(message if message is not None else fields)
        for alias in _SENDER_ALIASES:
            if alias in data:
                data["from"] = data.pop(alias)
        if data.get("attachments"):
            data["attachments"] = [_attachment_json(item) for item in data["attachments"]]
        if isinstance(data.get("raw"), bytes | bytearray):
            data["raw"] = _raw_text(bytes(data["raw"]))
        if data.get("lane") is not None:
            data["lane"] = str(data["lane"])
        for name in ("to", "cc", "bcc"):
            if isinstance(data.get(name), tuple):
                data[name] = list(data[name])
    for name in ("send_at", "expires_at"):
        data[name] = _when_json(data.get(name), name)
    return {name: value for name, value in data.items() if value is not None}


def _when_json(value: Any, what: str) -> str | float | None:
    """A time as the API takes it: ISO 8601 with its zone (an aware datetime), or as given.
    A naive datetime is refused here, before any request: whose 9:30 would it be?"""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValidationError(
                f"{what} has no time zone; give an aware datetime (e.g. tzinfo=UTC)", field=what
            )
        return value.isoformat()
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        raise ValidationError(  # a date has no time of day, a timedelta no origin: say so
            f"{what} must be a time (an aware datetime, ISO 8601 text with a zone, or Unix "
            f"seconds), not {type(value).__name__}",
            field=what,
        )
    result: str | float | None = value
    return result


def _dataclass_json(message: Message) -> dict[str, Any]:
    data: dict[str, Any] = {
        "from": message.sender or None,
        "to": list(message.to) or None,
        "cc": list(message.cc) or None,
        "bcc": list(message.bcc) or None,
        "subject": message.subject,
        "text": message.text,
        "html": message.html,
        "headers": dict(message.headers) or None,
        "attachments": [_attachment_json(a) for a in message.attachments] or None,
        "lane": str(message.lane),
        "idempotency_key": message.idempotency_key,
        "metadata": dict(message.metadata) if message.metadata is not None else None,
        "send_at": message.send_at,
        "expires_at": message.expires_at,
    }
    if message.raw is not None:
        raw = message.raw
        data["raw"] = _raw_text(raw) if isinstance(raw, bytes | bytearray) else raw
    return data


def _attachment_json(item: Any) -> Any:
    if isinstance(item, Attachment):
        return {
            "filename": item.filename,
            "content": base64.b64encode(item.content).decode("ascii"),
            "content_type": item.content_type,
        }
    return item  # the API's own shape: the server says what is wrong with it


def _raw_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(
            f"the raw message is not UTF-8 ({exc.reason} at byte {exc.start}); "
            "the HTTP API carries raw messages as JSON strings",
            field="raw",
        ) from None


def _with_key(data: dict[str, Any]) -> dict[str, Any]:
    """The message with an idempotency key: the caller's, or a new one for this call's retries."""
    if data.get("idempotency_key") is None:
        return {**data, "idempotency_key": str(uuid.uuid4())}
    return data


# -- one HTTP exchange and what it means ---------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    body: Any = None
    #: query parameters (a list of pairs: a name may repeat, as ``type`` does)
    params: tuple[tuple[str, str], ...] = ()
    #: the answer when a retry finds the resource gone (404): an earlier try whose answer was
    #: lost did the work (a cancel); None: a 404 is :class:`NotFound` whatever the try
    gone: Any = None

    @property
    def content(self) -> bytes | None:
        if self.body is None:
            return None
        return json.dumps(self.body, separators=(",", ":")).encode()


class _Retry(Exception):
    """Why a try failed in a way worth another (its text ends up in the final error).
    ``reached``: the server may have acted on the request (its answer was lost, or a proxy's
    502/504 stood for it), as opposed to a connection never made or postlane's own 503."""

    def __init__(
        self, reason: str, retry_after: float | None = None, *, reached: bool = True
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.reached = reached


def _error_body(response: httpx.Response) -> tuple[str, str]:
    """The API's ``{"error": {"code", "message"}}``, or the status and a bit of the body."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().replace("\n", " ")[:200]
        return f"http_{response.status_code}", text or response.reason_phrase


def _interpret(response: httpx.Response) -> Any:
    """The JSON of a successful answer; raises :class:`_Retry` or the matching error."""
    status = response.status_code
    if status in RETRY_STATUSES:
        code, message = _error_body(response)
        reached = not (status == 503 and code == StoreUnavailable.code)  # postlane did nothing
        raise _Retry(f"HTTP {status} {code}: {message}", _retry_after(response), reached=reached)
    if status < 400:
        try:
            return response.json()
        except ValueError:
            raise PostlaneError(
                f"postlane answered {status} with a body that is not JSON "
                f"(is {response.request.url} a postlane server?)"
            ) from None
    code, message = _error_body(response)
    error: PostlaneError
    if status == 409 and code == IdempotencyConflict.code:
        body = response.json()["error"]
        raise IdempotencyConflict(str(body["key"]), str(body["id"]))
    if status == 413:
        error = MessageTooLarge(message)
    elif status in (400, 422):
        error = ValidationError(message)
    elif status == 404:
        error = NotFound(message)
    else:
        error = PostlaneError(f"postlane refused the request (HTTP {status} {code}): {message}")
    error.code = code
    raise error


def _answer(call: _Call, attempt: _Try, response: httpx.Response) -> Any:
    """:func:`_interpret`, but for a call whose work an earlier try that may have reached the
    server did (a 404 after a connection that was never made is a 404)."""
    if call.gone is not None and attempt.reached_before and response.status_code == 404:
        return call.gone
    return _interpret(response)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _transport_retry(exc: httpx.TransportError) -> _Retry:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    # a connection never made sent nothing; anything later may have reached the server
    reached = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    return _Retry(f"the connection {kind}: {exc or type(exc).__name__}", reached=reached)


def _unavailable(call: _Call, url: str, tries: int, last: _Retry) -> StoreUnavailable:
    return StoreUnavailable(
        f"postlane at {url} did not take {call.method} {call.path} after {tries} "
        f"{'try' if tries == 1 else 'tries'}: {last.reason}"
    )


def _enqueue_result(data: Any) -> EnqueueResult:
    return EnqueueResult(id=str(data["id"]), duplicate=bool(data["duplicate"]))


def _batch_results(data: Any, total: int) -> list[EnqueueResult]:
    results: list[EnqueueResult | None] = []
    errors: dict[int, str] = {}
    for index, item in enumerate(data["results"]):
        if "error" in item:
            results.append(None)
            errors[index] = str(item["error"].get("message", item["error"]))
        else:
            results.append(_enqueue_result(item))
    if errors:
        raise BatchRefused(results, errors, total)
    return [r for r in results if r is not None]


@dataclass(frozen=True)
class _Backoff:
    """How long to wait before try ``n`` (1-based retries): ``base * 2**(n-1)``, half of it
    random so that clients failing together do not retry together, capped."""

    retries: int
    base: float

    def delay(self, retry: int, last: _Retry) -> float:
        if last.retry_after is not None:
            return min(last.retry_after, MAX_RETRY_DELAY)
        step = min(self.base * 2.0 ** (retry - 1), MAX_RETRY_DELAY)
        return step / 2 + random.uniform(0, step / 2)


class _Try:
    """One try of a call, ``with``-ed around its request (as tenacity does): a failure worth
    another try (a 502/503/504 answer, a connection error or timeout) ends the block quietly
    and is kept as :attr:`failure`; any other error passes through."""

    def __init__(self, number: int, wait: float, *, reached_before: bool = False) -> None:
        self.number = number
        #: seconds to wait before this try (none before the first)
        self.wait = wait
        #: an earlier try may have reached the server (see :attr:`_Retry.reached`)
        self.reached_before = reached_before
        self.failure: _Retry | None = None

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, httpx.TransportError):
            exc = _transport_retry(exc)
        if isinstance(exc, _Retry):
            self.failure = exc
            return True
        return False


def _base_url(url: str) -> str:
    """The server's base URL, checked when the client is made: a mistake there would fail every
    request (and be retried as if the server were down)."""
    base = str(url).strip().rstrip("/")
    scheme, _, rest = base.partition("://")
    if scheme.lower() not in ("http", "https") or not rest:
        raise ConfigError(
            f"postlane's URL must start with http:// or https:// (http://127.0.0.1:8025), "
            f"got {url!r}"
        )
    if base.lower().endswith("/v1"):
        raise ConfigError(
            f"postlane's URL is the server's base, without /v1 (the client adds it): {url!r}"
        )
    return base


class _Base(Generic[_TransportT, _HttpT]):
    """What both clients share: their arguments, headers and the calls they make; each opens
    its own kind of httpx client (:meth:`_open`) and waits its own way between tries."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 10,
        *,
        retries: int = 3,
        backoff: float = 0.2,
        transport: _TransportT | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.url = _base_url(url)
        self.backoff = _Backoff(retries, backoff)
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http: _HttpT = self._open(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout), transport=transport
        )

    @staticmethod
    def _open(
        *,
        base_url: str,
        headers: dict[str, str],
        timeout: httpx.Timeout,
        transport: _TransportT | None,
    ) -> _HttpT:
        raise NotImplementedError

    def _tries(self, call: _Call) -> Iterator[_Try]:
        """The tries of ``call`` (see :class:`_Try`) until one returns or raises: each after
        its backoff; when the last one fails, :class:`StoreUnavailable` says why."""
        attempt = _Try(1, wait=0.0)
        while True:
            yield attempt
            failure = attempt.failure
            assert failure is not None, "a try that neither returned nor raised"
            if attempt.number > self.backoff.retries:
                raise _unavailable(call, self.url, attempt.number, failure)
            attempt = _Try(
                attempt.number + 1,
                self.backoff.delay(attempt.number, failure),
                reached_before=attempt.reached_before or failure.reached,
            )

    def _build(self, call: _Call) -> httpx.Request:
        return self._http.build_request(
            call.method, call.path, content=call.content, params=call.params
        )

    @staticmethod
    def _send_call(message: MessageInput | None, fields: dict[str, Any]) -> _Call:
        return _Call("POST", "/v1/messages", _with_key(message_json(message, **fields)))

    @staticmethod
    def _batch_call(messages: Sequence[MessageInput]) -> _Call:
        items = [_with_key(message_json(message)) for message in messages]
        return _Call("POST", "/v1/messages/batch", {"messages": items})

    @staticmethod
    def _get_call(queue_id: str) -> _Call:
        return _Call("GET", f"/v1/messages/{quote(str(queue_id), safe='')}")

    @staticmethod
    def _cancel_call(queue_id: str) -> _Call:
        gone: dict[str, Any] = {"id": str(queue_id), "cancelled": None, "left": []}
        return _Call("DELETE", f"/v1/messages/{quote(str(queue_id), safe='')}", gone=gone)

    @staticmethod
    def _events_call(after: str | int | None, limit: int, types: Sequence[str]) -> _Call:
        if isinstance(types, str):
            types = [types]
        params = [("limit", str(limit))]
        if after is not None and str(after) != "":
            params.append(("after", str(after)))
        params += [("type", str(kind)) for kind in types]
        return _Call("GET", "/v1/events", params=tuple(params))


class Client(_Base[httpx.BaseTransport, httpx.Client]):
    """postlane's HTTP API from synchronous code (a Flask or Django view, a script).

    ``url`` is the server (``http://host:8025``), ``token`` a bearer token (an admin or send
    token), ``timeout`` the seconds each try may take. A client keeps its connections open:
    make one per process and share it (it is thread-safe); close it with :meth:`close` or
    ``with``. ``transport`` is passed to httpx (tests use it to reach an app in process)."""

    _open = staticmethod(httpx.Client)

    def send(self, message: MessageInput | None = None, /, **fields: Any) -> EnqueueResult:
        """Enqueue one message; returns once the server has stored it durably.

        Pass a :class:`~postlane.Message`, the API's JSON as a dict, or the fields as keywords
        (``sender``, ``to``, ``cc``, ``bcc``, ``subject``, ``text``, ``html``, ``headers``,
        ``attachments``, ``raw``, ``lane``, ``idempotency_key``, ``metadata``)."""
        return _enqueue_result(self._request(self._send_call(message, fields)))

    def send_many(self, messages: Sequence[MessageInput]) -> list[EnqueueResult]:
        """Enqueue up to 1,000 messages in one request and one durable commit. A message the
        server refuses does not stop the others: :class:`BatchRefused` says which."""
        return _batch_results(self._request(self._batch_call(messages)), len(messages))

    def get(self, queue_id: str) -> dict[str, Any]:
        """The message as the API shows it: state, and each recipient's attempt history."""
        data: dict[str, Any] = self._request(self._get_call(queue_id))
        return data

    def cancel(self, queue_id: str) -> dict[str, Any]:
        """Cancel what of a message has not gone yet (``DELETE /v1/messages/ID``; a send token
        cancels only its own messages): ``{"id", "cancelled", "left"}``, how many recipients
        were removed before they were sent and the recipients it left with their states
        (already sent, or ``sending`` at that moment: it may still go). ``cancelled`` is None
        when a retry found the message gone: the try whose answer was lost cancelled it.
        :class:`~postlane.NotFound` for a message that does not exist (or is not yours)."""
        data: dict[str, Any] = self._request(self._cancel_call(queue_id))
        return data

    def events(
        self, after: str | int | None = None, *, limit: int = 100, types: Sequence[str] = ()
    ) -> dict[str, Any]:
        """A page of the event log (``GET /v1/events``, an admin token): ``{"events": [...],
        "next": ID}``, the events after the event ``after`` (None: from the oldest kept), in
        commit order, at most ``limit``, of ``types`` (default all). Pass ``next`` back as
        ``after`` to read on. :class:`~postlane.NotFound` when retention removed ``after``."""
        data: dict[str, Any] = self._request(self._events_call(after, limit, types))
        return data

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, call: _Call) -> Any:
        for attempt in self._tries(call):
            time.sleep(attempt.wait)
            with attempt:
                return _answer(call, attempt, self._http.send(self._build(call)))


class AsyncClient(_Base[httpx.AsyncBaseTransport, httpx.AsyncClient]):
    """:class:`Client` for asyncio code (FastAPI, Starlette, aiohttp): the same methods, to
    ``await``. Make one per process (e.g. in the app's lifespan) and close it with
    :meth:`aclose` or ``async with``."""

    _open = staticmethod(httpx.AsyncClient)

    async def send(self, message: MessageInput | None = None, /, **fields: Any) -> EnqueueResult:
        """Enqueue one message (see :meth:`Client.send`)."""
        return _enqueue_result(await self._request(self._send_call(message, fields)))

    async def send_many(self, messages: Sequence[MessageInput]) -> list[EnqueueResult]:
        """Enqueue up to 1,000 messages in one commit (see :meth:`Client.send_many`)."""
        return _batch_results(await self._request(self._batch_call(messages)), len(messages))

    async def get(self, queue_id: str) -> dict[str, Any]:
        """The message as the API shows it (see :meth:`Client.get`)."""
        data: dict[str, Any] = await self._request(self._get_call(queue_id))
        return data

    async def cancel(self, queue_id: str) -> dict[str, Any]:
        """Cancel what of a message has not gone yet (see :meth:`Client.cancel`)."""
        data: dict[str, Any] = await self._request(self._cancel_call(queue_id))
        return data

    async def events(
        self, after: str | int | None = None, *, limit: int = 100, types: Sequence[str] = ()
    ) -> dict[str, Any]:
        """A page of the event log (see :meth:`Client.events`)."""
        data: dict[str, Any] = await self._request(self._events_call(after, limit, types))
        return data

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, call: _Call) -> Any:
        for attempt in self._tries(call):
            await asyncio.sleep(attempt.wait)
            with attempt:
                return _answer(call, attempt, await self._http.send(self._build(call)))
