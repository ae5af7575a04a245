"""The throttle-state role, written once for both databases: destinations' recorded pauses and
rates, shared by every process, and the deliveries that wait on them
(:class:`postlane.store.base.ThrottleStore`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from postlane.records import (
    WAITING_FOR_DESTINATION,
    Deferral,
    DestinationStatus,
    FleetShares,
    ProbeTurn,
)
from postlane.store import rows
from postlane.store.plans import Plan, Row, SQLRole, batch, execute, fetch, fetch_one


class SQLThrottle(SQLRole):
    """Destinations' shared state."""

    async def defer_unattempted(
        self, owner: str, deferrals: Sequence[Deferral], now: float, reason: str
    ) -> int:
        first: dict[int, Deferral] = {}
        for deferral in deferrals:  # a delivery listed twice: its first time wins
            first.setdefault(deferral.delivery_id, deferral)
        names = sorted({d.waits_for for d in first.values() if d.waits_for is not None})
        shared = {"owner": owner, "now": now, "reason": reason}
        lifted_since = False

        def run() -> Plan[int]:
            nonlocal lifted_since
            recorded = yield from self._lifts(names)
            deferred = []
            for d in first.values():
                # decided before an operator's lift it had not heard of: due now, not at the
                # end of the pause (or the slot of the slowed rate) that lift ended
                lifted = d.waits_for is not None and recorded.get(d.waits_for, 0) > d.lifts
                lifted_since = lifted_since or lifted
                deferred.append(
                    {"id": d.delivery_id, "next_attempt_at": now if lifted else d.until}
                )
            return (yield from batch("defer_unattempted", deferred, shared)).rowcount

        moved = await self.db.write(run)
        if lifted_since:  # this process has yet to adopt that lift: news for its workers
            self.db.destinations_changed()
        return moved

    async def defer_destination(
        self, destination: str, until: float, now: float, reason: str, *, lifts: int | None = None
    ) -> int | None:
        params = {"destination": destination, "until": until, "now": now, "reason": reason}

        def run() -> Plan[int | None]:
            if lifts is not None:
                recorded = yield from self._lifts([destination])
                if recorded.get(destination, 0) > lifts:
                    return None
            return (yield from execute("defer_destination", params))

        moved = await self.db.write(run)
        if moved is None:
            self.db.destinations_changed()
        return moved

    def _lifts(self, destinations: Sequence[str]) -> Plan[dict[str, int]]:
        """How many times an operator lifted each of ``destinations`` (those never lifted or
        never recorded: 0). Read in a deferral's transaction, before it defers: on SQLite no
        lift can commit in between (one writer), on PostgreSQL the lifts wait for the shared
        lock this takes, so a lift either comes first and is seen here, or comes after and
        calls back what this deferred."""
        if not destinations:
            return {}
        if self.dialect.row_locks:
            yield from execute("share_destination_lifts")
        found = yield from fetch("destination_lifts", {"destinations": list(destinations)})
        return {row["destination"]: int(row["lifts"]) for row in found}

    async def hasten(self, destination: str | None, now: float, reason: str) -> int:
        params = {"destination": destination, "now": now, "reason": reason}
        query = "hasten_all" if destination is None else "hasten_destination"

        def run() -> Plan[int]:
            # what waited for the fleet's slots is called back: its schedule starts again
            yield from self._forget_slots(None if destination is None else [destination])
            return (yield from execute(query, params))

        return await self.db.write(run)

    def _forget_slots(self, destinations: Sequence[str] | None) -> Plan[None]:
        if destinations is None:
            yield from execute("forget_all_destination_slots")
        else:
            names = {"destinations": list(destinations)}
            yield from execute("forget_destination_slots", names)

    async def take_destination_slots(
        self, destination: str, count: int, earliest: float, interval: float, latest: float
    ) -> float:
        """``count`` successive slots of ``destination``'s rate for the fleet, ``interval``
        apart, from its next free slot or ``earliest`` (if later), never past ``latest``;
        returns the first."""
        earliest = min(earliest, latest)
        params = {
            "destination": destination,
            "count": count,
            "earliest": earliest,
            "interval": interval,
            "latest": latest,
        }
        row = await self.db.write(lambda: fetch_one("take_destination_slots", params))
        assert row is not None  # an upsert's RETURNING always answers
        return float(row["next_slot"]) - count * interval

    async def save_destination_states(self, statuses: Sequence[DestinationStatus]) -> None:
        latest = {s.destination: s for s in statuses}  # one row per destination: the last wins
        states = [
            {
                "destination": s.destination,
                "rate": s.rate,
                "paused_until": s.paused_until,
                "reason": s.reason,
                "updated_at": s.updated_at,
                "lifts": s.lifts,
            }
            for s in latest.values()
        ]
        # a pause is news for every process: told at once, not at each one's next sync
        announce = any(s.paused_until is not None for s in latest.values())

        def run() -> Plan[None]:
            yield from batch("save_destination_states", states)
            if announce:
                yield from self._announce()

        await self.db.write(run)
        if announce:
            self.db.destinations_changed()

    def _announce(self) -> Plan[None]:
        """Tell other processes, at the commit, that a destination was paused or lifted."""
        if self.dialect.notify_destinations_query is not None:
            yield from execute(self.dialect.notify_destinations_query)

    async def wait_for_destination_news(self, timeout: float) -> bool:
        return await self.db.wait_for_destination_news(timeout)

    async def destination_states(self) -> list[DestinationStatus]:
        def run() -> Plan[list[DestinationStatus]]:
            sending = {
                r["destination"]: int(r["n"]) for r in (yield from fetch("sending_by_destination"))
            }
            states = {
                r["destination"]: rows.destination_status(r, sending.get(r["destination"], 0))
                for r in (yield from fetch("destination_states"))
            }
            for name, count in sending.items():
                if name not in states:
                    states[name] = DestinationStatus(name, None, None, None, None, count)
            return sorted(states.values(), key=lambda s: s.destination)

        return await self.db.read(run)

    async def lift_destinations(
        self, destinations: Sequence[str] | None, now: float, *, every_waiting: bool = False
    ) -> int:
        """End the pauses and slow-downs of ``destinations`` (None: all) and make due what
        they held back: their backlog a pause pushed to its end, and what waits for their
        rate or cap; with ``every_waiting`` (or None), everything waiting for any destination
        (a relay's limits hold back mail of every destination). Mail deferred for a retry of
        its own is left to its schedule; mail scheduled for later goes back to its time."""

        def run() -> Plan[int]:
            if self.dialect.row_locks:  # after the deferrals under way (see _lifts)
                yield from execute("lock_destination_lifts")
            if destinations is None:
                lifted = yield from fetch("lift_all_destinations", {"now": now})
                names = [row["destination"] for row in lifted]
            else:
                names = list(destinations)
                yield from execute("lift_destinations", {"destinations": names, "now": now})
            yield from self._announce()
            every = destinations is None or every_waiting
            yield from self._forget_slots(None if every else names)
            params = {"destinations": names, "now": now, "waiting": WAITING_FOR_DESTINATION}
            yield from execute("reschedule_destinations", params)
            made_due = yield from execute("flush_destinations", params)
            if destinations is None or every_waiting:
                waiting = {"now": now, "reason": WAITING_FOR_DESTINATION}
                made_due += yield from execute("hasten_all", waiting)
            return made_due

        made_due = await self.db.write(run)
        self.db.destinations_changed()
        return made_due

    async def share_destinations(
        self, owner: str, demands: Mapping[str, float], now: float, lease_until: float
    ) -> FleetShares:
        """Renew this process's demands on destinations until ``lease_until``, forget expired
        ones, and return every live demand on those destinations and how many processes hold
        shares (one transaction)."""
        rows_ = [{"destination": d, "demand": float(v)} for d, v in sorted(demands.items())]

        def run() -> Plan[FleetShares]:
            yield from execute("forget_expired_shares", {"now": now})
            yield from batch(
                "renew_shares", rows_, {"owner": owner, "now": now, "expires_at": lease_until}
            )
            found = yield from fetch("live_shares", {"destinations": sorted(demands), "now": now})
            owners = yield from fetch_one("live_share_owners", {"now": now})
            demands_by: dict[str, dict[str, float]] = {}
            since: dict[tuple[str, str], float] = {}
            for row in found:
                demands_by.setdefault(row["destination"], {})[row["owner"]] = float(row["demand"])
                since[(row["destination"], row["owner"])] = float(row["since"])
            return FleetShares(demands_by, int(owners["n"]) if owners else 0, since)

        return await self.db.write(run)

    async def take_fleet_slot(
        self, owner: str, destination: str, cap: int, now: float, lease_until: float
    ) -> bool:
        """One more send in flight to ``destination`` for ``owner``, if the live sends in
        flight of all processes stay within ``cap`` (the row lives as long as the owner's
        shares, renewed by :meth:`share_destinations`)."""
        params = {
            "owner": owner,
            "destination": destination,
            "cap": cap,
            "now": now,
            "expires_at": lease_until,
        }

        def run() -> Plan[bool]:
            if self.dialect.row_locks:
                yield from execute("lock_fleet_slots", {"destination": destination})
            return (yield from fetch_one("take_fleet_slot", params)) is not None

        return await self.db.write(run)

    async def take_probe(
        self,
        destination: str,
        owner: str,
        pause_end: float,
        now: float,
        timeout: float,
        *,
        presence_until: float,
    ) -> ProbeTurn:
        """Whether ``owner`` probes ``destination`` after its pause that ended at
        ``pause_end``, waits for another process's probe, or finds it open (one transaction).
        The probe's taker renews its presence in the fleet until ``presence_until``."""
        key = {"destination": destination}

        def run() -> Plan[ProbeTurn]:
            if self.dialect.row_locks:
                yield from execute("lock_destination_probe", key)
            row = yield from fetch_one("destination_probe", {**key, "now": now})
            turn = _probe_turn(row, owner, pause_end, now, timeout)
            if turn is ProbeTurn.PROBE:
                params = {**key, "pause_end": pause_end, "owner": owner, "now": now}
                yield from execute("take_destination_probe", params)
                # its presence is what tells the others its probe is under way: a process that
                # takes one lives, though its next sync (which renews it) may come late
                presence = {"owner": owner, "now": now, "expires_at": presence_until}
                yield from execute("renew_presence", presence)
            return turn

        return await self.db.write(run)

    async def end_probe(self, destination: str, owner: str, pause_end: float, opened: bool) -> None:
        """What ``owner``'s probe of ``destination`` after the pause that ended at
        ``pause_end`` found: the destination open, or failed (a longer pause)."""
        params = {
            "destination": destination,
            "owner": owner,
            "pause_end": pause_end,
            "outcome": "open" if opened else "failed",
        }
        await self.db.write(lambda: execute("end_destination_probe", params))

    async def give_fleet_slots(self, owner: str, destinations: Sequence[str]) -> None:
        """Sends that :meth:`take_fleet_slot` let go are over: one slot back per name."""
        counts = Counter(destinations)

        def run() -> Plan[None]:
            for name, n in sorted(counts.items()):
                params = {"owner": owner, "destination": name, "n": n}
                yield from execute("give_fleet_slots", params)

        await self.db.write(run)

    async def forget_shares(self, owner: str) -> None:
        """A process stops: its shares go back to the others at once."""
        await self.db.write(lambda: execute("forget_shares", {"owner": owner}))


def _probe_turn(
    row: Row | None, owner: str, pause_end: float, now: float, timeout: float
) -> ProbeTurn:
    """The probe after a pause, as the last probe's row says: one process probes, the others
    wait for its outcome. A probe of an earlier pause is over (this pause's probe is this
    process's); one under way is its process's to finish, for ``timeout`` seconds at most
    while that process lives; one that answered says open, or wait (its failure recorded a
    longer pause, which this process adopts at its next sync)."""
    if row is None or float(row["pause_end"]) < pause_end:
        return ProbeTurn.PROBE
    if row["outcome"] is None:
        if row["owner"] != owner and row["alive"] and now - float(row["started_at"]) < timeout:
            return ProbeTurn.WAIT
        return ProbeTurn.PROBE
    return ProbeTurn.OPEN if row["outcome"] == "open" else ProbeTurn.WAIT
