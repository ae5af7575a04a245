"""The store, written once: every :class:`postlane.store.base.Store` operation as a plan over
named queries (:mod:`postlane.store.plans`), run by a :class:`postlane.store.plans.Database`.

The operations live by role, as the protocols in :mod:`postlane.store.base` split them:
:mod:`~postlane.store.delivery`, :mod:`~postlane.store.operator`,
:mod:`~postlane.store.throttle_state`, :mod:`~postlane.store.history`,
:mod:`~postlane.store.suppressions`, :mod:`~postlane.store.feedback`,
:mod:`~postlane.store.webhooks` and :mod:`~postlane.store.access`. The two databases differ
only below: SQLite (:mod:`postlane.store.sqlite`) runs plans in its writer thread's group
commit or on its reader threads; PostgreSQL (:mod:`postlane.store.postgres`) runs them on a
pooled connection, one transaction each, and adds what only it has (``FOR UPDATE SKIP LOCKED``
inside its queries, row locks, LISTEN/NOTIFY).
"""

from __future__ import annotations

from postlane.store.access import SQLAccess
from postlane.store.delivery import SQLDelivery
from postlane.store.feedback import SQLFeedback
from postlane.store.history import SQLHistory
from postlane.store.operator import SQLOperator
from postlane.store.plans import Database, execute, fetch_one
from postlane.store.sql import Migration
from postlane.store.suppressions import SQLSuppressions
from postlane.store.throttle_state import SQLThrottle
from postlane.store.webhooks import SQLWebhooks


class SQLStore(
    SQLDelivery,
    SQLOperator,
    SQLThrottle,
    SQLHistory,
    SQLSuppressions,
    SQLFeedback,
    SQLWebhooks,
    SQLAccess,
):
    """Every store operation over a :class:`Database`. Each method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.dialect = db.dialect
        #: where the data lives, for messages (never includes a password)
        self.description = db.description

    @property
    def migration(self) -> Migration | None:
        """What opening did to the schema (None: nothing)."""
        return self.db.migration

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def database_clock(self) -> float | None:
        row = await self.db.read(lambda: fetch_one("database_clock"))
        return None if row is None or row["now"] is None else float(row["now"])

    async def check(self, now: float) -> None:
        """Make one small write now; raises :class:`postlane.errors.StoreUnavailable` when the
        store cannot take writes (what a readiness probe asks)."""
        await self.db.write(lambda: execute("record_check", {"now": now}))
