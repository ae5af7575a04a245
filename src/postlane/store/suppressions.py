"""The suppression role, written once for both databases: the addresses never to be sent to,
for every sender or one sender domain, mail of every lane or of some, for good or until they
expire
(:class:`postlane.store.base.SuppressionStore`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from postlane.cursors import SuppressionKey
from postlane.message import Lane
from postlane.records import Suppression
from postlane.store import rows
from postlane.store.plans import Plan, SQLRole, batch, execute, fetch


class SQLSuppressions(SQLRole):
    """The suppression list."""

    async def suppressions_of(self, addresses: Sequence[str]) -> list[Suppression]:
        lowered = sorted({address.strip().lower() for address in addresses})
        found = await self.db.read(lambda: fetch("suppressions_of", {"addresses": lowered}))
        return [rows.suppression(row) for row in found]

    async def list_suppressions(
        self, *, limit: int, after: SuppressionKey | None = None
    ) -> list[Suppression]:
        keyset = (
            {
                "created_at": after.created_at,
                "address": after.address,
                "scope": after.scope,
                "reason": after.reason,
            }
            if after is not None
            else {"created_at": None, "address": None, "scope": None, "reason": None}
        )
        found = await self.db.read(lambda: fetch("suppressions", {**keyset, "limit": limit}))
        return [rows.suppression(row) for row in found]

    async def add_suppression(self, suppression: Suppression) -> bool:
        """False when the address is already suppressed in that scope, for that reason, for
        those lanes (the first entry wins unless it has expired; one for more lanes widens
        it)."""
        params = [rows.suppression_params(suppression)]
        result = await self.db.write(lambda: batch("insert_suppression", params))
        return bool(result.rowcount)

    async def remove_suppression(
        self, address: str, scope: str | None = None, reason: str | None = None
    ) -> bool:
        """Take an address off the list, in one scope or (None) in all, for one reason or
        (None) all."""
        params = {
            "address": address.lower(),
            "scope": scope.lower() if scope else None,
            "reason": reason,
        }
        return bool(await self.db.write(lambda: execute("delete_suppression", params)))

    async def lift_suppressions(self, mail: Sequence[tuple[str, str, Lane]]) -> list[str]:
        """Remove the entries that stop mail of ``lane`` from ``sender`` to ``address`` (for
        every sender, or for the sender's domain), for each ``(address, sender, lane)``; the
        others stay (an unsubscribe from the bulk lane, when a dead letter of another lane is
        requeued; a complaint about another sender's mail). Returns the addresses that had
        some, in order (one transaction)."""
        addresses = sorted({address.lower() for address, _sender, _lane in mail})
        stopped: dict[tuple[str, str], set[Lane]] = {}
        for address, sender, lane in mail:
            for scope in ("*", rows.sender_domain(sender)):
                stopped.setdefault((address.lower(), scope), set()).add(lane)

        def run() -> Plan[list[str]]:
            found = yield from fetch("suppressed_among", {"addresses": addresses, "now": None})
            lifted: list[str] = []
            for row in found:
                held = rows.stopped_lanes(row)
                lanes = stopped.get((row["address"], row["scope"]), set())
                if not any(rows.stops(held, lane) for lane in lanes):
                    continue
                key = {"address": row["address"], "scope": row["scope"], "reason": row["reason"]}
                yield from execute("delete_suppression", key)
                if row["address"] not in lifted:
                    lifted.append(row["address"])
            return sorted(lifted)

        return await self.db.write(run)

    async def is_suppressed(
        self,
        addresses: Sequence[str],
        *,
        sender: str = "",
        lane: Lane | None = None,
        now: float | None = None,
    ) -> Mapping[str, bool]:
        stopped = await self.suppressed_mail([(a, sender, lane) for a in addresses], now=now)
        return dict(zip(addresses, stopped, strict=True))

    async def suppressed_mail(
        self, mail: Sequence[tuple[str, str, Lane | None]], *, now: float | None = None
    ) -> list[bool]:
        lowered = sorted({address.lower() for address, _sender, _lane in mail})
        found = await self.db.read(
            lambda: fetch("suppressed_among", {"addresses": lowered, "now": now})
        )
        listed = rows.scopes_by_address(found)
        return [rows.listed_for(listed, address, sender, lane) for address, sender, lane in mail]
