"""The suppression role, written once for both databases: the addresses never to be sent to
(:class:`postlane.store.base.SuppressionStore`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from postlane.records import (
    Suppression,
)
from postlane.store import rows
from postlane.store.plans import (
    SQLRole,
    batch,
    execute,
    fetch,
)


class SQLSuppressions(SQLRole):
    """The suppression list."""

    async def list_suppressions(self, *, limit: int) -> list[Suppression]:
        found = await self.db.read(lambda: fetch("suppressions", {"limit": limit}))
        return [rows.suppression(row) for row in found]

    async def add_suppression(self, suppression: Suppression) -> bool:
        params = [rows.suppression_params(suppression)]
        result = await self.db.write(lambda: batch("insert_suppression", params))
        return bool(result.rowcount)

    async def remove_suppression(self, address: str) -> bool:
        params = {"address": address.lower()}
        return bool(await self.db.write(lambda: execute("delete_suppression", params)))

    async def is_suppressed(self, addresses: Sequence[str]) -> Mapping[str, bool]:
        lowered = sorted({a.lower() for a in addresses})
        found = await self.db.read(lambda: fetch("suppressed_among", {"addresses": lowered}))
        listed = {row["address"] for row in found}
        return {a: a.lower() in listed for a in addresses}
