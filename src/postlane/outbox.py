"""The transactional outbox: enqueue mail inside the application's own PostgreSQL transaction.

An application that writes a sign-up row and then calls an email API has two commits and a gap
between them: a crash in the gap loses the welcome mail, a failed send after the commit is not
retried, a rollback after the send mails someone who does not exist. With postlane on the same
PostgreSQL database, the mail is written by the application's transaction itself::

    async with conn.transaction():
        await conn.execute("INSERT INTO users (email) VALUES (%s)", [email])
        await enqueue_in_transaction(conn, Message(sender=..., to=[email], ...))
    # COMMIT: the user and the mail are durable together; ROLLBACK: neither exists

postlane's workers deliver it like any other message (they are notified at the commit). These
functions never commit or roll back: the caller's transaction decides. Only on a connection in
autocommit mode with no transaction open do they commit on their own (the message alone is
then atomic, like :meth:`postlane.store.postgres.PostgresStore.enqueue`).

The statements are the store's (:func:`postlane.store.postgres.enqueue_plan`), so a message
enqueued here is stored exactly as one enqueued through the API. psycopg errors reach the
caller unchanged: they concern the caller's transaction, which the caller retries or abandons.
(Tables missing, a database no postlane has opened yet: the error carries a note saying to run
``postlane migrate``.)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus

from postlane.errors import NotFound
from postlane.message import Message, PreparedMessage, prepare
from postlane.records import Cancelled, EnqueueResult
from postlane.store.operator import cancel_plan
from postlane.store.plans import Plan
from postlane.store.postgres import enqueue_plan, in_schema, run_plan, run_plan_sync

__all__ = [
    "cancel_in_transaction",
    "cancel_in_transaction_sync",
    "enqueue_in_transaction",
    "enqueue_in_transaction_sync",
    "missing_tables",
]

T = TypeVar("T")

#: the default size limit, as postlane's own ``ingest.max_size``
DEFAULT_MAX_SIZE = 25_000_000


def _enqueue_plan(
    message: Message | PreparedMessage, schema: str | None, max_size: int, now: float | None
) -> Plan[list[EnqueueResult]]:
    """The statements that enqueue ``message`` in ``schema``: it is validated and rendered
    (raises :class:`postlane.errors.ValidationError`) before any SQL."""
    at = time.time() if now is None else now
    if not isinstance(message, PreparedMessage):
        message = prepare(message, max_size=max_size, now=at)
    return in_schema(enqueue_plan([message], at), schema)


def missing_tables(schema: str | None) -> str:
    """What to do when postlane's tables are not where the outbox writes (a database no
    postlane has opened yet: the outbox does not create or migrate tables in the caller's
    transaction)."""
    where = f"the schema {schema!r}" if schema else "this database (its search_path)"
    return (
        f"postlane's tables are not in {where}: create them once with "
        "`postlane --config FILE migrate`, FILE naming this database as store.url "
        "(starting postlane serve or a worker on it does the same)"
    )


@contextlib.contextmanager
def _tables_explained(schema: str | None) -> Iterator[None]:
    """psycopg's UndefinedTable, unchanged, with a note saying what to do."""
    try:
        yield
    except psycopg.errors.UndefinedTable as exc:
        exc.add_note(missing_tables(schema))
        raise


def _outside_transaction(conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any]) -> bool:
    return conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE


async def enqueue_in_transaction(
    conn: psycopg.AsyncConnection[Any],
    message: Message | PreparedMessage,
    *,
    schema: str | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    now: float | None = None,
) -> EnqueueResult:
    """Enqueue ``message`` on the caller's async psycopg connection, in its transaction.

    The mail becomes durable, and workers are notified, when the caller commits; a rollback
    leaves nothing. ``schema`` is the store's schema (``store.url``'s ``?schema=``), if it has
    one: it applies to these statements only, the caller's search_path is left as it was.
    Returns the queue id (``duplicate`` set when the idempotency key was already stored, or is
    being stored by a concurrent transaction that then commits)."""
    [result] = await _run(conn, _enqueue_plan(message, schema, max_size, now), schema)
    return result


def enqueue_in_transaction_sync(
    conn: psycopg.Connection[Any],
    message: Message | PreparedMessage,
    *,
    schema: str | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    now: float | None = None,
) -> EnqueueResult:
    """:func:`enqueue_in_transaction` on a blocking psycopg connection (Django, SQLAlchemy,
    any synchronous application)."""
    [result] = _run_sync(conn, _enqueue_plan(message, schema, max_size, now), schema)
    return result


async def cancel_in_transaction(
    conn: psycopg.AsyncConnection[Any],
    queue_id: str,
    *,
    schema: str | None = None,
    now: float | None = None,
) -> Cancelled:
    """Cancel what of a message has not gone yet (see :meth:`postlane.AsyncPostlane.cancel`)
    on the caller's async connection, in its transaction: it sees the mail that transaction
    enqueued, and a rollback undoes the cancel. Raises :class:`NotFound` for no such
    message."""
    plan = cancel_plan(str(queue_id), None, time.time() if now is None else now)
    return _found(await _run(conn, in_schema(plan, schema), schema), queue_id)


def cancel_in_transaction_sync(
    conn: psycopg.Connection[Any],
    queue_id: str,
    *,
    schema: str | None = None,
    now: float | None = None,
) -> Cancelled:
    """:func:`cancel_in_transaction` on a blocking psycopg connection (Django)."""
    plan = cancel_plan(str(queue_id), None, time.time() if now is None else now)
    return _found(_run_sync(conn, in_schema(plan, schema), schema), queue_id)


def _found(cancelled: Cancelled | None, queue_id: str) -> Cancelled:
    if cancelled is None:
        raise NotFound(f"no message with id {queue_id}")
    return cancelled


async def _run(conn: psycopg.AsyncConnection[Any], plan: Plan[T], schema: str | None) -> T:
    """``plan`` in the caller's transaction (in one of its own on an idle autocommit one)."""
    with _tables_explained(schema):
        if _outside_transaction(conn):
            async with conn.transaction():
                return await run_plan(conn, plan)
        return await run_plan(conn, plan)


def _run_sync(conn: psycopg.Connection[Any], plan: Plan[T], schema: str | None) -> T:
    with _tables_explained(schema):
        if _outside_transaction(conn):
            with conn.transaction():
                return run_plan_sync(conn, plan)
        return run_plan_sync(conn, plan)
