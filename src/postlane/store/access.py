"""The access role, written once for both databases: what every process of a store must agree
on about who may in: the random keys they share (behind VERP and unsubscribe tokens, the
dashboard's CSRF tokens) and the dashboard sessions logged out
(:class:`postlane.store.base.AccessStore`)."""

from __future__ import annotations

import secrets

from postlane.store.plans import Plan, SQLRole, execute, fetch_one


class SQLAccess(SQLRole):
    """Shared keys and dashboard logouts."""

    async def secret(self, name: str, now: float) -> bytes:
        """A random key made once and shared by every process of this store (the first to ask
        makes it)."""

        def run() -> Plan[bytes]:
            params = {"name": name, "value": secrets.token_bytes(32), "now": now}
            yield from execute("insert_secret", params)
            row = yield from fetch_one("secret", {"name": name})
            assert row is not None
            return bytes(row["value"])

        return await self.db.write(run)

    async def end_session(self, session_id: str, until: float, now: float) -> None:
        """Refuse the logged-out session ``session_id`` in every process until ``until``."""

        def run() -> Plan[None]:
            yield from execute("forget_logouts", {"now": now})
            yield from execute("end_session", {"session_id": session_id, "until": until})

        await self.db.write(run)

    async def session_ended(self, session_id: str, now: float) -> bool:
        params = {"session_id": session_id, "now": now}
        return await self.db.read(lambda: fetch_one("session_ended", params)) is not None
