"""The history role, written once for both databases: the event log, the minutes' samples
behind charts and alert rules, attempts counted by class and destination, recoveries, and the
alerts' shared state (:class:`postlane.store.base.HistoryStore`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from postlane.errors import NotFound
from postlane.events import Event
from postlane.records import Sample
from postlane.store import rows
from postlane.store.plans import Plan, SQLRole, batch, execute, fetch, fetch_one


class SQLHistory(SQLRole):
    """Recorded history, the event log and alert state."""

    async def events_after(
        self, after: int | None, *, limit: int, types: Sequence[str] = ()
    ) -> list[Event]:
        """Events after the event ``after`` (None or 0, before any event: from the oldest
        kept), in order, at most ``limit``; only of ``types`` when given. Raises
        :class:`NotFound` for a cursor that is not kept (purged, or never was): reading on
        would skip events unseen."""

        def run() -> Plan[list[Event]]:
            tx, position = "0", 0
            if after:
                cursor = yield from fetch_one("event_cursor", {"id": after})
                if cursor is None:
                    raise NotFound(f"no event {after} is kept (expired by retention, or unknown)")
                tx, position = str(cursor["tx"]), int(cursor["id"])
            found = yield from fetch(
                "events_after",
                {
                    "tx": tx,
                    "after": position,
                    "any_type": not types,
                    "types": list(types),
                    "limit": limit,
                },
            )
            return [rows.event(row) for row in found]

        return await self.db.read(run)

    async def purge_events(self, before: float) -> int:
        """Forget events older than ``before`` (their retention)."""
        return await self.db.write(lambda: execute("purge_events", {"before": before}))

    async def record_samples(self, samples: Sequence[Sample]) -> bool:
        params = [sample.params() for sample in samples]
        result = await self.db.write(lambda: batch("insert_samples", params))
        return result.rowcount > 0

    async def samples(self, since: float) -> list[Sample]:
        found = await self.db.read(lambda: fetch("samples_since", {"since": since}))
        return [rows.sample(row) for row in found]

    async def finished_between(self, start: float, end: float) -> tuple[int, int, int]:
        row = await self.db.read(
            lambda: fetch_one("finished_between", {"start": start, "end": end})
        )
        assert row is not None  # an aggregate always has its row
        return int(row["sent"]), int(row["dead"]), int(row["hard_bounces"])

    async def event_types_between(
        self, start: float, end: float, types: Sequence[str]
    ) -> Mapping[str, int]:
        found = await self.db.read(
            lambda: fetch("event_types_between", {"start": start, "end": end, "types": list(types)})
        )
        return {str(row["type"]): int(row["n"]) for row in found}

    async def attempt_classes_between(self, start: float, end: float) -> Mapping[str, int]:
        found = await self.db.read(
            lambda: fetch("attempt_classes_between", {"start": start, "end": end})
        )
        return {str(row["class"]): int(row["n"]) for row in found}

    async def destination_replies(self, since: float) -> list[tuple[str, str, int]]:
        found = await self.db.read(lambda: fetch("destination_replies_since", {"since": since}))
        return [(str(r["destination"]), str(r["class"]), int(r["n"])) for r in found]

    async def purge_samples(self, before: float) -> int:
        return await self.db.write(lambda: execute("purge_samples", {"before": before}))

    async def claim_recoveries(self, since: float, *, limit: int = 1000) -> list[float]:
        found = await self.db.write(lambda: fetch("claim_recoveries", {"limit": limit}))
        return [float(r["seconds"]) for r in found if float(r["recovered_at"]) >= since]

    async def recoveries_after(self, after_id: int) -> list[tuple[int, float]]:
        found = await self.db.read(lambda: fetch("recoveries_after", {"after": after_id}))
        return [(int(row["id"]), float(row["seconds"])) for row in found]

    async def alert_transition(self, name: str, firing: bool, now: float) -> bool:
        query = "alert_fire" if firing else "alert_resolve"
        return bool(await self.db.write(lambda: execute(query, {"name": name, "now": now})))

    async def alerts_firing(self) -> list[tuple[str, float]]:
        found = await self.db.read(lambda: fetch("alerts_firing"))
        return [(str(row["name"]), float(row["since"])) for row in found]
