"""The webhook role, written once for both databases: each outbound webhook endpoint's place in
the event log, its failures and pause, and which process sends to it now (a lease, as deliveries
have) (:class:`postlane.store.base.WebhookStore`)."""

from __future__ import annotations

from collections.abc import Sequence

from postlane.events import WebhookEndpointState
from postlane.store import rows
from postlane.store.plans import Plan, SQLRole, execute, fetch, fetch_one


class SQLWebhooks(SQLRole):
    """Outbound webhook endpoints' state."""

    async def claim_webhook_endpoint(
        self, name: str, owner: str, *, now: float, lease_until: float, start_after: int
    ) -> WebhookEndpointState | None:
        """Lease the endpoint ``name`` for ``owner`` (created at ``start_after`` the first
        time); None while another process holds it. Claiming again renews the lease."""

        def run() -> Plan[WebhookEndpointState | None]:
            params = {
                "name": name,
                "owner": owner,
                "now": now,
                "lease_until": lease_until,
                "cursor": start_after,
            }
            yield from execute("create_webhook_endpoint", params)
            row = yield from fetch_one("lease_webhook_endpoint", params)
            return None if row is None else rows.webhook_endpoint(row)

        return await self.db.write(run)

    async def release_webhook_endpoint(self, name: str, owner: str) -> None:
        await self.db.write(
            lambda: execute("release_webhook_endpoint", {"name": name, "owner": owner})
        )

    async def webhook_delivered(
        self, name: str, owner: str, *, previous: int, cursor: int, count: int, now: float
    ) -> bool:
        """Move the endpoint's cursor from ``previous`` to ``cursor`` (``count`` events
        delivered up to it) and clear its failures; False when ``owner`` no longer holds it or
        the cursor is no longer ``previous`` (an operator replayed meanwhile)."""
        params = {
            "name": name,
            "owner": owner,
            "previous": previous,
            "cursor": cursor,
            "count": count,
            "now": now,
        }
        return bool(await self.db.write(lambda: execute("webhook_delivered", params)))

    async def webhook_failed(
        self, name: str, owner: str, *, error: str, paused_until: float, now: float
    ) -> bool:
        """One more failure in a row; the endpoint waits until ``paused_until``."""
        params = {
            "name": name,
            "owner": owner,
            "error": error,
            "paused_until": paused_until,
            "now": now,
        }
        return bool(await self.db.write(lambda: execute("webhook_failed", params)))

    async def webhook_endpoints(self) -> list[WebhookEndpointState]:
        found = await self.db.read(lambda: fetch("webhook_endpoints"))
        return [rows.webhook_endpoint(row) for row in found]

    async def replay_webhook(self, name: str, *, after: int, now: float) -> bool:
        """Send again from the event after ``after`` (an operator's replay), at once."""
        params = {"name": name, "cursor": after, "now": now}
        return bool(await self.db.write(lambda: execute("replay_webhook", params)))

    async def forget_webhook_endpoints(self, keep: Sequence[str]) -> int:
        """Remove the state of endpoints no longer configured."""
        return await self.db.write(
            lambda: execute("forget_webhook_endpoints", {"names": list(keep)})
        )
