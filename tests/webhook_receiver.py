"""A webhook receiver for tests and benchmarks: a small HTTP/1.1 server on 127.0.0.1 that
verifies every request with the Standard Webhooks reference library (``standardwebhooks``, not
postlane's code), records it, and answers as the test scripts it::

    async with WebhookReceiver(secret) as receiver:
        receiver.answer = lambda request: Answer(500)        # fail for a while
        ...
        receiver.answer = ok                                 # recover
        await receiver.wait_until(lambda: len(receiver.accepted) >= 10, "ten events")

A request whose signature does not verify is answered 401, as a real receiver would. Run as a
script (``python tests/webhook_receiver.py --port P --secret S``) it serves until killed and
answers ``GET /count`` with its tallies, for the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True)
class Request:
    """One POST as the receiver got it."""

    webhook_id: str
    timestamp: str
    signature: str
    body: bytes
    #: the verified payload (None when verification failed)
    payload: dict[str, Any] | None
    error: str | None
    #: the signature is right, whatever the time (tests on a fake clock sign in its time)
    signed: bool
    path: str
    headers: dict[str, str]

    @property
    def verified(self) -> bool:
        return self.payload is not None

    @property
    def data(self) -> dict[str, Any]:
        """The event (the payload's ``data``), signed but maybe not verified (a fake time)."""
        data: dict[str, Any] = json.loads(self.body)["data"]
        return data


@dataclass(frozen=True)
class Answer:
    status: int = 204
    #: seconds before answering
    delay: float = 0.0
    #: close the connection without answering
    drop: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


def ok(request: Request) -> Answer:
    """A receiver's answer: 200 when the request verifies, else 401."""
    return Answer(200 if request.verified else 401, body=b"" if request.verified else b"bad")


def signed_ok(request: Request) -> Answer:
    """200 when the signature matches, whatever its time (tests on a fake clock)."""
    return Answer(200 if request.signed else 401)


@dataclass
class WebhookReceiver:
    secret: str
    tls: ssl.SSLContext | None = None
    host: str = "127.0.0.1"
    port: int = 0
    answer: Callable[[Request], Answer] = ok
    #: every request, whatever it was answered
    received: list[Request] = field(default_factory=list)
    #: the requests answered 2xx
    accepted: list[Request] = field(default_factory=list)
    connections: int = 0
    _server: asyncio.Server | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}/hooks"

    async def __aenter__(self) -> WebhookReceiver:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)

    def events(self) -> list[dict[str, Any]]:
        """The events of the accepted requests, in the order they arrived."""
        return [request.data for request in self.accepted]

    async def wait_until(
        self, condition: Callable[[], bool], what: str, *, timeout: float = 30.0
    ) -> None:
        """Until ``condition()`` holds (checked after each request); AssertionError past
        ``timeout`` real seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}: {len(self.received)} "
                    f"request(s), {len(self.accepted)} accepted"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.2))

    def _verify(self, headers: dict[str, str], body: bytes) -> tuple[Any, str | None, bool]:
        """The payload as the library verifies it (or the reason it does not), and whether the
        signature matches regardless of the timestamp's age."""
        webhook = Webhook(self.secret)
        try:
            at = datetime.fromtimestamp(int(headers.get("webhook-timestamp", "")), UTC)
            expected = webhook.sign(headers.get("webhook-id", ""), at, body.decode())
        except ValueError:
            signed = False
        else:
            signed = expected in headers.get("webhook-signature", "").split(" ")
        try:
            return webhook.verify(body, headers), None, signed
        except WebhookVerificationError as exc:
            return None, str(exc), signed

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                method, path, _version = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    header = await reader.readline()
                    if header in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if method == "GET" and path == "/count":
                    tally = {
                        "received": len(self.received),
                        "accepted": len(self.accepted),
                        "verified": sum(r.verified for r in self.received),
                        "last_event_id": self.accepted[-1].data["id"] if self.accepted else None,
                    }
                    self._reply(writer, Answer(200, body=json.dumps(tally).encode()))
                    await writer.drain()
                    continue
                payload, error, signed = self._verify(headers, body)
                request = Request(
                    webhook_id=headers.get("webhook-id", ""),
                    timestamp=headers.get("webhook-timestamp", ""),
                    signature=headers.get("webhook-signature", ""),
                    body=body,
                    payload=payload,
                    error=error,
                    signed=signed,
                    path=path,
                    headers=headers,
                )
                answer = self.answer(request)
                if answer.delay:
                    await asyncio.sleep(answer.delay)
                self.received.append(request)
                if answer.drop:
                    self._changed.set()
                    break
                if 200 <= answer.status < 300:
                    self.accepted.append(request)
                self._changed.set()
                self._reply(writer, answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, answer: Answer) -> None:
        head = [f"HTTP/1.1 {answer.status} Status", f"Content-Length: {len(answer.body)}"]
        head += [f"{name}: {value}" for name, value in answer.headers]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + answer.body)


async def _main() -> None:
    parser = argparse.ArgumentParser(description="a verifying webhook receiver")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    async with WebhookReceiver(args.secret, port=args.port) as receiver:
        print(f"receiving on {receiver.url}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
    sys.exit(0)
