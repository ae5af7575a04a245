"""How the store's logic is written once for two databases: as *plans*.

A plan is a generator that yields :class:`Statement` s (a named query of the dialect and its
parameters) and receives each one's :class:`Result`; its return value is the operation's result.
Plans do no I/O: SQLite's writer thread runs them synchronously inside its group commit,
PostgreSQL runs them on a pooled async connection (or on the application's own connection, for
the transactional outbox). The algorithms (claim, record, reap, import/export, ...) live in
:mod:`postlane.store.sqlstore` as plans; each dialect keeps only its queries and what its
database truly does differently (a :class:`Dialect`).

Parameters are plain Python values; a list or tuple travels as the database's own array form
(a PostgreSQL array, a JSON array that SQLite reads with ``json_each``). A *batch* statement
(``rows=``) runs once per row on SQLite and once over parallel arrays on PostgreSQL
(``unnest``), so one plan is cheap on both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from postlane.records import Selector
from postlane.store.sql import Migration, load_common_queries, load_queries

T = TypeVar("T")
Item = TypeVar("Item")
Row = Mapping[str, Any]

_NO_PARAMS: Mapping[str, Any] = {}


@dataclass(frozen=True, slots=True)
class Statement:
    """One named query of the dialect. ``fill`` replaces ``{name}`` placeholders in its text
    with SQL fragments built at run time (a selection's WHERE clause); values always travel as
    parameters. ``rows``: a batch, the statement once per row (merged over ``params``)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=lambda: _NO_PARAMS)
    rows: Sequence[Mapping[str, Any]] | None = None
    fill: Mapping[str, str] = field(default_factory=lambda: _NO_PARAMS)


@dataclass(frozen=True, slots=True)
class Result:
    """What a statement gave back: its rows (by column name) and how many rows it changed."""

    rows: list[Row]
    rowcount: int


EMPTY = Result([], 0)

#: a sans-IO operation: yields statements, receives their results, returns its value
Plan = Generator[Statement, Result, T]


def fetch(
    name: str, params: Mapping[str, Any] = _NO_PARAMS, *, fill: Mapping[str, str] = _NO_PARAMS
) -> Plan[list[Row]]:
    """The rows of one statement."""
    result = yield Statement(name, params, fill=fill)
    return result.rows


def fetch_one(name: str, params: Mapping[str, Any] = _NO_PARAMS) -> Plan[Row | None]:
    """The first row of one statement, or None."""
    result = yield Statement(name, params)
    return result.rows[0] if result.rows else None


def execute(name: str, params: Mapping[str, Any] = _NO_PARAMS) -> Plan[int]:
    """How many rows one statement changed."""
    result = yield Statement(name, params)
    return result.rowcount


def batch(
    name: str, rows: Sequence[Mapping[str, Any]], params: Mapping[str, Any] = _NO_PARAMS
) -> Plan[Result]:
    """One statement over many rows (nothing runs for no rows)."""
    if not rows:
        return EMPTY
    return (yield Statement(name, params, rows=rows))


_ANY = re.compile(r"@any\(([\w.]+), (\w+), (\w+)\)")
_ROWS = re.compile(r"@rows\(([\w\s,]+)\)")


class Dialect:
    """What differs between the SQL of the two databases, beyond the queries themselves."""

    #: the named queries: the shared ones (``sql/queries.sql``) in this database's form, and
    #: its own (``sql/<name>/queries.sql``)
    queries: Mapping[str, str]
    #: whether rows must be locked explicitly against concurrent writers (PostgreSQL; SQLite
    #: has a single writer)
    row_locks: bool = False
    #: a query run in the enqueue's transaction when it stored something (wake-ups)
    notify_query: str | None = None
    #: a query run in the transaction that pauses or lifts a destination (other processes')
    notify_destinations_query: str | None = None

    def param(self, name: str) -> str:
        """The placeholder of a named parameter."""
        raise NotImplementedError

    def any_of(self, column: str, param: str, sql_type: str) -> str:
        """``column`` is one of the array parameter ``param``'s values."""
        raise NotImplementedError

    def metadata_matches(
        self, metadata: Mapping[str, str], params: dict[str, Any], alias: str
    ) -> str:
        """A condition on ``messages.metadata`` (the table named ``alias``): each key holds
        that string."""
        raise NotImplementedError

    def rows_of(self, columns: Sequence[tuple[str, str]]) -> str:
        """The rows of a batch, as an INSERT takes them: one per row of the batch, with these
        (parameter, SQL type) columns."""
        raise NotImplementedError

    def __init__(self, name: str) -> None:
        shared = {query: self.render(text) for query, text in load_common_queries().items()}
        own = load_queries(name)
        if twice := shared.keys() & own.keys():
            raise RuntimeError(f"{name}/queries.sql redefines shared queries: {sorted(twice)}")
        self.queries = {**shared, **own}

    def render(self, text: str) -> str:
        """A shared query in this database's form: its ``@any(column, param, type)``
        conditions and ``@rows(param type, ...)`` batch rows."""
        text = _ANY.sub(lambda m: self.any_of(m[1], m[2], m[3]), text)
        return _ROWS.sub(lambda m: self.rows_of(_columns(m[1])), text)

    def sql(self, statement: Statement) -> str:
        """The text of a statement, its placeholders filled."""
        text = self.queries[statement.name]
        for name, fragment in statement.fill.items():
            text = text.replace("{" + name + "}", fragment)
        return text


def _columns(declared: str) -> list[tuple[str, str]]:
    pairs = [column.split() for column in declared.split(",")]
    if any(len(pair) != 2 for pair in pairs):
        raise RuntimeError(f"@rows({declared}): each column is a parameter and its SQL type")
    return [(name, sql_type) for name, sql_type in pairs]


def _due_before_pause(dialect: Dialect, selector: Selector, params: dict[str, Any]) -> str:
    """The condition of a delivery due before the relay's pause ends, its parameter set."""
    params["relay_paused_until"] = selector.relay_paused_until
    return f"d.next_attempt_at < {dialect.param('relay_paused_until')}"


def shown_state(dialect: Dialect, selector: Selector, params: dict[str, Any]) -> str:
    """A delivery's state as the views show it (:class:`~postlane.relay_pause.RelayPause`):
    while the relay is paused, waiting mail due before the pause's end is ``deferred``."""
    if selector.relay_paused_until is None:
        return "d.state"
    due = _due_before_pause(dialect, selector, params)
    return f"CASE WHEN d.state = 'queued' AND {due} THEN 'deferred' ELSE d.state END"


def selection(
    dialect: Dialect,
    selector: Selector,
    *,
    default_states: Sequence[str],
    forced_states: Sequence[str] | None = None,
    by_row: bool = False,
) -> tuple[str, dict[str, Any]]:
    """A WHERE clause over ``deliveries d`` for a selector (every field narrows), and its
    parameters. The clause is built from fixed fragments only; every value is a parameter.
    ``forced_states``: the states an action applies to, whatever the selector asks.
    ``by_row``: the message's sender and metadata are looked up for each delivery read (a
    slice of a bulk action's walk by id), not gathered as a list of matching messages, which
    a query makes again each time it runs (SQLite did so for every slice: at 1,000,000
    recipients, holding one sender's 200,000 took minutes)."""
    states = [s.value for s in selector.states] or list(default_states)
    if forced_states is not None:
        states = [s for s in states if s in forced_states]
    clauses = [dialect.any_of("d.state", "states", "text")]
    params: dict[str, Any] = {"states": states}
    if selector.relay_paused_until is not None and ("queued" in states) != ("deferred" in states):
        # while the relay is paused the views show waiting mail due before the pause's end
        # as deferred (RelayPause): a --state selects what it shows
        due_before = _due_before_pause(dialect, selector, params)
        if "deferred" in states and (forced_states is None or "queued" in forced_states):
            params["states"] = [*states, "queued"]
            clauses.append(f"(d.state <> 'queued' OR {due_before})")
        elif "queued" in states:
            clauses.append(f"(d.state <> 'queued' OR NOT {due_before})")
    arrays: list[tuple[str, str, str, list[Any]]] = [
        ("d.queue_id", "ids", "text", list(selector.ids)),
        ("d.id", "delivery_ids", "bigint", [int(i) for i in selector.delivery_ids]),
        ("d.lane", "lanes", "text", [lane.value for lane in selector.lanes]),
        ("d.domain", "domains", "text", [d.lower() for d in selector.domains]),
        ("d.last_class", "classes", "text", [c.value for c in selector.classes]),
    ]
    for column, name, sql_type, values in arrays:
        if values:
            clauses.append(dialect.any_of(column, name, sql_type))
            params[name] = values
    if selector.older_than is not None:
        clauses.append(f"d.created_at <= {dialect.param('older_than')}")
        params["older_than"] = selector.older_than
    if selector.send_at_by is not None:
        clauses.append(
            "NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = d.queue_id "
            f"AND m.send_at > {dialect.param('send_at_by')})"
        )
        params["send_at_by"] = selector.send_at_by
    if selector.expires_after is not None:
        clauses.append(f"(d.expires_at IS NULL OR d.expires_at > {dialect.param('expires_after')})")
        params["expires_after"] = selector.expires_after
    if selector.recipient:
        clauses.append(f"lower(d.address) = {dialect.param('recipient')}")
        params["recipient"] = selector.recipient.lower()
    message_matches = []
    if selector.sender:
        message_matches.append(f"lower(m.sender) = {dialect.param('sender')}")
        params["sender"] = selector.sender.lower()
    if selector.metadata:
        message_matches.append(dialect.metadata_matches(selector.metadata, params, "m"))
    for matches in message_matches:
        if by_row:
            clauses.append(
                f"EXISTS (SELECT 1 FROM messages m WHERE m.id = d.queue_id AND {matches})"
            )
        else:  # one query: the messages' index (a sender's) finds them
            clauses.append(f"d.queue_id IN (SELECT m.id FROM messages m WHERE {matches})")
    return " AND ".join(clauses), params


class Database(Protocol):
    """Where plans run: what a dialect module provides."""

    description: str
    dialect: Dialect

    @property
    def migration(self) -> Migration | None:
        """What opening did to the schema (None: nothing)."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, plan: Callable[[], Plan[T]]) -> T:
        """Run a plan in one write transaction (the factory may be called again to retry)."""
        ...

    async def write_combined(self, combine: Callable[[list[Item]], Plan[list[T]]], item: Item) -> T:
        """``combine([item])[0]``, in one write transaction; concurrent calls with the same
        ``combine`` may run as one plan over all their items (each caller gets its own result).
        Should the combined plan fail, each item runs alone, so a failure is its own caller's."""
        ...

    async def read(self, plan: Callable[[], Plan[T]]) -> T:
        """Run a plan in one read-only snapshot."""
        ...

    async def wait_for_work(self, timeout: float) -> bool: ...

    def enqueued(self) -> None:
        """An enqueue of this process committed (in-process wake-ups)."""
        ...

    async def wait_for_destination_news(self, timeout: float) -> bool:
        """See :meth:`postlane.store.base.ThrottleStore.wait_for_destination_news`."""
        ...

    def destinations_changed(self) -> None:
        """A pause or a lift of this process committed (in-process news)."""
        ...


class SQLRole:
    """What every part of the store written over a :class:`Database` holds (the role classes
    of :mod:`postlane.store.delivery`, ``operator``, ``throttle_state``, ``history`` and
    ``suppressions``, put together by :class:`postlane.store.sqlstore.SQLStore`)."""

    db: Database
    dialect: Dialect
