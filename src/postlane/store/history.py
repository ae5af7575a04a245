"""The history role, written once for both databases: the minutes' samples behind charts and
alert rules, attempts counted by class and destination, recoveries, and the alerts' shared
state (:class:`postlane.store.base.HistoryStore`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from postlane.records import (
    Sample,
)
from postlane.store import rows
from postlane.store.plans import (
    SQLRole,
    batch,
    execute,
    fetch,
    fetch_one,
)


class SQLHistory(SQLRole):
    """Recorded history and alert state."""

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

    async def recoveries_after(self, after_id: int) -> list[tuple[int, float]]:
        found = await self.db.read(lambda: fetch("recoveries_after", {"after": after_id}))
        return [(int(row["id"]), float(row["seconds"])) for row in found]

    async def alert_transition(self, name: str, firing: bool, now: float) -> bool:
        query = "alert_fire" if firing else "alert_resolve"
        return bool(await self.db.write(lambda: execute(query, {"name": name, "now": now})))

    async def alerts_firing(self) -> list[tuple[str, float]]:
        found = await self.db.read(lambda: fetch("alerts_firing"))
        return [(str(row["name"]), float(row["since"])) for row in found]
